"""The gate framework and its pending-handshake table."""

from __future__ import annotations

import pytest

from eth_twisted.link import gate as link_gate


def test_pending_table_picks_the_largest_group_first_to_reach_its_size() -> None:
    """PendingHandshakes: full, it evicts the oldest of the largest group; sizes follow adds and discards."""
    table = link_gate.PendingHandshakes(max_total=5)
    for name, group in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b"), ("c1", "c")]:
        assert table.add(name, group) is None
    assert table.add("c2", "c") == "a1", "a and b both hold 2; a got there first"
    assert table.add("c3", "c") == "b1", "b and c hold 2; b got there first"
    assert table.add("d1", "d") == "c1", "c holds 3"
    table.discard("c2")
    table.discard("c3")
    assert table.group_size("c") == 0 and len(table) == 3
    assert table.add("e1", "e") is None and table.add("e2", "e") is None
    assert table.add("e3", "e") == "e1"
    assert set(table) == {"a2", "b2", "d1", "e2", "e3"}


@pytest.mark.parametrize("shape", ["many-groups", "one-group"])
def test_pending_table_work_is_linear(shape: str) -> None:
    """A full table costs the same per add however large: 10x the connections, well under 30x the time.

    many-groups: every add evicts from a table of one-connection groups (a
    scan for the largest group would be quadratic); one-group: one address
    past its cap evicts its own oldest each time (a scan of the group would
    be quadratic).
    """
    import time

    def run(n: int) -> float:
        if shape == "many-groups":
            table = link_gate.PendingHandshakes(max_total=n // 2, max_per_group=4)
            groups = [f"g{i}" for i in range(n)]
        else:
            table = link_gate.PendingHandshakes(max_total=None, max_per_group=n // 2)
            groups = ["g"] * n
        start = time.perf_counter()
        for i, group in enumerate(groups):
            table.add(i, group)
        for i in range(n // 2, n):
            table.discard(i)
        return time.perf_counter() - start

    run(4000)  # warm up
    small = min(run(4000) for _ in range(3))
    large = min(run(40000) for _ in range(3))
    assert large / small < 30, f"10x the connections cost {large / small:.1f}x the time"
