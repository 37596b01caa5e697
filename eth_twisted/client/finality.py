"""Finality: the finalized (and safe) block, by the node's tags or by depth, sent as records.

:class:`FinalityTracker` looks every ``--finality-interval`` seconds. With ``tag`` it asks for
``eth_getBlockByNumber("finalized")`` and ``("safe")``; with ``depth:N`` the finalized block
is the held block N below the tip. Finality never goes backwards; a changed hash at a
finalized height is a finality violation (an alarm: logged, counted), never a silent
rewrite. With ``json`` payloads every move is a finality record in the outbox, after the
blocks it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.heads import HeadPipeline, number_of
from eth_twisted.client.jsonrpc import RPCFailure
from eth_twisted.client.rpc import RPCClient
from eth_twisted.link.payload import render_finalized
from eth_twisted.metrics import ClientMetrics
from eth_twisted.options import positive_float, setting
from eth_twisted.outage import Episode

log = Logger(namespace="eth_twisted.client.finality")

STATE_KEY = "finalized"
"""The outbox state key of the last finalized block sent ("number:hash")."""


@dataclass(frozen=True)
class FinalitySettings:
    """How finality is learned; the option fields are the client options of their names."""

    finality: str = setting(
        "tag",
        "Finality: tag (the node's finalized and safe blocks), depth:N (N blocks below the "
        "head), or off",
    )
    finality_interval: float = setting(5.0, "Seconds between finality checks", positive_float)

    @property
    def depth(self) -> int | None:
        """N of ``depth:N``, else None."""
        if self.finality.startswith("depth:"):
            return int(self.finality.split(":", 1)[1])
        return None

    def check(self) -> None:
        """Raise ValueError naming the option of a value that makes no sense."""
        mode = self.finality
        if mode not in ("tag", "off") and not mode.startswith("depth:"):
            raise ValueError(f"--finality: expected tag, depth:N or off, got {mode!r}")
        if mode.startswith("depth:"):
            try:
                depth = int(mode.split(":", 1)[1])
            except ValueError:
                raise ValueError(
                    f"--finality: depth:N needs a whole number, got {mode!r}"
                ) from None
            if not 0 <= depth <= 100_000:
                raise ValueError(f"--finality: depth must be 0..100000, got {depth}")
        if not self.finality_interval > 0:
            raise ValueError(f"--finality-interval: must be positive, got {self.finality_interval}")


class FinalityTracker(service.Service):
    """Follows the finalized block and appends a finality record whenever it moves.

    ``finalized`` is (number, hash) of the last finalized block accepted (restored from
    the outbox at start), ``safe`` the safe block with it; ``violations`` counts finalized
    hashes that changed.
    """

    name = "finality"  # type: ignore[assignment]

    def __init__(
        self,
        rpc: RPCClient,
        pipeline: HeadPipeline,
        settings: FinalitySettings | None = None,
        *,
        fmt: str = "html",
        clock: IReactorTime,
        metrics: ClientMetrics | None = None,
    ) -> None:
        self.rpc = rpc
        self.pipeline = pipeline
        self.settings = settings if settings is not None else FinalitySettings()
        self.settings.check()
        self.format = fmt
        self.clock = clock
        self.metrics = metrics
        self.finalized: tuple[int, str] | None = None
        self.safe: tuple[int, str] | None = None
        self.violations = 0
        self._reported: set[tuple[int, str]] = set()
        self._loop: LoopingCall | None = None
        self._in_flight: Deferred[None] | None = None
        self.trouble = Episode(
            log,
            self.clock.seconds,
            "finality",
            start="the finalized block cannot be read ({kind}): {detail}{note}",
            end="the finalized block is read again after {duration:.1f} s",
        )

    def startService(self) -> None:
        """Restore the last finalized block and start looking every interval."""
        super().startService()
        if self.settings.finality == "off":
            return
        stored = self.pipeline.outbox.get_state(STATE_KEY)
        if stored:
            number, block_hash = stored.split(":", 1)
            self.finalized = (int(number), block_hash)
            self.pipeline.finalized = self.finalized
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.settings.finality_interval, now=False).addErrback(
            lambda f: log.failure("the finality loop stopped", f)
        )

    def stopService(self) -> Deferred[None] | None:
        """Stop looking; cancel a look in flight."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._in_flight is not None:
            self._in_flight.cancel()
        return None

    def tick(self) -> Deferred[None] | None:
        """One look (none while one is in flight or before the chain is known)."""
        if self._in_flight is not None or self.pipeline.tip is None or self.rpc.identity is None:
            return None
        d = Deferred.fromCoroutine(self._look())
        self._in_flight = d
        d.addErrback(self._failed)
        d.addBoth(self._over)
        return d

    def _over(self, _: Any) -> None:
        self._in_flight = None

    def _failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):
            return
        if failure.check(RPCFailure):
            self.trouble.failed(failure.value.kind, str(failure.value))
        else:
            self.trouble.failed("error", "unexpected error", failure)

    async def _look(self) -> None:
        depth = self.settings.depth
        if depth is not None:
            tip = self.pipeline.tip
            assert tip is not None
            number = tip[0] - depth
            held = self.pipeline.held(number) if number >= 0 else None
            if held is None:
                return
            fin: tuple[int, str] = (number, held)
            safe: tuple[int, str] | None = None
        else:
            got = await self.rpc.get_tagged("finalized")
            if got is None:
                self.trouble.failed("no-tag", "the node knows no finalized block")
                return
            fin = (number_of(got), got["hash"])
            try:
                tagged = await self.rpc.get_tagged("safe")
            except RPCFailure:
                tagged = None
            safe = (number_of(tagged), tagged["hash"]) if tagged is not None else None
        self.trouble.recovered()
        await self.pipeline.run(lambda: self._accept(fin, safe))

    async def _accept(self, fin: tuple[int, str], safe: tuple[int, str] | None) -> str:
        """Take ``fin`` as finalized if it moves finality forward on the held chain."""
        last = self.finalized
        if last is not None and fin[0] < last[0]:
            return "behind"  # never backwards (another endpoint, or a moment earlier)
        if last is not None and fin[0] == last[0]:
            if fin[1] != last[1]:
                self._violation(fin, last)
            return "same"
        tip = self.pipeline.tip
        assert tip is not None
        if fin[0] > tip[0]:
            return "ahead"  # the tag and the head came from different moments: next time
        held = self.pipeline.held(fin[0])
        if held is not None and held != fin[1]:
            return "pending"  # the held chain has another block there: a reorg to follow first
        self.finalized, self.safe = fin, safe
        self.pipeline.finalized = fin
        self.pipeline.outbox.set_state(STATE_KEY, f"{fin[0]}:{fin[1]}")
        if self.metrics is not None:
            self.metrics.finalized_block.set(fin[0])
            if safe is not None:
                self.metrics.safe_block.set(safe[0])
        if self.format == "json":
            identity = self.rpc.identity
            assert identity is not None
            record = render_finalized(
                identity[0], fin[0], fin[1], *(safe if safe is not None else (None, None))
            )
            return self.pipeline.append_record(record)
        return "ok"

    def _violation(self, fin: tuple[int, str], last: tuple[int, str]) -> None:
        if fin in self._reported:
            return
        self._reported.add(fin)
        self.violations += 1
        if self.metrics is not None:
            self.metrics.finality_violations.labels("finalized-hash").inc()
        log.critical(
            "FINALITY VIOLATION: block {number} was finalized as {old}, the node now finalizes "
            "{new} at that height",
            number=fin[0],
            old=last[1],
            new=fin[1],
        )

    def status(self) -> dict[str, Any]:
        """The finalized and safe blocks, for /readyz and /api/status."""
        return {
            "mode": self.settings.finality,
            "finalized": _block(self.finalized),
            "safe": _block(self.safe),
            "violations": self.violations,
        }


def _block(value: tuple[int, str] | None) -> dict[str, Any] | None:
    return None if value is None else {"number": value[0], "hash": value[1]}
