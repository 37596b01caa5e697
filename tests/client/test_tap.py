"""Options of eth-client (twistd plugin and ``eth client``) and the service they build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application import service
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from eth_twisted.client import tap as client_tap
from eth_twisted.client.endpoints import DEFAULT_RPC_URLS
from eth_twisted.client.outbox import Cursor, OutboxSettings, open_outbox
from eth_twisted.client.service import EthClientService
from eth_twisted.client.tap import Options
from eth_twisted.errors import OutboxLocked
from tests.support import ROOT, VENV_BIN


def parse(argv: list[str], env: dict[str, str] | None = None) -> Options:
    o = Options(environ=env or {})
    o.parseOptions(argv)
    return o


def test_defaults() -> None:
    """With no options the client polls the default endpoints every 5 s and sends to 127.0.0.1:9999."""
    o = parse([])
    assert o["connect"] == "tcp:host=127.0.0.1:port=9999"
    assert o["rpc"] == list(DEFAULT_RPC_URLS)
    assert (o["interval"], o["max-backfill"], o["max-gap"], o["format"]) == (5.0, 128, None, "html")
    assert (o["window"], o["ack-timeout"], o["heartbeat"], o["rpc-timeout"]) == (
        256,
        30.0,
        10.0,
        10.0,
    )
    assert o["spool"] == "eth-client-spool.sqlite3"
    assert o["max-outbox"] == 100_000
    assert o["stats"] == "tcp:8081:interface=127.0.0.1"
    assert not o["reset-cursor"] and o["chain-id"] is None


def test_seed_flags_host_and_port() -> None:
    """The seed's --host/--port still choose the server."""
    o = parse(["--host", "10.0.0.5", "--port", "8888"])
    assert o["connect"] == "tcp:host=10.0.0.5:port=8888"


def test_connect_overrides_host_and_port() -> None:
    """--connect takes an endpoint string and wins over --host/--port."""
    o = parse(["--connect", "tcp:host=srv:port=7000", "--port", "1"])
    assert o["connect"] == "tcp:host=srv:port=7000"


def test_ipv6_host_is_escaped() -> None:
    """An IPv6 --host becomes a valid endpoint string."""
    assert parse(["--host", "::1"])["connect"] == "tcp:host=\\:\\:1:port=9999"


def test_every_option_parses() -> None:
    """Every option takes its documented value type."""
    o = parse(
        [
            "--rpc",
            "http://127.0.0.1:8545",
            "--rpc",
            "https://a.example/key",
            "--interval",
            "1.5",
            "--max-backfill",
            "64",
            "--max-gap",
            "1000",
            "--format",
            "json",
            "--chain-id",
            "31337",
            "--reset-cursor",
            "--spool",
            ":memory:",
            "--max-outbox",
            "50",
            "--window",
            "16",
            "--ack-timeout",
            "45",
            "--heartbeat",
            "5",
            "--rpc-timeout",
            "3",
            "--stats",
            "none",
            "--verbose",
        ]
    )
    assert o["rpc"] == ["http://127.0.0.1:8545", "https://a.example/key"]
    assert (o["interval"], o["max-backfill"], o["max-gap"], o["format"]) == (1.5, 64, 1000, "json")
    assert (o["chain-id"], o["reset-cursor"], o["spool"], o["max-outbox"]) == (
        31337,
        True,
        ":memory:",
        50,
    )
    assert (o["window"], o["ack-timeout"], o["heartbeat"], o["rpc-timeout"]) == (16, 45.0, 5.0, 3.0)
    assert o["stats"] is None and o["verbose"]


def test_environment_and_precedence(tmp_path: Path) -> None:
    """ETH_* variables set options (lists comma-separated, flags as words); the command line wins."""
    env = {
        "ETH_RPC": "http://a:1, http://b:2",
        "ETH_WINDOW": "100",
        "ETH_RESET_CURSOR": "yes",
        "ETH_FORMAT": "json",
        "ETH_MAX_GAP": "off",
        "ETH_PORT": "7777",
        "ETH_STATE_DIRECTORY": "x",
        "STATE_DIRECTORY": str(tmp_path),
    }
    o = parse([], env)
    assert o["rpc"] == ["http://a:1", "http://b:2"]
    assert (o["window"], o["reset-cursor"], o["format"], o["max-gap"]) == (100, True, "json", None)
    assert o["connect"] == "tcp:host=127.0.0.1:port=7777"
    assert o["spool"] == str(tmp_path / "eth-client-spool.sqlite3")
    o = parse(["--window", "8"], env)
    assert o["window"] == 8


def test_repeatable_option_on_command_line_replaces_environment() -> None:
    """--rpc on the command line replaces ETH_RPC instead of adding to it (command line wins)."""
    o = parse(["--rpc", "http://c:3"], {"ETH_RPC": "http://a:1,http://b:2"})
    assert o["rpc"] == ["http://c:3"]


@pytest.mark.parametrize(
    "argv, env, named",
    [
        (["--window", "257"], {}, "--window"),
        (["--window", "0"], {}, "--window"),
        (["--port", "http"], {}, "--port"),
        (["--interval", "0"], {}, "--interval"),
        (["--format", "xml"], {}, "--format"),
        (["--ack-timeout", "19"], {}, "--ack-timeout"),
        (["--heartbeat", "30"], {}, "--heartbeat"),
        (["--max-gap", "-3"], {}, "--max-gap"),
        (["--chain-id", "zero"], {}, "--chain-id"),
        (["--connect", "bogus:1"], {}, "--connect"),
        (["--rpc", "ftp://x"], {}, "--rpc"),
        ([], {"ETH_WINDOW": "1000"}, "ETH_WINDOW"),
        ([], {"ETH_RESET_CURSOR": "maybe"}, "ETH_RESET_CURSOR"),
    ],
)
def test_bad_values_name_the_option(argv: list[str], env: dict[str, str], named: str) -> None:
    """A bad value is a UsageError naming the option (or its variable)."""
    with pytest.raises(usage.UsageError, match=named):
        parse(argv, env)


def test_rpc_credentials_accepted_and_warned_on_argv() -> None:
    """--rpc with user:password@ is accepted (basic auth); on argv it warns without repeating the password."""
    o = parse(["--rpc", "https://alice:hunter2@rpc.example/v1"])
    assert o["rpc"] == ["https://alice:hunter2@rpc.example/v1"]
    assert any("https://rpc.example" in w and "ETH_RPC" in w for w in o.warnings)
    assert not any("hunter2" in w for w in o.warnings)
    quiet = parse([], {"ETH_RPC": "https://alice:hunter2@rpc.example/v1"})
    assert quiet.warnings == []


def test_bad_rpc_url_error_hides_the_password() -> None:
    """A malformed --rpc URL is refused with a message that masks its password."""
    with pytest.raises(usage.UsageError) as info:
        parse(["--rpc", "http://alice:hunter2@rpc.example:99999/"])
    assert (
        "--rpc" in str(info.value)
        and "hunter2" not in str(info.value)
        and "alice:***" in str(info.value)
    )


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--tls-ca", "ca.pem"], "--tls-ca needs --tls"),
        (["--tls-hostname", "srv"], "--tls-hostname needs --tls"),
        (["--tls", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls", "--tls-ca", "/nonexistent/ca.pem"], "--tls-ca: no such file"),
        (["--tls", "--tls-min-version", "1.1"], "--tls-min-version"),
        (["--tls", "--connect", "tcp:host=srv:port=1"], "leave out --connect"),
    ],
)
def test_link_options_are_checked_once_in_the_tap(argv: list[str], named: str) -> None:
    """The TLS options' companions, files and versions are refused at parse time, naming the option."""
    with pytest.raises(usage.UsageError, match=named):
        parse(argv)


def test_secret_over_plaintext_is_refused_at_parse_time(tmp_path: Path) -> None:
    """A link secret without TLS is a UsageError naming the way out.

    --allow-plaintext-secret or --tls allow it.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"a shared secret of 32 bytes!!!!!")
    secret.chmod(0o600)
    with pytest.raises(usage.UsageError, match="--allow-plaintext-secret"):
        parse(["--secret-file", str(secret)])
    assert (
        parse(["--secret-file", str(secret), "--allow-plaintext-secret"]).settings.link.secret
        is not None
    )
    o = parse(["--secret-file", str(secret), "--tls", "--host", "srv.example"])
    assert o.settings.link.encrypted and o.settings.link.server == "tcp:host=srv.example:port=9999"
    assert "32 bytes" not in repr(o.settings)  # the secret stays out of logs and tracebacks


def test_option_rows_take_their_defaults_from_the_settings_fields() -> None:
    """Each option's default is its settings field's default: the field is the one place it is written."""
    import dataclasses

    from eth_twisted.client.endpoints import RPCSettings
    from eth_twisted.client.outbox import OutboxSettings
    from eth_twisted.client.poller import PollSettings
    from eth_twisted.client.sender import DeliverySettings
    from eth_twisted.client.service import ClientSettings, LinkSettings
    from eth_twisted.options import option_name

    defaults = Options(environ={}).defaults
    seen = 0
    for cls in (
        LinkSettings,
        PollSettings,
        OutboxSettings,
        DeliverySettings,
        RPCSettings,
        ClientSettings,
    ):
        for f in dataclasses.fields(cls):
            if (
                "help" in f.metadata and option_name(f) != "rpc"
            ):  # --rpc is repeatable: [] until parsed
                assert defaults[option_name(f)] == getattr(cls(), f.name), f.name
                seen += 1
    assert seen == 23
    assert parse([]).settings == ClientSettings(
        link=LinkSettings(),
        rpc=RPCSettings(),
        outbox=OutboxSettings(),
        site=parse([]).settings.site,
    )  # the site's allowlist is derived from --stats


def test_make_service_hands_the_settings_down(tmp_path: Path) -> None:
    """makeService builds each part from its settings, under the option's name."""
    client, _ = build(
        tmp_path,
        "--format",
        "json",
        "--chain-id",
        "5",
        "--max-gap",
        "9",
        "--max-outbox",
        "50",
        "--rpc-timeout",
        "3",
        "--heartbeat",
        "7",
        "--interval",
        "2",
    )
    try:
        assert client.poller.settings == client_tap.PollSettings(
            interval=2.0, max_gap=9, format="json", chain_id=5
        )
        assert client.outbox.max_outbox == 50
        assert (
            client.rpc.settings.rpc == ("http://127.0.0.1:1",)
            and client.rpc.settings.rpc_timeout == 3.0
        )
        assert client.delivery.settings.heartbeat == 7.0
    finally:
        client.outbox.close()


def test_default_spool_uses_state_directory(tmp_path: Path) -> None:
    """The default spool lives in $STATE_DIRECTORY when set, else the working directory.

    A given spool stays as given.
    """
    env = {"STATE_DIRECTORY": str(tmp_path)}
    assert parse([], env)["spool"] == str(tmp_path / "eth-client-spool.sqlite3")
    assert parse([])["spool"] == "eth-client-spool.sqlite3"
    assert (
        parse(["--spool", "eth-client-spool.sqlite3"], env)["spool"] == "eth-client-spool.sqlite3"
    )
    assert parse([], {**env, "ETH_SPOOL": "here.sqlite3"}).settings.outbox.spool == "here.sqlite3"


def test_help_mentions_environment() -> None:
    """--help documents the ETH_* variable of every option."""
    text = str(Options(environ={}))
    assert "ETH_ACK_TIMEOUT" in text and "ETH_RPC" in text and "--reset-cursor" in text


# -- makeService -----------------------------------------------------------------


def build(tmp_path: Path, *extra: str) -> tuple[EthClientService, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    o = parse(
        [
            "--spool",
            str(tmp_path / "spool.sqlite3"),
            "--rpc",
            "http://127.0.0.1:1",
            "--stats",
            "none",
            *extra,
        ]
    )
    return client_tap.makeService(o, reactor), reactor


def test_make_service_wires_the_parts(tmp_path: Path) -> None:
    """makeService returns a MultiService with outbox, poller, delivery and metrics wired together."""
    client, reactor = build(tmp_path, "--window", "32", "--connect", "tcp:host=127.0.0.1:port=4567")
    try:
        assert isinstance(client, service.MultiService)
        assert client.outbox.path == str(tmp_path / "spool.sqlite3")
        assert client.delivery.settings.window == 32
        assert client.delivery.outbox is client.outbox
        assert client.poller.outbox is client.outbox
        assert client.delivery.metrics is client.metrics
        assert set(client) == {client.delivery, client.poller, client.finality, client.heads}
        assert client.finality.pipeline is client.poller.pipeline
        assert client.heads.sources == []  # no ws:// endpoint
        assert client.exit_code == 0 and not client.exit_on_fatal
        client.delivery.startService()
        host, port = reactor.tcpClients[0][:2]
        assert (host, port) == ("127.0.0.1", 4567)
        client.delivery.stopService()
    finally:
        client.outbox.close()


def test_make_service_with_stats_listens(tmp_path: Path) -> None:
    """--stats serves the client's site on the given endpoint."""
    reactor = MemoryReactorClock()
    o = parse(
        [
            "--spool",
            str(tmp_path / "s.sqlite3"),
            "--rpc",
            "http://127.0.0.1:1",
            "--stats",
            "tcp:0:interface=127.0.0.1",
        ]
    )
    client = client_tap.makeService(o, reactor)
    try:
        assert client.stats is not None
        client.stats.startService()
        assert reactor.tcpServers and reactor.tcpServers[0][3] == "127.0.0.1"
        ok, detail = client.readiness()
        assert not ok and detail["server_link"]["ok"] is False
    finally:
        client.outbox.close()


def test_reset_cursor_clears_stored_cursor(tmp_path: Path) -> None:
    """--reset-cursor forgets the cursor but keeps the waiting messages."""
    box = open_outbox(OutboxSettings(spool=str(tmp_path / "spool.sqlite3")), clock=lambda: 0.0)
    box.append([(b"payload", 1)], Cursor(1, "0xg", 1, "0xh"))
    box.close()
    client, _ = build(tmp_path, "--reset-cursor")
    try:
        assert client.outbox.cursor() is None
        assert client.outbox.depth() == 1
    finally:
        client.outbox.close()


def test_locked_spool_fails_at_build(tmp_path: Path) -> None:
    """A spool held by another client fails makeService with OutboxLocked."""
    box = open_outbox(OutboxSettings(spool=str(tmp_path / "spool.sqlite3")), clock=lambda: 0.0)
    try:
        with pytest.raises(OutboxLocked):
            build(tmp_path)
    finally:
        box.close()


def test_fatal_sets_exit_code_and_stops_reactor(tmp_path: Path) -> None:
    """fatal() logs, sets exit_code 2 and stops the reactor on the next turn."""
    client, reactor = build(tmp_path)
    try:
        client.fatal("chain id changed; run with --reset-cursor")
        assert client.exit_code == 2
        assert not reactor.hasStopped
        reactor.advance(0)
        assert reactor.hasStopped
        client.fatal("again")  # only the first one counts
        assert client.fatal_message == "chain id changed; run with --reset-cursor"
    finally:
        client.outbox.close()


def test_stop_service_closes_outbox(tmp_path: Path) -> None:
    """Stopping the client releases the outbox file for the next run."""
    client, reactor = build(tmp_path)
    client.startService()
    d = client.stopService()
    reactor.advance(0)
    assert d.called
    again = open_outbox(OutboxSettings(spool=str(tmp_path / "spool.sqlite3")), clock=lambda: 0.0)
    again.close()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ETH_")}
    environ.update(env or {})
    return subprocess.run(
        [*args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=environ,
    )


def test_eth_client_bad_option_exits_nonzero_naming_it() -> None:
    """``eth client --window 999`` exits 2 and names --window."""
    proc = run_cli(str(VENV_BIN / "eth"), "client", "--window", "999")
    assert proc.returncode == 2
    assert "--window" in proc.stderr


def test_twistd_eth_client_bad_option_exits_nonzero_naming_it() -> None:
    """``twistd -n eth-client --ack-timeout 5`` exits non-zero and names --ack-timeout."""
    proc = run_cli(sys.executable, "-m", "twisted", "--help")  # warm the plugin cache
    proc = run_cli(str(VENV_BIN / "twistd"), "-n", "--pidfile=", "eth-client", "--ack-timeout", "5")
    assert proc.returncode != 0
    assert "--ack-timeout" in proc.stdout + proc.stderr


def test_stats_site_limits_reach_the_client_listener(tmp_path: Path) -> None:
    """The client's stats listener takes the same --stats-* limits as the server's."""
    from eth_twisted.web.limits import SiteLimits

    reactor = MemoryReactorClock()
    o = parse(
        [
            "--spool",
            str(tmp_path / "s.sqlite3"),
            "--rpc",
            "http://127.0.0.1:1",
            "--stats",
            "tcp:0:interface=127.0.0.1",
            "--stats-max-per-ip",
            "4",
        ],
        env={"ETH_STATS_MAX_CONNECTIONS": "8"},
    )
    client = client_tap.makeService(o, reactor)
    try:
        assert client.stats is not None
        assert client.stats.factory.limits == SiteLimits(
            stats_max_connections=8, stats_max_per_ip=4
        )
    finally:
        client.outbox.close()
