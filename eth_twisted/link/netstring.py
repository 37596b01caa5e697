"""A netstring decoder whose cost is linear in the bytes received, and the encoder.

:class:`NetstringDecoder` parses what the server reads (why not Twisted's
``NetstringReceiver`` is in its docstring); :func:`encode` frames one payload. The grammar
and what is refused with which code are in docs/protocol.md (section 1, "Framing").
"""

from __future__ import annotations

from eth_twisted.errors import FrameError

_DIGITS = frozenset(b"0123456789")
_COLON = ord(":")
_COMMA = ord(",")
_ZERO = ord("0")


class NetstringDecoder:
    """Incremental netstring parser with a maximum payload length.

    Twisted's ``NetstringReceiver`` re-slices its buffer once per frame, which is
    quadratic in the size of one chunk full of tiny frames, and its parse-error handler
    closes the connection at once, dropping the replies owed for earlier frames. This
    decoder only parses: it hands back every complete frame and, separately, the first
    framing error, so the protocol can answer what it owes before it closes. The grammar
    is D. J. Bernstein's: ``[len]":"[string]","`` where ``[len]`` is a non-empty run of
    ASCII digits without leading zeros (``0`` alone is the empty string).

    ``add(data)`` keeps bytes; ``next()`` parses and returns one complete
    frame at a time, so a reader can stop between frames (its window is full,
    its peer stopped reading) and leave the rest here, unparsed and counted in
    :attr:`buffered`. ``feed(data)`` does both and returns every frame. Once a
    framing error is found it is kept in ``error`` and every later byte is
    ignored. Parsing is linear in the bytes added: each byte is examined once,
    and consumed frames are dropped from the buffer lazily (at the next
    ``add``), never by re-slicing per frame.
    """

    def __init__(self, max_length: int) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.max_length = max_length
        self._max_digits = len(str(max_length))
        self._buf = bytearray()
        self._pos = 0  # bytes of _buf already handed out as frames
        self.error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held and not yet returned as frames: an incomplete frame, or frames not yet taken."""
        return len(self._buf) - self._pos

    @property
    def in_frame(self) -> bool:
        """True while bytes are held that have not been returned as frames (and no error was found)."""
        return self.buffered > 0 and self.error is None

    def add(self, data: bytes) -> None:
        """Keep ``data`` for :meth:`next`."""
        if self.error is not None:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> bytes | None:
        """The next complete frame, or None when the bytes held do not complete one.

        After None, check :attr:`error`: a framing error also ends the frames.
        """
        if self.error is not None:
            return None
        buf = self._buf
        pos = self._pos
        end = len(buf)
        if pos >= end:
            return None
        try:
            colon = self._length_end(buf, pos, end)
            if colon < 0:
                return None
            length = int(buf[pos:colon])
            if length > self.max_length:
                raise FrameError("too-long", f"declared length {length} > {self.max_length}")
            stop = colon + 1 + length
            if stop >= end:
                return None
            if buf[stop] != _COMMA:
                raise FrameError("bad-frame", "payload not followed by ','")
        except FrameError as e:
            self.error = e
            buf.clear()
            self._pos = 0
            return None
        frame = bytes(buf[colon + 1 : stop])
        if stop + 1 == end:
            buf.clear()
            self._pos = 0
        else:
            self._pos = stop + 1
        return frame

    def take(self, most: int) -> list[bytes]:
        """Up to ``most`` complete frames, in order (:meth:`next` in one call, for a reader that batches).

        Fewer (or none) when the bytes held run out first or a framing error
        is found (then check :attr:`error`).
        """
        frames: list[bytes] = []
        if self.error is not None or most <= 0:
            return frames
        buf = self._buf
        pos = self._pos
        end = len(buf)
        try:
            while pos < end and len(frames) < most:
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
            self._pos = 0
            return frames
        if pos == end:
            buf.clear()
            self._pos = 0
        else:
            self._pos = pos
        return frames

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame the bytes held now complete, in order."""
        self.add(data)
        return self.take(1 << 62)

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
