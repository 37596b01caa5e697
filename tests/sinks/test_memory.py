"""The sink contract against the in-memory record sink (the reference)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_twisted

from eth_twisted.sinks.memory import MemorySink
from tests.support.sink_contract import SinkContract


@pytest_twisted.async_yield_fixture
async def sink() -> AsyncIterator[MemorySink]:
    """A started memory sink."""
    s = MemorySink()
    await s.start()
    yield s
    await s.stop()


class TestMemorySink(SinkContract):
    """The memory sink keeps the contract every real sink is held to."""
