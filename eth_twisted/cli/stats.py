"""``eth stats``: print a running server's /api/stats as a readable table.

A one-shot command, so a blocking ``urllib`` request is all it needs. When the
server does not answer, it says so on stderr and exits 1. It never follows a
redirect (the bearer token would go wherever the redirect points): a 3xx is
an error naming where it pointed. The answer is read up to :data:`MAX_BODY`
bytes, and text from the server is printed without control characters.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TextIO

from eth_twisted.options import PRECEDENCE, EnvOptions

DEFAULT_URL = "http://127.0.0.1:8080"
TIMEOUT = 5.0
MAX_BODY = 8 * 1024 * 1024
"""Largest /api/stats answer read (the server's is tens of kilobytes: top clients, 600 chart points)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Options(EnvOptions):
    """Options of ``eth stats``."""

    synopsis = "[--url URL] [--token TOKEN] [--json]"
    longdesc = "Print the server's stats (GET /api/stats) as a table. " + PRECEDENCE
    secrets = ("token",)

    optFlags = [
        ["json", None, "Print the raw JSON instead of a table"],
    ]
    optParameters = [
        ["url", None, DEFAULT_URL, "Base URL of the server's stats API"],
        ["token", None, None, "Bearer token, when the stats API requires one (prefer ETH_TOKEN)"],
        ["token-file", None, None, "Read the bearer token from this file"],
        ["timeout", None, TIMEOUT, "Seconds to wait for the server", float],
    ]

    def postOptions(self) -> None:
        """Resolve the token from argv, environment, file or credentials directory."""
        token = self.resolve_secret("token") or self.environ.get("ETH_STATS_TOKEN") or None
        self["token"] = token
        url = str(self["url"]).rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self["url"] = url


class StatsUnavailable(Exception):
    """The stats could not be fetched; the message says why, for a person."""


def printable(text: Any, limit: int = 200) -> str:
    """``text`` as one line without control characters (no terminal escapes), at most ``limit`` long."""
    line = _CONTROL.sub("?", str(text))
    return line if len(line) <= limit else line[: limit - 1] + "…"


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend the Authorization header to any host.

    Returning None makes urllib raise the 3xx as an ``HTTPError``.
    """

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        """Refuse every redirect."""
        return None


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(NoRedirects())


def fetch_stats(
    url: str,
    token: str | None,
    timeout: float = TIMEOUT,
    path: str = "/api/stats",
    command: str = "eth stats",
    required: str = "totals",
) -> dict[str, Any]:
    """GET ``url`` + ``path`` and decode it; raises ``StatsUnavailable`` with a readable reason."""
    request = urllib.request.Request(url + path, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with _opener().open(request, timeout=timeout) as response:
            body = response.read(MAX_BODY + 1)
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            location = printable(e.headers.get("Location") or "nowhere")
            e.close()
            raise StatsUnavailable(
                f"{url}{path} answered a redirect (HTTP {e.code}) to {location}; {command} does "
                "not follow redirects (the token would go with it): give --url the server itself"
            )
        detail = ""
        try:
            detail = printable(json.loads(e.read(64 * 1024)).get("message", ""))
        except (ValueError, AttributeError, OSError):
            pass
        if e.code == 401:
            hint = "pass --token or set ETH_TOKEN" if not token else "the token was refused"
            raise StatsUnavailable(f"the stats API at {url} needs a valid token ({hint})")
        raise StatsUnavailable(
            f"{url}{path} answered HTTP {e.code}" + (f": {detail}" if detail else "")
        )
    except urllib.error.URLError as e:
        raise StatsUnavailable(f"the server at {url} does not answer ({e.reason})")
    except (OSError, ValueError) as e:
        raise StatsUnavailable(f"the server at {url} does not answer ({e})")
    if len(body) > MAX_BODY:
        raise StatsUnavailable(
            f"{url}{path} answered more than {MAX_BODY // (1024 * 1024)} MiB: "
            "is this the eth-twisted stats API?"
        )
    try:
        stats = json.loads(body)
    except ValueError:
        raise StatsUnavailable(
            f"{url}{path} did not answer JSON: is this the eth-twisted stats API?"
        )
    if not isinstance(stats, dict) or required not in stats:
        raise StatsUnavailable(f"{url}{path} answered something that is not eth-twisted's")
    return stats


def _int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def format_stats(stats: dict[str, Any], url: str) -> str:
    """The stats as lines of text: a summary, then one row per listed client (IPv6: per /64)."""
    totals = stats.get("totals", {})
    latest = stats.get("latest_block")
    now = stats.get("now")
    lines = [f"eth-twisted server stats ({url})", ""]
    if latest:
        head = f"{_int(latest['number'])}   received {_age(latest.get('age_seconds'))} ago"
        head += f" ({_when(latest.get('received_at'))})"
    else:
        head = "no block yet"
    summary = [
        ("chain head", head),
        ("records", _int(totals.get("records"))),
        (
            "messages",
            f"{_int(totals.get('messages'))} ({_int(totals.get('duplicates'))} duplicates)",
        ),
        ("clients", _int(totals.get("clients"))),
        ("first receipt", _when(stats.get("first_received_at"))),
        ("last receipt", _when(stats.get("last_received_at"))),
        ("uptime", _age(stats.get("uptime_seconds"))),
        ("counts from", str(stats.get("messages_source", "-"))),
    ]
    width = max(len(k) for k, _ in summary)
    lines += [f"  {k:<{width}}  {v}" for k, v in summary]
    clients = stats.get("clients") or []
    lines.append("")
    if not clients:
        lines.append("  no clients yet")
        return "\n".join(lines)
    header = ("client", "records", "messages", "latest block", "last seen")
    rows = [
        (
            printable(c.get("ip", "?"), 60),
            _int(c.get("records")),
            _int(c.get("messages")),
            _int(c.get("latest_block")),
            "before start"
            if c.get("last_seen") is None or now is None
            else _age(now - c["last_seen"]) + " ago",
        )
        for c in clients
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  " + "  ".join(cells).rstrip()

    lines.append(fmt(header))
    lines.append("  " + "  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in rows]
    omitted = stats.get("clients_omitted") or 0
    if omitted:
        lines.append(
            f"  … and {_int(omitted)} more (the busiest {len(rows)} are shown; the totals count all)"
        )
    return "\n".join(lines)


def run(
    config: Options,
    out: TextIO | None = None,
    err: TextIO | None = None,
    fetch: Callable[[str, str | None, float], dict[str, Any]] = fetch_stats,
) -> int:
    """Fetch and print the stats; 0 on success, 1 when the server does not answer."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    for warning in getattr(config, "warnings", []):
        print(f"eth stats: warning: {warning}", file=err)
    url = str(config["url"])
    try:
        stats = fetch(url, config["token"], float(config["timeout"]))
    except StatsUnavailable as e:
        print(f"eth stats: {e}", file=err)
        return 1
    if config["json"]:
        print(json.dumps(stats, indent=2, sort_keys=True), file=out)
        return 0
    try:
        table = format_stats(stats, url)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, OSError):
        # The answer had the right keys but not the right kinds of values: say so, no traceback.
        print(
            f"eth stats: {url}/api/stats answered stats this eth stats cannot read (use --json to see them)",
            file=err,
        )
        return 1
    print(table, file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; for ``python -m eth_twisted.cli.stats``."""
    from twisted.python import usage

    config = Options()
    try:
        config.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"eth stats: {e}", file=sys.stderr)
        return 2
    return run(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
