"""JSON-RPC to one or more Ethereum nodes: failover, cooldowns, and agreement on the head and the chain.

:class:`RPCClient` sends each call (one POST, :mod:`eth_twisted.client.jsonrpc`)
to the best endpoint available and moves on when it fails; every failure has a
kind, is counted per endpoint and logged once per outage. The head and the
chain followed are what the endpoints agree on (:mod:`eth_twisted.client.agreement`),
so one lying or broken node costs only itself. The rules, as a user meets them,
are in the README ("What the client believes from RPC nodes").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from eth_twisted.client.agreement import agreement, choose_chain, wrong_chain_message
from eth_twisted.client.endpoints import (
    AGREEMENT_MEMORY,
    BACKOFF_MAX,
    RATE_LIMIT_BASE,
    RATE_LIMIT_KINDS,
    RATE_LIMIT_MAX,
    TRANSPORT_KINDS,
    UNUSABLE,
    Agreement,
    RPCEndpoint,
    RPCSettings,
    check_header,
)
from eth_twisted.client.jsonrpc import (
    MAX_CHAIN_ID,
    STALE_CONNECTION,
    ResponseTooLarge,
    RPCFailure,
    cancelled,
    capped_agent,
    check_block,
    classify,
    has_reason,
    hex_quantity,
    is_tls_failure,
    parse_envelope,
    post,
    reasons,
    status_failure,
)
from eth_twisted.errors import ChainMismatch
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.metrics import ClientMetrics
from eth_twisted.outage import Episode

log = Logger(namespace="eth_twisted.client.rpc")


def _default_agent(clock: Any, timeout: float, max_body: int) -> tuple[Any, Any]:
    from twisted.internet.interfaces import IReactorTCP
    from twisted.web.client import HTTPConnectionPool

    reactor = clock if IReactorTCP.providedBy(clock) else maybe_global_reactor()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    return capped_agent(reactor, max_body, timeout, pool), pool


class RPCClient:
    """JSON-RPC calls with failover, cooldowns, head agreement and chain verification.

    ``agent`` is an ``IAgent`` (``treq.testing.RequestTraversalAgent`` in
    tests); by default a ``twisted.web.client.Agent`` with its own persistent
    connection pool, closed by :meth:`close`.
    """

    def __init__(
        self,
        settings: RPCSettings,
        *,
        agent: Any = None,
        clock: IReactorTime | None = None,
        metrics: ClientMetrics | None = None,
    ) -> None:
        if not settings.rpc:
            raise ValueError("at least one RPC URL is needed")
        clock = maybe_global_reactor(clock)
        self.settings = settings
        self.clock: IReactorTime = clock
        self.endpoints = [RPCEndpoint.from_url(u) for u in settings.rpc]
        for ep in self.endpoints:
            ep.outage = Episode(
                log,
                self.clock.seconds,
                ep.label,
                start="RPC endpoint {subject} is failing ({kind}): {detail}{note}",
                end="RPC endpoint {subject} answers again after {duration:.1f} s "
                "({failures} failures: {kinds})",
            )
            ep.mistrust = Episode(
                log,
                self.clock.seconds,
                ep.label,
                split_kinds=True,
                start="RPC endpoint {subject} is not trusted ({kind}): {detail}{note}",
                end="RPC endpoint {subject} is trusted again after {duration:.1f} s (was {kind})",
            )
        self._pool = None
        if agent is None:
            agent, self._pool = _default_agent(self.clock, settings.rpc_timeout, settings.max_body)
        self.agent = agent
        self.metrics = metrics
        self._next_id = 0
        self.identity: tuple[int, str] | None = None
        """(chain id, genesis hash) being followed, once known."""
        self._identity_source = ""
        self._announced: tuple[int, str] | None = None
        self._expected: tuple[int, str] | None = None
        self.agreed_head: int | None = None
        """The head the last successful round agreed on."""
        self._agreement: Agreement | None = None

    # -- public calls ------------------------------------------------------

    def block_number(self) -> Deferred[int]:
        """The head number of the first usable endpoint that answers (one answer: see head_round).

        The poller uses :meth:`head_round`; this single-answer call (like
        :meth:`chain_id` and :meth:`genesis_hash`) is for tests and tools.
        """
        return Deferred.fromCoroutine(self._block_number())

    async def _block_number(self) -> int:
        _, head = await self._call(
            "eth_blockNumber", [], check=lambda r, label: hex_quantity(r, "eth_blockNumber", label)
        )
        return cast(int, head)

    def get_block(self, number: int) -> Deferred[dict[str, Any]]:
        """Block ``number``'s header fields from the best endpoint that has it.

        The result holds ``number``, ``hash``, ``parentHash`` and
        ``timestamp`` (checked and bounded). A ``null`` answer means that
        node has not got the block yet: the call moves on to another endpoint
        and fails ``null-result`` if none has it. Far-ahead and wrong-chain
        endpoints are never asked.
        """
        return Deferred.fromCoroutine(self._get_block(number))

    async def _get_block(self, number: int) -> dict[str, Any]:
        _, block = await self._call(
            "eth_getBlockByNumber",
            [hex(number), False],
            want=number,
            check=lambda result, label: check_block(result, number, label),
        )
        return cast(dict[str, Any], block)

    def get_block_by_hash(self, block_hash: str) -> Deferred[dict[str, Any] | None]:
        """Block ``block_hash``'s header (as :meth:`get_block`), or None when the node has none."""
        return Deferred.fromCoroutine(self._get_block_by_hash(block_hash.lower()))

    async def _get_block_by_hash(self, block_hash: str) -> dict[str, Any] | None:
        def check(result: Any, label: str) -> dict[str, Any] | None:
            if result is None:
                return None
            header = check_header(result, label)
            if header["hash"] != block_hash:
                raise RPCFailure(
                    f"asked for block {block_hash}, got {header['hash']}", "bad-result", label
                )
            return header

        _, block = await self._call("eth_getBlockByHash", [block_hash, False], check=check)
        return cast("dict[str, Any] | None", block)

    def get_tagged(self, tag: str) -> Deferred[dict[str, Any] | None]:
        """The header of the ``tag`` block (``finalized``, ``safe``), or None when there is none."""
        return Deferred.fromCoroutine(self._get_tagged(tag))

    async def _get_tagged(self, tag: str) -> dict[str, Any] | None:
        _, block = await self._call(
            "eth_getBlockByNumber", [tag, False], check=lambda r, lb: r and check_header(r, lb)
        )
        return cast("dict[str, Any] | None", block)

    def attach_socket(self, url: str, socket: Any) -> RPCEndpoint:
        """Send the requests of the ``ws(s)://`` endpoint ``url`` over ``socket`` (a NodeSocket)."""
        for ep in self.endpoints:
            if ep.raw_url == url:
                ep.socket = socket
                return ep
        raise KeyError("no such WebSocket endpoint")

    def chain_id(self) -> Deferred[int]:
        """``eth_chainId`` of the first usable endpoint that answers."""
        return Deferred.fromCoroutine(self._chain_id())

    async def _chain_id(self) -> int:
        _, chain_id = await self._call(
            "eth_chainId",
            [],
            check=lambda r, label: hex_quantity(r, "eth_chainId", label, MAX_CHAIN_ID),
        )
        return cast(int, chain_id)

    def genesis_hash(self) -> Deferred[str]:
        """Lowercase hash of block 0, from the first usable endpoint that answers."""
        return Deferred.fromCoroutine(self._genesis_hash())

    async def _genesis_hash(self) -> str:
        block = await self._get_block(0)
        return str(block["hash"])

    def head_round(self) -> Deferred[int]:
        """Ask every usable endpoint for its head; fire with the head they agree on (:func:`agree`).

        Endpoints whose head went below their own previous answer do not vote
        this round; ones far ahead of the agreed head are distrusted, ones far
        behind are lagging. Fails with :class:`RPCFailure` when no endpoint
        gave a believable head, and with :class:`ChainMismatch` when every
        endpoint is on another chain.
        """
        return Deferred.fromCoroutine(self._head_round())

    def verify_chain(
        self, expected: tuple[int, str] | None, chain_id: int | None = None
    ) -> Deferred[tuple[int, str]]:
        """Ask every endpoint for its chain and choose the one to follow.

        ``expected`` is ``(chain_id, genesis_hash)`` from the stored cursor, or
        None. The chain followed is ``expected`` when some endpoint shows it,
        else (no cursor) the one a majority of the answering endpoints show,
        among those of chain id ``chain_id`` (``--chain-id``). Endpoints on other chains
        are wrong-chain (they cost only themselves). Raises
        :class:`ChainMismatch` (its message names ``--reset-cursor``) when no
        endpoint is on the expected chain or there is no majority, and
        :class:`RPCFailure` when no endpoint answered.
        """
        return Deferred.fromCoroutine(self._verify_chain(expected, chain_id))

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

    async def _show_chain(self, ep: RPCEndpoint) -> tuple[int, str]:
        """Ask ``ep`` for its chain id and genesis hash (bounded, checked); remember them."""
        raw_id = await self._request(ep, "eth_chainId", [])
        raw_genesis = await self._request(ep, "eth_getBlockByNumber", ["0x0", False])
        try:
            chain_id = hex_quantity(raw_id, "eth_chainId", ep.label, MAX_CHAIN_ID)
            genesis = check_block(raw_genesis, 0, ep.label)["hash"]
        except RPCFailure as e:
            self._record_failure(ep, e, "eth_chainId")
            raise
        ep.chain = (chain_id, genesis)
        return ep.chain

    async def _verify_chain(
        self, expected: tuple[int, str] | None, chain_id: int | None
    ) -> tuple[int, str]:
        self._expected = (expected[0], expected[1].lower()) if expected is not None else None
        self.invalidate()
        now = self.clock.seconds()
        candidates = [ep for ep in self.endpoints if ep.cooldown_until <= now] or list(
            self.endpoints
        )
        results = await defer.DeferredList(
            [Deferred.fromCoroutine(self._show_chain(ep)) for ep in candidates],
            consumeErrors=True,
        )
        shown: list[tuple[RPCEndpoint, tuple[int, str]]] = []
        failures: list[RPCFailure] = []
        for ep, (ok, value) in zip(candidates, results, strict=True):
            if ok:
                shown.append((ep, cast(tuple[int, str], value)))
            else:
                failures.append(_rpc_failure(value))
        if not shown:
            raise self._exhausted("chain verification", failures)
        identity = choose_chain(
            [(ep.label, chain) for ep, chain in shown], self._expected, chain_id
        )
        self.identity = identity
        self._identity_source = next(ep.label for ep, chain in shown if chain == identity)
        for ep, chain in shown:
            if chain == identity:
                self._chain_ok(ep)
            else:
                self._wrong_chain(ep, chain)
        agreeing = sum(1 for _, chain in shown if chain == identity)
        if identity != self._announced:
            self._announced = identity
            log.info(
                "RPC chain: chain id {chain_id}, genesis {genesis} ({count} of {total} endpoints show it)",
                chain_id=identity[0],
                genesis=identity[1],
                count=agreeing,
                total=len(self.endpoints),
            )
        return identity

    async def _ensure_verified(self, ep: RPCEndpoint) -> None:
        if ep.verified:
            return
        chain = await self._show_chain(ep)
        if self.identity is None:  # used before verify_chain: the first answer names the chain
            self.identity = chain
            self._identity_source = ep.label
        if chain != self.identity:
            self._wrong_chain(ep, chain)
            raise RPCFailure(
                f"it is on chain id {chain[0]} with genesis {chain[1]}, not the followed chain id "
                f"{self.identity[0]} with genesis {self.identity[1]}",
                "wrong-chain",
                ep.label,
            )
        self._chain_ok(ep)

    def _chain_ok(self, ep: RPCEndpoint) -> None:
        ep.verified = True
        ep.wrong_chain_checks = 0
        if ep.distrust == "wrong-chain":
            self._trust(ep)

    def _wrong_chain(self, ep: RPCEndpoint, chain: tuple[int, str]) -> None:
        """``ep`` is on another chain: distrusted (one line), and asked after the others for a while."""
        ep.verified = False
        ep.wrong_chain_checks += 1
        ep.backoff_until = self.clock.seconds() + min(2.0**ep.wrong_chain_checks, BACKOFF_MAX)
        assert self.identity is not None
        self._distrust(
            ep,
            "wrong-chain",
            f"chain id {chain[0]} with genesis {chain[1]}, not chain id "
            f"{self.identity[0]} with genesis {self.identity[1]}",
        )

    def _check_all_wrong_chain(self) -> None:
        """Every endpoint is on another chain than the one followed: that is fatal."""
        if not all(ep.distrust == "wrong-chain" for ep in self.endpoints) or self.identity is None:
            return
        raise ChainMismatch(
            wrong_chain_message(
                [(ep.label, ep.chain) for ep in self.endpoints if ep.chain is not None],
                self.identity,
                single=len(self.endpoints) == 1,
            )
        )

    # -- head agreement ------------------------------------------------------

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
            self._check_all_wrong_chain()
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
                # Out of this round's vote. A step back within the lag threshold is a
                # load-balanced provider's backends disagreeing: counted, not logged.
                detail = f"head {head} is below its previous {previous}"
                if previous - head > self.settings.lag_threshold:
                    self._distrust(ep, "went-backwards", detail)
                else:
                    ep.distrust = "went-backwards"
                    if self.metrics is not None:
                        self.metrics.rpc_failures.labels(ep.label, "went-backwards").inc()
                    log.debug("RPC endpoint {endpoint}: {detail}", endpoint=ep.label, detail=detail)
            else:
                forward.append((ep, head))
        if not forward:
            self._publish_states()
            raise RPCFailure("every answering endpoint went backwards this round", "went-backwards")
        agreed, median = self._agree(forward, now)
        lag = self.settings.lag_threshold
        support = 0
        for ep, head in forward:
            if head > median + lag:
                self._distrust(
                    ep,
                    "far-ahead",
                    f"head {head} is more than {lag} blocks above the "
                    f"head {median} the endpoints agree on",
                )
                continue
            if head < median - lag:
                self._distrust(
                    ep, "lagging", f"head {head} lags the agreed head {median} by {median - head}"
                )
                continue
            if ep.distrust is not None and ep.distrust != "wrong-chain":
                self._trust(ep)
            support += head >= median
        self._agreement = Agreement(agreed, now, support)
        self.agreed_head = agreed
        if self.metrics is not None:
            self.metrics.agreed_head.set(agreed)
        self._publish_states()
        return agreed

    def _agree(self, forward: list[tuple[RPCEndpoint, int]], now: float) -> tuple[int, int]:
        """(head, median) of this round's forward answers, or RPCFailure ``far-ahead``.

        Far-ahead endpoints do not vote. When fewer endpoints than agreed on
        a head moments ago now claim one far past it, their answers are set
        aside for this round (not marked: one of them may be the only honest
        endpoint left, and is followed once :data:`AGREEMENT_MEMORY` passes).
        """
        lag = self.settings.lag_threshold
        memory = (
            self._agreement
            if self._agreement and now - self._agreement.at <= AGREEMENT_MEMORY
            else None
        )
        voters = [(ep, h) for ep, h in forward if ep.distrust != "far-ahead"]
        while voters:
            head, median, support = agreement([h for _, h in voters], lag)
            if memory is None or head <= memory.head + lag or support >= min(2, memory.support):
                return head, median
            aside = [(ep, h) for ep, h in voters if median <= h <= median + lag]
            for ep, h in aside:
                log.debug(
                    "RPC endpoint {endpoint}: head {head} is unconfirmed (agreed {agreed} "
                    "by {n} endpoints {ago:.0f} s ago)",
                    endpoint=ep.label,
                    head=h,
                    agreed=memory.head,
                    n=memory.support,
                    ago=now - memory.at,
                )
            voters = [v for v in voters if v not in aside]
        if memory is not None:
            detail = (
                f"the only answers are more than {lag} blocks above the head {memory.head} "
                f"that {memory.support} endpoints agreed on {now - memory.at:.0f} s ago"
            )
        else:
            detail = "the only answers come from endpoints far ahead of the others"
        raise RPCFailure(detail, "far-ahead")

    async def _head_of(self, ep: RPCEndpoint) -> int:
        result = await self._call_on(ep, "eth_blockNumber", [])
        try:
            return hex_quantity(result, "eth_blockNumber", ep.label)
        except RPCFailure as e:
            self._record_failure(ep, e, "eth_blockNumber")
            raise

    def _distrust(self, ep: RPCEndpoint, kind: str, detail: str) -> None:
        ep.distrust = kind
        if self.metrics is not None:
            self.metrics.rpc_failures.labels(ep.label, kind).inc()
        assert ep.mistrust is not None
        ep.mistrust.failed(kind, detail)

    def _trust(self, ep: RPCEndpoint) -> None:
        ep.distrust = None
        assert ep.mistrust is not None
        ep.mistrust.recovered()

    def _publish_states(self) -> None:
        if self.metrics is None:
            return
        for ep in self.endpoints:
            self.metrics.rpc_state.labels(ep.label).state(ep.state)

    # -- the call machinery --------------------------------------------------

    def _usable(self, prefer_healthy: bool, want: int | None = None) -> list[RPCEndpoint]:
        """Endpoints to try, best first: not rate limited; healthy before backing-off.

        For single calls (``prefer_healthy`` false) far-ahead and wrong-chain
        endpoints are left out, and trusted ones that have block ``want``
        come first.
        """
        now = self.clock.seconds()
        open_ = [ep for ep in self.endpoints if ep.cooldown_until <= now]
        if prefer_healthy:
            healthy = [ep for ep in open_ if ep.backoff_until <= now]
            return healthy or open_
        usable = [ep for ep in open_ if ep.distrust not in UNUSABLE]

        def rank(ep: RPCEndpoint) -> tuple[bool, bool, bool]:
            has_it = want is None or (ep.last_head is not None and ep.last_head >= want)
            return (ep.backoff_until > now, not ep.trusted, not has_it)

        return sorted(usable, key=rank)  # stable: the configured order breaks ties

    def _cooling(self) -> RPCFailure:
        now = self.clock.seconds()
        wait = min(ep.cooldown_until for ep in self.endpoints) - now
        return RPCFailure(
            f"every endpoint is rate limited; the first is free again in {wait:.1f} s",
            "rate-limit",
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
            now = self.clock.seconds()
            if any(ep.cooldown_until > now for ep in self.endpoints):
                raise self._cooling()
            self._check_all_wrong_chain()
            raise RPCFailure(
                f"{method}: no trusted endpoint to ask (far-ahead or wrong-chain)", "far-ahead"
            )
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
                    failure = RPCFailure(
                        f"answer could not be read: {e.__class__.__name__}", "bad-result", ep.label
                    )
                    self._record_failure(ep, failure, method)
                    failures.append(failure)
                    continue
            return ep, result
        self._check_all_wrong_chain()
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
            if ep.socket is not None:
                result = await ep.socket.request(method, params)
            elif ep.kind != "http":
                raise RPCFailure("the WebSocket is not attached", "unavailable", ep.label)
            else:
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
            if cancelled(
                e
            ):  # our caller gave up (poll deadline, shutdown): not the endpoint's fault
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
                post(
                    self.agent,
                    ep.target,
                    body,
                    max_body=self.settings.max_body,
                    now=self.clock.seconds,
                )
            )
            d.addTimeout(self.settings.rpc_timeout, self.clock, onTimeoutCancel=self._timed_out(ep))
            try:
                return await d
            except STALE_CONNECTION as e:
                if cancelled(e):
                    raise defer.CancelledError() from e
                if attempt == 1 and not is_tls_failure(e) and not has_reason(e, ResponseTooLarge):
                    log.debug(
                        "RPC {endpoint}: request failed before any answer ({why}); retrying once",
                        endpoint=ep.label,
                        why=reasons(e),
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
        else:
            ep.failures += 1
            ep.backoff_until = now + min(2.0 ** (ep.failures - 1), BACKOFF_MAX)
        if e.kind in TRANSPORT_KINDS:
            ep.verified = False
        assert ep.outage is not None
        ep.outage.failed(e.kind, f"{method}: {detail}", failure)
        if self.metrics is not None:
            self.metrics.rpc_state.labels(ep.label).state(ep.state)

    def _record_success(self, ep: RPCEndpoint) -> None:
        ep.failures = 0
        ep.rate_limits = 0
        ep.backoff_until = 0.0
        assert ep.outage is not None
        ep.outage.recovered()


def _rpc_failure(value: Any) -> RPCFailure:
    """The RPCFailure inside a DeferredList failure; anything else (ChainMismatch, bugs) is raised."""
    failure = cast(Failure, value)
    if failure.check(RPCFailure):
        return cast(RPCFailure, failure.value)
    failure.raiseException()
    raise AssertionError("unreachable")  # pragma: no cover
