"""The Redis mirror sink: stats keys updated by one Lua script per batch, rebuilt from SQL.

SQL is the record; :class:`RedisSink` mirrors it for the stats API (its docstring lists the
keys, how every call is bounded and how a Redis that restarted empty converges). The README
("Storage") gives the keys as a user sees them; docs/architecture.md (section 1, "Mirrors")
places the sink after the record.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import txredisapi
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from eth_twisted.errors import ConfigError, SinkBusy, SinkError, SinkTimeout, SinkUnavailable
from eth_twisted.interfaces import IRecord, ISink, maybe_global_reactor
from eth_twisted.model import DEFAULT_SUMMARY_PAGE_BYTES, MAX_BLOCK_NUMBER, Message, Outcome
from eth_twisted.options import int_in, positive_float, setting
from eth_twisted.sinks.redis_scripts import (
    INSTALL_COUNTS,
    RAISE_MESSAGES,
    READ_COUNTS,
    RECONCILE_PAGE,
    SCRIPTS,
    STORE,
    Script,
    pack_store_entries,
    score,
)

DEFAULT_PREFIX = "eth:"


DEFAULT_PAGE_SIZE = 5000
"""Records per page of a reconciliation (each page is also bounded by bytes: DEFAULT_SUMMARY_PAGE_BYTES)."""


RECONCILE_KEY_TTL = 600
"""Seconds a reconciliation's own count key outlives its last page (an abandoned run's key expires)."""


SCAN_COUNT = 1000
"""HSCAN COUNT hint when raising ip_messages from the rebuilt counts."""


# Error replies that mean "this Redis cannot serve us now": an outage (retryable).
# Other error replies (NOPERM, WRONGTYPE, unknown command) are refusals of one command.
_OUTAGE_CODES = frozenset(
    {
        "MISCONF",
        "LOADING",
        "READONLY",
        "MASTERDOWN",
        "OOM",
        "NOAUTH",
        "WRONGPASS",
        "CLUSTERDOWN",
        "TRYAGAIN",
    }
)


class RedisClient(Protocol):
    """What the sink needs from txredisapi's connection handler (fakes provide the same)."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Send one command and fire with its reply."""

    def disconnect(self) -> Deferred[Any]:
        """Close every connection and stop reconnecting."""


class ReconcileCancelled(Exception):
    """A reconciliation stopped between pages because its caller asked it to (a shutdown)."""


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What one reconciliation did."""

    records: int
    """Records read from the record."""

    hashes_added: int
    """Hashes that were missing from ``hashes`` and were added."""

    ips: int
    """Client IPs now in ``ip_addresses``."""

    ip_messages_raised: int
    """IPs whose ``ip_messages`` was below their ``ip_addresses`` and was raised."""

    seconds: float
    """How long it took, by the sink's clock."""


def _text(value: Any) -> str:
    """A Redis bulk reply (bytes with ``charset=None``) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _pairs_to_counts(flat: Sequence[Any] | None) -> dict[str, int]:
    """``[field, value, field, value, ...]`` from HGETALL as ``{field: int(value)}``."""
    items = list(flat or [])
    return {_text(items[i]): int(items[i + 1]) for i in range(0, len(items) - 1, 2)}


def parse_run_id(info: Any) -> str | None:
    """The ``run_id`` field of an ``INFO server`` reply, or None."""
    for line in _text(info).splitlines():
        if line.startswith("run_id:"):
            return line.split(":", 1)[1].strip()
    return None


@implementer(ISink)
class RedisSink:
    """The Redis mirror, on any txredisapi-like client.

    SQL is the record; Redis mirrors it for the stats API (README "Storage"):

    - ``<prefix>hashes``: sorted set, member = SHA-256, score = unix time of first receipt;
    - ``<prefix>ip_addresses``: hash, client IP -> records it was first to deliver;
    - ``<prefix>ip_messages``: hash, client IP -> every message it delivered, duplicates
      included.

    txredisapi queues commands silently while Redis is down and answers them minutes
    later, so every call made here is bounded twice: in time (``Deferred.addTimeout`` on
    the injected reactor) and in number (``max_in_flight``; past it a call fails at once).
    Failures become :mod:`eth_twisted.errors` exceptions: timeouts :class:`SinkTimeout`,
    everything else :class:`SinkUnavailable` (``BUSY`` scripts, and a full in-flight budget
    while Redis answers: :class:`SinkBusy`). An outage is logged once when it starts and
    once when it ends.

    A Redis that restarted empty converges through :meth:`reconcile`, which the
    :class:`~eth_twisted.sinks.reconcile.Reconciler` service runs at start, every
    ``interval`` and whenever the sink sees Redis come back (first success after
    failures, or a changed ``run_id``).

    ``redis`` is txredisapi's connection handler (see :func:`make_redis_sink`)
    or a fake with ``execute_command`` and ``disconnect``. It must be built with
    ``convertNumbers=False`` and ``charset=None``. Every call is bounded by
    ``call_timeout`` seconds on ``reactor`` and by ``max_in_flight`` calls.
    """

    name = "redis"
    log = Logger()

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        reactor: IReactorTime | None = None,
        call_timeout: float = 5.0,
        max_in_flight: int = 64,
        where: str = "redis",
    ) -> None:
        reactor = maybe_global_reactor(reactor)
        if call_timeout <= 0:
            raise ValueError("call_timeout must be positive")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._redis = redis
        self._reactor: IReactorTime = reactor
        self.prefix = prefix
        self.hashes_key = prefix + "hashes"
        self.ip_addresses_key = prefix + "ip_addresses"
        self.ip_messages_key = prefix + "ip_messages"
        self.reconcile_tmp_key = prefix + "ip_addresses:rebuild"
        """Prefix of each reconciliation's own count key (``<this>:<random>``): runs never share one."""
        self.call_timeout = call_timeout
        self.max_in_flight = max_in_flight
        self.where = where
        self.in_flight = 0
        self.failures = 0
        """Calls that failed (any reason), since start."""
        self.outage_started: float | None = None
        """When the current outage began (reactor seconds), None while Redis answers."""
        self.run_id: str | None = None
        """Redis's ``run_id`` as last seen: a change means Redis restarted."""
        self.persistent: bool | None = None
        """False when Redis has neither AOF nor RDB snapshots; None when unknown."""
        self._outage_failures = 0
        self._listeners: list[Callable[[], None]] = []
        self._stopped = False
        self._notify_pending = False

    # -- ISink -------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load the scripts, note Redis's run_id and warn when it has no persistence.

        Fails with a :class:`SinkError` when Redis does not answer; the sink still
        works afterwards (EVALSHA falls back to EVAL), so a caller may log and go on.
        """
        return defer.ensureDeferred(self._start())

    async def _start(self) -> None:
        for script in SCRIPTS:
            sha = await self._call("SCRIPT LOAD", "SCRIPT", "LOAD", script.source)
            if _text(sha) != script.sha:
                raise SinkUnavailable(self.name, f"SCRIPT LOAD {script.name} answered {sha!r}")
        self.run_id = await self._fetch_run_id()
        await self._check_persistence()

    def stop(self) -> Deferred[None]:
        """Close the pool (bounded by ``call_timeout``)."""
        self._stopped = True
        d = defer.maybeDeferred(self._redis.disconnect)
        d.addTimeout(self.call_timeout, self._reactor)

        def closed(result: Any) -> None:
            if isinstance(result, Failure):
                self.log.warn(
                    "Redis {where}: closing the pool: {reason}",
                    where=self.where,
                    reason=result.getErrorMessage(),
                )
            return None

        return d.addBoth(closed)

    def ping(self) -> Deferred[None]:
        """Fire with None when Redis answers PING; fail with a SinkError otherwise."""
        return self._call("PING", "PING").addCallback(lambda _: None)

    def store_batch(
        self, messages: Sequence[Message], verdicts: Sequence[Outcome] | None = None
    ) -> Deferred[list[Outcome]]:
        """Mirror one batch with a single Lua script; one Outcome per message, in order.

        With ``verdicts`` (the record's outcomes) a STORED message counts as its
        IP's first delivery, DUPLICATE does not, REJECTED is skipped entirely, and
        the verdicts are answered back. Without them the sink stands alone:
        ZADD NX decides (added: STORED, else DUPLICATE) and out-of-range block
        numbers are REJECTED like the record would.

        A timeout is ambiguous: the script may have run. The server then answers
        ``ERR timeout``, the client resends, and the record calls the resend DUP, so
        ``hashes`` and ``ip_addresses`` stay right; ``ip_messages`` counts that
        delivery twice (it counts deliveries, and cannot tell a resend apart).
        """
        if verdicts is not None and len(verdicts) != len(messages):
            return defer.fail(ValueError(f"{len(verdicts)} verdicts for {len(messages)} messages"))
        outcomes: list[Outcome | None] = []
        entries: list[tuple[str, float, str, str]] = []
        sent: list[int] = []
        for i, m in enumerate(messages):
            if verdicts is not None:
                verdict = verdicts[i]
                if verdict is Outcome.REJECTED:
                    outcomes.append(Outcome.REJECTED)
                    continue
                flag = "1" if verdict is Outcome.STORED else "0"
                outcomes.append(verdict)
            elif m.block_number is not None and not 0 <= m.block_number <= MAX_BLOCK_NUMBER:
                outcomes.append(Outcome.REJECTED)
                continue
            else:
                flag = "?"
                outcomes.append(None)
            sent.append(i)
            entries.append((m.hash, m.received_at, m.client_ip, flag))
        if not sent:
            return defer.succeed([o for o in outcomes if o is not None])

        keys = [self.hashes_key, self.ip_addresses_key, self.ip_messages_key]
        d = self._eval(STORE, keys, [str(len(sent)), pack_store_entries(entries)])

        def answer(added: Any) -> list[Outcome]:
            if isinstance(added, bytes | str):
                added = [1 if c in ("1", 49) else 0 for c in added]
            if not isinstance(added, list) or len(added) != len(sent):
                raise SinkUnavailable(self.name, f"store script answered {added!r}")
            for i, a in zip(sent, added, strict=True):
                if outcomes[i] is None:
                    outcomes[i] = Outcome.STORED if int(a) == 1 else Outcome.DUPLICATE
            return [o for o in outcomes if o is not None]

        return d.addCallback(answer)

    # -- read paths for the stats API ------------------------------------------------

    def read_counts(self) -> Deferred[tuple[dict[str, int], dict[str, int]]]:
        """``(ip_addresses, ip_messages)`` as ``{ip: count}``, read in one snapshot."""
        d = self._eval(READ_COUNTS, [self.ip_addresses_key, self.ip_messages_key], [])

        def decode(reply: Any) -> tuple[dict[str, int], dict[str, int]]:
            first, every = reply
            return _pairs_to_counts(first), _pairs_to_counts(every)

        return d.addCallback(decode)

    # -- restarts and reconciliation ---------------------------------------------------

    def add_recovery_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever Redis comes back or is seen to have restarted."""
        self._listeners.append(listener)

    def remove_recovery_listener(self, listener: Callable[[], None]) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def check_restart(self) -> Deferred[bool]:
        """Compare Redis's ``run_id`` with the last one seen; True (and listeners told) on a change."""
        d = defer.ensureDeferred(self._fetch_run_id())

        def compare(run_id: str | None) -> bool:
            previous, self.run_id = self.run_id, run_id
            if previous is not None and run_id is not None and run_id != previous:
                self.log.info(
                    "Redis {where} restarted (run_id {old} -> {new})",
                    where=self.where,
                    old=previous[:8],
                    new=run_id[:8],
                )
                self._notify()
                return True
            return False

        return d.addCallback(compare)

    def reconcile(
        self,
        record: IRecord,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_bytes: int = DEFAULT_SUMMARY_PAGE_BYTES,
        cancelled: Callable[[], bool] | None = None,
    ) -> Deferred[ReconcileResult]:
        """Rebuild what Redis can know from the record, reading it in bounded pages.

        Pages through ``record.fetch_summaries`` (hash, receipt time and first
        sender of each record, never a payload; at most ``page_size`` records and
        ``page_bytes`` bytes a page, by id). Each page is one script: missing
        hashes are added (ZADD NX with their receipt time) and the page's first
        deliveries per IP are added to a count key of this run's own. Then
        ``ip_messages`` is raised to at least those counts (HSCAN pages) and the
        count key replaces ``ip_addresses`` (RENAME). Memory is one page here and
        in each Redis call, whatever the size of the record or its payloads.

        ``cancelled`` is asked between pages: when it answers True the run stops
        with :class:`ReconcileCancelled` and ``ip_addresses`` is left as it was
        (a shutdown does not wait for a long rebuild).

        A batch mirrored while this runs may be counted in ``ip_addresses`` once
        too few or too many times (its SQL commit and its Redis update are not
        one transaction); the next reconciliation corrects it.
        """
        return defer.ensureDeferred(self._reconcile(record, page_size, page_bytes, cancelled))

    async def _reconcile(
        self, record: IRecord, page_size: int, page_bytes: int, cancelled: Callable[[], bool] | None
    ) -> ReconcileResult:
        started = self._reactor.seconds()
        counts_key = f"{self.reconcile_tmp_key}:{secrets.token_hex(8)}"
        after, records, added = 0, 0, 0
        try:
            while True:
                if cancelled is not None and cancelled():
                    raise ReconcileCancelled(f"stopped after {records} records")
                page = await record.fetch_summaries(after, page_size, page_bytes)
                if not page:
                    break
                zadd: list[str] = []
                firsts: dict[str, int] = {}
                for r in page:
                    zadd += [score(r.received_at), r.hash]
                    firsts[r.client_ip] = firsts.get(r.client_ip, 0) + 1
                counts = [x for ip, n in firsts.items() for x in (ip, str(n))]
                n = await self._eval(
                    RECONCILE_PAGE,
                    [self.hashes_key, counts_key],
                    [str(RECONCILE_KEY_TTL), str(len(zadd)), *zadd, *counts],
                )
                added += int(n)
                records += len(page)
                after = page[-1].id
            raised, cursor = 0, b"0"
            while True:
                if cancelled is not None and cancelled():
                    raise ReconcileCancelled(f"stopped after {records} records")
                cursor, flat = await self._call(
                    "reconcile HSCAN", "HSCAN", counts_key, cursor, "COUNT", str(SCAN_COUNT)
                )
                if flat:
                    raised += int(
                        await self._eval(RAISE_MESSAGES, [self.ip_messages_key], list(flat))
                    )
                if _text(cursor) == "0":
                    break
            ips = await self._eval(INSTALL_COUNTS, [counts_key, self.ip_addresses_key], [])
        except BaseException:
            if records:  # a page was written: its count key exists
                self._discard(counts_key)
            raise
        return ReconcileResult(records, added, int(ips), raised, self._reactor.seconds() - started)

    def _discard(self, key: str) -> None:
        """Best effort: delete an abandoned run's count key now (it expires anyway)."""
        d = self._call("reconcile cleanup", "DEL", key, quiet=True)
        d.addErrback(lambda _: None)

    # -- plumbing ----------------------------------------------------------------------

    async def _fetch_run_id(self) -> str | None:
        info = await self._call("INFO server", "INFO", "server")
        return parse_run_id(info)

    async def _check_persistence(self) -> None:
        try:
            appendonly = await self._call(
                "CONFIG GET appendonly", "CONFIG", "GET", "appendonly", quiet=True
            )
            save = await self._call("CONFIG GET save", "CONFIG", "GET", "save", quiet=True)
        except SinkError as e:
            self.persistent = None
            self.log.info(
                "Redis {where}: persistence unknown (CONFIG GET refused: {reason}); "
                "the mirror is rebuilt from SQL after a restart either way",
                where=self.where,
                reason=e.reason,
            )
            return
        aof = _text(appendonly[1]) if len(appendonly) > 1 else ""
        rdb = _text(save[1]).strip() if len(save) > 1 else ""
        self.persistent = aof == "yes" or bool(rdb)
        if not self.persistent:
            self.log.warn(
                "Redis {where} has no persistence (appendonly={aof}, save={save!r}): a restart "
                "empties the mirror until it is rebuilt from SQL",
                where=self.where,
                aof=aof,
                save=rdb,
            )

    def _eval(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Deferred[Any]:
        """EVALSHA ``script``, falling back to EVAL on NOSCRIPT; one bounded call in all."""

        def run() -> Deferred[Any]:
            d = self._redis.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

            def noscript(f: Failure) -> Any:
                if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
                    self.log.info(
                        "Redis {where}: script {script} not loaded; sending it with EVAL",
                        where=self.where,
                        script=script.name,
                    )
                    return self._redis.execute_command(
                        "EVAL", script.source, len(keys), *keys, *args
                    )
                return f

            return d.addErrback(noscript)

        return self._bounded(f"EVALSHA {script.name}", run)

    def _call(self, what: str, *command: Any, quiet: bool = False) -> Deferred[Any]:
        """One command, bounded in time and number."""
        return self._bounded(what, lambda: self._redis.execute_command(*command), quiet)

    def _bounded(
        self, what: str, start: Callable[[], Deferred[Any]], quiet: bool = False
    ) -> Deferred[Any]:
        """Run ``start()`` within the in-flight budget and ``call_timeout``; map its failure.

        ``quiet``: a refusal (a Redis error reply) is expected and not logged.
        """
        if self.in_flight >= self.max_in_flight:
            self.failures += 1
            if self.outage_started is not None:
                return defer.fail(
                    SinkUnavailable(
                        self.name, f"{what}: Redis is down and {self.in_flight} calls are waiting"
                    )
                )
            return defer.fail(SinkBusy(self.name, f"{what}: {self.in_flight} calls in flight"))
        self.in_flight += 1
        d = defer.maybeDeferred(start)
        d.addTimeout(self.call_timeout, self._reactor)

        def done(result: Any) -> Any:
            self.in_flight -= 1
            if isinstance(result, Failure):
                err, outage = self._translate(result, what, quiet)
                self.failures += 1
                if outage:
                    self._note_failure(err)
                else:
                    self._note_success()
                raise err
            self._note_success()
            return result

        return d.addBoth(done)

    def _translate(self, f: Failure, what: str, quiet: bool = False) -> tuple[SinkError, bool]:
        """Map a failure of one call to the project's exceptions; True when it is an outage."""
        if f.check(SinkError):
            return f.value, not f.check(SinkBusy)
        if f.check(defer.TimeoutError, txredisapi.TimeoutError):
            return SinkTimeout(self.name, f"{what}: no answer within {self.call_timeout:g}s"), True
        if f.check(txredisapi.ResponseError):
            text = str(f.value)
            code = text.split(" ", 1)[0]
            if code == "BUSY":
                return SinkBusy(self.name, f"{what}: {text}"), False
            if code in _OUTAGE_CODES:
                return SinkUnavailable(self.name, f"{what}: {text}"), True
            if not quiet:
                # Not an outage: a refused command (ACL, WRONGTYPE, a script bug).
                self.log.error(
                    "Redis {where}: {what} refused: {text}", where=self.where, what=what, text=text
                )
            return SinkUnavailable(self.name, f"{what}: {text}"), False
        if f.check(
            txredisapi.ConnectionError,
            error.ConnectError,
            error.ConnectionLost,
            error.ConnectionClosed,
            ConnectionError,
            defer.CancelledError,
        ):
            reason = f.getErrorMessage() or f.type.__name__
            return SinkUnavailable(self.name, f"{what}: {reason}"), True
        self.log.failure(
            "Redis {where}: {what} failed unexpectedly", f, where=self.where, what=what
        )
        return SinkUnavailable(self.name, f"{what}: {f.type.__name__}"), True

    def _note_failure(self, err: SinkError) -> None:
        self._outage_failures += 1
        if self.outage_started is None and not self._stopped:
            self.outage_started = self._reactor.seconds()
            self.log.error(
                "Redis {where} is unavailable: {reason}; calls fail until it answers",
                where=self.where,
                reason=err.reason,
            )

    def _note_success(self) -> None:
        if self.outage_started is None:
            return
        seconds = self._reactor.seconds() - self.outage_started
        failed, self._outage_failures = self._outage_failures, 0
        self.outage_started = None
        self.log.info(
            "Redis {where} answers again after {seconds:.1f}s ({failed} failed calls)",
            where=self.where,
            seconds=seconds,
            failed=failed,
        )
        self._notify()

    def _notify(self) -> None:
        # Called from inside a call's callbacks: let the listeners run on the next turn,
        # once for every signal (recovery, new run_id) that arrived before it.
        if not self._notify_pending:
            self._notify_pending = True
            self._reactor.callLater(0, self._run_listeners)

    def _run_listeners(self) -> None:
        self._notify_pending = False
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                self.log.failure("Redis {where}: recovery listener failed", where=self.where)


@dataclass(slots=True)
class RedisSettings:
    """Where and how the Redis mirror connects; the option fields are the server options of their names."""

    redis_host: str = setting("127.0.0.1", "Redis host")
    redis_port: int = setting(6379, "Redis port", int_in(1, 65535))
    redis_db: int = setting(0, "Redis database number", int_in(0, 1_000_000))
    redis_prefix: str = setting(DEFAULT_PREFIX, "Prefix of every Redis key")
    redis_username: str | None = setting(None, "Redis ACL user")
    redis_password: str | None = setting(
        None, "Redis password (prefer ETH_REDIS_PASSWORD or --redis-password-file)"
    )
    redis_timeout: float = setting(5.0, "Seconds to wait for a Redis reply", positive_float)
    redis_tls_ca: str | None = setting(
        None, "CA file: connect to Redis over TLS and verify its certificate and host name"
    )
    tls: Any = None
    """A ``ClientContextFactory`` to use instead of one built from ``redis_tls_ca`` (True: TLS unverified)."""
    call_timeout: float | None = None
    """Bound on each call, the wait for a connection included (default: ``redis_timeout``)."""
    connect_timeout: float | None = None
    pool_size: int = 4
    max_in_flight: int = 64

    def tls_context(self) -> Any:
        """The TLS connection creator, or False for plaintext (txredisapi's own default checks nothing)."""
        if self.tls is not None:
            return self.tls
        if not self.redis_tls_ca:
            return False
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        try:
            pem = Path(self.redis_tls_ca).read_bytes()
        except OSError as e:
            raise ConfigError(f"--redis-tls-ca: cannot read {self.redis_tls_ca}: {e.strerror}")
        return optionsForClientTLS(self.redis_host, trustRoot=Certificate.loadPEM(pem))


def make_redis_sink(settings: RedisSettings, *, reactor: IReactorTime | None = None) -> RedisSink:
    """Build a :class:`RedisSink` on a txredisapi lazy connection pool (not yet started).

    ``redis_timeout`` bounds each reply on the wire (txredisapi aborts the
    connection past it); ``call_timeout`` (default: the same) bounds each call
    including the wait for a connection. txredisapi always uses the global
    reactor for its connections; ``reactor`` drives our own timeouts.
    """
    pool = txredisapi.lazyConnectionPool(
        host=settings.redis_host,
        port=settings.redis_port,
        # SELECT only when needed: a failed SELECT stops txredisapi reconnecting (#146).
        dbid=settings.redis_db or None,
        poolsize=settings.pool_size,
        reconnect=True,
        charset=None,
        password=settings.redis_password,
        username=settings.redis_username,
        ssl_context_factory=settings.tls_context(),
        connectTimeout=settings.connect_timeout
        if settings.connect_timeout is not None
        else settings.redis_timeout,
        replyTimeout=settings.redis_timeout,
        convertNumbers=False,
    )
    where = f"{settings.redis_host}:{settings.redis_port}/{settings.redis_db}"
    call_timeout = (
        settings.call_timeout if settings.call_timeout is not None else settings.redis_timeout
    )
    return RedisSink(
        pool,
        prefix=settings.redis_prefix,
        reactor=reactor,
        call_timeout=call_timeout,
        max_in_flight=settings.max_in_flight,
        where=where,
    )
