"""The stats site against hostile requests, on Twisted's fakes (StubTreq, StringTransport, Clock).

Issue 13, items 14-19: header values that cannot be decoded, trickled or
oversized headers, request bodies, too many connections, pipelined requests
whose answers are never read, responses that grow with history.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from tests.test_web_helpers import server_fixture


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted during the test."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def failures(events: list[dict[str, Any]]) -> list[str]:
    """The format strings of the logged tracebacks."""
    return [str(e.get("log_format")) for e in events if e.get("log_failure") is not None]


# -- item 19: an Authorization header that is not UTF-8 ------------------------------------


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", b"\xffearer tok", b"Bearer t\xf6k", b"Bearer \x80"])
def test_non_utf8_authorization_is_a_401_without_a_traceback(value: bytes,
                                                             logged: list[dict[str, Any]]) -> None:
    """An Authorization header that is not UTF-8 is an invalid token (401), never a 500 or a log line."""
    s = server_fixture(token="tok")
    reply = s.http.get("/api/stats", headers={b"Authorization": [value]})
    assert reply.code == 401, reply.body
    assert reply.json()["error"] == "unauthorized"
    assert failures(logged) == []


def test_token_is_compared_as_bytes() -> None:
    """A non-ASCII token matches its own UTF-8 bytes and nothing else (not its Latin-1 form)."""
    s = server_fixture(token="tök")
    good = s.http.get("/api/stats", headers={b"Authorization": [b"Bearer t\xc3\xb6k"]})
    assert good.code == 200
    latin1 = s.http.get("/api/stats", headers={b"Authorization": [b"Bearer t\xf6k"]})
    assert latin1.code == 401
