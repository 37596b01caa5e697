"""The client's ``GET /api/status`` and ``eth status``.

Unit tests format canned documents; the live test runs a real ``eth server`` (SQLite) and
``eth client`` (anvil, an RPC URL with credentials given in ETH_RPC) as subprocesses, checks
the real answer against the client's OpenAPI document (jsonschema), runs ``eth status``
against it, and lets schemathesis fuzz the client's site.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from eth_twisted.cli.stats import StatsUnavailable
from eth_twisted.cli.status import Options, format_status, run
from eth_twisted.web.site import CLIENT_OPENAPI, openapi_document
from tests.faults.services import EthProcess
from tests.support import VENV_BIN, Anvil, free_port, wait_until

SPEC = openapi_document(CLIENT_OPENAPI)
SECRET = "rpc-Pw-4242"
TOKEN = "status-token-1"


def validate_status(body: Any) -> None:
    """``body`` matches the ClientStatus schema of the client's OpenAPI document."""
    schema = {"$ref": "#/components/schemas/ClientStatus", "components": SPEC["components"]}
    errors = sorted(Draft202012Validator(schema).iter_errors(body), key=str)
    assert not errors, "; ".join(e.message for e in errors[:5])


def canned() -> dict[str, Any]:
    """A status document like a live client's, with a reorg and dead letters."""
    return {
        "ready": False,
        "time": 1_800_000_100.0,
        "endpoints": [
            {
                "url": "https://node.example:8545",
                "kind": "http",
                "state": "cooling",
                "last_head": 100,
                "lag": 2,
                "head_age": 30.0,
                "failures": 4,
                "rate_limits": 3,
                "cooling_until": 1_800_000_160.0,
                "distrust": None,
            },
            {
                "url": "wss://ws.example",
                "kind": "ws",
                "state": "ok",
                "last_head": 102,
                "lag": 0,
                "head_age": 1.0,
                "failures": 0,
                "rate_limits": 0,
                "cooling_until": None,
                "distrust": None,
            },
        ],
        "agreed_head": 102,
        "chain": {"chain_id": 1, "genesis": "0x" + "d4" * 32},
        "head_source": "push",
        "sockets": [],
        "cursor": {"chain_id": 1, "genesis": "0x" + "d4" * 32, "number": 101, "hash": "0xab"},
        "poller": {"ok": True, "last_success": 1_800_000_099.0},
        "outbox": {"depth": 7, "free_slots": 99_993, "oldest_age": 65.0, "in_flight": 3},
        "dead_letters": {"total": 2, "by_code": {"bad-payload": 2}},
        "server_link": {
            "endpoint": "tcp:host=server:port=9999",
            "state": "disconnected",
            "last_ack_at": 1_800_000_040.0,
        },
        "last_reorg": {
            "fork_number": 95,
            "depth": 2,
            "at": 1_800_000_000.0,
            "below_finality": True,
        },
        "finality": {
            "mode": "tag",
            "finalized": {"number": 64, "hash": "0x" + "ef" * 32},
            "safe": None,
            "violations": 1,
        },
    }


def test_canned_document_matches_the_schema() -> None:
    """The canned document is a valid ClientStatus (the schema accepts what the client sends)."""
    validate_status(canned())


def test_format_status_table() -> None:
    """Summary lines, then one row per endpoint; not-ready, reorg below finality spelled out."""
    text = format_status(canned(), "http://c:8081")
    assert text.splitlines()[0] == "eth-twisted client status (http://c:8081): NOT READY"
    for expected in (
        "block 101",
        "agreed 102, source push",
        "tcp:host=server:port=9999: disconnected",
        "(1 min 0 s ago)",
        "depth 7, oldest 1 min 5 s, in flight 3",
        "2 (bad-payload 2)",
        "finalized 64",
        "violations 1",
        "at block 95, depth 2",
        "BELOW FINALITY",
    ):
        assert expected in text, (expected, text)
    rows = [line for line in text.splitlines() if line.startswith(("https://", "wss://"))]
    assert len(rows) == 2 and "cooling" in rows[0] and "2030-" not in rows[1]


def test_run_prints_json_and_reports_failures() -> None:
    """--json prints the document; an unreachable client is one line on stderr and exit 1."""
    config = Options()
    config.parseOptions(["--json", "--url", "c:8081"])
    out = io.StringIO()
    assert run(config, out=out, fetch=lambda url, token, timeout: canned()) == 0
    assert json.loads(out.getvalue())["agreed_head"] == 102
    assert config["url"] == "http://c:8081"

    def down(url: str, token: str | None, timeout: float) -> dict[str, Any]:
        raise StatsUnavailable(f"the server at {url} does not answer (refused)")

    err = io.StringIO()
    assert run(config, out=io.StringIO(), err=err, fetch=down) == 1
    assert err.getvalue().startswith("eth status: ")


@pytest.mark.live
@pytest.mark.slow
def test_live_client_status(tmp_path: Path) -> None:
    """A real client's /api/status, ``eth status`` on it, and schemathesis on its site."""
    anvil = Anvil(block_time=1.0)
    anvil.start()
    port, stats = free_port(), free_port()
    server = EthProcess(
        ["server", "--port", str(port), "--stats", "none"]
        + ["--sqlite", str(tmp_path / "server.sqlite3")],
        str(tmp_path / "server.log"),
        cwd=str(tmp_path),
    )
    client = EthProcess(
        ["client", "--connect", f"tcp:host=127.0.0.1:port={port}", "--interval", "1"]
        + ["--stats", f"tcp:{stats}:interface=127.0.0.1"]
        + ["--spool", str(tmp_path / "spool.sqlite3")],
        str(tmp_path / "client.log"),
        env={
            "ETH_RPC": anvil.url.replace("http://", f"http://relay:{SECRET}@"),
            "ETH_STATS_TOKEN": TOKEN,
        },
        cwd=str(tmp_path),
    )
    base = f"http://127.0.0.1:{stats}"

    def get(path: str) -> Any:
        request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    try:
        server.start()
        server.wait_port(port)
        client.start()
        status = wait_until(
            lambda: (
                (s := get("/api/status"))
                and s["ready"]
                and (s["cursor"] or {}).get("number", 0) >= 2
                and s
            ),
            60,
            interval=0.5,
            what="the client ready with a cursor",
        )
        validate_status(status)
        assert SECRET not in json.dumps(status)
        (endpoint,) = status["endpoints"]
        assert endpoint["url"] == anvil.url and endpoint["kind"] == "http"
        assert endpoint["state"] == "ok" and endpoint["last_head"] >= 2
        assert status["chain"]["chain_id"] == 31337 == status["cursor"]["chain_id"]
        assert status["head_source"] == "poll"
        assert status["server_link"]["state"] == "connected"
        assert status["server_link"]["last_ack_at"] is not None
        assert status["dead_letters"] == {"total": 0, "by_code": {}}
        assert get("/api/openapi.json") == SPEC

        env = dict(os.environ, ETH_TOKEN=TOKEN)
        shown = subprocess.run(
            [str(VENV_BIN / "eth"), "status", "--url", base],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert shown.returncode == 0, shown.stderr
        assert ": ready" in shown.stdout.splitlines()[0]
        assert anvil.url in shown.stdout and "connected" in shown.stdout
        assert SECRET not in shown.stdout

        st = str(Path(sys.executable).parent / "schemathesis")
        fuzz = subprocess.run(
            [st, "run", base + "/api/openapi.json", "-H", f"Authorization: Bearer {TOKEN}"]
            + ["--checks", "all", "--max-examples", "20", "--seed", "20240601"]
            + ["--generation-database", "none", "--workers", "1", "--no-color"]
            + ["--request-timeout", "10"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(tmp_path),
        )
        text = fuzz.stdout + fuzz.stderr
        assert fuzz.returncode == 0, text[-4000:]
        assert "No issues found" in text, text[-4000:]
    finally:
        client.stop()
        server.stop()
        if anvil.proc is not None:
            anvil.proc.kill()
            anvil.proc.wait(10)
