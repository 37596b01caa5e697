"""``twistd eth-server`` / ``eth server``: the options, and the settings they become.

Every option row takes its default and help from the settings dataclass field
of its name (:func:`~eth_twisted.options.option_rows`); :func:`makeService`
validates once, builds one :class:`~eth_twisted.server.service.ServerSettings`
and hands it to :func:`~eth_twisted.server.service.build_server`. Nothing
below here sees an Options object.
"""

from __future__ import annotations

import gc
from typing import Any, ClassVar

from twisted.logger import Logger
from twisted.python import usage

from eth_twisted.errors import ConfigError
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.options import (
    PRECEDENCE,
    EnvOptions,
    flag_rows,
    int_in,
    option_rows,
    settings_from,
    state_path,
)
from eth_twisted.server.limits import ReceiverLimits
from eth_twisted.server.router import BatchSettings
from eth_twisted.server.service import ServerSettings, ServerTLS
from eth_twisted.sinks import StorageSettings
from eth_twisted.sinks.redis import RedisSettings
from eth_twisted.sinks.sql.pool import MySQLSettings
from eth_twisted.sinks.sql.sqlite import SQLITE_FILE, SQLiteSettings
from eth_twisted.web.app import SITE_OPTIONS, SiteSettings, exposure_warning, site_settings_from

log = Logger()


def tcp_endpoint(host: str, port: int) -> str:
    """The endpoint string for ``--host``/``--port`` (IPv6 colons escaped)."""
    return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"


class StorageOptions(EnvOptions):
    """The storage options shared by ``eth server`` and ``eth migrate``."""

    secrets: ClassVar[tuple[str, ...]] = ("mysql-pass", "redis-password")

    optFlags = flag_rows(StorageSettings)
    optParameters: list[list[Any]] = [
        *option_rows(SQLiteSettings),
        *option_rows(MySQLSettings),
        ["mysql-pass-file", None, None, "File holding the MySQL password"],
        *option_rows(RedisSettings),
        ["redis-password-file", None, None, "File holding the Redis password"],
    ]

    def postOptions(self) -> None:
        if self["use-mysql"]:
            for name in ("mysql-host", "mysql-user", "mysql-db"):
                if not self[name]:
                    raise usage.UsageError(f"--use-mysql needs --{name}")
        elif self["mysql-host"] and self.from_argv("mysql-host"):
            self.warnings.append("--mysql-host is ignored without --use-mysql")
        self.storage = self.storage_settings()
        if self.storage.use_redis and self.storage.redis.redis_tls_ca:
            try:
                self.storage.redis.tls_context()  # the CA file is read now: a bad one is a start-up error
            except ConfigError as e:
                raise usage.UsageError(str(e))

    def storage_settings(self) -> StorageSettings:
        """The sinks these options describe, with their secrets resolved (never from argv alone)."""
        self["sqlite"] = self["sqlite"] or state_path(SQLITE_FILE, self.environ)
        return settings_from(
            StorageSettings,
            self,
            sqlite=SQLiteSettings(sqlite=self["sqlite"]),
            mysql=settings_from(
                MySQLSettings,
                self,
                mysql_pass=self.resolve_secret("mysql-pass") if self["use-mysql"] else None,
            ),
            redis=settings_from(
                RedisSettings,
                self,
                redis_password=self.resolve_secret("redis-password") if self["use-redis"] else None,
            ),
        )


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
        [
            "verbose",
            "v",
            "Log every message received (the seed's DATA line) and other debug detail",
        ],
        *flag_rows(BatchSettings),
        *flag_rows(ServerSettings),
    ]
    optParameters = [
        ["host", None, "127.0.0.1", "Interface to listen on"],
        ["port", None, 9999, "TCP port to listen on", int_in(0, 65535)],
        [
            "listen",
            None,
            None,
            "Endpoint string to listen on instead of --host/--port, e.g. tcp:9999:interface=0.0.0.0",
        ],
        ["stats", None, SiteSettings().stats, "Endpoint of the stats HTTP API, or 'none'"],
        *option_rows(ServerTLS),
        [
            "secret-file",
            None,
            None,
            "File holding the link's shared secret (also ETH_SECRET, "
            "$CREDENTIALS_DIRECTORY/link-secret): clients must pass the HMAC handshake",
        ],
        *option_rows(ReceiverLimits),
        *option_rows(BatchSettings),
        *option_rows(ServerSettings),
        *SITE_OPTIONS,
    ]

    def postOptions(self) -> None:
        super().postOptions()
        try:
            self.settings = self.server_settings()
        except ConfigError as e:
            raise usage.UsageError(str(e))
        except ValueError as e:
            raise usage.UsageError(
                str(e).replace("idle_timeout", "--idle-timeout").replace("deadline", "--deadline")
            )
        site = self.settings.site
        exposed = exposure_warning(site.stats, site.stats_allowed_hosts, site.stats_token)
        if exposed:
            self.warnings.append(exposed)

    def server_settings(self) -> ServerSettings:
        """The settings of everything ``eth server`` runs, checked.

        A ConfigError or ValueError names the option at fault.
        """
        from eth_twisted.link.secret import check_secret_transport, load_secret

        listen = self["listen"] = self["listen"] or tcp_endpoint(self["host"], self["port"])
        tls = settings_from(ServerTLS, self)
        tls.check()
        secret = load_secret(file=self["secret-file"], environ=self.environ)
        check_secret_transport(
            secret, tls.enabled or listen.startswith("ssl:"), self["allow-plaintext-secret"]
        )
        site = site_settings_from(self, None if self["stats"].lower() == "none" else self["stats"])
        limits = settings_from(ReceiverLimits, self)
        limits.check()
        return settings_from(
            ServerSettings,
            self,
            listen=listen,
            storage=self.storage,
            limits=limits,
            batch=settings_from(BatchSettings, self),
            tls=tls,
            secret=secret,
            site=site,
            verbose=bool(self["verbose"]),
        )

    def limits(self) -> ReceiverLimits:
        """The receiver's limits from these options."""
        return self.settings.limits


def makeService(config: Options, reactor: Any = None) -> Any:
    """Build the eth-server from parsed options."""
    from eth_twisted.server.service import build_server

    reactor = maybe_global_reactor(reactor)
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    tune_gc()  # this is the process's entry point (twistd or eth server)
    settings = config.settings
    raise_file_limit(
        settings.limits.max_connections + settings.site.limits.stats_max_connections + FILE_HEADROOM
    )
    return build_server(settings, reactor=reactor)


GC_THRESHOLD = (50_000, 20, 100)
"""Collection thresholds :func:`tune_gc` sets (CPython's default is 700, 10, 10)."""


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLD) -> None:
    """Make the cyclic garbage collector cheap for a busy server; call once, after start-up.

    Under load the server holds tens of thousands of live objects (a window of
    messages per connection, their reply slots and callables). CPython's default
    thresholds run a collection every 700 allocations and a full one every
    70,000, each walking every live object, a measurable share of the server's
    throughput (bench/README.md, "What was slow", item 5). This freezes what
    start-up allocated (modules, classes: never garbage) and collects young
    objects every ``thresholds[0]`` allocations instead. Process-wide, so it is
    the process's entry point that calls it, never a library object.
    """
    gc.freeze()
    gc.set_threshold(*thresholds)


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
            log.warn(
                "Could not raise the open-files limit from {soft} to {target}: {error}",
                soft=soft,
                target=target,
                error=str(e),
            )
    if not unlimited and hard < needed:
        log.warn(
            "The open-files limit ({hard}) is below what the connection caps need ({needed}): lower "
            "--max-connections/--stats-max-connections or raise LimitNOFILE, else accepts fail first",
            hard=hard,
            needed=needed,
        )
    return int(soft)
