"""The images, built from the repository's Dockerfiles unchanged, really run.

- the runtime image (default command ``eth run``) and both AWS images run as a numeric
  non-root user on a read-only root with every capability dropped, reach ``healthy`` through
  their own HEALTHCHECK, start the right program, and stop cleanly (exit 0) on SIGTERM
  within a second;
- the test image runs as non-root and carries every tool the suite calls.

Single containers run with ``--network none``: the health checks use the loopback, and the
default command's client never reaches a public RPC endpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.containers import Engine

pytestmark = [pytest.mark.container, pytest.mark.slow]

HARDENED = [
    "--read-only",
    "--tmpfs",
    "/tmp",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--network",
    "none",
]
STOP_WITHIN = 1.0


def wait_healthy(engine: Engine, cid: str, timeout: float = 120) -> dict[str, Any]:
    """The container's State once its HEALTHCHECK says healthy (a failure shows the probes)."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = engine.inspect(cid)["State"]
        status = (state.get("Health") or {}).get("Status")
        if status == "healthy":
            return state
        if status == "unhealthy" or not state["Running"]:
            break
        time.sleep(0.5)
    logs = engine.docker("logs", "--tail", "40", cid, check=False)
    raise AssertionError(f"{cid[:12]} not healthy: {state}\n{logs.stdout}{logs.stderr}")


def pid1(engine: Engine, cid: str) -> list[str]:
    """The program PID 1 runs after the entrypoint's exec: the venv script and its arguments.

    The kernel shows ``python /opt/eth-twisted/venv/bin/eth run ...``; this returns
    ``["eth", "run", ...]``, checking that the interpreter and the script are the venv's.
    """
    out = engine.docker("exec", cid, "cat", "/proc/1/cmdline").stdout
    argv = [arg for arg in out.split("\0") if arg]
    assert argv[0].startswith("/opt/eth-twisted/venv/bin/python"), argv
    assert argv[1].startswith("/opt/eth-twisted/venv/bin/"), argv
    return [Path(argv[1]).name, *argv[2:]]


def assert_hardened_non_root(engine: Engine, cid: str) -> None:
    """A numeric non-root uid, no capabilities, no new privileges, and / not writable."""
    status = engine.docker("exec", cid, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields["Uid"].split()
    assert uids[0] != "0" and set(uids) == {uids[0]}, fields["Uid"]
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    write = engine.docker("exec", cid, "touch", "/opt/eth-twisted/probe", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write


def assert_stops_cleanly(engine: Engine, cid: str) -> float:
    """``docker stop`` (SIGTERM) ends the container with exit 0 within STOP_WITHIN seconds."""
    started = time.monotonic()
    engine.docker("stop", "--time", "10", cid)
    took = time.monotonic() - started
    state = engine.inspect(cid)["State"]
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), state
    assert took < STOP_WITHIN, f"docker stop took {took:.2f} s"
    return took


@pytest.fixture(scope="module")
def running(
    engine: Engine, runtime_image: str, aws_images: dict[str, str]
) -> Iterator[dict[str, str]]:
    """The runtime image's default command and both AWS images, started together, hardened."""
    yield {
        "runtime": engine.run_container(*HARDENED, runtime_image),
        "ecs": engine.run_container(*HARDENED, "-e", "ETH_HOST=127.0.0.1", aws_images["ecs"]),
        "beanstalk": engine.run_container(*HARDENED, aws_images["beanstalk"]),
    }


def test_runtime_image_runs_hardened_healthy_and_stops_on_sigterm(
    engine: Engine, runtime_image: str, running: dict[str, str], tier_report: dict[str, Any]
) -> None:
    """`docker run eth-twisted` (eth run): uid 10001, read-only root, healthy, stops in < 1 s."""
    cid = running["runtime"]
    assert engine.inspect(runtime_image)["Config"]["User"] == "10001:10001"
    assert engine.inspect(runtime_image)["Config"]["Healthcheck"]["Test"][0] == "CMD"
    wait_healthy(engine, cid)
    assert pid1(engine, cid) == ["eth", "run", "--stats", "tcp:8080:interface=0.0.0.0"]
    assert_hardened_non_root(engine, cid)
    tier_report["stop_seconds_runtime"] = round(assert_stops_cleanly(engine, cid), 2)


def test_ecs_image_starts_the_client(engine: Engine, running: dict[str, str]) -> None:
    """deploy/aws/Dockerfile-client-ecs runs `eth client`, healthy on :8081, hardened."""
    cid = running["ecs"]
    wait_healthy(engine, cid)
    assert pid1(engine, cid) == ["eth", "client"]
    assert_hardened_non_root(engine, cid)
    assert_stops_cleanly(engine, cid)


def test_beanstalk_image_starts_twistd_eth_server(engine: Engine, running: dict[str, str]) -> None:
    """deploy/aws/Dockerfile-server-beanstalk runs twistd eth-server (foreground, no pidfile)."""
    cid = running["beanstalk"]
    wait_healthy(engine, cid)
    assert pid1(engine, cid) == ["twistd", "--nodaemon", "--pidfile=", "eth-server"]
    probe = "import socket; socket.create_connection(('127.0.0.1', 9999), timeout=3).close()"
    engine.docker("exec", cid, "python", "-c", probe)
    assert_hardened_non_root(engine, cid)
    assert_stops_cleanly(engine, cid)


def test_test_image_runs_as_non_root_with_the_tools_the_suite_needs(
    engine: Engine, test_image: str
) -> None:
    """The test image: uid 10001, and nc, ruff, mypy, redis-server, anvil, openssl, sslscan, testssl."""
    tools = [
        "nc",
        "ruff",
        "mypy",
        "redis-server",
        "anvil",
        "openssl",
        "sslscan",
        "testssl",
        "python",
    ]
    script = f"id -u; for t in {' '.join(tools)}; do command -v $t || echo missing $t; done"
    out = engine.docker(
        "run", "--rm", *HARDENED, "--entrypoint", "sh", test_image, "-c", script
    ).stdout
    lines = out.split()
    assert lines[0] == "10001", out
    assert "missing" not in out, out
