"""A zero-copy msgpack reader for incoming frames.

`msgpack.unpackb` copies every bin into a new `bytes`; for a 2.4 MB activation that copy is
most of the decode time. `read_frame` walks the frame itself and returns each bin as a
`memoryview` slice of the frame, so tensors become `np.frombuffer` views with no copy.

It reads all of msgpack except ext types (this protocol never sends them). Map keys must be
strings and unique. Counts are checked against the bytes left before anything is allocated,
and nesting is capped, so a hostile frame cannot make it allocate or recurse without bound.
"""

from __future__ import annotations

import struct

from .codes import bad

MAX_DEPTH = 8  # top map > tensor dict > tensor map > shape list needs 4

_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_S = struct.Struct
_NUMBERS = {
    0xCA: _S(">f"), 0xCB: _S(">d"),
    0xCC: _S(">B"), 0xCD: _S(">H"), 0xCE: _S(">I"), 0xCF: _S(">Q"),
    0xD0: _S(">b"), 0xD1: _S(">h"), 0xD2: _S(">i"), 0xD3: _S(">q"),
}
_BIN = {0xC4: _S(">B"), 0xC5: _S(">H"), 0xC6: _S(">I")}
_STR = {0xD9: _S(">B"), 0xDA: _S(">H"), 0xDB: _S(">I")}
_ARRAY = {0xDC: _S(">H"), 0xDD: _S(">I")}
_MAP = {0xDE: _S(">H"), 0xDF: _S(">I")}


def read_frame(frame: memoryview) -> object:
    """Parse one msgpack value filling all of `frame`; bins come back as memoryview slices."""
    reader = _Reader(frame)
    value = reader.value(depth=0)
    if reader.pos != len(frame):
        raise bad(
            f"msgpack: expected one value filling the frame of {len(frame)} bytes, "
            f"got {len(frame) - reader.pos} trailing bytes after offset {reader.pos}"
        )
    return value


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def value(self, *, depth: int) -> object:
        """The value at `pos`, most frequent types first (keys are short strings)."""
        b = self._take(1)[0]
        if 0xA0 <= b <= 0xBF:
            return self._text(b & 0x1F)
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if b in _CONSTANTS:
            return _CONSTANTS[b]
        if b in _NUMBERS:
            return self._unpack(_NUMBERS[b])
        if b in _BIN:
            return self._take(self._unpack(_BIN[b]))
        if b in _STR:
            return self._text(self._unpack(_STR[b]))
        if 0x80 <= b <= 0x8F or b in _MAP:
            n = b & 0x0F if b <= 0x8F else self._unpack(_MAP[b])
            return self._map(n, depth=depth + 1)
        if 0x90 <= b <= 0x9F or b in _ARRAY:
            n = b & 0x0F if b <= 0x9F else self._unpack(_ARRAY[b])
            return self._array(n, depth=depth + 1)
        raise bad(f"msgpack: expected a value, got type byte 0x{b:02x} at offset {self.pos - 1}")

    def _take(self, n: int) -> memoryview:
        pos, end = self.pos, self.pos + n
        if end > len(self.buf):
            raise bad(
                f"msgpack: truncated frame: expected {n} bytes at offset {pos}, "
                f"got {len(self.buf) - pos}"
            )
        self.pos = end
        return self.buf[pos:end]

    def _unpack(self, fmt: struct.Struct) -> int | float:
        return fmt.unpack(self._take(fmt.size))[0]

    def _text(self, n: int) -> str:
        start = self.pos
        try:
            return str(self._take(n), "utf-8")
        except UnicodeDecodeError as exc:
            raise bad(f"msgpack: expected UTF-8 text at offset {start}, got {exc.reason}")

    def _check_count(self, n: int, *, depth: int, what: str) -> None:
        if depth > MAX_DEPTH:
            raise bad(f"msgpack: expected nesting of at most {MAX_DEPTH}, got deeper")
        if n > len(self.buf) - self.pos:  # every item takes at least one byte
            raise bad(
                f"msgpack: {what} of {n} items cannot fit in the "
                f"{len(self.buf) - self.pos} bytes left at offset {self.pos}"
            )

    def _array(self, n: int, *, depth: int) -> list:
        self._check_count(n, depth=depth, what="array")
        return [self.value(depth=depth) for _ in range(n)]

    def _map(self, n: int, *, depth: int) -> dict:
        self._check_count(2 * n, depth=depth, what="map")
        out: dict = {}
        for _ in range(n):
            start = self.pos
            key = self.value(depth=depth)
            if not isinstance(key, str):
                raise bad(
                    f"msgpack: expected a string map key at offset {start}, "
                    f"got {type(key).__name__}"
                )
            if key in out:
                raise bad(f"msgpack: expected unique map keys, got {key!r} twice")
            out[key] = self.value(depth=depth)
        return out
