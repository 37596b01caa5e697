"""The router: group commit, answers after commit, failing sinks, mirrors."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from eth_twisted.errors import SinkTimeout, SinkUnavailable
from eth_twisted.interfaces import ISink
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import Message, Outcome
from eth_twisted.server.router import BatchSettings, Router
from eth_twisted.sinks.memory import MemorySink


def msg(payload: bytes, ip: str = "10.0.0.1", block: int | None = None) -> Message:
    return Message.build(payload, ip, 1000.0, block)


class AlwaysUp:
    """The lifecycle of a fake sink that is always up: only ``store_batch`` differs."""

    def start(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def ping(self) -> defer.Deferred[None]:
        return defer.succeed(None)


@implementer(ISink)
class RecordingMirror(AlwaysUp):
    """A mirror that remembers the verdicts it was given, and can be made to fail or hang."""

    name = "mirror"

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[Outcome] | None]] = []
        self.fail: Exception | None = None
        self.hang = False

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> defer.Deferred[list[Outcome]]:
        self.calls.append(([m.hash for m in messages], list(verdicts) if verdicts else None))
        if self.hang:
            return defer.Deferred()
        if self.fail is not None:
            return defer.fail(self.fail)
        return defer.succeed(list(verdicts or []))


class HeldMemory(MemorySink):
    """A memory record whose batches are answered only when the test releases them, oldest first."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[defer.Deferred[None]] = []

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> defer.Deferred[list[Outcome]]:
        stored = super().store_batch(messages, verdicts)
        gate: defer.Deferred[None] = defer.Deferred()
        self.gates.append(gate)
        return gate.addCallback(lambda _: stored)  # type: ignore[return-value]

    def release(self) -> None:
        self.gates.pop(0).callback(None)


def setup(
    mirrors: Sequence[ISink] = (), record: MemorySink | None = None, **kw: object
) -> tuple[Router, MemorySink, Clock, dict[bytes, list[str]]]:
    clock = Clock()
    record = record if record is not None else MemorySink()
    kw.setdefault("concurrent_batches", 1)  # one batch at a time unless a test asks for more
    router = Router(
        record, mirrors, clock=clock, metrics=ServerMetrics(), settings=BatchSettings(**kw)
    )  # type: ignore[arg-type]
    answers: dict[bytes, list[str]] = {}
    return router, record, clock, answers


def short_timers(clock: Clock) -> list[object]:
    """The delayed calls due within 10 s: a batch_delay timer, not a 30 s batch_timeout."""
    return [c for c in clock.getDelayedCalls() if c.getTime() - clock.seconds() < 10.0]


def submit(router: Router, answers: dict[bytes, list[str]], m: Message) -> None:
    router.submit(m, lambda code: answers.setdefault(m.payload, []).append(code))


# -- the policy: at once with a free slot, collected while every slot is busy --------------


def test_an_idle_record_stores_a_lone_message_at_once() -> None:
    """With a free slot a message is stored and answered inside submit: no batch_delay, no timer."""
    router, record, clock, answers = setup(batch_delay=0.002, concurrent_batches=2)
    submit(router, answers, msg(b"a"))
    assert record.batches == [1]
    assert answers == {b"a": ["OK"]}
    assert clock.getDelayedCalls() == []


def test_messages_collected_while_every_slot_is_busy_go_when_a_slot_frees() -> None:
    """Two slots busy: later messages collect into one batch, stored the moment a slot frees.

    No timer stores it: the clock never moves. A hash twice in that batch is OK once, then DUP.
    """
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_delay=1.0, concurrent_batches=2)
    submit(router, answers, msg(b"a"))
    submit(router, answers, msg(b"b"))
    assert held.batches == [1, 1]  # each at once, a slot each
    for p in (b"c", b"d", b"c"):
        submit(router, answers, msg(p))
    assert held.batches == [1, 1] and router.pending == 3
    held.release()
    assert answers == {b"a": ["OK"]}
    assert held.batches == [1, 1, 3]  # the freed slot took the collected batch
    held.release()
    held.release()
    assert answers == {b"a": ["OK"], b"b": ["OK"], b"c": ["OK", "DUP"], b"d": ["OK"]}
    assert router.drain().called


def test_a_full_batch_is_stored_without_waiting_for_a_slot() -> None:
    """batch_size messages collected while the slot is busy are stored at once, beyond the slot.

    Only as many batches again as there are slots: past that the queue waits for a slot, with no timer.
    """
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_size=3, batch_delay=1.0)
    submit(router, answers, msg(b"x"))
    for p in (b"1", b"2", b"3"):
        submit(router, answers, msg(p))
    assert held.batches == [1, 3]
    submit(router, answers, msg(b"4"))
    assert held.batches == [1, 3] and short_timers(clock) == []
    held.release()
    assert held.batches == [1, 3] and answers == {b"x": ["OK"]}  # the slot is the full batch's
    assert len(short_timers(clock)) == 1  # 4 collects behind it, for at most batch_delay
    held.release()
    assert held.batches == [1, 3, 1]
    held.release()
    assert set(answers) == {b"x", b"1", b"2", b"3", b"4"}


def test_a_batch_of_batch_bytes_is_stored_without_waiting_for_a_slot() -> None:
    """Collected payload bytes reaching batch_bytes store the batch at once, whatever the count."""
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_bytes=1000, batch_delay=1.0)
    submit(router, answers, msg(b"x"))
    submit(router, answers, msg(b"a" * 500))
    assert held.batches == [1]
    submit(router, answers, msg(b"b" * 500))
    assert held.batches == [1, 2]


def test_batch_delay_bounds_the_wait_while_the_slots_stay_busy() -> None:
    """A batch collecting behind a busy slot is stored after batch_delay, not later."""
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_delay=0.005)
    submit(router, answers, msg(b"x"))
    submit(router, answers, msg(b"y"))
    clock.advance(0.004)
    assert held.batches == [1]
    clock.advance(0.001)
    assert held.batches == [1, 1]
    submit(router, answers, msg(b"z"))  # the slot and the place beyond it are taken: z waits
    assert short_timers(clock) == []
    clock.advance(1.0)
    assert held.batches == [1, 1]
    held.release()
    assert answers == {b"x": ["OK"]}
    held.release()
    assert held.batches == [1, 1, 1]  # a slot freed: z at once
    held.release()
    assert answers == {b"x": ["OK"], b"y": ["OK"], b"z": ["OK"]}


def test_answers_keep_the_order_batches_were_taken_whatever_order_they_commit() -> None:
    """Batches taken at once, full and overdue are answered in the order they were taken.

    The record commits them newest first; mirrors and answers still go oldest first.
    """
    router, record, mirror, clock, order = concurrent_setup(2)
    for p in (b"a1", b"a2", b"b1", b"b2", b"c1"):
        router.submit(msg(p), lambda code, p=p: order.append(p))
    assert [batch for batch, _ in record.pending] == [[b"a1"], [b"a2"], [b"b1", b"b2"]]
    clock.advance(0.002)  # c1 was collecting: overdue
    assert [batch for batch, _ in record.pending][3:] == [[b"c1"]]
    for index in (3, 2, 1):
        record.finish(index)
    assert order == [] and mirror.calls == []
    record.finish(0)
    assert order == [b"a1", b"a2", b"b1", b"b2", b"c1"]
    assert [calls for calls, _ in mirror.calls] == [
        [msg(b"a1").hash],
        [msg(b"a2").hash],
        [msg(b"b1").hash, msg(b"b2").hash],
        [msg(b"c1").hash],
    ]
    assert router.drain().called


# -- answers, failures, bounds ---------------------------------------------------------------


def test_record_failure_answers_its_code_and_recovers() -> None:
    """A failing record sink answers every message its retryable code; later batches succeed."""
    router, record, clock, answers = setup(batch_delay=0.001)
    record.fail_with = SinkUnavailable("memory", "down")
    submit(router, answers, msg(b"a"))
    clock.advance(0.001)
    assert answers == {b"a": ["unavailable"]}
    assert not router.health["memory"].up
    record.fail_with = None
    submit(router, answers, msg(b"a"))
    clock.advance(0.001)
    assert answers[b"a"] == ["unavailable", "OK"]
    assert router.health["memory"].up


def test_a_hung_batch_holds_its_slot_and_one_place_beyond() -> None:
    """While a batch hangs in the mirror, one overdue batch goes beyond the slot; the rest queues."""
    mirror = RecordingMirror()
    mirror.hang = True
    router, record, clock, answers = setup([mirror], batch_delay=0.001)
    submit(router, answers, msg(b"x"))
    for p in (b"y", b"z"):
        submit(router, answers, msg(p))
    clock.advance(0.001)
    assert record.batches == [1, 2]
    submit(router, answers, msg(b"w"))
    clock.advance(10)
    assert record.batches == [1, 2] and router.pending == 1
    assert answers == {}


def test_mirror_gets_the_record_verdicts() -> None:
    """The mirror is called after the record with the record's verdicts for the same messages."""
    mirror = RecordingMirror()
    held = HeldMemory()
    router, record, clock, answers = setup([mirror], record=held, batch_delay=1.0)
    submit(router, answers, msg(b"x"))
    submit(router, answers, msg(b"a"))
    submit(router, answers, msg(b"a", ip="10.0.0.2"))
    held.release()
    held.release()
    assert mirror.calls[1][1] == [Outcome.STORED, Outcome.DUPLICATE]
    assert answers == {b"x": ["OK"], b"a": ["OK", "DUP"]}


def test_mirror_failure_is_not_acknowledged() -> None:
    """When Redis fails, a message SQL committed is answered with Redis's code, not OK."""
    mirror = RecordingMirror()
    mirror.fail = SinkTimeout("mirror", "slow")
    router, record, clock, answers = setup([mirror], batch_delay=0.001)
    submit(router, answers, msg(b"a"))
    clock.advance(0.001)
    assert answers == {b"a": ["timeout"]}
    assert len(record.order) == 1  # committed: the resend will be DUP


def test_hung_sink_times_out() -> None:
    """A sink that never answers makes the batch fail with timeout after batch_timeout."""
    mirror = RecordingMirror()
    mirror.hang = True
    router, record, clock, answers = setup([mirror], batch_delay=0.001, batch_timeout=5.0)
    submit(router, answers, msg(b"a"))
    clock.advance(0.001)
    clock.advance(5.0)
    assert answers == {b"a": ["timeout"]}


def test_not_ready_answers_unavailable() -> None:
    """Before the sinks have started every message is answered unavailable."""
    router, record, clock, answers = setup()
    router.ready = False
    submit(router, answers, msg(b"a"))
    assert answers == {b"a": ["unavailable"]}
    assert record.order == []


def test_queue_bound_answers_busy() -> None:
    """Past max_pending queued messages the router answers busy instead of growing."""
    mirror = RecordingMirror()
    mirror.hang = True
    router, record, clock, answers = setup([mirror], batch_delay=0.001, max_pending=2, batch_size=1)
    for p in (b"1", b"2", b"3", b"4", b"5"):
        submit(router, answers, msg(p))
    assert record.batches == [1, 1]  # the slot and the place beyond it; 3 and 4 queue
    assert answers == {b"5": ["busy"]}


def test_observers_see_final_codes() -> None:
    """Batch observers get each message with its final code."""
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_delay=1.0)
    seen: list[tuple[list[bytes], list[str]]] = []
    router.observers.append(lambda ms, cs: seen.append(([m.payload for m in ms], list(cs))))
    submit(router, answers, msg(b"x"))
    submit(router, answers, msg(b"a"))
    submit(router, answers, msg(b"a"))
    held.release()
    held.release()
    assert seen == [([b"x"], ["OK"]), ([b"a", b"a"], ["OK", "DUP"])]


def test_drain_waits_for_queued_messages() -> None:
    """drain() fires once every queued message has been stored and answered."""
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_delay=1.0)
    submit(router, answers, msg(b"a"))
    submit(router, answers, msg(b"b"))
    drained = router.drain()
    held.release()
    assert not drained.called
    held.release()
    assert drained.called
    assert answers == {b"a": ["OK"], b"b": ["OK"]}


@implementer(ISink)
class ManualRecord(AlwaysUp):
    """A record whose batches finish when the test says, each with all-OK verdicts."""

    name = "manual"

    def __init__(self) -> None:
        self.pending: list[tuple[list[bytes], defer.Deferred[list[Outcome]]]] = []

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> defer.Deferred[list[Outcome]]:
        d: defer.Deferred[list[Outcome]] = defer.Deferred()
        self.pending.append(([m.payload for m in messages], d))
        return d

    def finish(self, index: int) -> None:
        payloads, d = self.pending[index]
        d.callback([Outcome.STORED] * len(payloads))


def concurrent_setup(
    concurrency: int,
) -> tuple[Router, ManualRecord, RecordingMirror, Clock, list[bytes]]:
    clock = Clock()
    record, mirror = ManualRecord(), RecordingMirror()
    router = Router(
        record,
        [mirror],
        clock=clock,
        metrics=ServerMetrics(),  # type: ignore[list-item]
        settings=BatchSettings(batch_size=2, batch_delay=0.002, concurrent_batches=concurrency),
    )
    order: list[bytes] = []
    return router, record, mirror, clock, order


def test_concurrency_one_has_one_slot_and_one_place_beyond() -> None:
    """With one slot a full batch may go beside the slot's batch; a third waits for an answer."""
    router, record, _, clock, order = concurrent_setup(1)
    for p in (b"a1", b"a2", b"b1", b"b2"):
        router.submit(msg(p), lambda code, p=p: order.append(p))
    clock.advance(0.01)
    assert [batch for batch, _ in record.pending] == [[b"a1"], [b"a2", b"b1"]]
    record.finish(0)
    assert order == [b"a1"]
    assert len(record.pending) == 2  # b2: the slot is the full batch's
    clock.advance(0.002)
    assert [batch for batch, _ in record.pending][2:] == [[b"b2"]]  # overdue: the place beyond
    record.finish(1)
    record.finish(2)
    assert order == [b"a1", b"a2", b"b1", b"b2"]


def test_a_failed_batch_does_not_block_the_next_in_concurrent_mode() -> None:
    """A batch whose record fails is answered with the sink's code, and the batch after it still goes on."""
    router, record, _, clock, order = concurrent_setup(2)
    codes: dict[bytes, str] = {}
    for p in (b"a1", b"a2", b"b1", b"b2"):
        router.submit(msg(p), lambda code, p=p: (order.append(p), codes.__setitem__(p, code)))
    assert [batch for batch, _ in record.pending] == [[b"a1"], [b"a2"], [b"b1", b"b2"]]
    record.finish(1)
    record.finish(2)
    record.pending[0][1].errback(SinkUnavailable("manual", "down"))
    assert order == [b"a1", b"a2", b"b1", b"b2"]
    assert codes == {b"a1": "unavailable", b"a2": "OK", b"b1": "OK", b"b2": "OK"}


def test_each_batch_is_answered_inside_one_answering_scope() -> None:
    """The router enters ``answering`` once per batch, around all of that batch's replies.

    The receiver holds its writes in it; the router enters it around nothing else.
    """
    held = HeldMemory()
    router, _, clock, _ = setup(record=held, batch_size=2, batch_delay=1.0)
    events: list[str] = []

    class Scope:
        def __enter__(self) -> None:
            events.append("enter")

        def __exit__(self, *exc: object) -> None:
            events.append("exit")

    router.answering = Scope
    for p in (b"a", b"b", b"c"):
        router.submit(msg(p), lambda code, p=p: events.append(f"{p.decode()}:{code}"))
    held.release()
    held.release()
    assert events == ["enter", "a:OK", "exit", "enter", "b:OK", "c:OK", "exit"]


def test_queue_byte_budget_answers_busy() -> None:
    """Past pending_budget payload bytes queued the router answers busy, whatever the count."""
    mirror = RecordingMirror()
    mirror.hang = True  # the first batch never finishes: everything after it queues
    router, record, clock, answers = setup(
        [mirror], batch_delay=0.001, batch_size=1, pending_budget=1000
    )
    submit(router, answers, msg(b"first"))  # taken into the (hanging) batch at once
    for i in range(4):
        submit(router, answers, msg(b"%d" % i + b"x" * 399))
    assert record.batches == [1, 1]  # 0 went beyond the slot (a full batch); 1 and 2 queue
    assert router.pending == 2 and router.pending_bytes == 800
    assert [k[:1] for k, v in answers.items() if v == ["busy"]] == [b"3"]
    assert router.metrics.registry.get_sample_value("eth_server_pending_bytes") == 800


def test_withdrawn_messages_leave_the_queue_and_free_their_bytes() -> None:
    """A cancelled ticket drops its message before a batch takes it; a taken one cannot be withdrawn."""
    held = HeldMemory()
    router, record, clock, answers = setup(record=held, batch_delay=1.0)
    submit(router, answers, msg(b"x"))  # the slot is busy: a and b wait
    ticket_a = router.submit(
        msg(b"a" * 100), lambda code: answers.setdefault(b"a", []).append(code)
    )
    submit(router, answers, msg(b"b"))
    assert ticket_a is not None and router.pending_bytes == 101
    ticket_a.cancel()
    ticket_a.cancel()  # twice is harmless
    assert router.pending == 1 and router.pending_bytes == 1
    held.release()
    held.release()
    assert [r.payload for r in record.order] == [b"x", b"b"]
    assert b"a" not in answers and answers[b"b"] == ["OK"]
    assert router.metrics.withdrawn._value.get() == 1


def test_a_taken_message_is_not_withdrawn() -> None:
    """Once in a batch, cancel() does nothing: the message is stored and answered."""
    clock = Clock()
    manual = ManualRecord()
    router = Router(
        manual,
        [],
        clock=clock,
        metrics=ServerMetrics(),
        settings=BatchSettings(batch_delay=0.001, concurrent_batches=1),
    )
    answers: dict[bytes, list[str]] = {}
    ticket = router.submit(msg(b"a"), lambda code: answers.setdefault(b"a", []).append(code))
    clock.advance(0.001)
    assert ticket is not None
    ticket.cancel()
    manual.finish(0)
    assert answers == {b"a": ["OK"]}


def test_mostly_withdrawn_queue_is_compacted() -> None:
    """Withdrawn entries never pile up: the queue is rebuilt once they outnumber the live ones."""
    mirror = RecordingMirror()
    mirror.hang = True
    router, record, clock, answers = setup([mirror], batch_delay=0.001, batch_size=1)
    submit(router, answers, msg(b"first"))
    clock.advance(0.001)
    tickets = [router.submit(msg(b"%d" % i), lambda code: None) for i in range(5000)]
    for t in tickets:
        assert t is not None
        t.cancel()
    assert router.pending == 0 and router.pending_bytes == 0
    assert len(router._queue) <= 1024 + 1


# -- the pipeline mode: the record stores the next batch while the mirrors store this one --


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
    submit(router, answers, msg(b"a"))  # stored at once, to the mirror
    submit(router, answers, msg(b"a", ip="10.0.0.2"))  # stored at once, waits for the mirror
    record.fail_with = SinkUnavailable("memory", "down")
    submit(router, answers, msg(b"b"))  # waits: a stored batch already waits for the mirror
    drained = router.drain()
    assert not drained.called
    mirror.release()
    assert answers == {b"a": ["OK"]}  # b's verdict waits its turn behind the stored batch
    mirror.release()
    assert drained.called
    assert [verdicts for _, verdicts in mirror.calls] == [[Outcome.STORED], [Outcome.DUPLICATE]]
    assert answers == {b"a": ["OK", "DUP"], b"b": ["unavailable"]}
    # a batch the record refused never reaches the mirror
