"""JSON-RPC over HTTP to one or more Ethereum nodes, through an injected ``IAgent``.

One call (:mod:`eth_twisted.jsonrpc`) is one POST through ``twisted.web``'s
``Agent`` (by default on its own persistent pool), guarded by a single
timeout that covers the request *and* the body, capped in bytes (headers
included), never redirected or inflated, and checked three ways before its
result is believed: the HTTP status, the body (it must be JSON) and the
JSON-RPC envelope. Every quantity is bounded while it is parsed.

Every failure has a *kind* (``dns``, ``connect``, ``timeout``, ``tls``,
``connection-lost``, ``http-3xx``, ``http-429``, ``http-4xx``, ``http-5xx``,
``too-large``, ``bad-encoding``, ``bad-json``, ``bad-envelope``,
``rpc-error``, ``rate-limit``, ``null-result``, ``bad-result``), is counted
per endpoint, and moves the call to the next endpoint. An exception raised
while reading one endpoint's answer is that endpoint's ``bad-result``, never
the caller's. Rate limits (HTTP 429, JSON-RPC -32005/-32007, "rate limit" in
the message) put the endpoint in a cooldown that honours ``Retry-After``
(seconds or an HTTP date) or else backs off exponentially; other failures
put it at the back of the queue for a short, growing while. An
endpoint's outage is logged once when it starts and once when it ends, with
its duration (:class:`eth_twisted.outage.Episode`), and so is each time it
is not trusted.

Endpoints are identified in logs and metrics by ``scheme://host[:port]``
only: providers put API keys in the path or the query, and a URL's
``user:password@`` becomes a basic-auth header that is never logged.

An endpoint is used only once it has shown the same chain id and genesis
hash as every other endpoint, the ``--chain-id`` option and the stored
cursor; after a transport failure it shows them again before its answers
count, so a node restarted on a new chain is caught (:class:`ChainMismatch`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.errors import ChainMismatch
from eth_twisted.jsonrpc import (
    MAX_CHAIN_ID,
    RETRY_AFTER_MAX,
    STALE_CONNECTION,
    ResponseTooLarge,
    RPCFailure,
    Target,
    cancelled,
    capped_agent,
    check_block,
    classify,
    collect_capped,
    endpoint_label,
    has_reason,
    hex_quantity,
    is_tls_failure,
    parse_envelope,
    parse_retry_after,
    post,
    reasons,
    status_failure,
)
from eth_twisted.metrics import ClientMetrics
from eth_twisted.outage import Episode

__all__ = [
    "DEFAULT_RPC_URLS", "RETRY_AFTER_MAX", "RPCClient", "RPCEndpoint", "RPCFailure",
    "check_block", "collect_capped", "endpoint_label", "parse_retry_after",
]

log = Logger(namespace="eth_twisted.rpc")

DEFAULT_RPC_URLS: tuple[str, ...] = (
    "https://ethereum-rpc.publicnode.com",
    "https://eth.llamarpc.com",
    "https://cloudflare-eth.com",
    "https://1rpc.io/eth",
)
"""Public mainnet endpoints that need no key (overridable with ``--rpc``)."""

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_LAG_THRESHOLD = 5

RATE_LIMIT_BASE = 1.0
"""First cooldown after a rate limit without Retry-After; doubles per repeat."""
RATE_LIMIT_MAX = 60.0
"""Longest cooldown chosen by backoff alone."""
BACKOFF_MAX = 30.0
"""Longest time a failing endpoint stays at the back of the queue."""

TRANSPORT_KINDS = frozenset({"timeout", "connect", "connection-lost", "dns", "tls"})
"""Failures after which an endpoint must show its chain again before it is believed."""
RATE_LIMIT_KINDS = frozenset({"http-429", "rate-limit"})


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
    """Showed the expected chain id and genesis hash since its last transport failure."""
    last_head: int | None = None
    head_moved_at: float | None = None
    trusted: bool = True
    state: str = "new"
    outage: Episode | None = field(default=None, repr=False)
    mistrust: Episode | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``scheme://host[:port]``: safe to log."""
        return self.target.label

    @property
    def url(self) -> str:
        """The URL requests go to (credentials removed; it may still hold a key in its path)."""
        return self.target.url

    @classmethod
    def from_url(cls, url: str) -> RPCEndpoint:
        """An endpoint for ``url``; ValueError (without the URL in it) for a bad one."""
        return cls(target=Target.from_url(url))


def _default_agent(clock: Any, timeout: float, max_body: int) -> tuple[Any, Any]:
    from twisted.internet import reactor as global_reactor
    from twisted.internet.interfaces import IReactorTCP
    from twisted.web.client import HTTPConnectionPool

    reactor = clock if IReactorTCP.providedBy(clock) else global_reactor
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return capped_agent(reactor, max_body, timeout, pool), pool


class RPCClient:
    """JSON-RPC calls with failover, cooldowns, head ranking and chain verification.

    ``agent`` is an ``IAgent`` (``treq.testing.RequestTraversalAgent`` in
    tests); by default a ``twisted.web.client.Agent`` with its own persistent
    connection pool, closed by :meth:`close`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        agent: Any = None,
        clock: IReactorTime | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_body: int = DEFAULT_MAX_BODY,
        lag_threshold: int = DEFAULT_LAG_THRESHOLD,
        metrics: ClientMetrics | None = None,
    ) -> None:
        if not urls:
            raise ValueError("at least one RPC URL is needed")
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.clock: IReactorTime = clock  # type: ignore[assignment]
        self.endpoints = [RPCEndpoint.from_url(u) for u in urls]
        for ep in self.endpoints:
            ep.outage = Episode(
                log, self.clock.seconds, ep.label,
                start="RPC endpoint {subject} is failing ({kind}): {detail}{note}",
                end="RPC endpoint {subject} answers again after {duration:.1f} s ({failures} failures: {kinds})",
            )
            ep.mistrust = Episode(
                log, self.clock.seconds, ep.label, split_kinds=True,
                start="RPC endpoint {subject} is not trusted ({kind}): {detail}{note}",
                end="RPC endpoint {subject} is trusted again after {duration:.1f} s (was {kind})",
            )
        self._pool = None
        if agent is None:
            agent, self._pool = _default_agent(self.clock, timeout, max_body)
        self.agent = agent
        self.timeout = timeout
        self.max_body = max_body
        self.lag_threshold = lag_threshold
        self.metrics = metrics
        self._next_id = 0
        self.identity: tuple[int, str] | None = None
        """(chain id, genesis hash) every endpoint has shown, once known."""
        self._identity_source = ""
        self._announced: tuple[int, str] | None = None
        self._expected: tuple[int, str] | None = None
        self._chain_id_option: int | None = None
        self.best_head: int | None = None

    # -- public calls ------------------------------------------------------

    def block_number(self) -> Deferred[int]:
        """The head number of the first endpoint that answers."""
        return Deferred.fromCoroutine(self._block_number())

    async def _block_number(self) -> int:
        _, head = await self._call(
            "eth_blockNumber", [], check=lambda r, label: hex_quantity(r, "eth_blockNumber", label))
        return cast(int, head)

    def get_block(self, number: int) -> Deferred[dict[str, Any]]:
        """Block ``number``'s header fields from the best endpoint that has it.

        The result holds ``number``, ``hash``, ``parentHash`` and
        ``timestamp`` (checked and bounded). A ``null`` answer means that
        node has not got the block yet: the call moves on to another endpoint
        and fails ``null-result`` if none has it.
        """
        return Deferred.fromCoroutine(self._get_block(number))

    async def _get_block(self, number: int) -> dict[str, Any]:
        _, block = await self._call(
            "eth_getBlockByNumber", [hex(number), False], want=number,
            check=lambda result, label: check_block(result, number, label),
        )
        return cast(dict[str, Any], block)

    def chain_id(self) -> Deferred[int]:
        """``eth_chainId`` of the first endpoint that answers."""
        return Deferred.fromCoroutine(self._chain_id())

    async def _chain_id(self) -> int:
        _, chain_id = await self._call(
            "eth_chainId", [], check=lambda r, label: hex_quantity(r, "eth_chainId", label, MAX_CHAIN_ID))
        return cast(int, chain_id)

    def genesis_hash(self) -> Deferred[str]:
        """Lowercase hash of block 0, from the first endpoint that answers."""
        return Deferred.fromCoroutine(self._genesis_hash())

    async def _genesis_hash(self) -> str:
        block = await self._get_block(0)
        return str(block["hash"])

    def head_round(self) -> Deferred[int]:
        """Ask every usable endpoint for its head; fire with the best trusted one.

        An endpoint whose head went below its own previous answer, or lags
        the best by more than ``lag_threshold`` blocks, is not trusted this
        round. Fails with :class:`RPCFailure` when no endpoint is trusted.
        """
        return Deferred.fromCoroutine(self._head_round())

    def verify_chain(
        self, expected: tuple[int, str] | None, chain_id_option: int | None = None
    ) -> Deferred[tuple[int, str]]:
        """Check that every endpoint that answers is on one chain, the one expected.

        ``expected`` is ``(chain_id, genesis_hash)`` from the stored cursor, or
        None. Fires with the chain's ``(chain_id, genesis_hash)``. Raises
        :class:`ChainMismatch` (its message names ``--reset-cursor``) on any
        disagreement, and :class:`RPCFailure` when no endpoint answered.
        Endpoints that did not answer are checked before their first use.
        """
        return Deferred.fromCoroutine(self._verify_chain(expected, chain_id_option))

    def close(self) -> Deferred[None]:
        """Close the connection pool this client made (nothing when ``agent`` was injected)."""
        if self._pool is not None:
            return self._pool.closeCachedConnections()  # type: ignore[no-any-return]
        return defer.succeed(None)

    def invalidate(self) -> None:
        """Make every endpoint show its chain again before its next answer counts."""
        for ep in self.endpoints:
            ep.verified = False

    # -- chain identity ----------------------------------------------------

    async def _verify_chain(
        self, expected: tuple[int, str] | None, chain_id_option: int | None
    ) -> tuple[int, str]:
        self._expected = (expected[0], expected[1].lower()) if expected is not None else None
        self._chain_id_option = chain_id_option
        self.identity = None
        self._identity_source = ""
        self.invalidate()
        now = self.clock.seconds()
        candidates = [ep for ep in self.endpoints if ep.cooldown_until <= now] or list(self.endpoints)
        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self._ensure_verified(ep)) for ep in candidates],
            consumeErrors=True,
        )
        failures: list[RPCFailure] = []
        for ok, value in results:
            if not ok:
                failures.append(_rpc_failure(value))
        if self.identity is None:
            raise self._exhausted("chain verification", failures)
        if self.identity != self._announced:  # once per chain, not once per outage
            self._announced = self.identity
            log.info(
                "RPC chain verified: chain id {chain_id}, genesis {genesis} ({count} of {total} endpoints answered)",
                chain_id=self.identity[0], genesis=self.identity[1],
                count=len(candidates) - len(failures), total=len(self.endpoints),
            )
        return self.identity

    async def _ensure_verified(self, ep: RPCEndpoint) -> None:
        if ep.verified:
            return
        raw_id = await self._request(ep, "eth_chainId", [])
        raw_genesis = await self._request(ep, "eth_getBlockByNumber", ["0x0", False])
        try:
            chain_id = hex_quantity(raw_id, "eth_chainId", ep.label, MAX_CHAIN_ID)
            genesis = check_block(raw_genesis, 0, ep.label)["hash"]
        except RPCFailure as e:
            self._record_failure(ep, e, "eth_chainId")
            raise
        self._check_identity(ep, chain_id, genesis)
        ep.verified = True

    def _check_identity(self, ep: RPCEndpoint, chain_id: int, genesis: str) -> None:
        seen = f"{ep.label} is on chain id {chain_id} with genesis {genesis}"
        advice = (
            "Point --rpc at nodes of one chain. If the chain itself changed (a dev node "
            "restarted from scratch, a new testnet), start over with --reset-cursor, which "
            "forgets the stored position and begins at the new chain's head."
        )
        if self._chain_id_option is not None and chain_id != self._chain_id_option:
            raise ChainMismatch(f"{seen}, but --chain-id is {self._chain_id_option}. {advice}")
        if self._expected is not None and (chain_id, genesis) != self._expected:
            raise ChainMismatch(
                f"{seen}, but the stored cursor belongs to chain id {self._expected[0]} with "
                f"genesis {self._expected[1]}. {advice}"
            )
        if self.identity is not None and (chain_id, genesis) != self.identity:
            if ep.label == self._identity_source:
                raise ChainMismatch(
                    f"{ep.label} changed chains: it now reports chain id {chain_id} with genesis "
                    f"{genesis}, but this client has been following chain id {self.identity[0]} "
                    f"with genesis {self.identity[1]}. {advice}"
                )
            raise ChainMismatch(
                f"RPC endpoints disagree: {seen}, but {self._identity_source} is on chain id "
                f"{self.identity[0]} with genesis {self.identity[1]}. {advice}"
            )
        if self.identity is None:
            self.identity = (chain_id, genesis)
            self._identity_source = ep.label

    # -- head ranking ------------------------------------------------------

    async def _head_round(self) -> int:
        candidates = self._usable(prefer_healthy=True)
        if not candidates:
            raise self._cooling()
        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self._head_of(ep)) for ep in candidates], consumeErrors=True
        )
        answers: list[tuple[RPCEndpoint, int]] = []
        failures: list[RPCFailure] = []
        for ep, (ok, value) in zip(candidates, results, strict=True):
            if ok:
                answers.append((ep, cast(int, value)))
            else:
                failures.append(_rpc_failure(value))
        if not answers:
            raise self._exhausted("eth_blockNumber", failures)
        now = self.clock.seconds()
        forward: list[tuple[RPCEndpoint, int]] = []
        for ep, head in answers:
            previous = ep.last_head
            if previous is None or head != previous:
                ep.head_moved_at = now
            ep.last_head = head
            if self.metrics is not None:
                self.metrics.head.labels(ep.label).set(head)
                self.metrics.head_age.labels(ep.label).set(now - (ep.head_moved_at or now))
            if previous is not None and head < previous:
                # Out of this round. A step back within the lag threshold is a
                # load-balanced provider's backends disagreeing: counted, not logged.
                detail = f"head {head} is below its previous {previous}"
                if previous - head > self.lag_threshold:
                    self._distrust(ep, "went-backwards", detail)
                else:
                    ep.trusted = False
                    if self.metrics is not None:
                        self.metrics.rpc_failures.labels(ep.label, "went-backwards").inc()
                    log.debug("RPC endpoint {endpoint}: {detail}", endpoint=ep.label, detail=detail)
            else:
                forward.append((ep, head))
        if not forward:
            self.best_head = None
            raise RPCFailure("every answering endpoint went backwards this round", "went-backwards")
        best = max(head for _, head in forward)
        trusted = []
        for ep, head in forward:
            if best - head > self.lag_threshold:
                self._distrust(ep, "lagging", f"head {head} lags the best {best} by {best - head}")
            else:
                trusted.append(ep)
                self._trust(ep)
        self.best_head = best
        return best

    async def _head_of(self, ep: RPCEndpoint) -> int:
        result = await self._call_on(ep, "eth_blockNumber", [])
        try:
            return hex_quantity(result, "eth_blockNumber", ep.label)
        except RPCFailure as e:
            self._record_failure(ep, e, "eth_blockNumber")
            raise

    def _distrust(self, ep: RPCEndpoint, kind: str, detail: str) -> None:
        ep.trusted = False
        if self.metrics is not None:
            self.metrics.rpc_failures.labels(ep.label, kind).inc()
        assert ep.mistrust is not None
        ep.mistrust.failed(kind, detail)

    def _trust(self, ep: RPCEndpoint) -> None:
        ep.trusted = True
        assert ep.mistrust is not None
        ep.mistrust.recovered()

    # -- the call machinery --------------------------------------------------

    def _usable(self, prefer_healthy: bool, want: int | None = None) -> list[RPCEndpoint]:
        """Endpoints to try, best first: not rate limited; healthy before backing-off."""
        now = self.clock.seconds()
        open_ = [ep for ep in self.endpoints if ep.cooldown_until <= now]
        healthy = [ep for ep in open_ if ep.backoff_until <= now]
        if prefer_healthy:
            return healthy or open_

        def rank(ep: RPCEndpoint) -> tuple[int, int, int]:
            has_it = want is None or (ep.last_head is not None and ep.last_head >= want)
            return (ep.backoff_until > now, not ep.trusted, not has_it)

        return sorted(open_, key=rank)  # stable: the configured order breaks ties

    def _cooling(self) -> RPCFailure:
        now = self.clock.seconds()
        wait = min(ep.cooldown_until for ep in self.endpoints) - now
        return RPCFailure(
            f"every endpoint is rate limited; the first is free again in {wait:.1f} s", "rate-limit",
            retry_after=wait,
        )

    async def _call(
        self,
        method: str,
        params: list[Any],
        *,
        want: int | None = None,
        check: Callable[[Any, str], Any] | None = None,
    ) -> tuple[RPCEndpoint, Any]:
        candidates = self._usable(prefer_healthy=False, want=want)
        if not candidates:
            raise self._cooling()
        failures: list[RPCFailure] = []
        for ep in candidates:
            try:
                result = await self._call_on(ep, method, params)
            except RPCFailure as e:  # already counted
                failures.append(e)
                continue
            if check is not None:
                try:
                    result = check(result, ep.label)
                except RPCFailure as e:
                    self._record_failure(ep, e, method)
                    failures.append(e)
                    continue
                except Exception as e:  # noqa: BLE001 - one endpoint's odd answer is its own failure
                    failure = RPCFailure(f"answer could not be read: {e.__class__.__name__}", "bad-result", ep.label)
                    self._record_failure(ep, failure, method)
                    failures.append(failure)
                    continue
            return ep, result
        raise self._exhausted(method, failures)

    def _exhausted(self, method: str, failures: list[RPCFailure]) -> RPCFailure:
        kinds = {f.kind for f in failures}
        kind = kinds.pop() if len(kinds) == 1 else "all-failed"
        detail = "; ".join(f"{f.endpoint or '?'} {f.kind}" for f in failures) or "no endpoint tried"
        return RPCFailure(f"{method} failed on every endpoint ({detail})", kind)

    async def _call_on(self, ep: RPCEndpoint, method: str, params: list[Any]) -> Any:
        await self._ensure_verified(ep)
        return await self._request(ep, method, params)

    async def _request(self, ep: RPCEndpoint, method: str, params: list[Any]) -> Any:
        """One JSON-RPC request to one endpoint: classified, counted, state updated."""
        self._next_id += 1
        request_id = self._next_id
        body = json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params},
            separators=(",", ":"),
        ).encode("ascii")
        try:
            answer = await self._post(ep, body)
            if not 200 <= answer.code < 300:
                raise status_failure(answer.code, ep.label, answer.retry_after, answer.location)
            result = parse_envelope(answer.body, request_id, ep.label)
        except RPCFailure as e:
            self._record_failure(ep, e, method)
            raise
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is classified and counted
            if cancelled(e):  # our caller gave up (poll deadline, shutdown): not the endpoint's fault
                raise defer.CancelledError() from e
            failure = classify(e, ep.label)
            if failure is None:
                failure = RPCFailure(f"unexpected {e.__class__.__name__}", "other", ep.label)
                self._record_failure(ep, failure, method, Failure(e))
            else:
                self._record_failure(ep, failure, method)
            raise failure from e
        self._record_success(ep)
        return result

    async def _post(self, ep: RPCEndpoint, body: bytes) -> Any:
        """POST ``body``; retry once on a stale pooled connection (reads are idempotent)."""
        for attempt in (1, 2):
            d = Deferred.fromCoroutine(
                post(self.agent, ep.target, body, max_body=self.max_body, now=self.clock.seconds))
            d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out(ep))
            try:
                return await d
            except STALE_CONNECTION as e:
                if cancelled(e):
                    raise defer.CancelledError() from e
                if attempt == 1 and not is_tls_failure(e) and not has_reason(e, ResponseTooLarge):
                    log.debug(
                        "RPC {endpoint}: request failed before any answer ({why}); retrying once",
                        endpoint=ep.label, why=reasons(e),
                    )
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _timed_out(self, ep: RPCEndpoint) -> Callable[[Any, float], Failure]:
        def convert(result: Any, timeout: float) -> Failure:
            return Failure(
                RPCFailure(f"no complete answer within {timeout:g} s", "timeout", ep.label)
            )

        return convert

    # -- endpoint state ------------------------------------------------------

    def _record_failure(
        self, ep: RPCEndpoint, e: RPCFailure, method: str, failure: Failure | None = None
    ) -> None:
        if not e.endpoint:
            e.endpoint = ep.label
        if self.metrics is not None:
            self.metrics.rpc_failures.labels(ep.label, e.kind).inc()
        now = self.clock.seconds()
        detail = str(e)
        if e.kind in RATE_LIMIT_KINDS or e.retry_after is not None:
            ep.rate_limits += 1
            delay = e.retry_after
            if delay is None:
                delay = min(RATE_LIMIT_BASE * 2 ** (ep.rate_limits - 1), RATE_LIMIT_MAX)
            ep.cooldown_until = max(ep.cooldown_until, now + delay)
            detail = f"{detail}; not asked for {delay:g} s"
            ep.state = "cooling"
        else:
            ep.failures += 1
            ep.backoff_until = now + min(2.0 ** (ep.failures - 1), BACKOFF_MAX)
            ep.state = "failing"
        if e.kind in TRANSPORT_KINDS:
            ep.verified = False
        assert ep.outage is not None
        ep.outage.failed(e.kind, f"{method}: {detail}", failure)

    def _record_success(self, ep: RPCEndpoint) -> None:
        ep.failures = 0
        ep.rate_limits = 0
        ep.backoff_until = 0.0
        ep.state = "ok"
        assert ep.outage is not None
        ep.outage.recovered()


def _rpc_failure(value: Any) -> RPCFailure:
    """The RPCFailure inside a DeferredList failure; anything else (ChainMismatch, bugs) is raised."""
    failure = cast(Failure, value)
    if failure.check(RPCFailure):
        return cast(RPCFailure, failure.value)
    failure.raiseException()
    raise AssertionError("unreachable")  # pragma: no cover
