"""Fixtures of the link tests: one test PKI per module, a live link server."""

from __future__ import annotations

from collections.abc import Generator

import pytest
import pytest_twisted

from tests.support.certs import PKI, PemPair, issue_into, make_pki
from tests.support.link import LinkServer


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rsa_server(pki: PKI) -> PemPair:
    """An RSA server certificate (the kind most deployments use; static RSA needs one)."""
    return issue_into(
        pki, "rsa-server", server=True, dns=("localhost",), ips=("127.0.0.1",), rsa_bits=2048
    )


@pytest.fixture
def server() -> Generator[LinkServer, None, None]:
    s = LinkServer()
    yield s
    pytest_twisted.blockon(s.stop())
