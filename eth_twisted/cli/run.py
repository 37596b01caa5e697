"""``eth run``: server and client in one process, on the embedded defaults.

It prints where its data lives, the dashboard URL and one line per stored block. The
server listens on 127.0.0.1:9999, or on a free port when 9999 is taken. Ctrl-C (SIGINT) or
SIGTERM first lets the client drain its outbox, within ``--drain-timeout`` seconds, then
stops both. Its site has ``eth server``'s protections: the Host allowlist on loopback (DNS
rebinding), the optional bearer token, the listener's limits. docs/architecture.md
(section 2, "eth run") draws its service tree.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from eth_twisted.client.endpoints import RPCSettings
from eth_twisted.client.outbox import OutboxSettings
from eth_twisted.client.poller import PollSettings
from eth_twisted.client.service import ClientSettings, LinkSettings
from eth_twisted.model import Message
from eth_twisted.options import (
    PRECEDENCE,
    EnvOptions,
    flag_rows,
    int_in,
    option_rows,
    positive_float,
    settings_from,
    state_path,
)
from eth_twisted.server.limits import ReceiverLimits
from eth_twisted.server.tap import FILE_HEADROOM, raise_file_limit
from eth_twisted.sinks.sql.sqlite import SQLITE_FILE
from eth_twisted.web.app import SITE_OPTIONS, SiteSettings, exposure_warning, site_settings_from

log = Logger()


class RunOptions(EnvOptions):
    """Options of ``eth run``."""

    synopsis = "[options]"
    longdesc = (
        "Run the server (SQLite) and the client together: watch the chain head on --rpc "
        "and store every block locally, with the dashboard on --stats. " + PRECEDENCE
    )
    repeatable = ("rpc",)
    secrets = ("stats-token",)
    optFlags = [*flag_rows(ClientSettings, "reset_cursor")]
    doc_rpc = next(f.metadata["help"] for f in dataclasses.fields(RPCSettings) if f.name == "rpc")
    optParameters = [
        [
            "port",
            None,
            9999,
            "Internal server port on 127.0.0.1 (a free one is used when it is taken)",
            int_in(0, 65535),
        ],
        [
            "stats",
            None,
            "tcp:8080:interface=127.0.0.1",
            "Endpoint of the dashboard and API, or 'none'",
        ],
        *option_rows(PollSettings, "interval", "format", "max_backfill"),
        [
            "data-dir",
            None,
            None,
            "Directory for the SQLite file and the outbox "
            "[default: $STATE_DIRECTORY, else the working directory]",
        ],
        [
            "drain-timeout",
            None,
            10.0,
            "Seconds Ctrl-C waits for the outbox to drain",
            positive_float,
        ],
        *SITE_OPTIONS,
    ]

    def postOptions(self) -> None:
        directory = self["data-dir"]
        self["sqlite"] = (
            str(Path(directory) / SQLITE_FILE)
            if directory
            else state_path(SQLITE_FILE, self.environ)
        )
        spool = OutboxSettings().spool
        self["spool"] = spool = (
            str(Path(directory) / spool) if directory else state_path(spool, self.environ)
        )
        # The client's settings but its server's port, known once the server listens.
        self.client = ClientSettings(
            rpc=RPCSettings(rpc=tuple(self["rpc"])) if self["rpc"] else RPCSettings(),
            poll=settings_from(PollSettings, self),
            outbox=OutboxSettings(spool=spool),
            site=SiteSettings(stats=None),
            reset_cursor=bool(self["reset-cursor"]),
        )
        try:
            self.client.check()
        except ValueError as e:
            raise usage.UsageError(str(e))
        # The same site settings as eth server's: loopback answers only loopback names.
        try:
            self.site = site_settings_from(
                self, None if self["stats"].lower() == "none" else self["stats"]
            )
        except ValueError as e:
            raise usage.UsageError(str(e))
        exposed = exposure_warning(
            self.site.stats, self.site.stats_allowed_hosts, self.site.stats_token
        )
        if exposed:
            self.warnings.append(exposed)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` right now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


class RunService(service.MultiService):
    """The server and the client; stopping drains the client's outbox first.

    The client is built once the server listens, so it can be pointed at the
    server's actual port (a free one when 9999 is taken).
    """

    def __init__(
        self,
        server: Any,
        make_client: Callable[[int], Any],
        site: SiteSettings,
        reactor: Any,
        drain_timeout: float,
        out: TextIO,
    ) -> None:
        super().__init__()
        self.site = site
        """Where the combined site listens, who may read it and its limits (as eth server builds them)."""
        self.server = server
        self.make_client = make_client
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.out = out
        self.client: Any = None
        self.exit_code = 0
        server.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        self.server.when_ready().addCallback(lambda _: self._start_client())

    def _start_client(self) -> None:
        """Once the server's sinks answer, start the client against its actual port."""
        if not self.running:
            return
        port = self.server.port.getHost().port
        self.client = self.make_client(port)
        self.client.setServiceParent(self)
        self.say(f"eth run: server on 127.0.0.1:{port}, records in {self.server.summary}")
        self.say(f"eth run: client outbox in {self.client.outbox.path}")
        if self.site.stats is not None:
            self._serve_site(self.site.stats)

    def _serve_site(self, listen: str) -> None:
        from eth_twisted.web.site import make_combined_site

        site = make_combined_site(
            record=self.server.record,
            sinks=self.server.sinks,
            stats=self.server.stats,
            metrics=self.server.metrics,
            client_metrics=self.client.metrics,
            client_readiness=self.client.readiness,
            client_status=getattr(self.client, "status", None),
            clock=self.reactor,
            token=self.site.stats_token,
            allowed_hosts=self.site.stats_allowed_hosts,
            limits=self.site.limits,
        )
        web = strports.service(listen, site, reactor=self.reactor)
        web.setName("stats")
        web.setServiceParent(self)
        needs = (
            " (the API needs the stats token: add #token=<token> to the URL)"
            if self.site.stats_token
            else ""
        )
        self.say(f"eth run: dashboard at {_url_for(listen)}{needs}")

    def say(self, line: str) -> None:
        """One line for the person watching the terminal."""
        print(line, file=self.out, flush=True)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        if self.client is not None:
            depth = self.client.outbox.depth()
            if depth:
                self.say(
                    f"eth run: delivering {depth} waiting messages (at most {self.drain_timeout:.0f}s)"
                )
                try:
                    yield self.client.delivery.drain(self.drain_timeout)
                except Exception as e:
                    self.say(f"eth run: drain stopped: {e}")
            self.exit_code = int(self.client.exit_code or 0)
            yield self.client.disownServiceParent()
        yield super().stopService()


def make_run_service(
    config: RunOptions, reactor: Any, verbose: bool = False, out: TextIO | None = None
) -> RunService:
    """Build ``eth run`` from its options."""
    from eth_twisted.client.service import make_client_service
    from eth_twisted.server.service import ServerSettings, build_server
    from eth_twisted.sinks import StorageSettings
    from eth_twisted.sinks.sql.sqlite import SQLiteSettings
    from eth_twisted.web.app import SiteSettings

    out = out or sys.stdout
    port = config["port"] if port_is_free(config["port"]) else 0
    if port == 0 and config["port"]:
        print(f"eth run: port {config['port']} is taken; using a free port", file=out, flush=True)
    raise_file_limit(
        ReceiverLimits().max_connections + config.site.limits.stats_max_connections + FILE_HEADROOM
    )
    server = build_server(
        ServerSettings(
            listen=f"tcp:{port}:interface=127.0.0.1",
            site=SiteSettings(stats=None),
            verbose=verbose,
            storage=StorageSettings(sqlite=SQLiteSettings(sqlite=config["sqlite"])),
        ),
        reactor=reactor,
    )

    def make_client(server_port: int) -> Any:
        settings = dataclasses.replace(config.client, link=LinkSettings(port=server_port))
        return make_client_service(settings, reactor=reactor)

    run = RunService(server, make_client, config.site, reactor, config["drain-timeout"], out)
    for warning in config.warnings:
        print(f"eth run: warning: {warning}", file=out, flush=True)

    def print_blocks(messages: Sequence[Message], codes: Sequence[str]) -> None:
        for m, code in zip(messages, codes, strict=True):
            if code == "OK":
                block = "?" if m.block_number is None else m.block_number
                run.say(f"stored block {block}  sha256 {m.hash[:16]}…  from {m.client_ip}")

    server.router.observers.append(print_blocks)
    return run


def _url_for(endpoint: str) -> str:
    """http://host:port/ for a tcp: endpoint string (best effort)."""
    parts = endpoint.split(":")
    port = parts[1] if len(parts) > 1 else "8080"
    host = "127.0.0.1"
    for p in parts[2:]:
        if p.startswith("interface="):
            host = p.split("=", 1)[1] or host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/"
