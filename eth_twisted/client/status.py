"""The client's own status (``GET /api/status`` on its site, ``eth status``).

Everything an operator far from the server needs to tell, from the client alone, whether it
is healthy and why not: each RPC endpoint (label only: credentials never leave), the head
source, the cursor, the outbox and its dead letters, the server link, the last reorg and
the finalized block. Built from what the services already hold; nothing here blocks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

STATUS_DEAD_LETTER_SCAN = 1000
"""Dead letters read to count them by code (the total is always exact)."""


def endpoint_status(endpoint: Any, agreed_head: int | None, now: float) -> dict[str, Any]:
    """One RPC endpoint as JSON: label (no credentials), kind, state, head, lag, failures."""
    head = endpoint.last_head
    cooling = max(endpoint.cooldown_until, endpoint.backoff_until)
    return {
        "url": endpoint.label,
        "kind": endpoint.kind,
        "state": endpoint.state,
        "last_head": head,
        "lag": None if head is None or agreed_head is None else agreed_head - head,
        "head_age": None if endpoint.head_moved_at is None else now - endpoint.head_moved_at,
        "failures": endpoint.failures,
        "rate_limits": endpoint.rate_limits,
        "cooling_until": cooling if cooling > now else None,
        "distrust": endpoint.distrust,
    }


def client_status(client: Any) -> dict[str, Any]:
    """The status document of an :class:`~eth_twisted.client.service.EthClientService`."""
    now = client.reactor.seconds()
    rpc = client.rpc
    ok, readiness = client.readiness()
    cursor = client.outbox.cursor()
    oldest = client.outbox.oldest_created_at()
    letters = client.outbox.dead_letters(limit=STATUS_DEAD_LETTER_SCAN)
    delivery = client.delivery
    last_reorg = getattr(client.poller.pipeline, "last_reorg", None)
    heads = client.heads.status()
    return {
        "ready": ok,
        "time": now,
        "endpoints": [endpoint_status(e, rpc.agreed_head, now) for e in rpc.endpoints],
        "agreed_head": rpc.agreed_head,
        "chain": None
        if rpc.identity is None
        else {"chain_id": rpc.identity[0], "genesis": rpc.identity[1]},
        "head_source": heads.get("source"),
        "sockets": heads.get("sockets", []),
        "cursor": None
        if cursor is None
        else {
            "chain_id": cursor.chain_id,
            "genesis": cursor.genesis_hash,
            "number": cursor.block_number,
            "hash": cursor.block_hash,
        },
        "poller": readiness.get("poller"),
        "outbox": {
            "depth": client.outbox.depth(),
            "free_slots": client.outbox.free_slots(),
            "oldest_age": None if oldest is None else max(0.0, now - oldest),
            "in_flight": delivery.in_flight,
        },
        "dead_letters": {
            "total": client.outbox.dead_letter_count(),
            "by_code": dict(Counter(letter.code for letter in letters)),
        },
        "server_link": {
            "endpoint": str(delivery.server),
            "state": "connected" if delivery.connected else "disconnected",
            "last_ack_at": delivery.last_ack_at,
        },
        "last_reorg": None
        if last_reorg is None
        else {
            "fork_number": last_reorg.fork_number,
            "depth": last_reorg.depth,
            "at": last_reorg.at,
            "below_finality": last_reorg.below_finality,
        },
        "finality": client.finality.status(),
    }
