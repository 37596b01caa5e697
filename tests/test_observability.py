"""The shipped Prometheus rules and Grafana dashboard, against the services' real /metrics.

- ``promtool check rules`` and ``promtool test rules`` (Debian's ``prometheus``
  package, installed here when missing and running as root; under ``CI=true`` a
  missing promtool fails, never skips) on ``deploy/prometheus``; every alert has a
  runbook line and a firing and a quiet test case;
- a real ``eth server`` (SQLite) and ``eth client`` (anvil) run as subprocesses
  and their ``/metrics`` pass ``promtool check metrics`` cleanly;
- every metric a rule or a dashboard panel names is in that real output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.faults.services import EthProcess
from tests.support import ROOT, Anvil, free_port, wait_until

RULES = ROOT / "deploy" / "prometheus" / "eth-twisted.rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "eth-twisted.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "eth-twisted.json"

PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
"""PromQL keywords: identifiers that are not metric names."""


def promtool() -> str:
    """The promtool binary, installing Debian's ``prometheus`` package when it is missing."""
    found = shutil.which("promtool")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
            env=env,
            capture_output=True,
            timeout=600,
        )
        found = shutil.which("promtool")
    if found is None:
        message = (
            "promtool is missing and could not be installed: "
            "apt-get install --no-install-recommends prometheus (as root)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool in deploy/prometheus (rule files name each other relatively)."""
    return subprocess.run(
        [promtool(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=RULES.parent,
        timeout=120,
    )


def rule_file() -> dict[str, Any]:
    """The parsed rules file."""
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of the rules file."""
    return [rule for group in rule_file()["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric (or recording rule) names a PromQL expression reads.

    Strings, label matchers, ranges, grouping clauses and Grafana variables are
    removed first; what is left that is not a function call, a keyword or a
    number is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def test_metric_names_extraction() -> None:
    """The extractor finds the metrics and nothing else in the shapes the files use."""
    expr = (
        'sum by (job, instance) (increase(eth_client_reorg_depth_count{job="x"}[15m])) '
        '- on (job) histogram_quantile(0.99, rate(a_bucket{le="5.0"}[$__rate_interval])) '
        "or b unless b offset 1h > 0 and eth:rec:rate5m"
    )
    assert metric_names(expr) == {"eth_client_reorg_depth_count", "a_bucket", "b", "eth:rec:rate5m"}


def exposed_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce, from its TYPE lines and samples."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("_count", "_sum", "_created"),
        "gauge": ("",),
        "stateset": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names |= {name + s for s in suffixes.get(kind, ("",))}
            names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_rules_check() -> None:
    """``promtool check rules`` accepts the rules file."""
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests() -> None:
    """``promtool test rules`` passes every case."""
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_runbook_and_cases() -> None:
    """Each alert has a summary and a runbook line, and is tested firing and quiet."""
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 15
    cases = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    for alert in alerts:
        name = alert["alert"]
        annotations = alert.get("annotations", {})
        assert annotations.get("summary"), name
        runbook = annotations.get("runbook", "")
        assert runbook and "\n" not in runbook.strip(), f"{name}: one runbook line"
        assert "severity" in alert.get("labels", {}), name
        assert name in firing, f"{name} has no firing case"
        assert name in quiet, f"{name} has no quiet case"


@pytest.fixture(scope="module")
def metrics_text(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Real /metrics of an ``eth server`` (SQLite) and an ``eth client`` (anvil) relaying blocks."""
    tmp = tmp_path_factory.mktemp("observability")
    anvil = Anvil(block_time=1.0)
    anvil.start()
    port, server_stats, client_stats = free_port(), free_port(), free_port()
    server = EthProcess(
        [
            "server",
            "--port",
            str(port),
            "--stats",
            f"tcp:{server_stats}:interface=127.0.0.1",
            "--sqlite",
            str(tmp / "server.sqlite3"),
        ],
        str(tmp / "server.log"),
        cwd=str(tmp),
    )
    client = EthProcess(
        [
            "client",
            "--connect",
            f"tcp:host=127.0.0.1:port={port}",
            "--rpc",
            anvil.url,
            "--interval",
            "1",
            "--spool",
            str(tmp / "spool.sqlite3"),
            "--stats",
            f"tcp:{client_stats}:interface=127.0.0.1",
        ],
        str(tmp / "client.log"),
        cwd=str(tmp),
    )

    def fetch(stats_port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/metrics", timeout=10) as r:
            return r.read().decode("utf-8")  # type: ignore[no-any-return]

    try:
        server.start()
        server.wait_port(port)
        client.start()
        wait_until(
            lambda: (
                'eth_server_messages_total{outcome="stored"}' in fetch(server_stats)
                and "eth_client_frames_sent_total" in fetch(client_stats)
            ),
            60,
            interval=0.5,
            what="a block relayed and both /metrics answering",
        )
        yield {"server": fetch(server_stats), "client": fetch(client_stats)}
    finally:
        client.stop()
        server.stop()
        if anvil.proc is not None:
            anvil.proc.kill()
            anvil.proc.wait(10)


@pytest.mark.live
@pytest.mark.parametrize("service", ["server", "client"])
def test_promtool_check_metrics_clean(metrics_text: dict[str, str], service: str) -> None:
    """``promtool check metrics`` finds nothing to complain about in either service's output."""
    result = run_promtool("check", "metrics", stdin=metrics_text[service])
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


@pytest.mark.live
def test_rules_name_only_real_metrics(metrics_text: dict[str, str]) -> None:
    """Every metric a rule reads is exported by a service (or is a recording rule, or ``up``)."""
    real = exposed_names(metrics_text["server"]) | exposed_names(metrics_text["client"])
    recorded = {r["record"] for r in rules() if "record" in r}
    used: set[str] = set()
    for rule in rules():
        used |= metric_names(rule["expr"])
    assert used, "no metric found in the rules"
    assert used - real - recorded - {"up"} == set()
    assert used & real >= {"eth_server_sink_up", "eth_client_finality_violations_total"}


def dashboard_exprs() -> list[str]:
    """Every ``expr`` anywhere in the Grafana dashboard JSON."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    return found


def test_dashboard_shape() -> None:
    """The dashboard is Grafana JSON with panels over every area issue 18 names."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for area in ("head", "lag", "latency", "/s", "outbox", "sink", "reorg", "finali", "watchdog"):
        assert area in titles, area
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]


@pytest.mark.live
def test_dashboard_names_only_real_metrics(metrics_text: dict[str, str]) -> None:
    """Every metric a dashboard expression reads is exported by the server or the client."""
    real = exposed_names(metrics_text["server"]) | exposed_names(metrics_text["client"])
    exprs = dashboard_exprs()
    assert len(exprs) >= 30
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        used |= names
    assert used - real - {"up"} == set()
