"""The dashboard in a real headless Chromium (Debian's, driven by Playwright; no browser download).

A real server on SQLite with its stats site; the page is opened with the
token in the URL fragment. The head shown equals the API's and follows a new
message; a payload carrying ``<script>`` is shown as text and never runs; a chain's
head and finalized block and a reorg below finality (flagged) show; the
clients table shows the busiest 20 of 30 client groups and says so; a
screenshot is saved to tests/artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from eth_twisted.link.payload import render_html
from eth_twisted.model import sha256_hex
from eth_twisted.sinks.sql.migrations import migrate_sqlite
from tests.support import ROOT
from tests.support.chain_contract import bh, branch, finalized, reorg
from tests.support.live import sqlite_storage
from tests.support.web import send_from, start_with_stats

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.live]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "browser-token"
HOSTILE = (
    b"<script>window.__pwned = 1; alert('xss')</script>"
    b'<img src=x onerror="window.__pwned = 2"><b>bold?</b>'
)
HEAD0 = 19_000_040


def seed_history(path: Path, now: float) -> None:
    """Forty blocks over the last eight minutes from three clients, written straight to SQLite."""
    migrate_sqlite(str(path))
    with sqlite3.connect(path) as db:
        for i in range(40):
            number = HEAD0 - 40 + i
            payload = render_html(number)
            db.execute(
                "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at)"
                " VALUES (?, ?, ?, ?, NULL, ?)",
                (sha256_hex(payload), payload, number, f"192.0.2.{10 + i % 3}", now - 480 + i * 12),
            )
        # Older chatter without a block number from 24 more addresses and one IPv6 /64 (4 hosts):
        # 30 client groups with the live senders, more than the 20 the API lists.
        extra = [f"198.51.100.{i}" for i in range(24)] + [f"2001:db8:7::{i}" for i in range(1, 5)]
        for i, ip in enumerate(extra):
            payload = b"chatter %d" % i
            db.execute(
                "INSERT INTO ethereum_data (hash, payload, block_number, client_ip, client_id, received_at)"
                " VALUES (?, ?, NULL, ?, NULL, ?)",
                (sha256_hex(payload), payload, ip, now - 900 + i),
            )


def api_stats(web: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{web}/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def drive_browser(web: int, port: int) -> dict[str, Any]:
    """The whole browser session (blocking: runs in a thread while the reactor serves)."""
    from playwright.sync_api import sync_playwright

    seen: dict[str, Any] = {"dialogs": [], "console": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
            page.on("console", lambda m: seen["console"].append(f"{m.type}: {m.text}"))
            page.goto(f"http://127.0.0.1:{web}/#token={TOKEN}")

            # The head shown is the API's head.
            api_head = api_stats(web)["latest_block"]["number"]
            page.wait_for_function(
                "n => document.getElementById('head-number').dataset.value === String(n)",
                arg=api_head,
                timeout=10_000,
            )
            seen["head_before"] = page.text_content("#head-number")
            seen["fragment_after_load"] = page.evaluate("window.location.hash")

            # A new message moves the head without a reload.
            new_head = api_head + 1
            assert send_from("127.0.0.3", port, [render_html(new_head)])[0].startswith(b"OK")
            page.wait_for_function(
                "n => document.getElementById('head-number').dataset.value === String(n)",
                arg=new_head,
                timeout=10_000,
            )
            seen["head_after"] = page.text_content("#head-number")
            seen["api_head_after"] = api_stats(web)["latest_block"]["number"]

            # A hostile payload is shown as text and never runs.
            assert send_from("127.0.0.4", port, [HOSTILE])[0].startswith(b"OK")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#messages-list .preview')]"
                ".some(e => e.textContent.includes('<script>'))",
                timeout=10_000,
            )
            row = page.locator("#messages-list li.msg", has_text="window.__pwned").first
            row.locator("summary").click()
            seen["hostile_text"] = row.locator("pre.payload").text_content()
            seen["scripts_in_list"] = page.evaluate(
                "document.querySelectorAll("
                "'#messages-list script, #messages-list img, #messages-list b').length"
            )
            seen["pwned"] = page.evaluate("typeof window.__pwned")
            seen["clients_rows"] = page.locator("#client-rows tr").count()
            seen["clients_meta"] = page.text_content("#clients-meta")
            seen["client_addrs"] = page.locator("#client-rows td.addr").all_text_contents()
            # Chain records: the head, the finalized block and a reorg below finality, flagged.
            chain = [m.payload for m in branch("a", 1, 6, chain=7)]
            chain += [finalized(4, chain=7, safe=5).payload]
            chain += [
                reorg(3, [bh("a", n, 7) for n in (4, 5, 6)], [bh("b", 4, 7)], chain=7).payload
            ]
            chain += [m.payload for m in branch("b", 4, 5, "a", chain=7)]
            replies = send_from("127.0.0.5", port, chain)
            assert all(r.startswith(b"OK") for r in replies), replies
            page.wait_for_function(
                "() => document.querySelector('#reorgs-list li.reorg.violation') !== null",
                timeout=10_000,
            )
            seen["chain_row"] = page.text_content("#chain-rows tr[data-chain='7']")
            seen["chain_finalized"] = page.text_content(
                "#chain-rows tr[data-chain='7'] td.finalized"
            )
            seen["chain_head"] = page.text_content("#chain-rows tr[data-chain='7'] td.head")
            seen["reorg_flag"] = page.text_content("#reorgs-list li.reorg.violation .flag")
            seen["sinks"] = page.text_content("#sinks")
            seen["status"] = page.get_attribute("#status", "data-state")
            page.wait_for_timeout(600)  # let the pulse animation and chart settle for the picture
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    return seen


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium (scripts/test installs it with apt-get when missing)."""
    if shutil.which("chromium") is None and not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run ./scripts/test (apt-get install -y chromium)")
    return CHROMIUM


@pytest_twisted.inlineCallbacks
def test_dashboard_in_chromium(tmp_path: Path, chromium: str):
    """The head shown equals the API and follows a new message; a <script> payload stays text."""
    path = tmp_path / "eth-server.sqlite3"
    seed_history(path, time.time())
    server, port, web = yield start_with_stats(sqlite_storage(str(path)), stats_token=TOKEN)
    try:
        seen = yield threads.deferToThread(drive_browser, web, port)
    finally:
        yield server.stopService()
    assert seen["head_before"].replace(",", "") == str(HEAD0 - 1)
    assert seen["head_after"].replace(",", "") == str(HEAD0) == str(seen["api_head_after"])
    assert seen["fragment_after_load"] == ""  # the token does not linger in the address bar
    assert "<script>window.__pwned = 1; alert('xss')</script>" in seen["hostile_text"]
    assert seen["scripts_in_list"] == 0
    assert seen["pwned"] == "undefined"
    assert seen["dialogs"] == []
    assert seen["clients_rows"] == 20  # the busiest 20 of 30 groups
    assert seen["clients_meta"] == "30 addresses · busiest 20 shown"
    assert seen["client_addrs"][:3] == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
    assert "2001:db8:7::/64" in seen["client_addrs"]  # four hosts of one /64, one row
    assert seen["chain_head"].startswith("#5") and seen["chain_finalized"] == "#4"
    assert "⚠ 1" in seen["chain_row"]
    assert seen["reorg_flag"] == "below finality (finalized #4)"
    assert "sqlite" in seen["sinks"] and "up" in seen["sinks"]
    assert seen["status"] == "live"
    assert not [
        c for c in seen["console"] if "Content Security Policy" in c or c.startswith("error")
    ]
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
