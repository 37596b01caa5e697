"""Payload formats: the golden vectors of docs/protocol.md and block-number recognition."""

from __future__ import annotations

import hashlib
import time

import pytest

from eth_twisted.link.payload import (
    HTML_SCAN_LIMIT,
    OutOfRange,
    recognise,
    recognise_block_number,
    render,
    render_finalized,
    render_html,
    render_json,
    render_reorg,
)
from eth_twisted.model import MAX_REORG_HASHES, ChainBlock, FinalityEvent, ReorgEvent

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
    """Block 19000000 renders to the 194 bytes whose SHA-256 docs/protocol.md pins."""
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
    [
        render_html(2**63),
        b'{"block_number": -1}',
        b'{"block_number": 18446744073709551616}',
        render_html(10**40),
    ],
)
def test_out_of_range(payload: bytes) -> None:
    """A recognised block number outside 0 <= n < 2**63 is refused, not stored as a lie."""
    with pytest.raises(OutOfRange):
        recognise_block_number(payload)


# -- bounded, linear recognition (issue 13, item 1) -----------------------------------

MAX_FRAME = 64 * 1024
"""The server's default --max-length: the largest payload the recogniser ever sees."""

_TITLED = b"<title>Ethereum block number</title>"


def _adversarial(size: int) -> dict[str, bytes]:
    """Inputs of ``size`` bytes that made regular expressions (or naive scans) backtrack."""

    def fill(head: bytes, unit: bytes, tail: bytes = b"") -> bytes:
        count = max(1, (size - len(head) - len(tail)) // len(unit))
        return head + unit * count + tail

    return {
        "title never closed": fill(b"<title>", b"ethereum block number "),
        "titles never closed": fill(b"", b"<title>ethereum "),
        "title words, no block number": fill(b"<title>", b"ethereum "),
        "body full of '<'": fill(_TITLED + b"<body>", b"<"),
        "body tags never closed": fill(_TITLED + b"<body>", b"<a "),
        "body opened, never '>'": fill(_TITLED, b"<body "),
        "body never closed": fill(_TITLED + b"<body>", b"x 1 "),
        "many tags, many integers": fill(_TITLED + b"<body>", b"<b>1</b>.", b"</body>"),
        "digits and dots": fill(_TITLED + b"<body>", b"1.", b"</body>"),
        "one huge integer": fill(_TITLED + b"<body>", b"9", b"</body>"),
        "json nesting": fill(b'{"block_number":', b"["),
    }


def _fastest(payload: bytes, repeat: int) -> float:
    """The fastest of ``repeat`` timings of recognising ``payload`` (noise only adds time)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            recognise_block_number(payload)
        except OutOfRange:
            pass
        best = min(best, time.perf_counter() - started)
    return best


def test_recogniser_is_linear_on_adversarial_inputs_of_the_maximum_frame_size() -> None:
    """Each adversarial family at 64 KiB costs at most 4x its linear extrapolation from 4 KiB.

    The budget is measured in the same test: the cost of the same family at
    a sixteenth of the size, scaled linearly (x16) and given a 4x margin. A
    quadratic recogniser needs 16x that budget and a cubic one 256x (the
    regular expressions this replaced took minutes on the first input).
    """
    small, large = _adversarial(MAX_FRAME // 16), _adversarial(MAX_FRAME)
    over_budget = {}
    for name, payload in large.items():
        assert len(payload) <= MAX_FRAME
        budget = 4 * 16 * _fastest(small[name], 30)
        spent = _fastest(payload, 5)
        if spent > budget:
            over_budget[name] = f"{spent * 1e6:.0f} us > budget {budget * 1e6:.0f} us"
    assert over_budget == {}


def test_recogniser_looks_at_a_bounded_prefix() -> None:
    """Past HTML_SCAN_LIMIT bytes nothing is recognised, so the work per payload is bounded."""
    page = _TITLED + b"<body>" + b" " * HTML_SCAN_LIMIT + b"<p>7</p></body>"
    assert recognise_block_number(page) is None
    assert recognise_block_number(_TITLED + b"<body><p>7</p></body>") == 7


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"<title>x</title><title>Ethereum Block Number</title><body>5</body>", 5),
        (b"<TITLE>ETHEREUM Current BLOCK NUMBER</TITLE><BODY class=x><P>12</P></BODY>", 12),
        (b"<title>block number ethereum</title><body>5</body>", None),
        (b"<title>Ethereum block number<b></title><body>5</body>", None),
        (b"<title>Ethereum block number</title><body><p>1</p><p>2</p></body>", None),
        (b"<title>Ethereum block number</title><body>v1.2 <i>7</i></body>", 7),
        (b"<title>Ethereum block number</title><body>a7 7b 7</body>", 7),
        (b"<title>Ethereum block number</title><body>3 < 4</body>", None),
        (b"<title>Ethereum block number</title><body><!-- 9 -->8</body>", 8),
        (b"<title>Ethereum block number</title><body>8", None),
    ],
)
def test_html_rules_without_regular_expressions(payload: bytes, expected: int | None) -> None:
    """Title and body rules as docs/protocol.md states them: case-insensitive, tags ignored, one integer."""
    assert recognise_block_number(payload) == expected


H1, H2, H3 = ("0x" + c * 64 for c in "123")


def test_recognise_a_json_block_with_its_links() -> None:
    """The golden block is block 19000000 of chain 1 with its hash and parent."""
    assert recognise(render_json(GOLDEN_BLOCK)) == (
        19000000,
        ChainBlock(1, "0x" + "ab" * 32, "0x" + "cd" * 32),
    )
    upper = dict(GOLDEN_BLOCK, block_hash="0x" + "AB" * 32)
    assert recognise(render_json(upper))[1] == ChainBlock(1, "0x" + "ab" * 32, "0x" + "cd" * 32)
    bad_links = dict(GOLDEN_BLOCK, parent_hash="0x1234")
    assert recognise(render_json(bad_links)) == (19000000, None)  # a block, chain unknown
    assert recognise(render_html(7)) == (7, None)


def test_rendered_reorg_and_finality_records_are_recognised() -> None:
    """render_reorg and render_finalized give records the recogniser reads back field for field."""
    number, event = recognise(render_reorg(5, 99, [H1, H2], [H3], 1_700_000_000))
    assert number is None
    assert event == ReorgEvent(5, 99, 2, (H1, H2), (H3,), 1_700_000_000, 0)
    assert recognise(render_finalized(5, 98, H1, 100, H2)) == (
        None,
        FinalityEvent(5, 98, H1, 100, H2),
    )
    assert recognise(render_finalized(5, 98, H1, None, None)) == (
        None,
        FinalityEvent(5, 98, H1, None, None),
    )
    assert recognise(render_reorg(5, 99, [H1], [], 1))[1] == ReorgEvent(5, 99, 1, (H1,), (), 1, 0)


def test_reorg_hash_lists_are_capped() -> None:
    """Past MAX_REORG_HASHES a list is cut and the rest counted as dropped (bounded work)."""
    many = ["0x" + f"{i:064x}" for i in range(MAX_REORG_HASHES + 5)]
    _, event = recognise(render_reorg(1, 10, many, many[:3], 1))
    assert isinstance(event, ReorgEvent)
    assert len(event.old_hashes) == MAX_REORG_HASHES and event.dropped == 5
    assert event.depth == MAX_REORG_HASHES + 5


@pytest.mark.parametrize(
    "payload",
    [
        b'{"kind":"launch","chain_id":1}',
        b'{"kind":"reorg","chain_id":1,"fork_number":1,"depth":2,"old_hashes":[],'
        b'"new_hashes":[],"detected_at":1}',
        b'{"kind":"reorg","chain_id":true,"fork_number":1,"depth":0,"old_hashes":[],'
        b'"new_hashes":[],"detected_at":1}',
        b'{"kind":"reorg","chain_id":1,"fork_number":1,"depth":0,"old_hashes":{},'
        b'"new_hashes":[],"detected_at":1}',
        b'{"kind":"finalized","chain_id":1,"block_number":-1,"block_hash":"' + H1.encode() + b'"}',
        b'{"kind":"finalized","chain_id":1,"block_number":1,"block_hash":"' + H1.encode() + b'",'
        b'"safe_number":2,"safe_hash":null}',
        b'{"kind":"finalized","chain_id":1,"block_number":1e3,"block_hash":"' + H1.encode() + b'"}',
        b'{"kind":"finalized","chain_id":1,"block_number":' + str(2**64).encode() + b","
        b'"block_hash":"' + H1.encode() + b'"}',
        b'{"kind":null}',
    ],
)
def test_invalid_kinds_are_nothing(payload: bytes) -> None:
    """A record with a kind but a bad field is neither a chain event nor a block (kind other)."""
    assert recognise(payload) == (None, None)
