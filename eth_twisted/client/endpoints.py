"""One RPC endpoint and what the client has learned of it, and the RPC client's settings.

What it has learned: its state, cooldowns and trust (:class:`RPCEndpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from eth_twisted.client.jsonrpc import (
    Target,
    check_block,
    endpoint_label,
    hex_quantity,
    redact_url,
)
from eth_twisted.options import positive_float, setting
from eth_twisted.outage import Episode

RATE_LIMIT_BASE = 1.0
"""First cooldown after a rate limit without Retry-After; doubles per repeat."""


DEFAULT_RPC_URLS: tuple[str, ...] = (
    "https://ethereum-rpc.publicnode.com",
    "https://eth.llamarpc.com",
    "https://cloudflare-eth.com",
    "https://1rpc.io/eth",
)
"""Public mainnet endpoints that need no key (the default of ``--rpc``)."""


RATE_LIMIT_MAX = 60.0
"""Longest cooldown chosen by backoff alone."""


BACKOFF_MAX = 30.0
"""Longest time a failing endpoint stays at the back of the queue."""


AGREEMENT_MEMORY = 120.0
"""Seconds a head agreed by several endpoints keeps a lone endpoint from jumping far past it."""


TRANSPORT_KINDS = frozenset({"timeout", "connect", "connection-lost", "dns", "tls"})
"""Failures after which an endpoint must show its chain again before it is believed."""


RATE_LIMIT_KINDS = frozenset({"http-429", "rate-limit"})


UNUSABLE = frozenset({"far-ahead", "wrong-chain"})
"""Distrust states in which an endpoint is never asked for blocks."""


STATES = (
    "new",
    "ok",
    "failing",
    "cooling",
    "lagging",
    "far-ahead",
    "went-backwards",
    "wrong-chain",
)
"""What the ``eth_client_rpc_endpoint_state`` metric can say about an endpoint."""


@dataclass(frozen=True)
class RPCSettings:
    """What the RPC client is told: the ``--rpc`` endpoints and the ``--rpc-*`` options."""

    rpc: tuple[str, ...] = setting(
        DEFAULT_RPC_URLS,
        "JSON-RPC endpoint URL (repeatable; default: a short list of public mainnet endpoints)",
    )
    """The endpoint URLs, in order of preference (user:password@ is sent as basic auth)."""
    rpc_timeout: float = setting(
        10.0, "Seconds for one JSON-RPC call, headers and body", positive_float
    )
    max_body: int = 4 * 1024 * 1024
    """Largest answer body read, in bytes; a longer one fails ``too-large``."""
    lag_threshold: int = 5
    """Blocks an endpoint's head may stray from the agreed head before it is distrusted."""

    def check(self) -> None:
        """Raise ValueError naming ``--rpc`` (and never repeating a password) for an unusable URL."""
        if not self.rpc:
            raise ValueError("--rpc: at least one JSON-RPC endpoint is needed")
        for url in self.rpc:
            try:
                ws_target(url) if is_websocket(url) else Target.from_url(url)
            except ValueError as e:
                raise ValueError(f"--rpc: {e}, got {redact_url(url)!r}") from None
        if self.rpc_timeout <= 0:
            raise ValueError(f"--rpc-timeout: must be positive, got {self.rpc_timeout}")
        if self.max_body < 1 or self.lag_threshold < 0:
            raise ValueError("max_body must be at least 1 and lag_threshold at least 0")


@dataclass
class Agreement:
    """A head round's agreed head, its clock time, and how many endpoints reached the median."""

    head: int
    at: float
    support: int


@dataclass
class RPCEndpoint:
    """One node's URL (credentials split off) and what we have learned about it."""

    target: Target
    cooldown_until: float = 0.0
    """Rate limited: not asked at all before this clock time."""
    backoff_until: float = 0.0
    """Recently failing: asked only when no healthy endpoint is left before this time."""
    failures: int = 0
    rate_limits: int = 0
    verified: bool = False
    """Showed the followed chain id and genesis hash since its last transport failure."""
    chain: tuple[int, str] | None = None
    """The (chain id, genesis hash) it showed last."""
    wrong_chain_checks: int = 0
    """Checks in a row that found it on another chain (it is asked ever less often)."""
    last_head: int | None = None
    head_moved_at: float | None = None
    distrust: str | None = None
    """None when trusted, else why not: lagging, far-ahead, went-backwards or wrong-chain."""
    outage: Episode | None = field(default=None, repr=False)
    mistrust: Episode | None = field(default=None, repr=False)
    kind: str = "http"
    """``http`` or ``ws`` (requests over the endpoint's NodeSocket)."""
    raw_url: str = field(default="", repr=False)
    """The URL as configured (may hold credentials: never logged)."""
    socket: Any = field(default=None, repr=False)
    """The NodeSocket of a ``ws`` endpoint, once attached."""

    @property
    def label(self) -> str:
        """``scheme://host[:port]``: safe to log."""
        return self.target.label

    @property
    def url(self) -> str:
        """The URL requests go to (credentials removed; it may still hold a key in its path)."""
        return self.target.url

    @property
    def trusted(self) -> bool:
        """Not distrusted for its head or its chain."""
        return self.distrust is None

    @property
    def state(self) -> str:
        """One word for /metrics: an outage first, then distrust, else ok (or new)."""
        if self.outage is not None and self.outage.active:
            return "cooling" if self.outage.kind in RATE_LIMIT_KINDS else "failing"
        if self.distrust is not None:
            return self.distrust
        return "new" if self.last_head is None and not self.verified else "ok"

    @classmethod
    def from_url(cls, url: str) -> RPCEndpoint:
        """An endpoint for ``url``; ValueError (without the URL in it) for a bad one."""
        if is_websocket(url):
            return cls(target=ws_target(url), kind="ws", raw_url=url)
        return cls(target=Target.from_url(url), raw_url=url)


def is_websocket(url: str) -> bool:
    """Whether ``url`` is a ``ws://`` or ``wss://`` URL."""
    return url[:6].lower().startswith(("ws://", "wss://"))


def ws_target(url: str) -> Target:
    """The :class:`Target` of a ``ws(s)://`` URL: credentials split off as for HTTP."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError("expected a ws:// or wss:// URL with a host name")
    http = Target.from_url(urlunsplit(("http" + parts.scheme[2:], *parts[1:])))
    clean = "ws" + http.url[4:]
    return Target(url=clean, label=endpoint_label(clean), authorization=http.authorization)


def check_header(block: Any, label: str = "") -> dict[str, Any]:
    """A block header of unknown number (a push, a block by hash or tag), checked as check_block does."""
    number = hex_quantity(
        block.get("number") if isinstance(block, dict) else None, "block number", label
    )
    return check_block(block, number, label)
