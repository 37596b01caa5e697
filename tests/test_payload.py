"""Payload formats: the golden vectors of DESIGN.md and block-number recognition."""

from __future__ import annotations

import hashlib

import pytest

from eth_twisted.payload import (
    OutOfRange,
    recognise_block_number,
    render,
    render_html,
    render_json,
)

HTML_19M_SHA = "f6cba531821a919acf0192f162c2458baceb8a90d935e88a0c01ffafd94ea860"
JSON_GOLDEN_SHA = "68e6f0e30107893f5d6df88500800c4050d70e0aa074dd8ecb626ab028bb007a"
GOLDEN_BLOCK = {
    "block_hash": "0x" + "ab" * 32,
    "block_number": 19000000,
    "chain_id": 1,
    "parent_hash": "0x" + "cd" * 32,
    "timestamp": 1700000000,
}


def test_html_golden_vector() -> None:
    """Block 19000000 renders to the 194 bytes whose SHA-256 DESIGN.md pins."""
    page = render_html(19000000)
    assert len(page) == 194
    assert hashlib.sha256(page).hexdigest() == HTML_19M_SHA
    assert page.endswith(b"</html>\n")


def test_json_golden_vector() -> None:
    """The canonical JSON of the golden block is 226 bytes with the pinned SHA-256."""
    body = render_json(GOLDEN_BLOCK)
    assert len(body) == 226
    assert hashlib.sha256(body).hexdigest() == JSON_GOLDEN_SHA
    assert not body.endswith(b"\n")


def test_render_from_rpc_block() -> None:
    """An eth_getBlockByNumber result renders to the same bytes as the golden fields."""
    rpc_block = {
        "number": hex(19000000),
        "hash": "0x" + "AB" * 32,
        "parentHash": "0x" + "cd" * 32,
        "timestamp": hex(1700000000),
    }
    assert hashlib.sha256(render("json", rpc_block, 1)).hexdigest() == JSON_GOLDEN_SHA
    assert hashlib.sha256(render("html", rpc_block, 1)).hexdigest() == HTML_19M_SHA
    with pytest.raises(ValueError, match="unknown payload format"):
        render("xml", rpc_block, 1)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (render_html(0), 0),
        (render_html(19000000), 19000000),
        (render_html(2**63 - 1), 2**63 - 1),
        (render_json(GOLDEN_BLOCK), 19000000),
        (b'  {"block_number": 7, "x": "y"}', 7),
        (b'{"block_number": "7"}', None),
        (b'{"block_number": true}', None),
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"hello 12", None),
        (b"<html><title>Something else</title><body><p>5</p></body></html>", None),
        (b"<html><title>Ethereum block number</title><body><p>5</p><p>6</p></body></html>", None),
        (b"<html><title>ETHEREUM Block Number</title><body>\n<p> 42 </p></body></html>", 42),
        (b"\xff\xfe\x00binary", None),
        (b"", None),
    ],
)
def test_recognise(payload: bytes, expected: int | None) -> None:
    """Block numbers are recognised tolerantly in JSON and in the seed's HTML page, and only there."""
    assert recognise_block_number(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [render_html(2**63), b'{"block_number": -1}', b'{"block_number": 18446744073709551616}',
     render_html(10**40)],
)
def test_out_of_range(payload: bytes) -> None:
    """A recognised block number outside 0 <= n < 2**63 is refused, not stored as a lie."""
    with pytest.raises(OutOfRange):
        recognise_block_number(payload)
