"""What several RPC endpoints agree on: the head to follow and the chain to follow.

Pure functions (no I/O, no clock), used by :class:`eth_twisted.client.rpc.RPCClient`
once per poll. A lying or broken endpoint among honest ones must cost only
itself, so neither answer is ever taken from one endpoint when others say
otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from eth_twisted.errors import ChainMismatch

RESET_ADVICE = (
    "If the chain itself changed (a dev node restarted from scratch, a new testnet), start over "
    "with --reset-cursor, which forgets the stored position and begins at the new chain's head."
)

Chain = tuple[int, str]
"""(chain id, lowercase genesis hash)."""


def agree(heads: Sequence[int], lag: int) -> int:
    """The head to follow of one round's ``heads``: see :func:`agreement`."""
    return agreement(heads, lag)[0]


def agreement(heads: Sequence[int], lag: int) -> tuple[int, int, int]:
    """``(head, median, support)`` of one round's answers.

    The median (the lower one of an even count) is where the endpoints
    agree: with fewer liars than honest endpoints it lies between honest
    answers, however far the liars go. The group is the answers from the
    median to ``lag`` blocks above it (endpoints a block or two ahead are
    normal); the head is the group's newest answer that a second endpoint
    of the group has also reached, so no block is fetched that only one
    endpoint claims while others answer nearby. ``support`` is the size of
    the group.
    """
    if not heads:
        raise ValueError("no heads to agree on")
    ordered = sorted(heads)
    median = ordered[(len(ordered) - 1) // 2]
    group = [h for h in ordered if median <= h <= median + lag]
    head = group[-1] if len(group) == 1 else group[-2]
    return head, median, len(group)


def choose_chain(
    shown: Sequence[tuple[str, Chain]], expected: Chain | None, chain_id: int | None
) -> Chain:
    """The chain to follow, from ``(endpoint label, chain)`` answers.

    Endpoints of another chain id than ``chain_id`` are left out
    first. With a stored cursor (``expected``) its chain is followed when
    any endpoint shows it; without one, the chain a strict majority shows.
    Raises :class:`ChainMismatch` (naming ``--reset-cursor``) otherwise.
    """
    advice = f"Point --rpc at nodes of one chain. {RESET_ADVICE}"
    seen = "; ".join(f"{label} is on chain id {c[0]} with genesis {c[1]}" for label, c in shown)
    pool = list(shown)
    if chain_id is not None:
        pool = [(label, c) for label, c in shown if c[0] == chain_id]
        if not pool:
            raise ChainMismatch(f"{seen}, but --chain-id is {chain_id}. {advice}")
    if expected is not None:
        if chain_id is not None and expected[0] != chain_id:
            raise ChainMismatch(
                f"the stored cursor belongs to chain id {expected[0]}, but --chain-id is {chain_id}. "
                f"{advice}"
            )
        if any(c == expected for _, c in pool):
            return expected
        raise ChainMismatch(
            f"{seen}, but the stored cursor belongs to chain id {expected[0]} with genesis {expected[1]}. "
            f"{advice}"
        )
    if not pool:
        raise ValueError("no chain shown")
    chain, count = Counter(c for _, c in pool).most_common(1)[0]
    if 2 * count > len(pool):
        return chain
    raise ChainMismatch(f"RPC endpoints disagree, and no chain has a majority: {seen}. {advice}")


def wrong_chain_message(
    shown: list[tuple[str, tuple[int, str]]], identity: tuple[int, str], *, single: bool
) -> str:
    """Why following stops when every endpoint (label, chain shown) is on another chain."""
    following = f"chain id {identity[0]} with genesis {identity[1]}"
    if single and shown:
        label, chain = shown[0]
        return (
            f"{label} changed chains: it now reports chain id {chain[0]} with genesis "
            f"{chain[1]}, but this client has been following {following}. {RESET_ADVICE}"
        )
    seen = "; ".join(
        f"{label} is on chain id {chain[0]} with genesis {chain[1]}" for label, chain in shown
    )
    return f"no RPC endpoint is on the followed {following} any more: {seen}. {RESET_ADVICE}"
