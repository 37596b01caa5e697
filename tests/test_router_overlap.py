"""The router's overlap mode: the record stores the next batch while the mirrors store this one."""

from __future__ import annotations

from twisted.internet import defer

from eth_twisted.errors import SinkUnavailable
from eth_twisted.model import Outcome
from tests.test_router import RecordingMirror, msg, setup, submit


class GatedMirror(RecordingMirror):
    """A mirror whose answers wait until the test releases them, one batch at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[defer.Deferred[list[Outcome]], list[Outcome]]] = []

    def store_batch(self, messages, verdicts=None):  # type: ignore[no-untyped-def]
        self.calls.append(([m.hash for m in messages], list(verdicts) if verdicts else None))
        d: defer.Deferred[list[Outcome]] = defer.Deferred()
        self.waiting.append((d, list(verdicts or [])))
        return d

    def release(self) -> None:
        d, verdicts = self.waiting.pop(0)
        d.callback(verdicts)


def test_record_stores_next_batch_while_mirror_works() -> None:
    """While the mirror holds batch 1, the record stores batch 2; nothing is answered before its mirror."""
    mirror = GatedMirror()
    router, record, clock, answers = setup([mirror], batch_delay=0.001, pipeline=True)
    submit(router, answers, msg(b"1"))
    clock.advance(0.001)
    submit(router, answers, msg(b"2"))
    clock.advance(0.001)
    assert record.batches == [1, 1]
    assert len(mirror.calls) == 1 and answers == {}
    mirror.release()
    assert answers == {b"1": ["OK"]}
    assert len(mirror.calls) == 2
    mirror.release()
    assert answers == {b"1": ["OK"], b"2": ["OK"]}


def test_at_most_one_stored_batch_waits_for_the_mirror() -> None:
    """A hung mirror stops the record after one more batch: stored work cannot pile up."""
    mirror = GatedMirror()
    router, record, clock, answers = setup([mirror], batch_delay=0.001, pipeline=True)
    for p in (b"1", b"2", b"3", b"4"):
        submit(router, answers, msg(p))
        clock.advance(0.001)
    assert record.batches == [1, 1]
    assert router.pending == 2
    mirror.release()  # batch 1 answered, batch 2 to the mirror, the record takes 3 and 4
    assert record.batches == [1, 1, 2]
    mirror.release()
    mirror.release()
    assert set(answers) == {b"1", b"2", b"3", b"4"}


def test_overlap_keeps_verdicts_failures_and_drain() -> None:
    """Mirrors get the record's verdicts, a failing record answers its code, drain waits for both stages."""
    mirror = GatedMirror()
    router, record, clock, answers = setup([mirror], batch_delay=0.001, pipeline=True)
    submit(router, answers, msg(b"a"))
    submit(router, answers, msg(b"a", ip="10.0.0.2"))
    clock.advance(0.001)
    record.fail_with = SinkUnavailable("memory", "down")
    submit(router, answers, msg(b"b"))
    drained = router.drain()
    assert not drained.called
    assert mirror.calls[0][1] == [Outcome.STORED, Outcome.DUPLICATE]
    mirror.release()
    assert drained.called
    assert answers == {b"a": ["OK", "DUP"], b"b": ["unavailable"]}
    assert len(mirror.calls) == 1  # a batch the record refused never reaches the mirror
