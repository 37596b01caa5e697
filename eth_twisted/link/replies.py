"""The replies of wire protocol version 1: their codes, how the server writes and the client reads them.

For every frame, in order, the server answers ``OK <sha256>``, ``DUP <sha256>``
or ``ERR <sha256> <code>``; ``ERR - <code>`` ends a connection whose framing
broke (docs/protocol.md). Both ends use this one vocabulary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RETRYABLE_CODES = frozenset({"unavailable", "timeout", "busy"})
"""Not stored; the client keeps the message and resends it after a backoff."""
FINAL_CODES = frozenset({"empty", "too-long", "rejected", "auth"})
"""Never stored; the client moves the message to its dead letters."""
FRAME_CODES = frozenset({"bad-frame", "too-long", "truncated"})
"""The connection's framing broke (``ERR - <code>``); the connection closes after it."""
KNOWN_CODES = RETRYABLE_CODES | FINAL_CODES | FRAME_CODES
_SHA = re.compile(r"[0-9a-f]{64}\Z")
_CODE = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")


class ReplyError(ValueError):
    """A reply that is not one of the forms of wire protocol version 1."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One parsed reply: ``kind`` is OK, DUP or ERR; ``sha`` is ``-`` for connection errors."""

    kind: str
    sha: str
    code: str | None = None


def parse_reply(raw: bytes) -> Reply:
    """Parse one reply netstring's content, or raise :class:`ReplyError`."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ReplyError("reply is not ASCII")
    parts = text.split(" ")
    if len(parts) == 2 and parts[0] in ("OK", "DUP") and _SHA.match(parts[1]):
        return Reply(parts[0], parts[1])
    if len(parts) == 3 and parts[0] == "ERR" and _CODE.match(parts[2]):
        if parts[1] == "-" or _SHA.match(parts[1]):
            return Reply("ERR", parts[1], parts[2])
    raise ReplyError(f"unknown reply {text[:80]!r}")


def reply_text(sha: str, code: str) -> bytes:
    """The content of the reply netstring for message ``sha``: ``code`` is OK, DUP or an ERR code."""
    if code == "OK" or code == "DUP":
        return f"{code} {sha}".encode("ascii")
    return f"ERR {sha} {code}".encode("ascii")
