"""Bit-level coding used by the wire format: varints, fixed-width fields, Golomb-Rice gaps.

Everything is vectorised with numpy (no per-element Python loops), and every
reader checks lengths and counts before it allocates, raising ``CodecError``.

Golomb-Rice codes keep their unary and binary parts in separate streams, so both
directions are a handful of array operations: the unary stream is ``q`` ones and
a zero per value, the remainder stream is ``r`` fixed-width bits per value.
"""

from __future__ import annotations

import numpy as np

MAX_RICE = 31  # gaps below 2**31 * 2**k: tensors of up to two billion entries


class CodecError(ValueError):
    """A payload is malformed or does not fit the expected layout."""


def varint(value: int) -> bytes:
    """LEB128: 7 bits a byte, high bit set while more bytes follow."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def packed_size(bits: int) -> int:
    return (bits + 7) // 8


def pack(values: np.ndarray, width: int) -> bytes:
    """Unsigned fields of ``width`` bits each, MSB first, packed into bytes."""
    if width == 0 or values.size == 0:
        return b""
    if width == 8:
        return values.astype(np.uint8).tobytes()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint32)
    bits = ((values.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def unpack(data: memoryview | bytes, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack``; ``data`` must hold exactly ``packed_size(count * width)`` bytes."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8)
    if width == 8:
        return raw[:count].astype(np.int64)
    bits = np.unpackbits(raw, count=count * width).reshape(count, width)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def best_rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter that minimises unary + remainder bits for these gaps."""
    if gaps.size == 0:
        return 0
    top = min(int(gaps.max()).bit_length(), MAX_RICE)
    costs = [int((gaps >> r).sum()) + gaps.size * (r + 1) for r in range(top + 1)]
    return int(np.argmin(costs))


def rice_encode(gaps: np.ndarray, rice: int) -> tuple[bytes, bytes]:
    """(unary stream, remainder stream) of non-negative gaps."""
    quotients = gaps >> rice
    ends = np.cumsum(quotients + 1) - 1
    # Padded with ones, so the stream holds exactly one zero per code.
    unary = np.ones(8 * packed_size(int(ends[-1]) + 1) if ends.size else 0, dtype=np.uint8)
    unary[ends] = 0
    return np.packbits(unary).tobytes(), pack(gaps & ((1 << rice) - 1), rice)


def rice_decode(unary: memoryview | bytes, remainders: memoryview | bytes, count: int,
                rice: int) -> np.ndarray:
    """Gaps back from the two streams; the unary stream must hold exactly ``count`` codes."""
    if count == 0:
        if len(unary):
            raise CodecError("index stream present but no values kept")
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
    ends = np.flatnonzero(bits == 0)
    if ends.size != count or packed_size(int(ends[-1]) + 1) != len(unary):
        raise CodecError(f"index stream does not hold exactly {count} codes")
    quotients = np.diff(ends, prepend=-1) - 1
    return (quotients << rice) | unpack(remainders, count, rice)


class ByteReader:
    """Bounds-checked cursor over a payload: every read says what it wanted."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str, limit: int) -> int:
        """A varint no larger than ``limit`` (checked byte by byte, so it cannot run away)."""
        value, shift = 0, 0
        while True:
            byte = self.byte(what)
            value |= (byte & 0x7F) << shift
            if value > limit:
                raise CodecError(f"{what} = {value} exceeds its bound {limit}")
            if not byte & 0x80:
                return value
            shift += 7

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise CodecError(f"{len(self.data) - self.pos} unexpected trailing bytes")
