"""Fixtures of the container tier: one private engine and the images, per session.

The tier (marker ``container``) builds the repository's Dockerfiles unchanged and runs
them; the engine, its caches and its cleanup are in tests/support/containers.py.
Timings and image sizes go to tests/artifacts/container-tier.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import ROOT
from tests.support.containers import Engine, log, private_engine

RUNTIME = "eth-twisted:latest"
TEST_IMAGE = "eth-twisted-test:latest"
ECS_IMAGE = "eth-twisted-client-ecs:test"
BEANSTALK_IMAGE = "eth-twisted-server-beanstalk:test"
REPORT = ROOT / "tests/artifacts/container-tier.json"


@pytest.fixture(scope="session")
def tier_report() -> Iterator[dict[str, Any]]:
    """Timings and sizes the tier measured, written out at the end of the session."""
    report: dict[str, Any] = {"started": time.time(), "build_seconds": {}, "image_mb": {}}
    yield report
    report["total_seconds"] = round(time.time() - report.pop("started"), 1)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log(f"report: {json.dumps(report, sort_keys=True)}")


@pytest.fixture(scope="session")
def engine(tier_report: dict[str, Any]) -> Iterator[Engine]:
    """The private dockerd with the base images in place (pulled, or stand-ins)."""
    started = time.monotonic()
    with private_engine() as eng:
        eng.ensure_bases()
        tier_report["standins"] = eng.standins
        tier_report["engine_and_bases_seconds"] = round(time.monotonic() - started, 1)
        yield eng


def _build(engine: Engine, report: dict[str, Any], tag: str, **kw: Any) -> str:
    report["build_seconds"][tag] = round(engine.build(tag, args=engine.build_args, **kw), 1)
    report["image_mb"][tag] = round(engine.image_size_mb(tag))
    return tag


@pytest.fixture(scope="session")
def runtime_image(engine: Engine, tier_report: dict[str, Any]) -> str:
    """The Dockerfile's default target, built as docker-compose.yml names it."""
    return _build(engine, tier_report, RUNTIME, dockerfile=ROOT / "Dockerfile", target="runtime")


@pytest.fixture(scope="session")
def test_image(engine: Engine, tier_report: dict[str, Any]) -> str:
    """The Dockerfile's ``test`` target (the compose ``test`` service and the anvil node)."""
    return _build(engine, tier_report, TEST_IMAGE, dockerfile=ROOT / "Dockerfile", target="test")


@pytest.fixture(scope="session")
def aws_images(engine: Engine, tier_report: dict[str, Any]) -> dict[str, str]:
    """Both AWS Dockerfiles, built from the repository root as deploy/aws/README.md says."""
    return {
        "ecs": _build(
            engine, tier_report, ECS_IMAGE, dockerfile=ROOT / "deploy/aws/Dockerfile-client-ecs"
        ),
        "beanstalk": _build(
            engine,
            tier_report,
            BEANSTALK_IMAGE,
            dockerfile=ROOT / "deploy/aws/Dockerfile-server-beanstalk",
        ),
    }
