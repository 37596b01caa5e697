"""A listener on a NOTIFY_SOCKET datagram socket, as systemd is, for the sd_notify tests."""

from __future__ import annotations

import secrets
import socket
import struct
import time
from pathlib import Path


class NotifyListener:
    """A datagram socket that collects sd_notify messages, like systemd's manager.

    ``name`` is what goes into ``$NOTIFY_SOCKET``.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is None:
            abstract = "eth-test-notify-" + secrets.token_hex(6)
            self.sock.bind(b"\0" + abstract.encode())
            self.name = "@" + abstract
        else:
            self.sock.bind(str(path))
            self.name = str(path)
        self.messages: list[tuple[int, dict[str, str]]] = []

    def receive(self, timeout: float) -> tuple[int, dict[str, str]] | None:
        """The next message as (sender pid, fields), or None at the deadline."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append((pid, fields))
        return pid, fields

    def wait_for(
        self, key: str, timeout: float = 10.0, pid: int | None = None
    ) -> tuple[int, dict[str, str]]:
        """The first message with ``key`` (from process ``pid``, when given).

        It may have been received already or arrive before the deadline.
        """

        def wanted(message: tuple[int, dict[str, str]] | None) -> bool:
            return message is not None and key in message[1] and pid in (None, message[0])

        for message in self.messages:
            if wanted(message):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and wanted(message):
                return message
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages!r}")

    def close(self) -> None:
        """Stop listening."""
        self.sock.close()
