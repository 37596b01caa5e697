"""``twistd eth-client`` / ``eth client``: options, and the service they describe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from eth_twisted.client.outbox import DEFAULT_MAX_MESSAGES, DEFAULT_SPOOL
from eth_twisted.client.sender import DeliverySettings
from eth_twisted.errors import ConfigError
from eth_twisted.interfaces import maybe_global_reactor
from eth_twisted.link.payload import FORMATS
from eth_twisted.options import (
    PRECEDENCE,
    EnvOptions,
    int_in,
    option_rows,
    optional_positive_int,
    positive_float,
    settings_from,
    state_path,
)
from eth_twisted.web.limits import STATS_LIMIT_OPTIONS, limits_from_options

log = Logger()

DEFAULT_STATS = "tcp:8081:interface=127.0.0.1"


def tcp_client_endpoint(host: str, port: int) -> str:
    """The client endpoint string for ``--host``/``--port`` (IPv6 colons escaped)."""
    return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port}"


class Options(EnvOptions):
    """Options of the eth-client (same for ``twistd eth-client`` and ``eth client``)."""

    synopsis = "[options]"
    longdesc = (
        "Watch the Ethereum chain head over JSON-RPC and deliver every new block, in "
        "order and acknowledged, to an eth-server. Blocks wait in a durable outbox "
        "(--spool) until the server answers OK or DUP. " + PRECEDENCE
    )
    repeatable = ("rpc",)
    secrets = ("stats-token",)
    doc_rpc = "JSON-RPC endpoint URL (repeatable; default: a short list of public mainnet endpoints)"
    optFlags = [
        ["reset-cursor", None, "Forget the stored cursor and start at the chain head (after a chain change)"],
        ["verbose", "v", "Log at debug level (every poll, every frame)"],
        ["tls", None, "Connect to --host/--port over TLS, verifying the server's certificate and name (no plaintext fallback)"],
        ["allow-plaintext-secret", None, "Allow the shared-secret handshake without TLS"],
    ]
    optParameters: list[list[Any]] = [
        ["host", None, "127.0.0.1", "Server host"],
        ["port", None, 9999, "Server port", int_in(1, 65535)],
        ["connect", None, None, "Server endpoint string instead of --host/--port, e.g. tcp:host=h:port=9999"],
        ["interval", None, 5.0, "Seconds between polls of the chain head", positive_float],
        ["max-backfill", None, 128, "Most blocks fetched and enqueued per poll", int_in(1, 100_000)],
        ["max-gap", None, None, "Skip ahead (recording the gap) when further behind than this many blocks; 'off' never skips", optional_positive_int],
        ["format", None, "html", "Payload format: html or json (use json for more than one chain)"],
        ["chain-id", None, None, "Expected chain id; refuse endpoints that disagree", int_in(1)],
        ["spool", None, None, f"Outbox file, or ':memory:' (not durable) [default: {DEFAULT_SPOOL} in $STATE_DIRECTORY, else the working directory]"],
        ["max-outbox", None, DEFAULT_MAX_MESSAGES, "Most messages the outbox holds; when full the poller waits", int_in(1, 100_000_000)],
        *option_rows(DeliverySettings),
        ["rpc-timeout", None, 10.0, "Seconds for one JSON-RPC call, headers and body", positive_float],
        ["tls-ca", None, None, "PEM CA the server's certificate must chain to [default: the system's trust store]"],
        ["tls-cert", None, None, "PEM client certificate (for servers that require one)"],
        ["tls-key", None, None, "PEM private key of --tls-cert"],
        ["tls-hostname", None, None, "Name the server's certificate must carry [default: --host]"],
        ["tls-min-version", None, "1.2", "Lowest TLS version: 1.2 or 1.3"],
        ["secret-file", None, None, "File holding the link's shared secret (also ETH_SECRET, $CREDENTIALS_DIRECTORY/link-secret)"],
        ["client-name", None, "eth-client", "Name this client proves in the shared-secret handshake (recorded as client_id)"],
        ["stats-token", None, None, "Bearer token /metrics requires (prefer ETH_STATS_TOKEN or --stats-token-file)"],
        ["stats-token-file", None, None, "File holding the stats token"],
        ["stats-allowed-hosts", None, None, "Comma list of Host header values the stats site answers [default on loopback: localhost,127.0.0.1,::1]"],
        ["stats", None, DEFAULT_STATS, "Endpoint of /healthz, /readyz and /metrics, or 'none'"],
        *STATS_LIMIT_OPTIONS,
    ]

    def postOptions(self) -> None:
        if self["format"] not in FORMATS:
            raise usage.UsageError(f"--format: expected html or json, got {self['format']!r}")
        try:
            settings_from(DeliverySettings, self).check()
        except ValueError as e:
            raise usage.UsageError(str(e))
        if self["tls"] and self.from_argv("connect"):
            raise usage.UsageError("--tls connects to --host/--port; leave out --connect")
        if self["connect"] and not self["tls"]:
            _check_endpoint(self["connect"])
        else:
            self["connect"] = tcp_client_endpoint(self["host"], self["port"])
        self["tls-settings"] = self._tls_settings()
        try:
            from eth_twisted.link.secret import check_secret_transport, load_secret

            self["secret"] = load_secret(file=self["secret-file"], environ=self.environ)
            check_secret_transport(self["secret"], bool(self["tls"]) or self["connect"].startswith("tls:"),
                                   self["allow-plaintext-secret"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        if not self["rpc"]:
            from eth_twisted.client.rpc import DEFAULT_RPC_URLS

            self["rpc"] = list(DEFAULT_RPC_URLS)
        from eth_twisted.client.jsonrpc import Target, redact_url

        for url in self["rpc"]:
            try:
                target = Target.from_url(url)
            except ValueError as e:
                raise usage.UsageError(f"--rpc: {e}, got {redact_url(url)!r}")
            if target.authorization is not None and self.from_argv("rpc"):
                self.warnings.append(
                    f"--rpc {target.label} carries a password on the command line, visible to every "
                    "local user (ps, /proc); pass the URL in ETH_RPC instead"
                )
        if not self["spool"]:
            self["spool"] = state_path(DEFAULT_SPOOL, self.environ)
        self["stats-token-resolved"] = self.resolve_secret("stats-token")
        if self["stats"].strip().lower() == "none":
            self["stats"] = None
        from eth_twisted.web.app import allowed_hosts, exposure_warning

        self["allowed-hosts"] = allowed_hosts(self["stats"] or "", self["stats-allowed-hosts"])
        self["stats-limits"] = limits_from_options(self)
        exposed = exposure_warning(self["stats"], self["allowed-hosts"], self["stats-token-resolved"])
        if exposed:
            self.warnings.append(exposed)


    def _tls_settings(self) -> dict[str, Any] | None:
        if not self["tls"]:
            for name in ("tls-ca", "tls-cert", "tls-key", "tls-hostname"):
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --tls")
            return None
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for name in ("tls-ca", "tls-cert", "tls-key"):
            if self[name] and not Path(self[name]).is_file():
                raise usage.UsageError(f"--{name}: no such file {self[name]}")
        if self["tls-min-version"] not in ("1.2", "1.3"):
            raise usage.UsageError(f"--tls-min-version: expected 1.2 or 1.3, got {self['tls-min-version']!r}")
        return {"host": self["host"], "port": self["port"], "ca": self["tls-ca"], "cert": self["tls-cert"],
                "key": self["tls-key"], "hostname": self["tls-hostname"], "min_version": self["tls-min-version"]}


def _check_endpoint(description: str) -> None:
    """Parse ``description`` as a client endpoint string, or raise a UsageError naming --connect."""
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.testing import MemoryReactor

    try:
        clientFromString(MemoryReactor(), description)
    except Exception as e:  # ValueError, KeyError, TypeError from the parsers
        raise usage.UsageError(f"--connect: not a client endpoint string {description!r}: {e}")


def makeService(config: Options, reactor: Any = None) -> Any:
    """Build the eth-client from parsed options.

    twistd calls this without a reactor: the global one is used and a fatal
    error ends the process with status 2 (see :mod:`eth_twisted.client.service`).
    The ``eth`` CLI passes its reactor and reads ``exit_code`` instead.
    """
    from eth_twisted.client.service import make_client_service

    exit_on_fatal = reactor is None
    reactor = maybe_global_reactor(reactor)
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    return make_client_service(
        reactor=reactor,
        connect=config["connect"],
        rpc_urls=list(config["rpc"]),
        spool=config["spool"],
        max_outbox=config["max-outbox"],
        reset_cursor=bool(config["reset-cursor"]),
        fmt=config["format"],
        interval=config["interval"],
        max_backfill=config["max-backfill"],
        max_gap=config["max-gap"],
        chain_id=config["chain-id"],
        delivery=settings_from(DeliverySettings, config),
        rpc_timeout=config["rpc-timeout"],
        stats_listen=config["stats"],
        stats_token=config["stats-token-resolved"],
        allowed_hosts=config["allowed-hosts"],
        stats_limits=config["stats-limits"],
        exit_on_fatal=exit_on_fatal,
        tls=config["tls-settings"],
        secret=config["secret"],
        client_name=config["client-name"],
        allow_plaintext_secret=config["allow-plaintext-secret"],
    )
