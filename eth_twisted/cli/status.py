"""``eth status``: print a running client's /api/status as a readable table.

Like ``eth stats`` for the server (and with its fetching rules: a blocking one-shot request,
no redirects followed, a bounded answer, control characters removed from what is printed).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from eth_twisted.cli.stats import (
    TIMEOUT,
    StatsUnavailable,
    _age,
    _int,
    _when,
    fetch_stats,
    printable,
)
from eth_twisted.cli.stats import Options as StatsOptions

DEFAULT_URL = "http://127.0.0.1:8081"
"""The client's default stats endpoint (``eth client --stats tcp:8081:interface=127.0.0.1``)."""


class Options(StatsOptions):
    """Options of ``eth status``."""

    synopsis = "[--url URL] [--token TOKEN] [--json]"
    longdesc = "Print the client's status (GET /api/status) as a table."
    optParameters = [
        ["url", None, DEFAULT_URL, "Base URL of the client's stats site"],
        ["token", None, None, "Bearer token, when the site requires one (prefer ETH_TOKEN)"],
        ["token-file", None, None, "Read the bearer token from this file"],
        ["timeout", None, TIMEOUT, "Seconds to wait for the client", float],
    ]


def fetch_status(url: str, token: str | None, timeout: float = TIMEOUT) -> dict[str, Any]:
    """GET ``url``/api/status and decode it; raises ``StatsUnavailable`` with a readable reason."""
    return fetch_stats(
        url, token, timeout, path="/api/status", command="eth status", required="endpoints"
    )


def _short(value: Any, keep: int = 10) -> str:
    text = printable(value if value is not None else "-")
    return text if len(text) <= 2 * keep + 1 else f"{text[:keep]}…{text[-keep + 2 :]}"


def format_status(status: dict[str, Any], url: str) -> str:
    """The status as lines of text: a summary, then one row per RPC endpoint."""
    now = status.get("time")
    lines = [
        f"eth-twisted client status ({url}): {'ready' if status.get('ready') else 'NOT READY'}"
    ]
    chain = status.get("chain") or {}
    cursor = status.get("cursor") or {}
    outbox = status.get("outbox") or {}
    dead = status.get("dead_letters") or {}
    link = status.get("server_link") or {}
    fin = status.get("finality") or {}
    reorg = status.get("last_reorg")
    last_ack = link.get("last_ack_at")
    codes = ", ".join(f"{printable(k)} {_int(v)}" for k, v in (dead.get("by_code") or {}).items())

    def block(b: Any) -> str:
        return "-" if not b else f"{_int(b.get('number'))} ({_short(b.get('hash'))})"

    rows = [
        (
            "chain",
            f"id {printable(chain.get('chain_id', '-'))}, genesis {_short(chain.get('genesis'))}",
        ),
        ("cursor", f"block {_int(cursor.get('number'))} ({_short(cursor.get('hash'))})"),
        (
            "heads",
            f"agreed {_int(status.get('agreed_head'))}, source {printable(status.get('head_source') or '-')}",
        ),
        (
            "server link",
            f"{printable(link.get('endpoint') or '-')}: {printable(link.get('state') or '-')}, "
            f"last ack {_when(last_ack)}"
            + (f" ({_age(now - last_ack)} ago)" if now and last_ack else ""),
        ),
        (
            "outbox",
            f"depth {_int(outbox.get('depth'))}, oldest {_age(outbox.get('oldest_age'))}, "
            f"in flight {_int(outbox.get('in_flight'))}, free slots {_int(outbox.get('free_slots'))}",
        ),
        ("dead letters", f"{_int(dead.get('total'))}" + (f" ({codes})" if codes else "")),
        (
            "finality",
            f"finalized {block(fin.get('finalized'))}, safe {block(fin.get('safe'))}, "
            f"violations {_int(fin.get('violations'))}",
        ),
        (
            "last reorg",
            "none"
            if not reorg
            else f"at block {_int(reorg.get('fork_number'))}, depth {_int(reorg.get('depth'))}, "
            f"{_when(reorg.get('at'))}"
            + (" BELOW FINALITY" if reorg.get("below_finality") else ""),
        ),
    ]
    lines += [f"  {name:<13} {value}" for name, value in rows]
    header = ("endpoint", "kind", "state", "head", "lag", "head age", "failures", "cooling until")
    table = [header]
    for e in status.get("endpoints") or []:
        table.append(
            (
                printable(e.get("url"), 60),
                printable(e.get("kind")),
                printable(e.get("state")),
                _int(e.get("last_head")),
                _int(e.get("lag")),
                _age(e.get("head_age")),
                _int(e.get("failures")),
                _when(e.get("cooling_until")),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    lines += [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    return "\n".join(lines)


def run(
    config: Options,
    out: TextIO | None = None,
    err: TextIO | None = None,
    fetch: Callable[[str, str | None, float], dict[str, Any]] = fetch_status,
) -> int:
    """Fetch and print the status; 0 on success, 1 when the client does not answer."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    url = str(config["url"])
    try:
        status = fetch(url, config["token"], float(config["timeout"]))
    except StatsUnavailable as e:
        print(f"eth status: {e}", file=err)
        return 1
    if config["json"]:
        print(json.dumps(status, indent=2, sort_keys=True), file=out)
        return 0
    try:
        print(format_status(status, url), file=out)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, OSError):
        print(
            f"eth status: {url}/api/status answered a status this eth status cannot read "
            "(use --json to see it)",
            file=err,
        )
        return 1
    return 0
