"""A netstring decoder whose cost is linear in the bytes received.

Twisted's ``NetstringReceiver`` re-slices its buffer once per frame, which is
quadratic in the size of one chunk full of tiny frames (RELIABILITY.md 1.4-7),
and its parse-error handler closes the connection at once, dropping the
replies owed for earlier frames. This decoder only parses: it hands back every
complete frame and, separately, the first framing error, so the protocol can
answer what it owes before it closes.

The grammar is D. J. Bernstein's: ``[len]":"[string]","`` where ``[len]`` is
a non-empty run of ASCII digits without leading zeros (``0`` alone is the
empty string).
"""

from __future__ import annotations

from eth_twisted.errors import FrameError

_DIGITS = frozenset(b"0123456789")
_COLON = ord(":")
_COMMA = ord(",")
_ZERO = ord("0")


class NetstringDecoder:
    """Incremental netstring parser with a maximum payload length.

    ``feed(data)`` returns the frames completed by ``data``; once a framing
    error is found it is kept in ``error`` and every later byte is ignored.
    """

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buf = bytearray()
        self.error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived and the rest has not."""
        return bool(self._buf) and self.error is None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the frames it completes, in order."""
        if self.error is not None:
            return []
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        pos = 0
        end = len(buf)
        try:
            while pos < end:
                colon = self._length_end(buf, pos, end)
                if colon < 0:
                    break
                length = int(buf[pos:colon])
                if length > self.max_length:
                    raise FrameError("too-long", f"declared length {length} > {self.max_length}")
                stop = colon + 1 + length
                if stop >= end:
                    break
                if buf[stop] != _COMMA:
                    raise FrameError("bad-frame", "payload not followed by ','")
                frames.append(bytes(buf[colon + 1 : stop]))
                pos = stop + 1
        except FrameError as e:
            self.error = e
            buf.clear()
            return frames
        del buf[:pos]
        return frames

    def _length_end(self, buf: bytearray, pos: int, end: int) -> int:
        """Index of the ':' ending the length at ``pos``, -1 if not yet known.

        Raises FrameError as soon as the bytes seen cannot start a valid frame.
        """
        limit = min(end, pos + self._max_digits + 1)
        i = pos
        while i < limit:
            byte = buf[i]
            if byte == _COLON:
                if i == pos:
                    raise FrameError("bad-frame", "empty length")
                return i
            if byte not in _DIGITS:
                raise FrameError("bad-frame", f"non-digit byte 0x{byte:02x} in length")
            if i > pos and buf[pos] == _ZERO:
                raise FrameError("bad-frame", "leading zero in length")
            i += 1
        digits = i - pos
        if digits > self._max_digits or (digits and int(buf[pos:i]) > self.max_length):
            raise FrameError("too-long", f"length over {self.max_length}")
        return -1


def encode(payload: bytes) -> bytes:
    """One netstring holding ``payload``."""
    return b"%d:%s," % (len(payload), payload)
