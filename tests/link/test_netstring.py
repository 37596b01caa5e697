"""The netstring decoder: the spec's grammar, its limits, and linear cost."""

from __future__ import annotations

import pytest

from eth_twisted.link.netstring import NetstringDecoder, encode

LIMIT = 64 * 1024

ILLEGAL = [
    # (input, frames delivered before the error, code)
    (b"007:abcdefg,", [], "bad-frame"),
    (b"00:,", [], "bad-frame"),
    (b"01:a,", [], "bad-frame"),
    (b"abc:def,", [], "bad-frame"),
    (b"-1:a,", [], "bad-frame"),
    (b"+1:a,", [], "bad-frame"),
    (b" 1:a,", [], "bad-frame"),
    (b"1 :a,", [], "bad-frame"),
    (b"0x10:a,", [], "bad-frame"),
    ("٣:abc,".encode(), [], "bad-frame"),
    (b":a,", [], "bad-frame"),
    (b"3:abcX", [], "bad-frame"),
    (b"2:aaa,", [], "bad-frame"),
    (b"1:a,\r\n1:b,", [b"a"], "bad-frame"),
    (b"1:a,\n", [b"a"], "bad-frame"),
    (b"1:a,2:bb,xyz", [b"a", b"bb"], "bad-frame"),
    (b"GET / HTTP/1.1\r\n\r\n", [], "bad-frame"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", [], "bad-frame"),
    (b"\x00\x00\x00", [], "bad-frame"),
    (b"65537:", [], "too-long"),
    (b"100000:", [], "too-long"),
    (b"1000000", [], "too-long"),
    (b"9" * 30, [], "too-long"),
    (b"9999999999:", [], "too-long"),
]


@pytest.mark.parametrize(("data", "frames", "code"), ILLEGAL)
def test_illegal_whole(data: bytes, frames: list[bytes], code: str) -> None:
    """Each illegal input, fed at once, yields the frames before it and then its error code."""
    d = NetstringDecoder(LIMIT)
    assert d.feed(data) == frames
    assert d.error is not None and d.error.code == code


@pytest.mark.parametrize(("data", "frames", "code"), ILLEGAL)
def test_illegal_byte_by_byte(data: bytes, frames: list[bytes], code: str) -> None:
    """The same inputs fed one byte at a time give the same frames and error."""
    d = NetstringDecoder(LIMIT)
    got: list[bytes] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
    assert got == frames
    assert d.error is not None and d.error.code == code


@pytest.mark.parametrize(
    ("data", "frames"),
    [
        (b"0:,", [b""]),
        (b"12:hello world!,", [b"hello world!"]),
        (b"4:1:a,,", [b"1:a,"]),
        (b"3:\x00,:,", [b"\x00,:"]),
        (b"1:a,1:b,0:,", [b"a", b"b", b""]),
    ],
)
def test_legal(data: bytes, frames: list[bytes]) -> None:
    """Valid netstrings, nested and binary ones included, come out unchanged, whole or bytewise."""
    assert NetstringDecoder(LIMIT).feed(data) == frames
    d = NetstringDecoder(LIMIT)
    got: list[bytes] = []
    for i in range(len(data)):
        got += d.feed(data[i : i + 1])
    assert got == frames
    assert d.error is None and not d.in_frame


def test_boundary_lengths() -> None:
    """A frame of exactly the limit is accepted; one byte more is refused before buffering."""
    d = NetstringDecoder(LIMIT)
    assert d.feed(encode(b"x" * LIMIT)) == [b"x" * LIMIT]
    d = NetstringDecoder(LIMIT)
    assert d.feed(b"%d:" % (LIMIT + 1)) == []
    assert d.error is not None and d.error.code == "too-long"
    assert d.buffered == 0


@pytest.mark.parametrize("data", [b"3:abc", b"12", b"5:ab", b"1"])
def test_incomplete_waits(data: bytes) -> None:
    """An incomplete frame is neither delivered nor an error; it is reported as in progress."""
    d = NetstringDecoder(LIMIT)
    assert d.feed(data) == []
    assert d.error is None and d.in_frame and d.buffered == len(data)


def test_errors_are_final() -> None:
    """After a framing error every later byte is ignored."""
    d = NetstringDecoder(LIMIT)
    d.feed(b"x")
    assert d.feed(b"1:a,") == []


def test_many_tiny_frames_in_one_chunk() -> None:
    """A 64 KiB chunk of empty frames is parsed in full, in one pass."""
    d = NetstringDecoder(LIMIT)
    chunk = b"0:," * 21845
    assert len(d.feed(chunk)) == 21845
    assert d.buffered == 0


def test_max_length_must_be_positive() -> None:
    """A zero limit is a configuration error, not a math domain error later."""
    with pytest.raises(ValueError):
        NetstringDecoder(0)
