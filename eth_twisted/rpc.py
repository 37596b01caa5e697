"""JSON-RPC over HTTP to one or more Ethereum nodes, through an injected treq-like client.

Every call is one POST guarded by a single timeout that covers the request
*and* the body (treq's ``timeout=`` stops at the headers), read with a byte
cap, and checked three ways before its result is believed: the HTTP status
(429 and 5xx are failures), the body (it must be JSON: an HTML error page, a
truncated body or garbage is a failure) and the JSON-RPC envelope
(``jsonrpc`` "2.0", our ``id``, exactly one of ``result``/``error``).

Every failure has a *kind* (``timeout``, ``connect``, ``connection-lost``,
``http-429``, ``http-5xx``, ``http-4xx``, ``too-large``, ``bad-json``,
``bad-envelope``, ``rpc-error``, ``rate-limit``, ``null-result``,
``bad-result``), is counted per endpoint, and moves the call to the next
endpoint. Rate limits (HTTP 429, JSON-RPC -32005/-32007, "rate limit" in
the message) put the endpoint in a cooldown that honours ``Retry-After``
(seconds or an HTTP date) or else backs off exponentially; other failures
put it at the back of the queue for a short, growing while.

Endpoints are identified in logs and metrics by ``scheme://host[:port]``
only: providers put API keys in the path or the query.

An endpoint is used only once it has shown the same chain id and genesis
hash as every other endpoint, the ``--chain-id`` option and the stored
cursor; after a transport failure it shows them again before its answers
count, so a node restarted on a new chain is caught (:class:`ChainMismatch`).
"""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from eth_twisted.errors import ChainMismatch, RPCError
from eth_twisted.metrics import ClientMetrics

try:  # the request-level failures live in a private module of twisted.web
    from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
except ImportError:  # pragma: no cover - very old or very new Twisted
    from twisted.web.client import (  # type: ignore[attr-defined,no-redef]
        RequestTransmissionFailed,
        ResponseNeverReceived,
    )

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
RETRY_AFTER_MAX = 600.0
"""Longest Retry-After honoured (a provider asking for hours is clamped)."""
BACKOFF_MAX = 30.0
"""Longest time a failing endpoint stays at the back of the queue."""

RATE_LIMIT_CODES = frozenset({-32005, -32007})
_RATE_LIMIT_WORDS = re.compile(r"rate.?limit|too many requests|exceeded.*(quota|capacity|limit)", re.I)
_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")
_QUANTITY = re.compile(r"^0x[0-9a-fA-F]+$")

TRANSPORT_KINDS = frozenset({"timeout", "connect", "connection-lost"})
"""Failures after which an endpoint must show its chain again before it is believed."""
RATE_LIMIT_KINDS = frozenset({"http-429", "rate-limit"})


class RPCFailure(RPCError):
    """One classified RPC failure: ``kind`` names it, ``endpoint`` is the safe label."""

    def __init__(
        self, message: str, kind: str, endpoint: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{endpoint}: {message}" if endpoint else message)
        self.kind = kind
        self.endpoint = endpoint
        self.retry_after = retry_after


def endpoint_label(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: no user info, path or query (they hold keys)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.scheme or 'http'}://{host}" + (f":{port}" if port is not None else "")


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta seconds or HTTP date), or None."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _hex_int(value: Any, what: str, label: str) -> int:
    if not isinstance(value, str) or not _QUANTITY.match(value):
        raise RPCFailure(f"{what} is not a hex quantity: {value!r:.80}", "bad-result", label)
    return int(value, 16)


def check_block(block: Any, number: int, label: str = "") -> dict[str, Any]:
    """``block`` if it is a plausible ``eth_getBlockByNumber`` result for ``number``.

    ``None`` means the node does not have that block yet (``null-result``);
    anything malformed is ``bad-result``.
    """
    if block is None:
        raise RPCFailure(f"block {number} not available yet", "null-result", label)
    if not isinstance(block, dict):
        raise RPCFailure(f"block {number} is not an object", "bad-result", label)
    if _hex_int(block.get("number"), "block number", label) != number:
        raise RPCFailure(f"asked for block {number}, got {block.get('number')!r:.40}", "bad-result", label)
    for key in ("hash", "parentHash"):
        if not isinstance(block.get(key), str) or not _HASH.match(block[key]):
            raise RPCFailure(f"block {number} has a bad {key}", "bad-result", label)
    _hex_int(block.get("timestamp"), "block timestamp", label)
    return block


class _CappedBody(Protocol):
    """Collects a response body up to ``cap`` bytes; past it, closes the connection.

    Like ``treq.collect`` with a capping collector, plus a canceller that
    closes the connection, so a stalled body never holds a socket after the
    call's timeout.
    """

    def __init__(self, cap: int, label: str, length: int | None = None) -> None:
        self.cap = cap
        self.label = label
        self.length = length
        self.size = 0
        self.chunks: list[bytes] = []
        self.finished: Deferred[bytes] | None = Deferred(self._cancel)

    def _close(self) -> None:
        transport = self.transport
        if transport is not None:
            # TransportProxyProducer (what Agent hands a body protocol) has both.
            close = getattr(transport, "loseConnection", None)
            if close is None:
                close = transport.stopProducing  # type: ignore[attr-defined]
            close()

    def _cancel(self, d: Deferred[bytes]) -> None:
        self.finished = None
        self._close()

    def connectionMade(self) -> None:
        if self.length is not None and self.length > self.cap and self.finished is not None:
            d, self.finished = self.finished, None
            self._close()
            d.errback(
                RPCFailure(f"response body of {self.length} bytes is over {self.cap}", "too-large", self.label)
            )

    def dataReceived(self, data: bytes) -> None:
        if self.finished is None:
            return
        self.size += len(data)
        if self.size > self.cap:
            d, self.finished = self.finished, None
            self._close()
            d.errback(RPCFailure(f"response body over {self.cap} bytes", "too-large", self.label))
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if self.finished is None:
            return
        d, self.finished = self.finished, None
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: a body without a length ended by close. It may be
            # cut short; the JSON and envelope checks catch that.
            d.callback(b"".join(self.chunks))
        else:
            d.errback(reason)


def collect_capped(response: Any, cap: int, label: str = "") -> Deferred[bytes]:
    """The body of ``response`` (an IResponse), failing ``too-large`` past ``cap`` bytes."""
    length = getattr(response, "length", None)
    if length == 0:
        return defer.succeed(b"")
    body = _CappedBody(cap, label, length if isinstance(length, int) else None)
    d = body.finished
    assert d is not None
    response.deliverBody(body)
    return d


@dataclass
class RPCEndpoint:
    """One node's URL and what we have learned about it."""

    url: str
    label: str
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

    @classmethod
    def from_url(cls, url: str) -> RPCEndpoint:
        """An endpoint for ``url`` with its safe label."""
        return cls(url=url, label=endpoint_label(url))


def _default_http(clock: Any, timeout: float) -> tuple[Any, Any]:
    from treq.client import HTTPClient
    from twisted.internet import reactor as global_reactor
    from twisted.internet.interfaces import IReactorTCP
    from twisted.web.client import Agent, HTTPConnectionPool

    reactor = clock if IReactorTCP.providedBy(clock) else global_reactor
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent(reactor, connectTimeout=timeout, pool=pool)
    return HTTPClient(agent), pool


class RPCClient:
    """JSON-RPC calls with failover, cooldowns, head ranking and chain verification.

    ``http`` is treq or something shaped like it (``StubTreq`` in tests); by
    default a ``treq.HTTPClient`` with its own persistent connection pool,
    closed by :meth:`close`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        http: Any = None,
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
        self._pool = None
        if http is None:
            http, self._pool = _default_http(self.clock, timeout)
        self.http = http
        self.timeout = timeout
        self.max_body = max_body
        self.lag_threshold = lag_threshold
        self.metrics = metrics
        self._next_id = 0
        self.identity: tuple[int, str] | None = None
        """(chain id, genesis hash) every endpoint has shown, once known."""
        self._identity_source = ""
        self._expected: tuple[int, str] | None = None
        self._chain_id_option: int | None = None
        self.best_head: int | None = None

    # -- public calls ------------------------------------------------------

    def block_number(self) -> Deferred[int]:
        """The head number of the first endpoint that answers."""
        return Deferred.fromCoroutine(self._block_number())

    async def _block_number(self) -> int:
        ep, result = await self._call("eth_blockNumber", [])
        return _hex_int(result, "eth_blockNumber", ep.label)

    def get_block(self, number: int) -> Deferred[dict[str, Any]]:
        """Block ``number`` (header fields, no transactions) from the best endpoint that has it.

        A ``null`` answer means that node has not got the block yet: the call
        moves on to another endpoint and fails ``null-result`` if none has it.
        """
        return Deferred.fromCoroutine(self._get_block(number))

    async def _get_block(self, number: int) -> dict[str, Any]:
        _, block = await self._call(
            "eth_getBlockByNumber", [hex(number), False], want=number,
            check=lambda result, label: check_block(result, number, label),
        )
        return block  # type: ignore[no-any-return]

    def chain_id(self) -> Deferred[int]:
        """``eth_chainId`` of the first endpoint that answers."""
        return Deferred.fromCoroutine(self._chain_id())

    async def _chain_id(self) -> int:
        ep, result = await self._call("eth_chainId", [])
        return _hex_int(result, "eth_chainId", ep.label)

    def genesis_hash(self) -> Deferred[str]:
        """Lowercase hash of block 0, from the first endpoint that answers."""
        return Deferred.fromCoroutine(self._genesis_hash())

    async def _genesis_hash(self) -> str:
        block = await self._get_block(0)
        return str(block["hash"]).lower()

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
        """Close the connection pool this client made (nothing when ``http`` was injected)."""
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
        log.info(
            "RPC chain verified: chain id {chain_id}, genesis {genesis} ({count} of {total} endpoints answered)",
            chain_id=self.identity[0], genesis=self.identity[1],
            count=len(candidates) - len(failures), total=len(self.endpoints),
        )
        return self.identity

    async def _ensure_verified(self, ep: RPCEndpoint) -> None:
        if ep.verified:
            return
        chain_id = _hex_int(await self._request(ep, "eth_chainId", []), "eth_chainId", ep.label)
        genesis = await self._request(ep, "eth_getBlockByNumber", ["0x0", False])
        try:
            check_block(genesis, 0, ep.label)
        except RPCFailure as e:
            self._record_failure(ep, e, "eth_getBlockByNumber")
            raise
        self._check_identity(ep, chain_id, str(genesis["hash"]).lower())
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
                self._distrust(ep, "went-backwards", f"head {head} is below its previous {previous}")
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
                ep.trusted = True
                trusted.append(ep)
                self._set_state(ep, "ok")
        self.best_head = best
        return best

    async def _head_of(self, ep: RPCEndpoint) -> int:
        result = await self._call_on(ep, "eth_blockNumber", [])
        try:
            return _hex_int(result, "eth_blockNumber", ep.label)
        except RPCFailure as e:
            self._record_failure(ep, e, "eth_blockNumber")
            raise

    def _distrust(self, ep: RPCEndpoint, kind: str, detail: str) -> None:
        ep.trusted = False
        if self.metrics is not None:
            self.metrics.rpc_failures.labels(ep.label, kind).inc()
        self._set_state(ep, kind, detail)

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
            code, retry_after, raw = await self._post(ep, body)
            result = self._parse(ep, code, retry_after, raw, request_id)
        except RPCFailure as e:
            self._record_failure(ep, e, method)
            raise
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure is classified and counted
            if _cancelled(e):  # our caller gave up (poll deadline, shutdown): not the endpoint's fault
                raise defer.CancelledError() from e
            failure = self._classify(ep, e)
            self._record_failure(ep, failure, method)
            raise failure from e
        self._record_success(ep)
        return result

    async def _post(self, ep: RPCEndpoint, body: bytes) -> tuple[int, float | None, bytes]:
        """POST ``body``; retry once on a stale pooled connection (reads are idempotent)."""
        for attempt in (1, 2):
            d = Deferred.fromCoroutine(self._post_once(ep, body))
            d.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out(ep))
            try:
                return await d
            except (ResponseNeverReceived, RequestTransmissionFailed) as e:
                if _cancelled(e):
                    raise defer.CancelledError() from e
                if attempt == 1:
                    log.debug(
                        "RPC {endpoint}: request failed before any answer ({why}); retrying once",
                        endpoint=ep.label, why=_reasons(e),
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

    async def _post_once(self, ep: RPCEndpoint, body: bytes) -> tuple[int, float | None, bytes]:
        response = await self.http.post(
            ep.url,
            data=body,
            headers={
                b"Content-Type": [b"application/json"],
                b"Accept": [b"application/json"],
                b"User-Agent": [b"eth-twisted"],
            },
        )
        code = int(response.code)
        retry_after = None
        if code == 429 or code >= 500:
            values = response.headers.getRawHeaders(b"retry-after")
            retry_after = parse_retry_after(values[0], self.clock.seconds()) if values else None
        raw = await collect_capped(response, self.max_body, ep.label)
        return code, retry_after, raw

    def _parse(
        self, ep: RPCEndpoint, code: int, retry_after: float | None, raw: bytes, request_id: int
    ) -> Any:
        label = ep.label
        if code == 429:
            raise RPCFailure("HTTP 429 Too Many Requests", "http-429", label, retry_after)
        if code >= 500:
            raise RPCFailure(f"HTTP {code}", "http-5xx", label, retry_after)
        if code >= 400:
            raise RPCFailure(f"HTTP {code}", "http-4xx", label)
        if not 200 <= code < 300:
            raise RPCFailure(f"HTTP {code}", "http-other", label)
        try:
            reply = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            looks = "an HTML page" if raw.lstrip()[:1] == b"<" else f"{len(raw)} bytes of non-JSON"
            raise RPCFailure(f"answer is {looks}", "bad-json", label)
        if not isinstance(reply, dict):
            raise RPCFailure("answer is not a JSON-RPC object", "bad-envelope", label)
        if reply.get("jsonrpc") != "2.0":
            raise RPCFailure("answer lacks jsonrpc 2.0", "bad-envelope", label)
        reply_id = reply.get("id")
        if type(reply_id) is not int or reply_id != request_id:
            raise RPCFailure(f"answer id {reply_id!r:.40} is not our {request_id}", "bad-envelope", label)
        if ("result" in reply) == ("error" in reply):
            raise RPCFailure("answer must carry exactly one of result and error", "bad-envelope", label)
        if "error" in reply:
            err = reply["error"]
            if not isinstance(err, dict) or type(err.get("code")) is not int:
                raise RPCFailure("answer has a malformed error object", "bad-envelope", label)
            message = str(err.get("message", ""))[:200]
            if err["code"] in RATE_LIMIT_CODES or _RATE_LIMIT_WORDS.search(message):
                raise RPCFailure(f"rate limited: {err['code']} {message}", "rate-limit", label)
            raise RPCFailure(f"JSON-RPC error {err['code']}: {message}", "rpc-error", label)
        return reply["result"]

    def _classify(self, ep: RPCEndpoint, e: Exception) -> RPCFailure:
        label = ep.label
        if isinstance(e, (defer.TimeoutError, error.TimeoutError)):
            return RPCFailure(str(e) or "timed out", "timeout", label)
        if isinstance(e, error.ConnectError):
            return RPCFailure(f"cannot connect: {e.__class__.__name__}", "connect", label)
        if isinstance(e, (ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed)):
            return RPCFailure(f"connection lost: {_reasons(e)}", "connection-lost", label)
        if isinstance(e, (error.ConnectionLost, error.ConnectionDone)):
            return RPCFailure(f"connection lost: {e.__class__.__name__}", "connection-lost", label)
        log.failure(
            "RPC {endpoint}: unexpected failure", Failure(e), endpoint=label,
        )
        return RPCFailure(f"unexpected {e.__class__.__name__}", "other", label)

    # -- endpoint state ------------------------------------------------------

    def _record_failure(self, ep: RPCEndpoint, e: RPCFailure, method: str) -> None:
        if not e.endpoint:
            e.endpoint = ep.label
        if self.metrics is not None:
            self.metrics.rpc_failures.labels(ep.label, e.kind).inc()
        now = self.clock.seconds()
        if e.kind in RATE_LIMIT_KINDS or e.retry_after is not None:
            ep.rate_limits += 1
            delay = e.retry_after
            if delay is None:
                delay = min(RATE_LIMIT_BASE * 2 ** (ep.rate_limits - 1), RATE_LIMIT_MAX)
            ep.cooldown_until = max(ep.cooldown_until, now + delay)
            self._set_state(ep, "cooling", f"{e.kind}; not asked for {delay:g} s")
        else:
            ep.failures += 1
            ep.backoff_until = now + min(2.0 ** (ep.failures - 1), BACKOFF_MAX)
            self._set_state(ep, "failing", f"{e.kind}: {e}")
        if e.kind in TRANSPORT_KINDS:
            ep.verified = False
        log.debug(
            "RPC {method} on {endpoint} failed ({kind}): {detail}",
            method=method, endpoint=ep.label, kind=e.kind, detail=str(e),
        )

    def _record_success(self, ep: RPCEndpoint) -> None:
        ep.failures = 0
        ep.rate_limits = 0
        ep.backoff_until = 0.0
        if ep.state in ("failing", "cooling", "new"):
            self._set_state(ep, "ok")

    def _set_state(self, ep: RPCEndpoint, state: str, detail: str = "") -> None:
        if state == ep.state:
            return
        previous, ep.state = ep.state, state
        if state == "ok":
            if previous != "new":
                log.info("RPC endpoint {endpoint} is usable again (was {previous})",
                         endpoint=ep.label, previous=previous)
        else:
            log.warn("RPC endpoint {endpoint}: {state} ({detail})",
                     endpoint=ep.label, state=state, detail=detail)


def _rpc_failure(value: Any) -> RPCFailure:
    """The RPCFailure inside a DeferredList failure; anything else (ChainMismatch, bugs) is raised."""
    failure = cast(Failure, value)
    if failure.check(RPCFailure):
        return cast(RPCFailure, failure.value)
    failure.raiseException()
    raise AssertionError("unreachable")  # pragma: no cover


def _cancelled(e: BaseException) -> bool:
    """Whether ``e`` is, or wraps (twisted.web's reasons lists), a cancellation."""
    if isinstance(e, defer.CancelledError):
        return True
    return any(
        isinstance(r, Failure) and r.check(defer.CancelledError) for r in getattr(e, "reasons", None) or ()
    )


def _reasons(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if not reasons:
        return e.__class__.__name__
    return ", ".join(
        r.value.__class__.__name__ if isinstance(r, Failure) else str(r) for r in reasons
    )
