"""Fixtures of the fault suite: private MariaDB/Redis, anvil, scratch directories, the results file.

The private MariaDB is shared by the tests of one module (start ~0.3 s, but
install ~1.2 s); each test gets a database of its own from
:meth:`PrivateMariaDB.new_database`. A test that kills MariaDB restarts it
before it ends (the fixture checks and restarts it if not).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.faults import results
from tests.faults.services import FaultRedis, PrivateMariaDB


@pytest.fixture(scope="module")
def mariadb_server() -> Iterator[PrivateMariaDB]:
    """A private MariaDB for the whole module, destroyed afterwards."""
    db = PrivateMariaDB()
    db.start()
    yield db
    db.destroy()


@pytest.fixture
def private_mariadb(mariadb_server: PrivateMariaDB) -> Iterator[PrivateMariaDB]:
    """The module's private MariaDB, running, with a fresh database for this test."""
    if not mariadb_server.running():
        mariadb_server.start()
    mariadb_server.resume()
    mariadb_server.new_database()
    yield mariadb_server
    if mariadb_server.running():
        mariadb_server.resume()
    else:
        mariadb_server.start()


@pytest.fixture
def fault_redis() -> Iterator[FaultRedis]:
    """A private Redis for one test, which it may kill, stop and restart."""
    r = FaultRedis()
    r.start()
    yield r
    if r.proc is not None and r.proc.poll() is None:
        r.proc.send_signal(signal.SIGCONT)
    r.stop()


@pytest.fixture
def scratch(request: pytest.FixtureRequest) -> Iterator[str]:
    """A directory for one scenario's logs and files.

    It is kept (and named) when the test fails or ETH_FAULTS_KEEP is set.
    """
    path = tempfile.mkdtemp(prefix=f"eth-fault-{request.node.name[:40]}-")
    yield path
    rep = getattr(request.node, "rep_call", None)
    if (rep is not None and rep.failed) or os.environ.get("ETH_FAULTS_KEEP"):
        print(f"\nscenario files kept in {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Remember each phase's report on the item (the ``scratch`` fixture reads it)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def fault_results() -> Iterator[results.ResultLog]:
    """Where a scenario records its row for docs/faults.md (tests/artifacts/faults.json)."""
    log = results.ResultLog(os.environ.get("ETH_FAULTS_JSON", str(results.DEFAULT_JSON)))
    yield log
