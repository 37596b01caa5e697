"""The sd_notify client: datagrams to $NOTIFY_SOCKET, as systemd receives them.

Each test listens on a real ``AF_UNIX`` datagram socket (a filesystem path or
an abstract-namespace name), as systemd's manager does, with ``SO_PASSCRED``
on so the kernel tells us which process sent each message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import Logger

from eth_twisted import systemd
from tests.support.systemd import NotifyListener


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    """A notify socket of each kind systemd hands out: a path, and an @abstract name."""
    sock = NotifyListener(tmp_path / "notify" if request.param == "path" else None)
    yield sock
    sock.close()


def test_ready_reaches_the_socket_with_status(listener: NotifyListener) -> None:
    """notify_ready sends READY=1 and the STATUS line, from this very process."""
    assert systemd.notify_ready("listening on 127.0.0.1:9999", {"NOTIFY_SOCKET": listener.name})
    pid, fields = listener.wait_for("READY", timeout=2)
    assert fields == {"READY": "1", "STATUS": "listening on 127.0.0.1:9999"}
    assert pid == os.getpid()


def test_stopping_and_status_messages(listener: NotifyListener) -> None:
    """notify_stopping sends STOPPING=1; notify_status sends a STATUS line alone."""
    env = {"NOTIFY_SOCKET": listener.name}
    assert systemd.notify_status("catching up", env)
    assert systemd.notify_stopping("shutting down", env)
    assert listener.receive(2) == (os.getpid(), {"STATUS": "catching up"})
    assert listener.receive(2) == (os.getpid(), {"STOPPING": "1", "STATUS": "shutting down"})


def test_status_with_line_breaks_stays_one_field(listener: NotifyListener) -> None:
    """A status with newlines cannot inject a second field such as READY or MAINPID."""
    env = {"NOTIFY_SOCKET": listener.name}
    assert systemd.notify_status("sink down\nMAINPID=1\r\n", env)
    _pid, fields = listener.wait_for("STATUS", timeout=2)
    assert fields == {"STATUS": "sink down MAINPID=1"}


def test_wait_for_picks_the_named_process(listener: NotifyListener) -> None:
    """The listener tells messages apart by sender pid, as NotifyAccess=main does."""
    assert systemd.notify_ready("mine", {"NOTIFY_SOCKET": listener.name})
    with pytest.raises(AssertionError):
        listener.wait_for("READY", timeout=0.2, pid=os.getpid() + 1)
    assert listener.wait_for("READY", timeout=1, pid=os.getpid())[1]["STATUS"] == "mine"


def test_raw_notify_sends_the_state_verbatim(listener: NotifyListener) -> None:
    """notify() passes its state through unchanged (several KEY=VALUE lines)."""
    assert systemd.notify(
        "WATCHDOG=1\nEXTEND_TIMEOUT_USEC=5000000", {"NOTIFY_SOCKET": listener.name}
    )
    _pid, fields = listener.wait_for("WATCHDOG", timeout=2)
    assert fields == {"WATCHDOG": "1", "EXTEND_TIMEOUT_USEC": "5000000"}


def test_reads_the_process_environment_by_default(
    listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an explicit environ, $NOTIFY_SOCKET comes from os.environ."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    assert systemd.notify_ready("ok")
    assert listener.wait_for("READY", timeout=2)[1]["READY"] == "1"


def test_no_notify_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd every call returns False and logs nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    events: list[dict] = []
    monkeypatch.setattr(systemd, "log", Logger(observer=events.append))
    assert systemd.notify_ready("ready") is False
    assert systemd.notify_stopping() is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": ""}) is False
    assert events == []


@pytest.mark.parametrize("name", ["relative/notify", "@", "vsock:2:1234"])
def test_unusable_address_is_logged_not_raised(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An address that is neither absolute nor @abstract gives False and a warning."""
    events: list[dict] = []
    monkeypatch.setattr(systemd, "log", Logger(observer=events.append))
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": name}) is False
    assert [e["name"] for e in events] == [name]


def test_nobody_listening_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket path with no listener (systemd gone) gives False and a warning, no exception."""
    events: list[dict] = []
    monkeypatch.setattr(systemd, "log", Logger(observer=events.append))
    assert systemd.notify_ready("x", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert len(events) == 1 and "cannot notify systemd" in events[0]["log_format"]


def test_socket_address_forms() -> None:
    """Paths pass through; @name becomes a NUL-led abstract address; others are refused."""
    assert systemd.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.socket_address("@/org/systemd/x") == b"\0/org/systemd/x"
    assert systemd.socket_address("run/notify") is None
    assert systemd.socket_address("") is None
