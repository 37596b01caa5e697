"""The stats API, health checks, metrics and dashboard files, through treq's StubTreq."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from eth_twisted.model import MAX_BLOCK_NUMBER, Message, Totals
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.app import HANDLER_TIMEOUT, host_allowed
from eth_twisted.web.limits import SECURITY_HEADERS
from eth_twisted.web.site import MAX_LIMIT, PING_TIMEOUT, openapi_document
from tests.support.web import (
    BrokenRecord,
    HangingSink,
    Http,
    SlowRecord,
    block_message,
    client_site,
    combined_site,
    server_fixture,
)

# -- /api/stats ------------------------------------------------------------------------


def test_stats_reports_running_totals_and_head() -> None:
    """/api/stats answers the ServerStats snapshot: totals, head, clients, chart."""
    s = server_fixture()
    s.stats.seed(Totals())
    s.store([block_message(100, "10.0.0.1", 9000.0), block_message(101, "10.0.0.2", 9500.0)])
    s.store([block_message(101, "10.0.0.3", 9600.0)])
    reply = s.http.get("/api/stats")
    assert reply.code == 200
    assert reply.headers["content-type"] == "application/json; charset=utf-8"
    body = reply.json()
    assert body["totals"] == {"records": 2, "messages": 3, "duplicates": 1, "clients": 3}
    assert body["latest_block"]["number"] == 101
    assert body["latest_block"]["received_at"] == 9500.0
    assert body["chart"] == [[9000.0, 100], [9500.0, 101]]
    assert body["last_received_at_iso"].endswith("Z")


def test_stats_loads_chart_history_once_after_seeding() -> None:
    """The first /api/stats after seeding fills the chart from the record's recent rows."""
    s = server_fixture()
    for n in range(5):
        s.sink.store_batch([block_message(n, at=float(n))])
    s.stats.seed(Totals(records=5))
    assert s.http.get("/api/stats").json()["chart"] == [[float(n), n] for n in range(5)]
    assert s.stats.chart_seeded


def test_chart_history_is_read_without_payloads() -> None:
    """The chart's history comes from payload-free summaries: recent() (payloads) is never called for it."""

    class PayloadlessRecent(MemorySink):
        def recent(self, limit: int, before: int | None = None) -> Any:
            raise AssertionError("the chart read whole records (payloads)")

    s = server_fixture(record=PayloadlessRecent())
    for n in range(3):
        s.sink.store_batch([block_message(n, at=float(n))])
    s.stats.seed(Totals(records=3))
    assert s.http.get("/api/stats").json()["chart"] == [[float(n), n] for n in range(3)]


def test_stats_answer_is_cached_for_a_second() -> None:
    """Two polls within a second get the same answer; the next second sees new batches."""
    s = server_fixture()
    first = s.http.get("/api/stats").json()
    s.stats.observe([block_message(5)], ["OK"])
    assert s.http.get("/api/stats").json() == first
    s.clock.advance(1.0)
    assert s.http.get("/api/stats").json()["totals"]["records"] == 1


# -- /api/messages -----------------------------------------------------------------------


def test_messages_newest_first_and_paged() -> None:
    """limit and before page through every record, newest first, without overlap."""
    s = server_fixture()
    s.store([block_message(n) for n in range(7)])
    first = s.http.get("/api/messages?limit=3").json()
    assert [m["block_number"] for m in first["messages"]] == [6, 5, 4]
    assert first["limit"] == 3 and first["next_before"] == 5
    seen = [m["id"] for m in first["messages"]]
    before = first["next_before"]
    while before is not None:
        page = s.http.get(f"/api/messages?limit=3&before={before}").json()
        seen += [m["id"] for m in page["messages"]]
        before = page["next_before"]
    assert seen == [7, 6, 5, 4, 3, 2, 1]


def test_messages_default_and_capped_limit() -> None:
    """No limit means 50; a limit above the cap is served at the cap."""
    s = server_fixture()
    s.store([block_message(n) for n in range(MAX_LIMIT + 10)])
    assert len(s.http.get("/api/messages").json()["messages"]) == 50
    page = s.http.get("/api/messages?limit=100000").json()
    assert page["limit"] == MAX_LIMIT
    assert len(page["messages"]) == MAX_LIMIT


def test_message_json_shape() -> None:
    """A record carries hash, block, sender, times, size, its payload as text, and its chain status."""
    s = server_fixture()
    m = block_message(19000000, "192.0.2.7", 1700000000.25)
    s.store([m])
    (record,) = s.http.get("/api/messages").json()["messages"]
    assert record == {
        "id": 1,
        "hash": m.hash,
        "block_number": 19000000,
        "client_ip": "192.0.2.7",
        "client_id": None,
        "received_at": 1700000000.25,
        "received_at_iso": "2023-11-14T22:13:20.250000Z",
        "size": 194,
        "payload_encoding": "utf-8",
        "payload": m.payload.decode(),
        "payload_truncated": False,
        "kind": "block",
        "chain_id": None,
        "block_hash": None,
        "parent_hash": None,
        "canonical": None,
        "finalized": False,
    }


def test_binary_payload_is_base64() -> None:
    """A payload that is not UTF-8 is sent as base64 and says so."""
    s = server_fixture()
    raw = b"\xff\xfe\x00binary"
    s.store([Message.build(raw, "10.0.0.1", 1.0)])
    (record,) = s.http.get("/api/messages").json()["messages"]
    assert record["payload_encoding"] == "base64"
    assert base64.b64decode(record["payload"]) == raw


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        "limit=1&limit=2",
        "before=0",
        "before=x",
        "limit=%FF",
        "limit=123456789012345678901234",
    ],
)
def test_bad_paging_is_a_400_json_error(query: str) -> None:
    """A bad limit or before gets 400 with a JSON error naming the parameter."""
    s = server_fixture()
    reply = s.http.get("/api/messages?" + query)
    assert reply.code == 400
    body = reply.json()
    assert body["error"] == "bad-request"
    assert ("limit" in body["message"]) or ("before" in body["message"])


# -- /api/blocks ----------------------------------------------------------------------


def test_block_lookup() -> None:
    """/api/blocks/<n> returns every record of block n."""
    s = server_fixture()
    a = block_message(42)
    s.store(
        [
            a,
            Message.build(b'{"block_number":42,"chain_id":5}', "10.0.0.9", 2.0, 42),
            block_message(43),
        ]
    )
    body = s.http.get("/api/blocks/42").json()
    assert body["block_number"] == 42
    assert [r["hash"] for r in body["records"]][0] == a.hash
    assert len(body["records"]) == 2


def test_unknown_block_is_404() -> None:
    """A block number nobody sent is a 404 JSON error."""
    s = server_fixture()
    reply = s.http.get("/api/blocks/7")
    assert reply.code == 404
    assert reply.json()["error"] == "not-found"


@pytest.mark.parametrize(
    "number", ["abc", "-1", "1e3", "0x10", str(MAX_BLOCK_NUMBER + 1), "%20", "1%2F2"]
)
def test_bad_block_number_is_400(number: str) -> None:
    """Anything but a decimal integer in 0..2^63-1 is a 400 JSON error."""
    s = server_fixture()
    reply = s.http.get("/api/blocks/" + number)
    assert reply.code == 400, reply.body
    assert reply.json()["error"] == "bad-request"


def test_largest_block_number_is_accepted() -> None:
    """2^63-1 is a valid block number (404 when absent, not 400)."""
    assert server_fixture().http.get(f"/api/blocks/{MAX_BLOCK_NUMBER}").code == 404


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/api", "/api/stats/extra", "/static/../web.py", "/%ff"])
def test_unknown_path_is_404_json(path: str) -> None:
    """Unknown paths get a JSON 404, not Twisted's HTML page."""
    reply = server_fixture().http.get(path)
    assert reply.code == 404
    assert reply.json() == {"error": "not-found", "message": reply.json()["message"]}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_405(method: str) -> None:
    """Only GET and HEAD are served; others get 405 with Allow."""
    reply = server_fixture().http.get("/api/stats", method=method)
    assert reply.code == 405
    assert reply.headers["allow"] == "GET, HEAD"
    assert reply.json()["error"] == "method-not-allowed"


def test_head_has_headers_and_no_body() -> None:
    """HEAD answers like GET without the body."""
    reply = server_fixture().http.get("/api/stats", method="HEAD")
    assert reply.code == 200
    assert reply.body == b""
    assert int(reply.headers["content-length"]) > 0


def test_handler_exception_is_a_generic_500() -> None:
    """An exception inside a handler is a JSON 500 that leaks no text of it."""
    s = server_fixture(record=BrokenRecord())
    reply = s.http.get("/api/messages")
    assert reply.code == 500
    assert reply.json() == {"error": "internal", "message": "internal error"}
    assert b"hunter2" not in reply.body and b"Traceback" not in reply.body
    reply = s.http.get("/api/blocks/1")
    assert reply.code == 500
    assert b"hunter2" not in reply.body


def test_slow_record_is_a_503_after_the_deadline() -> None:
    """A read that never answers is a 503 timeout after the handler deadline."""
    s = server_fixture(record=SlowRecord())
    d = s.http.start("/api/messages")
    s.clock.advance(HANDLER_TIMEOUT + 0.1)
    reply = s.http.finish(d)
    assert reply.code == 503
    assert reply.json()["error"] == "timeout"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/api/stats",
        "/nope",
        "/healthz",
        "/readyz",
        "/metrics",
        "/static/dashboard.js",
        "/api/blocks/x",
    ],
)
def test_security_headers_on_every_response(path: str) -> None:
    """Every answer (errors included) carries CSP, nosniff, no-referrer and frame denial."""
    reply = server_fixture().http.get(path)
    for name, value in SECURITY_HEADERS.items():
        assert reply.headers[name.lower()] == value
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert reply.headers["x-content-type-options"] == "nosniff"


# -- health and metrics -------------------------------------------------------------------


def test_healthz() -> None:
    """/healthz says the process is up."""
    reply = server_fixture().http.get("/healthz")
    assert reply.code == 200 and reply.json()["status"] == "ok"


def test_readyz_ready_when_every_sink_answers() -> None:
    """/readyz is 200 and lists each sink with its latency when all answer."""
    a, b = MemorySink(), MemorySink()
    b.name = "redis"
    s = server_fixture(record=a, sinks=[a, b])
    reply = s.http.get("/readyz")
    assert reply.code == 200
    body = reply.json()
    assert body["status"] == "ready"
    assert set(body["sinks"]) == {"memory", "redis"}
    assert all(v["ok"] for v in body["sinks"].values())


def test_readyz_names_the_failing_sink() -> None:
    """A sink whose ping fails makes /readyz 503 naming it, without its error text."""
    from eth_twisted.errors import SinkUnavailable

    good, bad = MemorySink(), MemorySink()
    bad.name = "redis"
    bad.fail_with = SinkUnavailable("redis", "password=hunter2 refused")
    s = server_fixture(record=good, sinks=[good, bad])
    reply = s.http.get("/readyz")
    assert reply.code == 503
    body = reply.json()
    assert body["status"] == "unready"
    assert body["failing"] == ["redis"]
    assert body["sinks"]["memory"]["ok"] is True
    assert body["sinks"]["redis"] == {"ok": False, "error": "SinkUnavailable"}
    assert b"hunter2" not in reply.body


def test_readyz_times_out_a_silent_sink() -> None:
    """A sink that never answers its ping is reported failing after the ping timeout."""
    good = MemorySink()
    s = server_fixture(record=good, sinks=[good, HangingSink()])
    d = s.http.start("/readyz")
    s.clock.advance(PING_TIMEOUT + 0.01)
    reply = s.http.finish(d)
    assert reply.code == 503
    assert reply.json()["failing"] == ["hanging"]


def test_readyz_answer_is_reused_for_a_second() -> None:
    """Probes within a second reuse one ping round, so they cannot hammer the sinks."""
    calls = []
    sink = MemorySink()
    original = sink.ping
    sink.ping = lambda: (calls.append(1), original())[1]  # type: ignore[method-assign]
    s = server_fixture(record=sink)
    for _ in range(3):
        assert s.http.get("/readyz").code == 200
    assert len(calls) == 1
    s.clock.advance(1.5)
    s.http.get("/readyz")
    assert len(calls) == 2


def test_metrics_prometheus_text() -> None:
    """/metrics is the server registry in Prometheus text format."""
    s = server_fixture()
    s.metrics.received.inc(3)
    reply = s.http.get("/metrics")
    assert reply.code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert b"eth_server_messages_received_total 3.0" in reply.body
    assert b"eth_client_" not in reply.body


# -- token and Host allowlist --------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/stats", "/api/messages", "/api/blocks/1", "/metrics", "/api/openapi.json"]
)
def test_token_required_on_data_paths(path: str) -> None:
    """With a token, data paths answer 401 without it or with a wrong one, 2xx/404 with it."""
    s = server_fixture(token="s3cret")
    missing = s.http.get(path)
    assert missing.code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["error"] == "unauthorized"
    assert s.http.get(path, headers={"Authorization": "Bearer wrong"}).code == 401
    assert s.http.get(path, headers={"Authorization": "Basic s3cret"}).code == 401
    assert s.http.get(path, headers={"Authorization": "Bearer s3cret"}).code in (200, 404)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/", "/static/dashboard.js"])
def test_health_and_dashboard_files_stay_open(path: str) -> None:
    """Health checks and the data-free dashboard files need no token."""
    assert server_fixture(token="s3cret").http.get(path).code == 200


def test_host_allowlist() -> None:
    """A Host outside the allowlist gets 421 on data paths; health checks still answer."""
    s = server_fixture(allowed_hosts=["localhost", "127.0.0.1", ".example.org"])
    assert s.http.get("/api/stats").code == 200
    assert s.http.get("/api/stats", base="http://localhost:8080").code == 200
    assert s.http.get("/api/stats", base="http://stats.example.org").code == 200
    rebound = s.http.get("/api/stats", base="http://attacker.test:8080")
    assert rebound.code == 421
    assert rebound.json()["error"] == "host-not-allowed"
    assert s.http.get("/healthz", base="http://attacker.test:8080").code == 200


@pytest.mark.parametrize(
    ("host", "allowed", "expected"),
    [
        ("localhost", ["localhost"], True),
        ("LOCALHOST", ["localhost"], False),  # host_allowed takes the lowercased host
        ("::1", ["[::1]"], True),
        ("a.example.org", [".example.org"], True),
        ("example.org", [".example.org"], True),
        ("badexample.org", [".example.org"], False),
        ("anything", ["*"], True),
        (None, ["*"], False),
    ],
)
def test_host_allowed(host: str | None, allowed: list[str], expected: bool) -> None:
    """Allowlist entries match exactly, by subdomain with a leading dot, or all with '*'."""
    assert host_allowed(host, allowed) is expected


# -- dashboard ---------------------------------------------------------------------------


def test_dashboard_page_and_files() -> None:
    """/ is the dashboard; its script, style and icon are served with their types."""
    http = server_fixture().http
    page = http.get("/")
    assert page.code == 200 and page.headers["content-type"].startswith("text/html")
    assert b'<canvas id="chart"' in page.body
    assert http.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/static/dashboard.css").headers["content-type"].startswith("text/css")
    assert http.get("/static/favicon.svg").headers["content-type"] == "image/svg+xml"
    assert http.get("/static/openapi.json").code == 404


def test_dashboard_has_no_inline_script_or_html_sinks() -> None:
    """The page works under CSP default-src 'self': no inline script or style, no innerHTML."""
    http = server_fixture().http
    page = http.get("/").body.decode()
    assert re.findall(r"<script(?![^>]*\bsrc=)", page) == []
    assert " style=" not in page and "<style" not in page
    assert re.search(r"\bon[a-z]+=", page) is None
    js = http.get("/static/dashboard.js").body.decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js


def test_openapi_document_is_served() -> None:
    """/api/openapi.json is the shipped OpenAPI document."""
    reply = server_fixture().http.get("/api/openapi.json")
    assert reply.code == 200
    assert reply.json() == openapi_document()
    assert set(reply.json()["paths"]) >= {"/api/stats", "/api/messages", "/api/blocks/{number}"}


# -- client and combined sites -----------------------------------------------------------


def test_client_site_ready() -> None:
    """The client's /readyz is 200 with the readiness detail when ready."""
    site, _, _ = client_site(True)
    reply = Http(site).get("/readyz")
    assert reply.code == 200
    assert reply.json() == {"status": "ready", "checks": {"last_poll_age": 1.5, "link_up": True}}


def test_client_site_unready_and_broken_readiness() -> None:
    """Not ready, or a readiness callable that raises, is a 503."""
    site, _, _ = client_site(False)
    assert Http(site).get("/readyz").code == 503
    site, _, _ = client_site(RuntimeError("boom"))
    reply = Http(site).get("/readyz")
    assert reply.code == 503
    assert b"boom" not in reply.body


def test_client_site_metrics_and_token() -> None:
    """The client's /metrics is its registry, behind the token; /healthz stays open."""
    site, metrics, _ = client_site(True, token="t")
    metrics.outbox_depth.set(12)
    http = Http(site)
    assert http.get("/metrics").code == 401
    reply = http.get("/metrics", headers={"Authorization": "Bearer t"})
    assert b"eth_client_outbox_depth 12.0" in reply.body
    assert http.get("/healthz").code == 200
    assert http.get("/api/stats", headers={"Authorization": "Bearer t"}).code == 404


def test_combined_site_serves_both() -> None:
    """eth run's site: /metrics has both registries, /client/* answers for the client."""
    site, _, _ = combined_site()
    http = Http(site)
    metrics = http.get("/metrics").body
    assert b"eth_server_messages_received_total" in metrics
    assert b"eth_client_outbox_depth" in metrics
    assert b"eth_server_" not in http.get("/client/metrics").body
    assert http.get("/client/readyz").json()["status"] == "ready"
    assert http.get("/client/healthz").code == 200
    assert http.get("/api/stats").code == 200
    assert http.get("/readyz").json()["client"]["ok"] is True


def test_combined_readyz_needs_the_client() -> None:
    """eth run's /readyz is 503 naming 'client' when the client side is not ready."""
    site, _, _ = combined_site(client_ready=False)
    reply = Http(site).get("/readyz")
    assert reply.code == 503
    assert reply.json()["failing"] == ["client"]


def test_concurrent_readyz_share_one_ping_round() -> None:
    """Probes arriving while a ping is in flight wait for it instead of pinging again."""
    from twisted.internet import defer

    pending: list[defer.Deferred[None]] = []

    class SlowPing(MemorySink):
        def ping(self) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            pending.append(d)
            return d

    sink = SlowPing()
    s = server_fixture(record=sink)
    first, second = s.http.start("/readyz"), s.http.start("/readyz")
    assert len(pending) == 1
    pending[0].callback(None)
    assert s.http.finish(first).code == 200
    assert s.http.finish(second).code == 200
