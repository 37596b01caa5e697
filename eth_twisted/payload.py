"""Payload formats: rendering a block as bytes, and recognising a block number.

The bytes are fixed by DESIGN.md ("Payloads") and pinned by golden vectors in
the tests: changing one byte changes every message id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

FORMATS = ("html", "json")

MAX_BLOCK_NUMBER = 2**63 - 1

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

_TITLE = re.compile(rb"<title>[^<]*ethereum[^<]*block number[^<]*</title>", re.IGNORECASE)
_BODY = re.compile(rb"<body[^>]*>(.*?)</body>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(rb"<[^>]*>")
_INTEGER = re.compile(rb"(?<![\w.])[0-9]+(?![\w.])")


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
            if len(digits) > 25:
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
    if head == b"<" and _TITLE.search(payload):
        body = _BODY.search(payload)
        if body is None:
            return None
        text = _TAG.sub(b" ", body.group(1))
        numbers = _INTEGER.findall(text)
        if len(numbers) == 1:
            if len(numbers[0]) > 25:
                raise OutOfRange("block number has too many digits")
            return _checked(int(numbers[0]))
    return None
