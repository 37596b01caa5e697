"""``twistd eth-server`` / ``eth server``: options, and the service they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from twisted.logger import Logger
from twisted.python import usage

from eth_twisted.errors import ConfigError
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.options import (
    PRECEDENCE,
    EnvOptions,
    int_in,
    mask,
    non_negative_float,
    positive_float,
    state_path,
)
from eth_twisted.server.limits import (
    DEFAULT_DEADLINE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_WINDOW,
    ReceiverLimits,
)
from eth_twisted.server.router import DEFAULT_PENDING_BUDGET, SERVER_CONCURRENCY
from eth_twisted.web.app import allowed_hosts, exposure_warning
from eth_twisted.web.limits import STATS_LIMIT_OPTIONS, limits_from_options

log = Logger()

DEFAULT_STATS = "tcp:8080:interface=127.0.0.1"
SQLITE_FILE = "eth-server.sqlite3"


def tcp_endpoint(host: str, port: int) -> str:
    """The endpoint string for ``--host``/``--port`` (IPv6 colons escaped)."""
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


class StorageOptions(EnvOptions):
    """The storage flags shared by ``eth server`` and ``eth migrate``."""

    secrets: ClassVar[tuple[str, ...]] = ("mysql-pass", "redis-password")

    optFlags = [
        ["use-mysql", None, "Store to MySQL/MariaDB (else to the embedded SQLite file)"],
        ["use-redis", None, "Mirror counts and hashes to Redis"],
        ["no-migrate", None, "Do not apply schema migrations at start (run `eth migrate` instead)"],
    ]
    optParameters: list[list[Any]] = [
        ["sqlite", None, None, f"SQLite file used without MySQL [default: {SQLITE_FILE} in $STATE_DIRECTORY, else the working directory]"],
        ["mysql-host", None, None, "MySQL host (required with --use-mysql)"],
        ["mysql-port", None, 3306, "MySQL port", int_in(1, 65535)],
        ["mysql-user", None, None, "MySQL user (required with --use-mysql)"],
        ["mysql-pass", None, None, "MySQL password (prefer ETH_MYSQL_PASS, --mysql-pass-file or $CREDENTIALS_DIRECTORY/mysql-pass)"],
        ["mysql-pass-file", None, None, "File holding the MySQL password"],
        ["mysql-db", None, None, "MySQL database (required with --use-mysql)"],
        ["mysql-ssl-ca", None, None, "CA file: connect to MySQL over TLS and verify its certificate"],
        ["mysql-connect-timeout", None, 5.0, "Seconds to connect to MySQL", positive_float],
        ["mysql-read-timeout", None, 30.0, "Seconds to wait for a MySQL reply", positive_float],
        ["redis-host", None, "127.0.0.1", "Redis host"],
        ["redis-port", None, 6379, "Redis port", int_in(1, 65535)],
        ["redis-db", None, 0, "Redis database number", int_in(0, 1_000_000)],
        ["redis-prefix", None, "eth:", "Prefix of every Redis key"],
        ["redis-username", None, None, "Redis ACL user"],
        ["redis-password", None, None, "Redis password (prefer ETH_REDIS_PASSWORD or --redis-password-file)"],
        ["redis-password-file", None, None, "File holding the Redis password"],
        ["redis-timeout", None, 5.0, "Seconds to wait for a Redis reply", positive_float],
        ["redis-tls-ca", None, None, "CA file: connect to Redis over TLS and verify its certificate and host name"],
    ]

    def postOptions(self) -> None:
        if self["use-mysql"]:
            for name in ("mysql-host", "mysql-user", "mysql-db"):
                if not self[name]:
                    raise usage.UsageError(f"--use-mysql needs --{name}")
            self["mysql-password"] = self.resolve_secret("mysql-pass")
        elif self["mysql-host"] and self.from_argv("mysql-host"):
            self.warnings.append("--mysql-host is ignored without --use-mysql")
        if self["use-redis"]:
            self["redis-password-resolved"] = self.resolve_secret("redis-password")
        if not self["sqlite"]:
            self["sqlite"] = state_path(SQLITE_FILE, self.environ)

    def storage_summary(self) -> str:
        """Where messages go, for the start-up log line (no secrets)."""
        if self["use-mysql"]:
            sql = (f"mysql://{self['mysql-user']}:{mask(self.get('mysql-password'))}@"
                   f"{self['mysql-host']}:{self['mysql-port']}/{self['mysql-db']}")
        else:
            sql = f"sqlite:{self['sqlite']}"
        if self["use-redis"]:
            return f"{sql} + redis://{self['redis-host']}:{self['redis-port']}/{self['redis-db']} prefix {self['redis-prefix']}"
        return sql


class Options(StorageOptions):
    """Options of the eth-server (same for ``twistd eth-server`` and ``eth server``)."""

    secrets: ClassVar[tuple[str, ...]] = (*StorageOptions.secrets, "stats-token")

    synopsis = "[options]"
    longdesc = (
        "Receive netstring messages, store each in SQL (MySQL, or the embedded SQLite "
        "file) and Redis, and answer OK/DUP/ERR after the commit. " + PRECEDENCE
    )
    # usage.Options gathers optFlags/optParameters from every base class.
    optFlags = [
        ["verbose", "v", "Log every message received (the seed's DATA line) and other debug detail"],
        ["pipeline", None, "With Redis, let SQL store the next batch while Redis stores the current one: about 30% more throughput under saturation, about twice the latency at low load"],
        ["allow-plaintext-secret", None, "Allow the shared-secret handshake without TLS (the secret never crosses the wire, but the messages do, in clear)"],
    ]
    optParameters = [
        ["host", None, "127.0.0.1", "Interface to listen on"],
        ["port", None, 9999, "TCP port to listen on", int_in(0, 65535)],
        ["listen", None, None, "Endpoint string to listen on instead of --host/--port, e.g. tcp:9999:interface=0.0.0.0"],
        ["stats", None, DEFAULT_STATS, "Endpoint of the stats HTTP API, or 'none'"],
        ["tls-cert", None, None, "PEM certificate (chain) of the server: listen with TLS"],
        ["tls-key", None, None, "PEM private key of --tls-cert"],
        ["tls-client-ca", None, None, "PEM CA: require client certificates issued by it (mutual TLS); the subject becomes client_id"],
        ["tls-min-version", None, "1.2", "Lowest TLS version accepted: 1.2 or 1.3"],
        ["secret-file", None, None, "File holding the link's shared secret (also ETH_SECRET, $CREDENTIALS_DIRECTORY/link-secret): clients must pass the HMAC handshake"],
        ["stats-token", None, None, "Bearer token the stats API requires (not /healthz, /readyz); prefer ETH_STATS_TOKEN or --stats-token-file"],
        ["stats-token-file", None, None, "File holding the stats API token"],
        ["stats-allowed-hosts", None, None, "Comma list of Host header values the stats API answers [default on loopback: localhost,127.0.0.1,::1]"],
        ["max-length", None, DEFAULT_MAX_LENGTH, "Largest message accepted, in bytes", int_in(1, 16 * 1024 * 1024)],
        ["window", None, DEFAULT_WINDOW, "Unanswered messages per connection before reading pauses", int_in(1, 65536)],
        ["deadline", None, DEFAULT_DEADLINE, "Seconds within which every message is answered (else ERR timeout)", positive_float],
        ["batch-size", None, 1000, "Most messages per sink batch", int_in(1, 100_000)],
        ["batch-delay", None, 0.002, "Seconds to collect a batch before storing it", non_negative_float],
        ["concurrent-batches", None, SERVER_CONCURRENCY, "Batches in the SQL record at once, each in its own transaction (answers stay in order); more than 1 lets the database share one flush between them", int_in(1, 8)],
        ["reconcile-interval", None, 300.0, "Seconds between Redis rebuilds from SQL", positive_float],
        ["frame-timeout", None, 30.0, "Seconds a frame may take from its first byte to its comma", positive_float],
        ["idle-timeout", None, 90.0, "Seconds without a complete frame before a connection is dropped (clients heartbeat at a third of it)", positive_float],
        ["write-stall", None, 60.0, "Seconds a peer may leave its replies unread before it is dropped", positive_float],
        ["rate", None, 5000.0, "Messages per second per connection before reading pauses", positive_float],
        ["burst", None, 10000, "Messages a connection may send at once before the rate applies", int_in(1)],
        ["partial-budget", None, 32 * 1024 * 1024, "Bytes of incomplete (or not yet handled) frames held across all connections before reading pauses; the oldest holder always reads", int_in(1024)],
        ["pending-budget", None, DEFAULT_PENDING_BUDGET, "Payload bytes queued for the sinks across all connections before new messages are answered busy", int_in(65536)],
        ["max-connections", None, 10000, "Connections the server holds at once", int_in(1)],
        ["max-per-ip", None, 100, "Connections per client address (IPv6: per /64)", int_in(1)],
        *STATS_LIMIT_OPTIONS,
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["listen"]:
            self["listen"] = tcp_endpoint(self["host"], self["port"])
        self["stats-token-resolved"] = self.resolve_secret("stats-token")
        self["tls"] = tls_kwargs(self)
        try:
            from eth_twisted.link.secret import check_secret_transport, load_secret

            self["secret"] = load_secret(file=self["secret-file"], environ=self.environ)
            check_secret_transport(self["secret"], bool(self["tls"]) or self["listen"].startswith("ssl:"),
                                   self["allow-plaintext-secret"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        self["allowed-hosts"] = allowed_hosts(self["stats"], self["stats-allowed-hosts"])
        self["stats-limits"] = limits_from_options(self)
        exposed = exposure_warning(self["stats"], self["allowed-hosts"], self["stats-token-resolved"])
        if exposed:
            self.warnings.append(exposed)
        try:
            self.limits().check()
        except ValueError as e:
            raise usage.UsageError(str(e).replace("idle_timeout", "--idle-timeout").replace("deadline", "--deadline"))

    def limits(self) -> ReceiverLimits:
        """The receiver's limits from these options."""
        return ReceiverLimits(
            max_length=self["max-length"], window=self["window"], deadline=self["deadline"],
            frame_timeout=self["frame-timeout"], idle_timeout=self["idle-timeout"],
            write_stall=self["write-stall"], rate=self["rate"], burst=self["burst"],
            partial_budget=self["partial-budget"], max_connections=self["max-connections"],
            max_per_ip=self["max-per-ip"],
        )


def makeService(config: Options, reactor: Any = None) -> Any:
    """Build the eth-server from parsed options."""
    from eth_twisted.server.service import build_server

    reactor = maybe_global_reactor(reactor)
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    from eth_twisted.server.router import tune_gc

    tune_gc()  # this is the process's entry point (twistd or eth server)
    raise_file_limit(config["max-connections"] + config["stats-max-connections"] + FILE_HEADROOM)
    return build_server(
        reactor=reactor,
        listen=config["listen"],
        stats_listen=None if config["stats"].lower() == "none" else config["stats"],
        storage=storage_kwargs(config),
        limits=config.limits(),
        stats_token=config["stats-token-resolved"],
        tls=config["tls"],
        secret=config["secret"],
        allow_plaintext_secret=config["allow-plaintext-secret"],
        allowed_hosts=config["allowed-hosts"],
        stats_limits=config["stats-limits"],
        pipeline=True if config["pipeline"] else None,
        batch_size=config["batch-size"],
        batch_delay=config["batch-delay"],
        concurrent_batches=config["concurrent-batches"],
        pending_budget=config["pending-budget"],
        reconcile_interval=config["reconcile-interval"],
        verbose=config["verbose"],
        summary=config.storage_summary(),
    )


FILE_HEADROOM = 256
"""Descriptors a server needs besides its connections: listeners, database and Redis pools, logs."""


def raise_file_limit(needed: int, resource_module: Any = None) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one so the connection caps, not the kernel, bind.

    systemd (and most shells) start services with a soft limit of 1,024 and a
    far higher hard limit, expecting a daemon that needs more to raise its own
    soft limit. Without it a flood of connections runs the process out of
    descriptors below ``--max-connections``: accepts fail (Twisted logs three
    lines per refused socket) and the server resets new clients. Returns the
    soft limit in force; warns once when even the hard limit is below ``needed``.
    """
    if resource_module is None:
        import resource as resource_module
    soft, hard = resource_module.getrlimit(resource_module.RLIMIT_NOFILE)
    unlimited = hard == resource_module.RLIM_INFINITY
    target = needed if unlimited else min(needed, hard)
    if soft != resource_module.RLIM_INFINITY and soft < target:
        try:
            resource_module.setrlimit(resource_module.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as e:
            log.warn("Could not raise the open-files limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=str(e))
    if not unlimited and hard < needed:
        log.warn(
            "The open-files limit ({hard}) is below what the connection caps need ({needed}): lower "
            "--max-connections/--stats-max-connections or raise LimitNOFILE, else accepts fail first",
            hard=hard, needed=needed,
        )
    return int(soft)


def redis_tls(host: str, ca_file: str) -> Any:
    """A verifying TLS connection creator for Redis (txredisapi's own default checks nothing)."""
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    try:
        pem = Path(ca_file).read_bytes()
    except OSError as e:
        raise usage.UsageError(f"--redis-tls-ca: cannot read {ca_file}: {e.strerror}")
    return optionsForClientTLS(host, trustRoot=Certificate.loadPEM(pem))


def tls_kwargs(config: usage.Options) -> dict[str, Any] | None:
    """The server's TLS settings, or None for plaintext; a half-given pair is an error naming it."""
    cert, key = config["tls-cert"], config["tls-key"]
    if not cert and not key:
        if config["tls-client-ca"]:
            raise usage.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise usage.UsageError("--tls-cert and --tls-key go together")
    for name in ("tls-cert", "tls-key", "tls-client-ca"):
        path = config[name]
        if path and not Path(path).is_file():
            raise usage.UsageError(f"--{name}: no such file {path}")
    if config["tls-min-version"] not in ("1.2", "1.3"):
        raise usage.UsageError(f"--tls-min-version: expected 1.2 or 1.3, got {config['tls-min-version']!r}")
    return {"cert": cert, "key": key, "client_ca": config["tls-client-ca"], "min_version": config["tls-min-version"]}


def storage_kwargs(config: StorageOptions) -> dict[str, Any]:
    """Plain keyword arguments describing the configured sinks."""
    kwargs: dict[str, Any] = {"migrate": not config["no-migrate"]}
    if config["use-mysql"]:
        kwargs["mysql"] = {
            "host": config["mysql-host"],
            "port": config["mysql-port"],
            "user": config["mysql-user"],
            "password": config.get("mysql-password"),
            "database": config["mysql-db"],
            "ssl": {"ca": config["mysql-ssl-ca"]} if config["mysql-ssl-ca"] else None,
            "connect_timeout": config["mysql-connect-timeout"],
            "read_timeout": config["mysql-read-timeout"],
        }
    else:
        kwargs["sqlite"] = config["sqlite"]
    if config["use-redis"]:
        kwargs["redis"] = {
            "host": config["redis-host"],
            "port": config["redis-port"],
            "db": config["redis-db"],
            "prefix": config["redis-prefix"],
            "username": config["redis-username"],
            "password": config.get("redis-password-resolved"),
            "reply_timeout": config["redis-timeout"],
        }
        if config["redis-tls-ca"]:
            kwargs["redis"]["tls"] = redis_tls(config["redis-host"], config["redis-tls-ca"])
    return kwargs
