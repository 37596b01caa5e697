"""A fake Redis client and blocking RESP helpers for the Redis sink tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from tests.support import redis_command, redis_host_for


def resp(port: int, *args: Any, host: str | None = None) -> Any:
    """One blocking Redis command (inspection only, never the code under test).

    Without ``host``: the shared Redis's host (``ETH_TEST_REDIS_HOST``), or loopback for a
    private redis-server of the test's own.
    """
    return redis_command(host or redis_host_for(port), port, *args)


def hgetall(port: int, key: str) -> dict[str, int]:
    """A Redis hash of counters as ``{field: int}``."""
    flat = resp(port, "HGETALL", key)
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class FakeRedis:
    """Answers commands with Deferreds the test fires (or a canned reply/error)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.pending: list[Deferred[Any]] = []
        self.replies: dict[str, Any] = {}
        self.disconnected = False

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls.append(args)
        reply = self.replies.get(str(args[0]))
        if isinstance(reply, Exception):
            return defer.fail(reply)
        if reply is not None:
            return defer.succeed(reply(args) if callable(reply) else reply)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def disconnect(self) -> Deferred[None]:
        self.disconnected = True
        return defer.succeed(None)
