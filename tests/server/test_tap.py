"""Options of eth-server and the eth CLI: seed flags, endpoints, environment, secrets."""

from __future__ import annotations

import pytest
from twisted.python import usage

from eth_twisted.cli import main as cli
from eth_twisted.server.tap import Options


def parse(argv: list[str], env: dict[str, str] | None = None) -> Options:
    o = Options(environ=env or {})
    o.parseOptions(argv)
    return o


def test_defaults() -> None:
    """With no options the server listens on 127.0.0.1:9999 and stores to the SQLite file."""
    o = parse([])
    assert o["listen"] == "tcp:9999:interface=127.0.0.1"
    assert o["stats"] == "tcp:8080:interface=127.0.0.1"
    assert o.storage.sqlite.sqlite == "eth-server.sqlite3"
    assert not o.storage.use_mysql and not o.storage.use_redis and not o.storage.no_migrate
    assert o["max-length"] == 65536 and o["window"] == 256 and o["deadline"] == 10.0


def test_seed_flags() -> None:
    """The seed's flags keep their meaning."""
    o = parse(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "8888",
            "--use-redis",
            "--redis-host",
            "r",
            "--redis-port",
            "6380",
            "--redis-db",
            "2",
            "--use-mysql",
            "--mysql-host",
            "db",
            "--mysql-user",
            "u",
            "--mysql-pass",
            "s3cret",
            "--mysql-db",
            "eth",
        ]
    )
    assert o["listen"] == "tcp:8888:interface=0.0.0.0"
    storage = o.storage
    assert storage.mysql.mysql_host == "db" and storage.mysql.mysql_pass == "s3cret"
    assert (
        storage.redis.redis_host == "r"
        and storage.redis.redis_port == 6380
        and storage.redis.redis_db == 2
    )
    assert storage.use_mysql and storage.use_redis
    assert any("ETH_MYSQL_PASS" in w and "--mysql-pass-file" in w for w in o.warnings)
    assert "s3cret" not in o.storage.summary()


def test_endpoint_string_beside_seed_flags() -> None:
    """--listen takes a Twisted endpoint string and wins over --host/--port."""
    o = parse(["--listen", "tcp:7000:interface=::1", "--port", "1"])
    assert o["listen"] == "tcp:7000:interface=::1"


def test_ipv6_host_is_escaped() -> None:
    """An IPv6 --host becomes a valid endpoint string (colons escaped)."""
    assert parse(["--host", "::1"])["listen"] == "tcp:9999:interface=\\:\\:1"


def test_environment_and_precedence() -> None:
    """ETH_* variables set options; the command line wins over them."""
    env = {
        "ETH_PORT": "7777",
        "ETH_USE_REDIS": "yes",
        "ETH_REDIS_HOST": "cache",
        "ETH_HOST": "0.0.0.0",
    }
    o = parse([], env)
    assert o["listen"] == "tcp:7777:interface=0.0.0.0"
    assert o.storage.redis.redis_host == "cache"
    o = parse(["--port", "1234"], env)
    assert o["listen"] == "tcp:1234:interface=0.0.0.0"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("on", True), ("TRUE", True), ("no", False), ("off", False), ("0", False)],
)
def test_flag_words(value: str, expected: bool) -> None:
    """Flags in the environment take 1/true/yes/on and 0/false/no/off."""
    assert parse([], {"ETH_USE_REDIS": value})["use-redis"] is expected


def test_bad_flag_word_names_the_variable() -> None:
    """A flag value that is no true/false word is an error naming the variable."""
    with pytest.raises(usage.UsageError, match="ETH_USE_REDIS"):
        parse([], {"ETH_USE_REDIS": "maybe"})


def test_bad_number_in_environment_names_it() -> None:
    """A malformed number in the environment is an error naming the variable."""
    with pytest.raises(usage.UsageError, match="ETH_PORT"):
        parse([], {"ETH_PORT": "http"})


@pytest.mark.parametrize("missing", ["mysql-host", "mysql-user", "mysql-db"])
def test_use_mysql_needs_its_companions(missing: str) -> None:
    """--use-mysql without host, user or database is refused, naming what is missing."""
    argv = ["--use-mysql", "--mysql-host", "h", "--mysql-user", "u", "--mysql-db", "d"]
    i = argv.index("--" + missing)
    del argv[i : i + 2]
    with pytest.raises(usage.UsageError, match=f"--{missing}"):
        parse(argv)


def test_password_from_environment_file_and_credentials(tmp_path) -> None:
    """The MySQL password can come from ETH_MYSQL_PASS, --mysql-pass-file or $CREDENTIALS_DIRECTORY."""
    base = ["--use-mysql", "--mysql-host", "h", "--mysql-user", "u", "--mysql-db", "d"]
    assert parse(base, {"ETH_MYSQL_PASS": "from-env"}).storage.mysql.mysql_pass == "from-env"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    o = parse([*base, "--mysql-pass-file", str(f)])
    assert o.storage.mysql.mysql_pass == "from-file"
    assert o.warnings == []
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mysql-pass").write_text("from-creds")
    assert (
        parse(base, {"CREDENTIALS_DIRECTORY": str(creds)}).storage.mysql.mysql_pass == "from-creds"
    )


def test_unreadable_password_file_is_named(tmp_path) -> None:
    """A password file that cannot be read is an error naming the option."""
    with pytest.raises(usage.UsageError, match="--mysql-pass-file"):
        parse(
            [
                "--use-mysql",
                "--mysql-host",
                "h",
                "--mysql-user",
                "u",
                "--mysql-db",
                "d",
                "--mysql-pass-file",
                str(tmp_path / "nope"),
            ]
        )


def test_state_directory_holds_the_sqlite_file() -> None:
    """With $STATE_DIRECTORY set the SQLite file lives there."""
    assert (
        parse([], {"STATE_DIRECTORY": "/var/lib/eth"})["sqlite"]
        == "/var/lib/eth/eth-server.sqlite3"
    )


def test_help_states_environment_and_precedence() -> None:
    """--help names each option's variable and the precedence rule."""
    text = str(Options(environ={}))
    assert "[env ETH_REDIS_HOST]" in text
    assert "Precedence: command line, then environment, then default" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["server", "--port", "notaport"], "--port"),
        (["server", "--bogus"], "bogus"),
        (["server", "--use-mysql"], "--mysql-host"),
        (["server", "--max-length", "0"], "max-length"),
        ([], "command is required"),
        (["--wait", "x", "server"], "wait"),
    ],
)
def test_cli_bad_options_exit_nonzero_naming_them(argv: list[str], needle: str, capsys) -> None:
    """`eth` exits 2 with a message naming the bad option."""
    assert cli.main(argv) == 2
    assert needle in capsys.readouterr().err


def test_cli_global_options() -> None:
    """`eth --verbose --wait 2 server` parses the globals before the command."""
    o = cli.Options()
    o.parseOptions(["--verbose", "--wait", "2", "server", "--port", "1"])
    assert o["verbose"] and o["wait"] == 2.0 and o.subCommand == "server"
    assert o.subOptions["listen"] == "tcp:1:interface=127.0.0.1"


def test_redis_tls_builds_a_verifying_context(tmp_path) -> None:
    """--redis-tls-ca gives the Redis sink a TLS creator that checks the CA and the host name."""
    from tests.support.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    o = parse(["--use-redis", "--redis-host", "localhost", "--redis-tls-ca", pki.ca])
    creator = o.storage.redis.tls_context()
    assert creator._hostnameASCII == "localhost"
    with pytest.raises(usage.UsageError, match="--redis-tls-ca"):
        parse(["--use-redis", "--redis-tls-ca", str(tmp_path / "missing.pem")])


def test_pipeline_is_opt_in(tmp_path) -> None:
    """SQL/Redis pipelining is off unless --pipeline asks for it (it trades latency for throughput)."""
    from twisted.internet.testing import MemoryReactorClock

    from eth_twisted.server.tap import makeService

    base = [
        "--use-redis",
        "--stats",
        "none",
        "--sqlite",
        str(tmp_path / "s.sqlite3"),
        "--port",
        "0",
    ]
    assert makeService(parse(base), MemoryReactorClock()).router.pipeline is False
    assert makeService(parse([*base, "--pipeline"]), MemoryReactorClock()).router.pipeline is True


def test_concurrent_batches_default_and_bounds(tmp_path) -> None:
    """Two batches may be in the SQL record at once by default.

    --concurrent-batches sets it, within 1..8, and the pipeline mode (one batch per stage) keeps
    one.
    """
    from twisted.internet.testing import MemoryReactorClock

    from eth_twisted.server.tap import makeService

    base = [
        "--use-redis",
        "--stats",
        "none",
        "--sqlite",
        str(tmp_path / "s.sqlite3"),
        "--port",
        "0",
    ]
    assert makeService(parse(base), MemoryReactorClock()).router.concurrent_batches == 2
    assert (
        makeService(
            parse([*base, "--concurrent-batches", "1"]), MemoryReactorClock()
        ).router.concurrent_batches
        == 1
    )
    assert (
        makeService(parse([*base, "--pipeline"]), MemoryReactorClock()).router.concurrent_batches
        == 1
    )
    for bad in ("0", "9", "two"):
        with pytest.raises(usage.UsageError, match="concurrent-batches"):
            parse([*base, "--concurrent-batches", bad])


def test_stats_site_limits_reach_the_listener(tmp_path) -> None:
    """The --stats-* limit options (or ETH_*) set the stats listener's limits.

    --stats-max-connections, --stats-max-per-ip and --stats-header-timeout (or ETH_*) set them;
    the defaults are SiteLimits'.
    """
    from twisted.internet.testing import MemoryReactorClock

    from eth_twisted.server.tap import makeService
    from eth_twisted.web.limits import SiteLimits

    assert parse([]).settings.site.limits == SiteLimits()
    base = [
        "--sqlite",
        str(tmp_path / "s.sqlite3"),
        "--port",
        "0",
        "--stats",
        "tcp:0:interface=127.0.0.1",
    ]
    o = parse(
        [*base, "--stats-max-connections", "10", "--stats-max-per-ip", "3"],
        env={"ETH_STATS_HEADER_TIMEOUT": "2.5"},
    )
    assert o.settings.site.limits == SiteLimits(
        stats_max_connections=10, stats_max_per_ip=3, stats_header_timeout=2.5
    )
    reactor = MemoryReactorClock()
    server = makeService(o, reactor)
    site = server.getServiceNamed("stats").factory
    assert site.limits == o.settings.site.limits
    for bad in (["--stats-max-connections", "0"], ["--stats-header-timeout", "-1"]):
        with pytest.raises(usage.UsageError, match="stats-"):
            parse(bad)


class FakeResource:
    """resource's RLIMIT_NOFILE calls, with the limits a test chooses."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


def test_the_open_files_limit_is_raised_for_the_connection_caps() -> None:
    """A soft limit of 1,024 (systemd's default) is raised to what the caps need, within the hard limit."""
    from eth_twisted.server.tap import raise_file_limit

    fake = FakeResource(1024, 524288)
    assert raise_file_limit(10320, fake) == 10320 and fake.limits == (10320, 524288)
    fake = FakeResource(1024, 4096)
    assert raise_file_limit(10320, fake) == 4096 and fake.limits == (4096, 4096)
    fake = FakeResource(65536, 524288)
    assert raise_file_limit(10320, fake) == 65536  # never lowered
    fake = FakeResource(1024, 524288, refuse=True)
    assert raise_file_limit(10320, fake) == 1024


def test_make_service_raises_the_open_files_limit(tmp_path, monkeypatch) -> None:
    """eth server's entry point raises the soft limit before it listens."""
    import resource

    from twisted.internet.testing import MemoryReactorClock

    from eth_twisted.server.tap import Options, makeService

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4000)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    try:
        config = Options()
        config.parseOptions(
            [
                "--sqlite",
                str(tmp_path / "s.db"),
                "--max-connections",
                str(wanted - 64 - 256),
                "--stats",
                "none",
            ]
        )
        makeService(config, MemoryReactorClock())
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == wanted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
