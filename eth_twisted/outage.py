"""Log trouble once when it starts and once when it ends, never once per attempt.

An :class:`Episode` follows one subject (an RPC endpoint's reachability, its trust, the
poller's polls); its docstring says which calls write a line, and how a subject that flaps
is kept to about two lines per ``flap_window``. docs/hostile-input.md (item 13) shows what
it replaced.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger
from twisted.python.failure import Failure

FLAP_WINDOW = 60.0
"""Seconds after a logged episode ends during which a new one is logged only if it lasts."""


class Episode:
    """The current episode of trouble of one subject, and what has been logged about it.

    :meth:`failed` is called on every failed attempt and :meth:`recovered` on every
    success; only the first failure of an episode and its end write a line, the end with
    the episode's duration, failure count and kinds. Everything else goes to debug.

    A subject that flaps (fails, recovers, fails again within ``flap_window`` seconds)
    does not write a pair of lines per flap: an episode that starts within
    ``flap_window`` of the last logged end is logged only once it has lasted
    ``flap_window`` seconds, and its start line counts the brief episodes that were not
    logged. So a subject writes at most about two lines per ``flap_window``, however
    often it is tried.

    ``start`` and ``end`` are logger format strings. Their fields: ``subject``,
    ``kind`` (the first kind of the episode), ``detail``, ``note`` (empty, or
    a parenthesised remark on a delayed or flapping start), ``duration``,
    ``failures`` and ``kinds`` (for example ``dns x3, connect x1``).
    ``split_kinds`` makes a change of kind end the episode and start another
    (for states whose kind matters more than their continuity).
    """

    def __init__(
        self,
        log: Logger,
        seconds: Callable[[], float],
        subject: str,
        *,
        start: str,
        end: str,
        flap_window: float = FLAP_WINDOW,
        split_kinds: bool = False,
    ) -> None:
        self.log = log
        self.seconds = seconds
        self.subject = subject
        self.start_format = start
        self.end_format = end
        self.flap_window = flap_window
        self.split_kinds = split_kinds
        self.kind: str | None = None
        """The first kind of the current episode; None while there is none."""
        self.started_at: float | None = None
        self.failures = 0
        self.kinds: dict[str, int] = {}
        self.logged = False
        self.lines = 0
        """Lines written so far (for tests and curious operators)."""
        self._last_end: float | None = None
        self._unlogged = 0

    @property
    def active(self) -> bool:
        """True during an episode."""
        return self.kind is not None

    def failed(self, kind: str, detail: str, failure: Failure | None = None) -> bool:
        """One failed attempt; True when this call wrote the episode's start line.

        ``failure`` (an unexpected error) is logged with its traceback, once,
        on the start line.
        """
        now = self.seconds()
        if self.kind is not None and self.split_kinds and kind != self.kind:
            self.recovered()
        if self.kind is None:
            self.kind, self.started_at, self.failures, self.kinds, self.logged = (
                kind,
                now,
                0,
                {},
                False,
            )
        assert self.started_at is not None
        self.failures += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.logged:
            self.log.debug(
                "{subject}: still failing ({kind}): {detail}",
                subject=self.subject,
                kind=kind,
                detail=detail,
            )
            return False
        lasted = now - self.started_at
        quiet = self._last_end is None or now - self._last_end >= self.flap_window
        if not quiet and lasted < self.flap_window:
            self.log.debug(
                "{subject}: failing again ({kind}): {detail}",
                subject=self.subject,
                kind=kind,
                detail=detail,
            )
            return False
        notes = []
        if lasted >= 1.0:
            notes.append(f"for {lasted:.0f} s, {self.failures} failures")
        if self._unlogged:
            notes.append(f"after {self._unlogged} brief episodes not logged")
        note = f" ({'; '.join(notes)})" if notes else ""
        if failure is not None:
            self.log.failure(
                self.start_format,
                failure,
                subject=self.subject,
                kind=self.kind,
                detail=detail,
                note=note,
            )
        else:
            self.log.warn(
                self.start_format, subject=self.subject, kind=self.kind, detail=detail, note=note
            )
        self.logged = True
        self.lines += 1
        self._unlogged = 0
        return True

    def recovered(self) -> float | None:
        """The attempt succeeded: end the episode (logging its end if its start was logged).

        Returns the episode's duration, or None when there was none.
        """
        if self.kind is None:
            return None
        assert self.started_at is not None
        now = self.seconds()
        duration = now - self.started_at
        if self.logged:
            kinds = ", ".join(f"{k} x{n}" for k, n in self.kinds.items())
            self.log.info(
                self.end_format,
                subject=self.subject,
                kind=self.kind,
                duration=duration,
                failures=self.failures,
                kinds=kinds,
            )
            self.lines += 1
            self._last_end = now
        else:
            self._unlogged += 1
        self.kind = None
        self.started_at = None
        self.logged = False
        return duration
