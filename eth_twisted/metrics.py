"""Prometheus metrics, one registry per service.

Each service builds its own :class:`ServerMetrics` or :class:`ClientMetrics`
on a fresh ``CollectorRegistry``, so a server and a client in one process
(``eth run``) never collide. No metric carries a per-IP label: the number of
peers is unbounded, and per-client counts live in the stats API instead.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ServerMetrics:
    """Everything the server counts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "eth_server_messages_received", "Frames received (probes included)", registry=r
        )
        self.outcomes = Counter(
            "eth_server_messages",
            "Messages by outcome: stored, duplicate, or the ERR code",
            ["outcome"],
            registry=r,
        )
        self.replies = Counter(
            "eth_server_replies", "Replies written, by kind (OK, DUP, ERR)", ["kind"], registry=r
        )
        self.protocol_errors = Counter(
            "eth_server_protocol_errors", "Protocol violations by reason", ["reason"], registry=r
        )
        self.open_connections = Gauge(
            "eth_server_open_connections", "Open client connections", registry=r
        )
        self.connections = Counter("eth_server_connections", "Connections accepted", registry=r)
        self.refused_connections = Counter(
            "eth_server_refused_connections", "Connections refused by a cap", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "eth_server_batch_size",
            "Messages per sink batch",
            ["sink"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.sink_latency = Histogram(
            "eth_server_sink_latency_seconds",
            "Time a sink took to store one batch",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_failures = Counter(
            "eth_server_sink_failures",
            "Failed sink batches by sink and code",
            ["sink", "code"],
            registry=r,
        )
        self.sink_up = Gauge(
            "eth_server_sink_up", "1 when the sink's last operation succeeded", ["sink"], registry=r
        )
        self.reconciliations = Counter(
            "eth_server_redis_reconciliations",
            "Redis rebuilds from SQL, by result",
            ["result"],
            registry=r,
        )
        self.finality_violations = Counter(
            "eth_server_finality_violations",
            "Chain records contradicting finality, by kind: reorg (a reorg at or below the "
            "finalized block) or finalized (a finality record naming another hash)",
            ["kind"],
            registry=r,
        )
        self.reconciled_hashes = Counter(
            "eth_server_redis_reconciled_hashes",
            "Hashes added to Redis by reconciliation",
            registry=r,
        )
        self.paused_connections = Gauge(
            "eth_server_paused_connections",
            "Connections whose reading is paused (backpressure)",
            registry=r,
        )
        self.pending = Gauge(
            "eth_server_pending_messages", "Messages waiting for a sink", registry=r
        )
        self.pending_bytes = Gauge(
            "eth_server_pending_bytes",
            "Payload bytes of the messages waiting for a sink",
            registry=r,
        )
        self.withdrawn = Counter(
            "eth_server_withdrawn_messages",
            "Queued messages dropped before a batch took them: "
            "their deadline passed or their connection closed",
            registry=r,
        )


class ClientMetrics:
    """Everything the client counts."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.head = Gauge(
            "eth_client_rpc_head",
            "Latest head number seen per RPC endpoint",
            ["endpoint"],
            registry=r,
        )
        self.head_age = Gauge(
            "eth_client_rpc_head_age_seconds",
            "Seconds since each endpoint's head last moved",
            ["endpoint"],
            registry=r,
        )
        self.rpc_failures = Counter(
            "eth_client_rpc_failures",
            "Failed RPC calls by endpoint and kind",
            ["endpoint", "kind"],
            registry=r,
        )
        self.rpc_state = Enum(
            "eth_client_rpc_endpoint_state",
            "Each RPC endpoint's state (ok, failing, cooling, far-ahead, ...)",
            ["endpoint"],
            registry=r,
            states=[
                "new",
                "ok",
                "failing",
                "cooling",
                "lagging",
                "far-ahead",
                "went-backwards",
                "wrong-chain",
            ],
        )
        self.agreed_head = Gauge(
            "eth_client_rpc_agreed_head",
            "Head the RPC endpoints agree on (the one followed)",
            registry=r,
        )
        self.polls = Counter(
            "eth_client_polls",
            "Poll rounds by result (ok or the failure kind)",
            ["result"],
            registry=r,
        )
        self.last_poll_success = Gauge(
            "eth_client_last_successful_poll_timestamp",
            "Unix time of the last successful poll",
            registry=r,
        )
        self.cursor = Gauge(
            "eth_client_cursor_block", "Block number of the last block enqueued", registry=r
        )
        self.blocks_enqueued = Counter(
            "eth_client_blocks_enqueued", "Blocks rendered and put in the outbox", registry=r
        )
        self.gaps_skipped = Counter(
            "eth_client_gap_blocks_skipped", "Blocks skipped past --max-gap", registry=r
        )
        self.outbox_full = Counter(
            "eth_client_outbox_full", "Polls that found the outbox full", registry=r
        )
        self.outbox_depth = Gauge(
            "eth_client_outbox_depth", "Messages waiting for an ack", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "eth_client_outbox_oldest_age_seconds",
            "Age of the oldest unacknowledged message",
            registry=r,
        )
        self.dead_letters = Counter(
            "eth_client_dead_letters",
            "Messages moved to the dead-letter table",
            ["code"],
            registry=r,
        )
        self.reconnects = Counter(
            "eth_client_reconnects", "Connections made to the server", registry=r
        )
        self.link_up = Gauge(
            "eth_client_server_link_up", "1 while connected to the server", registry=r
        )
        self.sent = Counter(
            "eth_client_frames_sent", "Frames written to the server (resends included)", registry=r
        )
        self.replies = Counter(
            "eth_client_replies", "Replies from the server by kind and code", ["kind"], registry=r
        )
        self.ws_state = Enum(
            "eth_client_ws_state",
            "Each node WebSocket's state",
            ["endpoint"],
            registry=r,
            states=["down", "connecting", "open", "subscribed"],
        )
        self.ws_reconnects = Counter(
            "eth_client_ws_reconnects",
            "Node WebSocket connections subscribed after the first",
            ["endpoint"],
            registry=r,
        )
        self.ws_resubscribes = Counter(
            "eth_client_ws_resubscribes",
            "newHeads subscriptions renewed on an open node WebSocket",
            ["endpoint"],
            registry=r,
        )
        self.ws_invalid = Counter(
            "eth_client_ws_invalid_messages",
            "Node WebSocket messages dropped as malformed, by kind",
            ["endpoint", "kind"],
            registry=r,
        )
        self.ws_heartbeat_misses = Counter(
            "eth_client_ws_heartbeat_misses",
            "Node WebSocket connections dropped for an unanswered heartbeat",
            ["endpoint"],
            registry=r,
        )
        self.ack_timeouts = Counter(
            "eth_client_ack_timeouts", "Connections dropped for a missing ack", registry=r
        )
        self.heads_received = Counter(
            "eth_client_heads_received",
            "Headers taken by the head pipeline, by source (push, poll, backfill)",
            ["source"],
            registry=r,
        )
        self.heads_duplicate = Counter(
            "eth_client_heads_duplicate",
            "Headers already held (deduped by hash), by source",
            ["source"],
            registry=r,
        )
        self.reorgs = Counter("eth_client_reorgs", "Reorgs followed", registry=r)
        self.reorg_depth = Histogram(
            "eth_client_reorg_depth",
            "Blocks that stopped being canonical per reorg",
            buckets=(1, 2, 3, 5, 10, 20, 64, 128, 256),
            registry=r,
        )
        self.finality_violations = Counter(
            "eth_client_finality_violations",
            "Reorgs at or below the finalized block, and finalized blocks whose hash changed",
            ["kind"],
            registry=r,
        )
        self.finalized_block = Gauge(
            "eth_client_finalized_block", "Number of the finalized block", registry=r
        )
        self.safe_block = Gauge("eth_client_safe_block", "Number of the safe block", registry=r)
        self.head_source = Enum(
            "eth_client_head_source",
            "Where new heads come from: push (a WebSocket subscription) or poll",
            states=["push", "poll"],
            registry=r,
        )
        self.watchdog_checks = Counter(
            "eth_client_watchdog_checks",
            "Silences of a subscription compared with the polled head",
            ["endpoint"],
            registry=r,
        )
        self.stalls = Counter(
            "eth_client_subscription_stalls",
            "Silent subscriptions confirmed by a polled head above the last push, by action taken",
            ["endpoint", "action"],
            registry=r,
        )
