"""TCP socket options for connections to nodes: TCP_NODELAY, and TCP_QUICKACK re-armed per read.

Used by the HTTP RPC connections (:mod:`eth_twisted.client.jsonrpc`) and the node
WebSocket (:mod:`eth_twisted.client.wsproto`). Why: docs/architecture.md (section 1,
"Node socket").
"""

from __future__ import annotations

import socket
from typing import Any

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
"""``socket.TCP_QUICKACK`` where the platform has it (Linux), else None."""


def tcp_socket(transport: Any) -> socket.socket | None:
    """The TCP socket under ``transport`` (through TLS and protocol wrappers), or None.

    Wrappers forward ``getHandle`` to the transport below them, and TLS answers it with
    its ``OpenSSL.SSL.Connection``; so the walk goes down ``.transport`` until a handle
    is a real socket.
    """
    for _ in range(8):
        if transport is None:
            return None
        get = getattr(transport, "getHandle", None)
        try:
            handle = get() if get is not None else None
        except Exception:  # noqa: BLE001 - a fake or closed transport has no handle
            handle = None
        if isinstance(handle, socket.socket):
            return handle if handle.type == socket.SOCK_STREAM else None
        transport = getattr(transport, "transport", None)
    return None


def quickack(sock: socket.socket | None) -> None:
    """Re-arm TCP_QUICKACK on ``sock`` (Linux; a no-op elsewhere or for None).

    The kernel leaves quick-ACK mode on its own, so it is re-armed at every read: the
    ACK of what was just read leaves at once, and a node that does not set TCP_NODELAY
    (anvil) sends the next small write without waiting ~40 ms for it (HEADS.md 6.7).
    """
    if sock is None or _QUICKACK is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
    except OSError:
        pass  # closed, or not TCP after all
