"""``eth stats``: the server's /api/stats as a table, and a clear failure when it is down."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from eth_twisted.cli.stats import Options, format_stats, run
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import Totals
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.site import make_server_site
from eth_twisted.web.stats import ServerStats
from tests.support import free_port
from tests.support.web import block_message

SAMPLE: dict[str, Any] = {
    "now": 1000.0,
    "started_at": 900.0,
    "uptime_seconds": 100.0,
    "messages_source": "redis",
    "totals": {"records": 1234, "messages": 1300, "duplicates": 66, "clients": 2},
    "first_received_at": 0.0,
    "last_received_at": 990.0,
    "latest_block": {"number": 19000000, "received_at": 990.0, "age_seconds": 10.0},
    "clients": [
        {
            "ip": "10.0.0.1",
            "records": 1000,
            "messages": 1001,
            "latest_block": 19000000,
            "last_seen": 995.0,
        },
        {
            "ip": "2001:db8::7",
            "records": 234,
            "messages": 299,
            "latest_block": None,
            "last_seen": None,
        },
    ],
    "chart": [],
}


def options(*argv: str, environ: dict[str, str] | None = None) -> Options:
    config = Options(environ=environ or {})
    config.parseOptions(list(argv))
    return config


def test_table_shows_head_totals_and_clients() -> None:
    """The table names the head, totals, and one aligned row per client."""
    text = format_stats(SAMPLE, "http://x")
    assert "19,000,000   received 10 s ago" in text
    assert "1,300 (66 duplicates)" in text
    lines = text.splitlines()
    row = next(line for line in lines if "10.0.0.1" in line)
    assert row.split() == ["10.0.0.1", "1,000", "1,001", "19,000,000", "5", "s", "ago"]
    row6 = next(line for line in lines if "2001:db8::7" in line)
    assert "before start" in row6 and " - " in row6
    header = next(line for line in lines if line.strip().startswith("client"))
    assert len(header) <= len(row6) + 5


def test_empty_server_table() -> None:
    """A server with nothing stored says so instead of showing an empty table."""
    empty = dict(
        SAMPLE,
        latest_block=None,
        clients=[],
        totals={"records": 0, "messages": 0, "duplicates": 0, "clients": 0},
    )
    text = format_stats(empty, "http://x")
    assert "no block yet" in text and "no clients yet" in text


def test_unreachable_server_exits_1_with_a_message() -> None:
    """Nothing listening: exit 1 and a sentence naming the URL on stderr."""
    url = f"http://127.0.0.1:{free_port()}"
    out, err = io.StringIO(), io.StringIO()
    assert run(options("--url", url, "--timeout", "2"), out, err) == 1
    assert out.getvalue() == ""
    assert f"the server at {url} does not answer" in err.getvalue()
    assert "Traceback" not in err.getvalue()


def test_options_token_sources_and_url(tmp_path: Path) -> None:
    """The token comes from --token, ETH_TOKEN or --token-file; a bare host:port gets http://."""
    assert options("--url", "localhost:9/")["url"] == "http://localhost:9"
    assert options(environ={"ETH_TOKEN": "env"})["token"] == "env"
    assert options(environ={"ETH_STATS_TOKEN": "alt"})["token"] == "alt"
    path = tmp_path / "tok"
    path.write_text("from-file\n")
    assert options("--token-file", str(path))["token"] == "from-file"
    assert options()["token"] is None
    assert options()["url"] == "http://127.0.0.1:8080"


def test_token_on_argv_warns(capsys: Any) -> None:
    """--token on the command line works but warns that it is visible to other users."""
    config = options("--token", "x", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "1")
    err = io.StringIO()
    run(config, io.StringIO(), err)
    assert "visible to every local user" in err.getvalue()


@pytest_twisted.inlineCallbacks
def test_against_a_live_site():
    """Against a real site on loopback: the table, --json, and the token's 401 hint."""
    stats = ServerStats(reactor)
    sink = MemorySink()
    messages = [block_message(n, "10.1.2.3", 1_700_000_000.0 + n) for n in (41, 42)]
    stats.seed(Totals())
    stats.observe(messages, (yield sink.store_batch(messages)))
    site = make_server_site(
        record=sink, sinks=[sink], stats=stats, metrics=ServerMetrics(), clock=reactor, token="tkn"
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    try:

        def call(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            code = run(options("--url", url, *argv, environ=environ), out, err)
            return code, out.getvalue(), err.getvalue()

        code, out, err = yield threads.deferToThread(call)
        assert code == 1 and "needs a valid token" in err and "ETH_TOKEN" in err
        code, out, err = yield threads.deferToThread(call, environ={"ETH_TOKEN": "wrong"})
        assert code == 1 and "the token was refused" in err
        code, out, err = yield threads.deferToThread(call, environ={"ETH_TOKEN": "tkn"})
        assert code == 0, err
        assert "42   received" in out
        assert "10.1.2.3" in out
        code, out, err = yield threads.deferToThread(call, "--json", environ={"ETH_TOKEN": "tkn"})
        assert code == 0
        assert json.loads(out)["totals"]["records"] == 2
    finally:
        yield port.stopListening()


def test_eth_stats_command_when_server_is_down() -> None:
    """The installed `eth stats` exits 1 with a readable message when nothing answers."""
    eth = Path(sys.executable).parent / "eth"
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [str(eth), "stats", "--url", url, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr
    assert "does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- issue 13, item 12: redirects never carry the token ------------------------------------


class Recorder(Resource):
    """A stats API that records the Authorization header of every request it gets."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.seen: list[bytes | None] = []

    def render_GET(self, request: Any) -> bytes:
        self.seen.append(request.getHeader(b"authorization"))
        return self.body


class Redirector(Resource):
    """Answers every request with ``code`` and a Location header."""

    isLeaf = True

    def __init__(self, code: int, location: bytes) -> None:
        super().__init__()
        self.code = code
        self.location = location

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"location", self.location)
        return b""


def test_redirect_handler_refuses_every_redirect() -> None:
    """The opener's redirect handler builds no new request, so urllib raises the 3xx instead."""
    import urllib.request

    from eth_twisted.cli.stats import NoRedirects

    req = urllib.request.Request(
        "http://127.0.0.1:1/api/stats", headers={"Authorization": "Bearer x"}
    )
    for code in (301, 302, 303, 307, 308):
        assert (
            NoRedirects().redirect_request(req, None, code, "moved", {}, "http://evil.test/")
            is None
        )


def test_server_text_is_printed_without_control_characters() -> None:
    """A hostile server's strings cannot put terminal escapes on the screen."""
    from eth_twisted.cli.stats import printable

    hostile = dict(
        SAMPLE, clients=[dict(SAMPLE["clients"][0], ip="\x1b]0;pwned\x07\x1b[2J10.0.0.1")]
    )
    text = format_stats(hostile, "http://x")
    assert "\x1b" not in text and "\x07" not in text
    assert printable("a\x1b[31mb\r\nc") == "a?[31mb??c"
    assert len(printable("x" * 1000)) == 200


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest_twisted.inlineCallbacks
def test_redirect_is_an_error_and_the_token_goes_nowhere(code: int):
    """A 3xx from the stats API is an exit-1 error naming where it pointed; the target sees nothing."""
    target = Recorder(json.dumps(SAMPLE).encode())
    target_port = reactor.listenTCP(0, Site(target), interface="127.0.0.1")
    elsewhere = f"http://127.0.0.1:{target_port.getHost().port}/api/stats"
    origin_port = reactor.listenTCP(
        0, Site(Redirector(code, elsewhere.encode())), interface="127.0.0.1"
    )
    url = f"http://127.0.0.1:{origin_port.getHost().port}"
    try:

        def call() -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            code = run(options("--url", url, environ={"ETH_TOKEN": "secret-token"}), out, err)
            return code, out.getvalue(), err.getvalue()

        status, out, err = yield threads.deferToThread(call)
    finally:
        yield origin_port.stopListening()
        yield target_port.stopListening()
    assert status == 1, out
    assert f"redirect (HTTP {code}) to {elsewhere}" in err
    assert "does not follow redirects" in err
    assert target.seen == []


@pytest_twisted.inlineCallbacks
def test_an_oversized_answer_is_refused():
    """An answer larger than MAX_BODY is an error, not read whole into memory."""
    from eth_twisted.cli.stats import MAX_BODY

    huge = Recorder(b"{" + b" " * (MAX_BODY + 10) + b"}")
    port = reactor.listenTCP(0, Site(huge), interface="127.0.0.1")
    try:

        def call() -> tuple[int, str]:
            err = io.StringIO()
            return run(
                options("--url", f"http://127.0.0.1:{port.getHost().port}"), io.StringIO(), err
            ), err.getvalue()

        status, err = yield threads.deferToThread(call)
    finally:
        yield port.stopListening()
    assert status == 1
    assert "answered more than 8 MiB" in err


def test_table_says_how_many_clients_are_not_listed() -> None:
    """The API lists the busiest client groups; the table says how many more there are."""
    text = format_stats(dict(SAMPLE, clients_omitted=4980), "http://x")
    assert "… and 4,980 more (the busiest 2 are shown; the totals count all)" in text
    assert "more" not in format_stats(dict(SAMPLE, clients_omitted=0), "http://x")


def test_stats_of_the_wrong_kinds_are_an_error_not_a_traceback() -> None:
    """An answer with the right keys but values of the wrong kinds exits 1 with a sentence, no traceback."""
    hostile = dict(
        SAMPLE,
        totals={"records": "many"},
        latest_block={"number": [1]},
        clients=[{"ip": 1, "records": "x", "last_seen": "soon"}],
        now=1e308 * 10,
    )
    for stats in (
        hostile,
        dict(SAMPLE, latest_block={"number": 5, "received_at": 1e300, "age_seconds": "x"}),
    ):
        out, err = io.StringIO(), io.StringIO()
        code = run(
            options("--url", "http://x"), out, err, fetch=lambda url, token, timeout, s=stats: s
        )
        assert code == 1 and out.getvalue() == ""
        assert "answered stats this eth stats cannot read" in err.getvalue()
