"""``eth run``: server and client in one process, on the embedded defaults.

It prints where its data lives, the dashboard URL and one line per stored
block. The server listens on 127.0.0.1:9999, or on a free port when 9999 is
taken. Ctrl-C (SIGINT) or SIGTERM first lets the client drain its outbox,
within ``--drain-timeout`` seconds, then stops both.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from eth_twisted.config import PRECEDENCE, EnvOptions, int_in, positive_float, state_path
from eth_twisted.model import Message

log = Logger()


class RunOptions(EnvOptions):
    """Options of ``eth run``."""

    synopsis = "[options]"
    longdesc = (
        "Run the server (SQLite) and the client together: watch the chain head on --rpc "
        "and store every block locally, with the dashboard on --stats. " + PRECEDENCE
    )
    repeatable = ("rpc",)
    doc_rpc = "JSON-RPC endpoint URL (repeatable; default: a short list of public mainnet endpoints)"
    optParameters = [
        ["port", None, 9999, "Internal server port on 127.0.0.1 (a free one is used when it is taken)", int_in(0, 65535)],
        ["stats", None, "tcp:8080:interface=127.0.0.1", "Endpoint of the dashboard and API, or 'none'"],
        ["interval", None, 5.0, "Seconds between polls of the chain head", positive_float],
        ["format", None, "html", "Payload format: html or json"],
        ["data-dir", None, None, "Directory for the SQLite file and the outbox [default: $STATE_DIRECTORY, else the working directory]"],
        ["drain-timeout", None, 10.0, "Seconds Ctrl-C waits for the outbox to drain", positive_float],
        ["max-backfill", None, 128, "Most blocks fetched per poll", int_in(1, 100_000)],
    ]

    def postOptions(self) -> None:
        if self["format"] not in ("html", "json"):
            raise usage.UsageError(f"--format: expected html or json, got {self['format']!r}")
        directory = self["data-dir"]
        self["sqlite"] = str(Path(directory) / "eth-server.sqlite3") if directory else state_path(
            "eth-server.sqlite3", self.environ)
        self["spool"] = str(Path(directory) / "eth-client-spool.sqlite3") if directory else state_path(
            "eth-client-spool.sqlite3", self.environ)


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
    """The server and the client; stopping drains the client's outbox first."""

    def __init__(self, server: Any, client_config: usage.Options, reactor: Any, drain_timeout: float,
                 out: TextIO) -> None:
        super().__init__()
        self.server = server
        self.client_config = client_config
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.out = out
        self.client: Any = None
        self.exit_code = 0
        server.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        port = self.server.listening_port.getHost().port
        from eth_twisted import client_tap

        self.client_config.parseOptions(["--connect", f"tcp:127.0.0.1:{port}", *self.client_argv])
        self.client = client_tap.makeService(self.client_config, self.reactor)
        self.client.setServiceParent(self)
        self.say(f"eth run: server on 127.0.0.1:{port}, records in {self.server.summary}")
        self.say(f"eth run: client outbox in {self.client_config['spool']}")

    client_argv: Sequence[str] = ()

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        delivery = getattr(self.client, "delivery", None)
        if delivery is not None and hasattr(delivery, "drain"):
            self.say(f"eth run: draining the outbox (at most {self.drain_timeout:.0f}s)")
            try:
                yield delivery.drain(self.drain_timeout)
            except Exception as e:
                self.say(f"eth run: drain stopped: {e}")
        if self.client is not None:
            yield self.client.disownServiceParent()
        yield super().stopService()
        self.exit_code = int(getattr(self.client, "exit_code", 0) or 0)


def make_run_service(config: RunOptions, reactor: Any, verbose: bool = False, out: TextIO | None = None) -> RunService:
    """Build ``eth run`` from its options."""
    from eth_twisted import client_tap
    from eth_twisted.server import build_server

    out = out or sys.stdout
    port = config["port"] if port_is_free(config["port"]) else 0
    stats = None if config["stats"].lower() == "none" else config["stats"]
    server = build_server(
        reactor=reactor, listen=f"tcp:{port}:interface=127.0.0.1", stats_listen=stats,
        storage={"migrate": True, "sqlite": config["sqlite"]}, max_length=65536, window=256,
        deadline=10.0, batch_size=1000, batch_delay=0.002, reconcile_interval=300.0,
        verbose=verbose, summary=f"sqlite:{config['sqlite']}",
    )
    if port == 0 and config["port"]:
        print(f"eth run: port {config['port']} is taken; using a free port", file=out, flush=True)
    client_config = client_tap.Options(environ={})
    run = RunService(server, client_config, reactor, config["drain-timeout"], out)
    argv = ["--spool", config["spool"], "--interval", str(config["interval"]), "--format", config["format"],
            "--max-backfill", str(config["max-backfill"]), "--stats", "none"]
    for url in config["rpc"]:
        argv += ["--rpc", url]
    if verbose:
        argv.append("--verbose")
    run.client_argv = argv

    def print_blocks(messages: Sequence[Message], codes: Sequence[str]) -> None:
        for m, code in zip(messages, codes, strict=True):
            if code == "OK":
                block = "?" if m.block_number is None else m.block_number
                run.say(f"stored block {block}  sha256 {m.hash[:16]}…  from {m.client_ip}")

    server.router.observers.append(print_blocks)
    if stats is not None:
        host_port = _url_for(stats)
        server.on_ready.append(lambda: run.say(f"eth run: dashboard at {host_port}"))
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
