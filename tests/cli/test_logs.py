"""``--log-format json``: one JSON object per line, secrets masked (eth_twisted.logs).

The unit tests feed events to the formatter; the live ones run a real ``eth server``
and ``eth client`` (and ``twistd --logger=eth_twisted.logs.json_observer``) as
subprocesses and parse every line they print with :func:`json.loads`.
"""

from __future__ import annotations

import datetime
import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from eth_twisted.cli.main import Options
from eth_twisted.logs import (
    event_as_dict,
    json_observer,
    observer_for,
    split_log_format,
)
from tests.faults.services import EthProcess
from tests.support import VENV_BIN, Anvil, free_port, wait_until

SECRET = "s3cret-Pw-77"


def emit(**kwargs: Any) -> dict[str, Any]:
    """Log one event through a JSON observer and return the parsed line."""
    out = io.StringIO()
    publisher = LogPublisher(observer_for("json", out, LogLevel.debug))
    log = Logger(namespace="tests.logs", observer=publisher)
    log.info(kwargs.pop("format", "hello {who}"), **kwargs)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])  # type: ignore[no-any-return]


def test_fields_and_iso_time() -> None:
    """time (ISO 8601 UTC), level, namespace, message, then the event's own fields."""
    line = emit(who="world", count=3, ratio=0.5, items=(1, "a"), nested={"k": b"v"})
    assert line["level"] == "info" and line["namespace"] == "tests.logs"
    assert line["message"] == "hello world"
    when = datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(when.timestamp() - time.time()) < 60
    assert line["who"] == "world" and line["count"] == 3 and line["ratio"] == 0.5
    assert line["items"] == [1, "a"] and line["nested"] == {"k": "v"}
    assert not any(k.startswith("log_") for k in line)


def test_secrets_masked() -> None:
    """Secret-named fields are masked, and so are URL passwords in fields and the message."""
    line = emit(
        format="connecting to {url}",
        url=f"https://user:{SECRET}@node.example/v1",
        mysql_pass=SECRET,
        shared_secret=SECRET,
        settings={"redis_password": SECRET, "host": "h"},
    )
    text = json.dumps(line)
    assert SECRET not in text
    assert line["mysql_pass"] == "***" and line["shared_secret"] == "***"
    assert line["settings"] == {"redis_password": "***", "host": "h"}
    assert line["url"] == "https://user:***@node.example/v1"
    assert line["message"] == "connecting to https://user:***@node.example/v1"


def test_unsafe_values_and_reserved_names() -> None:
    """Objects become their repr, NaN a string; a field named like a key keeps its value."""
    line = emit(obj=object(), nan=float("nan"), level_hint="x", message_id=1, namespace_x=2)
    assert line["obj"].startswith("<object object") and line["nan"] == "nan"
    out = io.StringIO()
    observer_for("json", out)({"log_level": LogLevel.warn, "log_namespace": "n", "time": 5})
    assert json.loads(out.getvalue())["field_time"] == 5


def test_traceback_as_field() -> None:
    """A failure is an ``exception`` and a ``traceback`` field, in the one line."""
    try:
        raise RuntimeError(f"boom at http://u:{SECRET}@h/")
    except RuntimeError:
        failure = Failure()
    line = event_as_dict(
        {
            "log_level": LogLevel.critical,
            "log_namespace": "tests",
            "log_format": "it failed",
            "log_failure": failure,
            "log_time": time.time(),
        }
    )
    assert line["level"] == "critical" and line["message"] == "it failed"
    assert line["exception"].startswith("RuntimeError: boom")
    assert "Traceback" in line["traceback"] and "test_traceback_as_field" in line["traceback"]
    assert SECRET not in json.dumps(line)


def test_twistd_factory_and_text_default() -> None:
    """``json_observer`` takes no argument (twistd's --logger); text stays the default."""
    assert callable(json_observer())
    assert split_log_format(["server", "--port", "1"]) == ("text", ["server", "--port", "1"])
    assert split_log_format(["--log-format", "JSON", "client", "--log-format=json", "-v"]) == (
        "json",
        ["client", "-v"],
    )
    with pytest.raises(ValueError, match="--log-format"):
        split_log_format(["server", "--log-format", "xml"])
    config = Options()
    config.parseOptions(["--log-format", "json", "migrate"])
    assert config["log-format"] == "json"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a process's output parsed as JSON (the runner's ``===`` markers skipped)."""
    parsed = []
    for raw in text.splitlines():
        if not raw.strip() or raw.startswith("=== start"):
            continue
        try:
            parsed.append(json.loads(raw))
        except ValueError:
            raise AssertionError(f"not a JSON line: {raw!r}") from None
    return parsed


def check_lines(lines: list[dict[str, Any]]) -> None:
    """The fixed keys of every line, with the right types."""
    assert lines
    for line in lines:
        assert isinstance(line, dict)
        assert {"time", "level", "namespace", "message"} <= set(line), line
        datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
        assert line["time"].endswith("Z")
        assert line["level"] in ("debug", "info", "warn", "error", "critical"), line
        assert isinstance(line["namespace"], str) and isinstance(line["message"], str)


@pytest.mark.live
@pytest.mark.slow
def test_real_server_and_client_log_json(tmp_path: Path) -> None:
    """A real relay, a server outage and a restart: every line either prints is a JSON object."""
    anvil = Anvil(block_time=1.0)
    anvil.start()
    port = free_port()
    server = EthProcess(
        ["server", "--port", str(port), "--stats", "none", "--log-format", "json"]
        + ["--sqlite", str(tmp_path / "server.sqlite3")],
        str(tmp_path / "server.log"),
        cwd=str(tmp_path),
    )
    rpc = anvil.url.replace("http://", f"http://relay:{SECRET}@")
    client = EthProcess(
        ["--log-format=json", "client", "--connect", f"tcp:host=127.0.0.1:port={port}"]
        + ["--interval", "1", "--stats", "none"]
        + ["--spool", str(tmp_path / "spool.sqlite3")],
        str(tmp_path / "client.log"),
        env={"ETH_RPC": rpc},
        cwd=str(tmp_path),
    )
    try:
        server.start()
        server.wait_port(port)
        client.start()
        wait_until(
            lambda: any("RPC chain" in line["message"] for line in json_lines(client.log_text())),
            60,
            interval=0.5,
            what="the client reaching its RPC endpoint",
        )
        time.sleep(2)
        server.kill()  # the link's outage: logged by the client, as JSON too
        time.sleep(3)
        server.start()
        server.wait_port(port)
        time.sleep(3)
    finally:
        client.stop()
        server.stop()
        if anvil.proc is not None:
            anvil.proc.kill()
            anvil.proc.wait(10)
    server_lines = json_lines(server.log_text())
    client_lines = json_lines(client.log_text())
    check_lines(server_lines)
    check_lines(client_lines)
    assert SECRET not in client.log_text()
    namespaces = {line["namespace"] for line in server_lines + client_lines}
    assert any(n.startswith("eth_twisted.server") for n in namespaces), namespaces
    assert any(n.startswith("eth_twisted.client") for n in namespaces), namespaces
    listening = [line for line in server_lines if "listening" in line["message"]]
    assert listening and all(isinstance(line.get("listen"), str) for line in listening)
    assert any(line["level"] in ("warn", "error") for line in client_lines), client_lines[-10:]


@pytest.mark.live
def test_twistd_logger_option(tmp_path: Path) -> None:
    """``twistd --logger=eth_twisted.logs.json_observer eth-server``: JSON lines on stdout."""
    port = free_port()
    proc = subprocess.Popen(
        [str(VENV_BIN / "twistd"), "--nodaemon", "--pidfile=", "--logger"]
        + ["eth_twisted.logs.json_observer", "eth-server", "--port", str(port)]
        + ["--stats", "none", "--sqlite", str(tmp_path / "s.sqlite3")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(tmp_path),
    )
    try:
        wait_until(
            lambda: _connects(port) or proc.poll() is not None, 30, interval=0.2, what="twistd"
        )
        time.sleep(0.5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    lines = json_lines(out.decode("utf-8"))
    check_lines(lines)
    assert any("listening" in line["message"] for line in lines), lines


def _connects(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
