"""Reply batching: the replies given inside one scope leave in one write per connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Flushable(Protocol):
    """A connection that holds its replies until told to write them."""

    def write_due_replies(self) -> None:
        """Write the replies it holds that are due."""


class ReplyBatcher:
    """Replies given inside :meth:`hold` are written when it ends: one write per connection, not per reply.

    Built first and given to both the router (which answers a whole batch
    inside one scope) and the receiver (which answers a turn's probes inside
    one), so a connection with twenty messages in a batch gets one ``write``.
    Replies still leave in frame order; nested use is one scope.
    """

    def __init__(self) -> None:
        self.holding = False
        self._held: dict[Flushable, None] = {}  # an ordered set

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold every reply given inside; write them, connection by connection, at the end."""
        if self.holding:
            yield
            return
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
            held, self._held = self._held, {}
            for protocol in held:
                protocol.write_due_replies()

    def defer(self, protocol: Flushable) -> bool:
        """True (and ``protocol`` flushed at the end) when inside :meth:`hold`."""
        if self.holding:
            self._held[protocol] = None
            return True
        return False
