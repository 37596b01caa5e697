"""A minimal blocking Redis (RESP2) client for the benchmarks: pipelines and key cleanup.

Only what the bench needs: send many commands in one write, read their replies,
delete a key prefix. No dependency beyond the standard library.
"""

from __future__ import annotations

import socket
from typing import Any


def encode(*parts: Any) -> bytes:
    """One command in RESP array form."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Resp:
    """One connection to Redis."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.file = self.sock.makefile("rb", buffering=1 << 20)

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write already-encoded commands."""
        self.sock.sendall(data)

    def read(self) -> Any:
        """Read one reply (errors come back as RuntimeError instances, not raised)."""
        line = self.file.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"bad RESP reply {line!r}")

    def call(self, *parts: Any) -> Any:
        """One command, one reply (an error reply is raised)."""
        self.send(encode(*parts))
        reply = self.read()
        if isinstance(reply, RuntimeError):
            raise reply
        return reply

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (SCAN, then DEL); return how many."""
        cursor, gone = b"0", 0
        while True:
            cursor, keys = self.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                gone += self.call("DEL", *keys)
            if cursor in (b"0", "0"):
                return gone
