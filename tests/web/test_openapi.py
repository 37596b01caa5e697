"""The OpenAPI document stays true: real responses validate against it.

Two layers: every documented operation's real responses (each status we can
provoke) are validated with jsonschema against the document's schemas, and
schemathesis (from PyPI) fuzzes the live API on a loopback port with all its
checks, including that the token is enforced.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from jsonschema import Draft202012Validator
from twisted.internet import reactor, utils

from eth_twisted.errors import SinkUnavailable
from eth_twisted.metrics import ServerMetrics
from eth_twisted.model import Message, Totals
from eth_twisted.sinks.memory import MemorySink
from eth_twisted.web.site import make_server_site, openapi_document
from eth_twisted.web.stats import ServerStats
from tests.support.chain_contract import bh, branch, finalized, reorg
from tests.support.web import BrokenRecord, block_message, server_fixture

SPEC = openapi_document()


def response_schema(path: str, status: int, media: str = "application/json") -> dict[str, Any]:
    """The schema the document declares for ``path``'s GET answering ``status``."""
    responses = SPEC["paths"][path]["get"]["responses"]
    assert str(status) in responses, f"{path} answered {status}, which the document does not list"
    content = responses[str(status)]["content"]
    assert media in content, f"{path} {status}: {media} not documented"
    return content[media]["schema"]


def validate(path: str, status: int, body: Any) -> None:
    """Validate ``body`` against the declared schema, resolving the document's $refs."""
    schema = dict(response_schema(path, status), components=SPEC["components"])
    Draft202012Validator.check_schema(schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(body), key=str)
    assert not errors, f"{path} {status}: " + "; ".join(e.message for e in errors[:5])


def populated():
    """A server fixture with stats seeded and a few records of several kinds."""
    s = server_fixture(token="tok")
    s.stats.seed(Totals(), {"10.0.0.1": 0})
    s.store([block_message(n, f"10.0.0.{n % 3}", 9000.0 + n) for n in range(5)])
    s.store(
        [
            Message.build(b"\xff\x00 not utf-8", "10.0.0.9", 9100.0),
            Message.build(b"<script>x</script>", "10.0.0.9", 9101.0),
        ]
    )
    s.store([block_message(3, "10.0.0.7", 9200.0)])
    # Chain 3: json blocks, a reorg below finality, a finality record (what /api/chains shows).
    s.store(branch("a", 1, 6, chain=3) + [finalized(4, chain=3, safe=5)])
    s.store([reorg(3, [bh("a", n, 3) for n in (4, 5, 6)], [bh("b", 4, 3)], chain=3)])
    s.store(branch("b", 4, 5, "a", chain=3))
    return s


AUTH = {"Authorization": "Bearer tok"}


@pytest.mark.parametrize(
    ("template", "url", "status"),
    [
        ("/api/stats", "/api/stats", 200),
        ("/api/stats", "/api/stats?x=1", 200),
        ("/api/messages", "/api/messages", 200),
        ("/api/messages", "/api/messages?limit=2&before=4", 200),
        ("/api/messages", "/api/messages?before=1", 200),
        ("/api/messages", "/api/messages?limit=0", 400),
        ("/api/blocks/{number}", "/api/blocks/3", 200),
        ("/api/blocks/{number}", "/api/blocks/3?limit=1&after=0", 200),
        ("/api/blocks/{number}", "/api/blocks/3?after=999", 200),
        ("/api/blocks/{number}", "/api/blocks/999", 404),
        ("/api/blocks/{number}", "/api/blocks/x", 400),
        ("/api/blocks/{number}", "/api/blocks/3?limit=0", 400),
        ("/api/openapi.json", "/api/openapi.json", 200),
        ("/api/chains", "/api/chains", 200),
        ("/api/chains", "/api/chains?limit=1&after=0", 200),
        ("/api/chains", "/api/chains?limit=0", 400),
        ("/api/chains/{chain}/blocks", "/api/chains/3/blocks", 200),
        ("/api/chains/{chain}/blocks", "/api/chains/3/blocks?from=2&to=4&limit=2", 200),
        ("/api/chains/{chain}/blocks", "/api/chains/3/blocks?from=9&to=2", 200),
        ("/api/chains/{chain}/blocks", "/api/chains/99/blocks", 200),
        ("/api/chains/{chain}/blocks", "/api/chains/x/blocks", 400),
        ("/api/chains/{chain}/blocks", "/api/chains/3/blocks?limit=1001", 200),
        ("/api/chains/{chain}/reorgs", "/api/chains/3/reorgs", 200),
        ("/api/chains/{chain}/reorgs", "/api/chains/3/reorgs?limit=1&before=2", 200),
        ("/api/chains/{chain}/reorgs", "/api/chains/3/reorgs?before=0", 400),
        ("/healthz", "/healthz", 200),
        ("/readyz", "/readyz", 200),
    ],
)
def test_real_responses_match_the_document(template: str, url: str, status: int) -> None:
    """Each documented operation's real answer has a documented status and a valid body."""
    reply = populated().http.get(url, headers=AUTH)
    assert reply.code == status, reply.body
    assert reply.headers["content-type"].startswith("application/json")
    validate(template, status, reply.json())


@pytest.mark.parametrize(
    "template",
    [
        "/api/stats",
        "/api/messages",
        "/api/blocks/{number}",
        "/api/openapi.json",
        "/api/chains",
        "/api/chains/{chain}/blocks",
        "/api/chains/{chain}/reorgs",
        "/metrics",
    ],
)
def test_unauthorized_answer_matches_the_document(template: str) -> None:
    """Without the token, protected operations answer the documented 401 body."""
    reply = populated().http.get(template.replace("{number}", "1").replace("{chain}", "1"))
    assert reply.code == 401
    validate(template, 401, reply.json())


def test_unready_answer_matches_the_document() -> None:
    """A 503 from /readyz has the documented Readiness body."""
    good, bad = MemorySink(), MemorySink()
    bad.name, bad.fail_with = "redis", SinkUnavailable("redis", "down")
    reply = server_fixture(record=good, sinks=[good, bad]).http.get("/readyz")
    assert reply.code == 503
    validate("/readyz", 503, reply.json())


def test_stats_of_many_clients_match_the_document() -> None:
    """With more client groups than are listed (IPv6 /64s among them), /api/stats still validates."""
    s = populated()
    s.store([block_message(100 + i, f"2001:db8:{i}::1", 9300.0 + i) for i in range(30)])
    reply = s.http.get("/api/stats", headers=AUTH)
    body = reply.json()
    assert body["clients_omitted"] > 0 and any(c["ip"].endswith("::/64") for c in body["clients"])
    validate("/api/stats", 200, body)


def test_a_truncated_record_matches_the_document() -> None:
    """A record whose payload is cut (payload_truncated) validates, as text and as base64."""
    s = populated()
    s.store(
        [
            Message.build(b"t" * 200_000, "10.0.0.1", 9400.0),
            Message.build(b"\xff" * 200_000, "10.0.0.1", 9401.0),
        ]
    )
    body = s.http.get("/api/messages?limit=2", headers=AUTH).json()
    assert [m["payload_truncated"] for m in body["messages"]] == [True, True]
    validate("/api/messages", 200, body)


def test_empty_server_stats_match_the_document() -> None:
    """Before anything is stored, /api/stats (nulls everywhere) still validates."""
    reply = server_fixture().http.get("/api/stats")
    validate("/api/stats", 200, reply.json())


def test_metrics_content_type_is_documented() -> None:
    """/metrics answers the documented text/plain media type."""
    reply = populated().http.get("/metrics", headers=AUTH)
    assert reply.code == 200
    documented = SPEC["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert reply.headers["content-type"].split(";")[0] in documented


def test_internal_error_body_is_the_error_schema() -> None:
    """The generic 500 body has the document's Error shape."""
    reply = server_fixture(record=BrokenRecord()).http.get("/api/messages")
    assert reply.code == 500
    errors = list(
        Draft202012Validator(dict(SPEC["components"]["schemas"]["Error"])).iter_errors(reply.json())
    )
    assert errors == []


def test_every_documented_path_is_served_and_vice_versa() -> None:
    """The document lists exactly the JSON/metrics endpoints the site routes."""
    s = populated()
    for template in SPEC["paths"]:
        url = re.sub(r"\{[^}]+\}", "3", template)
        assert s.http.get(url, headers=AUTH).code == 200, template
    served_not_documented = {"/", "/static/dashboard.js"}
    assert not served_not_documented & set(SPEC["paths"])


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_schemathesis_finds_no_issue(tmp_path: Path):
    """schemathesis fuzzes the live API (all checks, token enforced) and finds nothing."""
    clock_stats = ServerStats(reactor)
    sink = MemorySink()
    messages = [block_message(n, f"10.0.0.{n % 4}", 1_700_000_000.0 + n) for n in range(30)]
    messages.append(Message.build(b"\xfe\xff binary", "192.0.2.1", 1_700_000_100.0))
    # More client groups than /api/stats lists, IPv6 /64s among them, and a payload it cuts.
    messages += [
        block_message(100 + n, f"2001:db8:{n}::{n + 1}", 1_700_000_200.0 + n) for n in range(25)
    ]
    messages.append(Message.build(b"\x01" * 200_000, "192.0.2.2", 1_700_000_300.0, 3))
    messages += branch("a", 1, 8, chain=5) + [finalized(6, chain=5, safe=7)]
    messages += [reorg(4, [bh("a", n, 5) for n in (5, 6, 7, 8)], [bh("b", 5, 5)], chain=5)]
    messages += branch("b", 5, 9, "a", chain=5)
    outcomes = yield sink.store_batch(messages)
    clock_stats.seed(Totals())
    clock_stats.observe(messages, outcomes)
    site = make_server_site(
        record=sink,
        sinks=[sink],
        stats=clock_stats,
        metrics=ServerMetrics(),
        clock=reactor,
        token="fuzz-token",
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/api/openapi.json"
        st = str(Path(sys.executable).parent / "schemathesis")
        args = [
            "run",
            url,
            "-H",
            "Authorization: Bearer fuzz-token",
            "--checks",
            "all",
            "--max-examples",
            "60",
            "--seed",
            "20240601",
            "--generation-database",
            "none",
            "--workers",
            "1",
            "--no-color",
            "--request-timeout",
            "10",
        ]
        env = {k: v for k, v in os.environ.items() if k.startswith(("PATH", "HOME", "LANG", "LC_"))}
        out, err, code = yield utils.getProcessOutputAndValue(st, args, env=env, path=str(tmp_path))
    finally:
        yield port.stopListening()
    text = out.decode(errors="replace") + err.decode(errors="replace")
    assert code == 0, text[-4000:]
    assert "No issues found" in text, text[-4000:]
    assert re.search(r"[1-9]\d* passed", text), text[-2000:]
