"""systemd readiness notification (the sd_notify protocol), with no dependency.

The taps call :func:`notify_ready` once their listeners are up and their sinks answered,
and :func:`notify_stopping` when they begin to shut down; :func:`notify` says what is sent
where. Outside systemd every function is a no-op that returns False, and nothing here
raises. docs/architecture.md (section 2) says when each service notifies.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger()

#: How long one send may block when systemd's queue is full (it never is in
#: practice: systemd gives the socket a large receive buffer).
SEND_TIMEOUT = 2.0


def socket_address(name: str) -> str | bytes | None:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value, or None if unusable."""
    if name.startswith("@") and len(name) > 1:
        # Abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + name[1:].encode("utf-8", "surrogateescape")
    if name.startswith("/"):
        return name
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``.

    A service started with ``Type=notify`` tells systemd it is ready by sending one
    datagram, ``READY=1``, to the ``AF_UNIX`` socket named in ``$NOTIFY_SOCKET``
    (systemd.io/NOTIFY, ``sd_notify(3)``). The name is a filesystem path, or an
    abstract-namespace name written with a leading ``@`` (:func:`socket_address`). The
    ``vsock:`` addresses systemd 254+ hands to virtual machines are not supported: they
    are logged and ignored.

    Returns True when the datagram was sent, False when there is no socket to
    send to (not under systemd, or an address this module cannot use) or the
    send failed; failures are logged, never raised, because a lost readiness
    message must never take the service down (systemd times the start out on its own).
    """
    environ = os.environ if environ is None else environ
    name = environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    address = socket_address(name)
    if address is None:
        log.warn(
            "NOTIFY_SOCKET={name!r} is neither an absolute path nor an @abstract name;"
            " not notifying systemd",
            name=name,
        )
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as e:
        log.warn("cannot notify systemd at {name!r}: {error}", name=name, error=e)
        return False
    return True


def _one_line(text: str) -> str:
    """``text`` with line breaks folded, so it stays one ``KEY=VALUE`` field."""
    return " ".join(text.split())


def notify_ready(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the service is ready (``READY=1``), with a human ``STATUS=`` line.

    Call it once, after the listeners are bound and the sinks answered.
    """
    state = "READY=1"
    if status:
        state += "\nSTATUS=" + _one_line(status)
    sent = notify(state, environ)
    if sent:
        log.info("told systemd we are ready: {status}", status=_one_line(status))
    return sent


def notify_status(status: str, environ: Mapping[str, str] | None = None) -> bool:
    """Update the one-line ``STATUS=`` that ``systemctl status`` shows (a running service's state)."""
    return notify("STATUS=" + _one_line(status), environ)


def notify_stopping(status: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the service is shutting down (``STOPPING=1``)."""
    state = "STOPPING=1"
    if status:
        state += "\nSTATUS=" + _one_line(status)
    return notify(state, environ)
