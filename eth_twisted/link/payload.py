"""Payload formats: rendering a block as bytes, and recognising a block number.

The bytes are fixed by docs/protocol.md ("Payloads and message kinds") and pinned by golden vectors in
the tests: changing one byte changes every message id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from eth_twisted.model import (
    MAX_BLOCK_NUMBER,
    MAX_REORG_HASHES,
    ChainBlock,
    ChainEvent,
    FinalityEvent,
    ReorgEvent,
)

FORMATS = ("html", "json")


_HTML_TEMPLATE = (
    "<!doctype html>\n"
    '<html lang="en">\n'
    "<head>\n"
    '<meta charset="utf-8">\n'
    "<title>Ethereum Current Block Number</title>\n"
    "</head>\n"
    "<body>\n"
    "<h2>Current Ethereum Block Number</h2>\n"
    "<p>{number}</p>\n"
    "</body>\n"
    "</html>\n"
)

HTML_SCAN_LIMIT = 256 * 1024
"""Bytes of an HTML payload the recogniser looks at: past them it recognises nothing.

Every step below is a ``find`` or a ``lower`` over at most this many bytes, so
the work per payload is linear and bounded whatever the bytes are (the
regular expressions this replaced backtracked on a 64 KiB frame of ``<title>``
and repeated words: docs/hostile-input.md, item 1, and bench/README.md).
"""

_DIGIT_RUN = re.compile(rb"[0-9]+")
"""Maximal runs of ASCII digits (no lookaround, no nesting: one pass)."""
_WORD_OR_DOT = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")
MAX_DIGITS = 25
"""A block number written with more digits than this is out of range without parsing it."""


class OutOfRange(ValueError):
    """A payload names a block number outside 0 <= n < 2**63."""


def render_html(number: int) -> bytes:
    """The seed's page for block ``number``, byte for byte."""
    return _HTML_TEMPLATE.format(number=number).encode("ascii")


def render_json(block: Mapping[str, Any]) -> bytes:
    """Canonical JSON of ``block`` (sorted keys, no spaces, ASCII, no newline)."""
    return json.dumps(block, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode(
        "ascii"
    )


def block_fields(block: Mapping[str, Any], chain_id: int) -> dict[str, Any]:
    """The ``json`` payload's fields from an ``eth_getBlockByNumber`` result."""
    return {
        "block_hash": block["hash"].lower(),
        "block_number": int(block["number"], 16),
        "chain_id": chain_id,
        "parent_hash": block["parentHash"].lower(),
        "timestamp": int(block["timestamp"], 16),
    }


def render(fmt: str, block: Mapping[str, Any], chain_id: int) -> bytes:
    """Render an RPC block object in format ``fmt`` (``html`` or ``json``)."""
    if fmt == "html":
        return render_html(int(block["number"], 16))
    if fmt == "json":
        return render_json(block_fields(block, chain_id))
    raise ValueError(f"unknown payload format {fmt!r}; expected one of {', '.join(FORMATS)}")


KINDS = ("block", "reorg", "finalized")
"""The JSON message kinds (docs/protocol.md, "Message kinds"); a block has no ``kind`` key."""


def render_reorg(
    chain_id: int,
    fork_number: int,
    old_hashes: Sequence[str],
    new_hashes: Sequence[str],
    detected_at: int,
) -> bytes:
    """A reorg record: the blocks after ``fork_number`` that stopped (old) and became canonical.

    Both hash lists run from ``fork_number + 1`` upward; ``depth`` is the number of
    blocks that stopped being canonical (``new_hashes`` may be shorter: a chain that went
    back without a replacement, or longer: the new branch outgrew the old one).
    ``detected_at`` is whole unix seconds, so a resent record is the same bytes.
    """
    return render_json(
        {
            "kind": "reorg",
            "chain_id": chain_id,
            "fork_number": fork_number,
            "depth": len(old_hashes),
            "old_hashes": [h.lower() for h in old_hashes],
            "new_hashes": [h.lower() for h in new_hashes],
            "detected_at": int(detected_at),
        }
    )


def render_finalized(
    chain_id: int,
    block_number: int,
    block_hash: str,
    safe_number: int | None,
    safe_hash: str | None,
) -> bytes:
    """A finality record: the finalized (and, when known, the safe) block of ``chain_id``."""
    return render_json(
        {
            "kind": "finalized",
            "chain_id": chain_id,
            "block_number": block_number,
            "block_hash": block_hash.lower(),
            "safe_number": safe_number,
            "safe_hash": safe_hash.lower() if safe_hash is not None else None,
        }
    )


def _checked(number: int) -> int:
    if not 0 <= number <= MAX_BLOCK_NUMBER:
        raise OutOfRange(f"block number {number} outside 0..2**63-1")
    return number


_SEED_HEAD, _SEED_TAIL = (part.encode("ascii") for part in _HTML_TEMPLATE.split("{number}"))


def recognise_block_number(payload: bytes) -> int | None:
    """The block number a payload carries, or None when it carries none.

    Tolerant: JSON objects with an integer ``block_number``, or HTML whose
    title names the Ethereum block number and whose body holds exactly one
    integer. Raises :class:`OutOfRange` for a recognised number outside
    0 <= n < 2**63, so the server can refuse it instead of storing a lie.
    """
    if payload.startswith(_SEED_HEAD) and payload.endswith(_SEED_TAIL):
        # The seed's page byte for byte (the common case): no regular expressions.
        digits = payload[len(_SEED_HEAD) : len(payload) - len(_SEED_TAIL)]
        if digits.isdigit() and digits.isascii():
            if len(digits) > MAX_DIGITS:
                raise OutOfRange("block number has too many digits")
            return _checked(int(digits))
    head = payload.lstrip()[:1]
    if head == b"{":
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if isinstance(obj, dict):
            value = obj.get("block_number")
            if isinstance(value, int) and not isinstance(value, bool):
                return _checked(value)
        return None
    if head == b"<":
        return _recognise_html(payload)
    return None


def recognise(payload: bytes) -> tuple[int | None, ChainEvent | None]:
    """The block number and the chain metadata of a payload (docs/protocol.md, "Message kinds").

    One parse per payload. A JSON object without a ``kind`` key is a block: its
    number as :func:`recognise_block_number` reads it, and a :class:`ChainBlock`
    when ``chain_id``, ``block_hash`` and ``parent_hash`` are valid. An object with
    a ``kind`` never carries a block number: it is a :class:`ReorgEvent` or a
    :class:`FinalityEvent` when every field is valid, else nothing (the record
    stores it as kind ``other``). Raises :class:`OutOfRange` as
    :func:`recognise_block_number` does, for blocks only.
    """
    if payload[:1] != b"{" and payload.lstrip()[:1] != b"{":
        return recognise_block_number(payload), None
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    if "kind" in obj:
        return None, _chain_record(obj)
    value = obj.get("block_number")
    if not isinstance(value, int) or isinstance(value, bool):
        return None, None
    number = _checked(value)
    chain_id = _number(obj.get("chain_id"))
    block_hash, parent = _hash(obj.get("block_hash")), _hash(obj.get("parent_hash"))
    if chain_id is not None and block_hash is not None and parent is not None:
        return number, ChainBlock(chain_id, block_hash, parent)
    return number, None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_BLOCK_NUMBER


def _number(value: Any) -> int | None:
    """``value`` when it is an integer (not a boolean) in 0..2**63-1, else None."""
    return value if _in_range(value) else None


_HEX = frozenset("0123456789abcdefABCDEF")


def _hash(value: Any) -> str | None:
    """A 32-byte hash as ``0x`` and 64 hex digits, lowercased; None when ``value`` is not one."""
    if isinstance(value, str) and len(value) == 66 and value[:2] in ("0x", "0X"):
        if _HEX.issuperset(value[2:]):
            return "0x" + value[2:].lower()
    return None


def _hashes(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    out: list[str] = []
    for item in value:
        checked = _hash(item)
        if checked is None:
            return None
        out.append(checked)
    return out


def _chain_record(obj: dict[str, Any]) -> ChainEvent | None:
    """A reorg or finality record when every field of its kind is valid, else None."""
    kind, chain_id = obj.get("kind"), _number(obj.get("chain_id"))
    if chain_id is None:
        return None
    if kind == "reorg":
        fork, detected = _number(obj.get("fork_number")), _number(obj.get("detected_at"))
        old, new = _hashes(obj.get("old_hashes")), _hashes(obj.get("new_hashes"))
        if old is None or new is None or fork is None or detected is None:
            return None
        if obj.get("depth") != len(old) or fork + max(len(old), len(new)) > MAX_BLOCK_NUMBER:
            return None
        dropped = max(0, len(old) - MAX_REORG_HASHES) + max(0, len(new) - MAX_REORG_HASHES)
        return ReorgEvent(
            chain_id,
            fork,
            len(old),
            tuple(old[:MAX_REORG_HASHES]),
            tuple(new[:MAX_REORG_HASHES]),
            detected,
            dropped,
        )
    if kind == "finalized":
        number, block_hash = _number(obj.get("block_number")), _hash(obj.get("block_hash"))
        safe_raw, safe_hash_raw = obj.get("safe_number"), obj.get("safe_hash")
        if number is None or block_hash is None:
            return None
        if safe_raw is None and safe_hash_raw is None:
            return FinalityEvent(chain_id, number, block_hash, None, None)
        safe_number, safe_hash = _number(safe_raw), _hash(safe_hash_raw)
        if safe_number is None or safe_hash is None:
            return None
        return FinalityEvent(chain_id, number, block_hash, safe_number, safe_hash)
    return None


def _recognise_html(payload: bytes) -> int | None:
    """The block number of an HTML page whose title names it, in linear, bounded time.

    The rules the earlier regular expressions stated, each now a ``find``:
    a ``<title>`` is followed by text without ``<`` that contains "ethereum"
    and, after it, "block number", then ``</title>``; the text
    between the first ``<body...>`` and the first ``</body>`` after it, with
    every ``<...>`` tag taken out, holds exactly one integer (a run of digits
    with neither a word character nor a dot on either side).
    """
    low = payload[:HTML_SCAN_LIMIT].lower()
    if not _names_the_block_number(low):
        return None
    body = low.find(b"<body")
    if body < 0:
        return None
    opened = low.find(b">", body + len(b"<body"))
    if opened < 0:
        return None
    closed = low.find(b"</body>", opened + 1)
    if closed < 0:
        return None
    number = _single_integer(_without_tags(low, opened + 1, closed))
    if number is None:
        return None
    if len(number) > MAX_DIGITS:
        raise OutOfRange("block number has too many digits")
    return _checked(int(number))


def _names_the_block_number(low: bytes) -> bool:
    """Whether some ``<title>`` of ``low`` (lowercased HTML) says "ethereum ... block number".

    Each candidate title runs from its ``<title>`` to the next ``<``, which must
    open ``</title>``; the next candidate starts at or after that ``<``, so the
    candidates never overlap and the whole search is one pass.
    """
    pos = 0
    while True:
        start = low.find(b"<title>", pos)
        if start < 0:
            return False
        start += len(b"<title>")
        end = low.find(b"<", start)
        if end < 0:
            return False
        if low.startswith(b"</title>", end):
            named = low.find(b"ethereum", start, end)
            if named >= 0 and low.find(b"block number", named + len(b"ethereum"), end) >= 0:
                return True
        pos = end


def _without_tags(text: bytes, start: int, end: int) -> bytes:
    """``text[start:end]`` with each ``<...>`` replaced by a space (an unclosed ``<`` stays)."""
    parts: list[bytes] = []
    pos = start
    while pos < end:
        tag = text.find(b"<", pos, end)
        if tag < 0:
            break
        close = text.find(b">", tag + 1, end)
        if close < 0:
            break  # no '>' before the end: no more tags, the rest is text
        parts.append(text[pos:tag])
        parts.append(b" ")
        pos = close + 1
    parts.append(text[pos:end])
    return b"".join(parts)


def _single_integer(text: bytes) -> bytes | None:
    """The only free-standing integer in ``text``, or None when there are none or several."""
    found: bytes | None = None
    for match in _DIGIT_RUN.finditer(text):
        begin, stop = match.span()
        if begin > 0 and text[begin - 1] in _WORD_OR_DOT:
            continue
        if stop < len(text) and text[stop] in _WORD_OR_DOT:
            continue
        if found is not None:
            return None  # a second integer: ambiguous, stop looking
        found = match.group()
    return found
