"""Wire format of model updates: ``encode(update, TopK(density=0.01))`` -> ArrayRecord.

A TopK payload is one byte blob (a single Flower ``Array`` with stype
``pollen.topk``) so per-tensor record overhead does not eat the compression:

    header   magic "PLNU", version, codec id, tensor count, crc32 of the layout
    per tensor (header):  dtype code, ndim, dims, k, rice parameter, scale (f32),
                          length of the unary stream in bytes
    per tensor (body):    unary stream | remainder stream | value stream

Kept indices are gap coded with Golomb-Rice codes whose unary and binary parts
live in separate bit streams, so both encoding and decoding are vectorised.
Values are symmetric b-bit integers with one fp32 scale per tensor.

The decoder trusts nothing: it checks every count, length and index against the
expected layout (known from the global model) before it allocates, and raises
``CodecError`` naming what is wrong.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

MAGIC = b"PLNU"
VERSION = 1
TOPK_ID = 1
TOPK_STYPE = "pollen.topk"
_DTYPES = {0: np.float32}
_MAX_RICE = 31  # gaps below 2**31: tensors of up to two billion entries

Layout = Mapping[str, tuple[int, ...]]  # tensor name -> shape, in wire order


class CodecError(ValueError):
    """A payload is malformed or does not fit the expected layout."""


@dataclass(frozen=True)
class Identity:
    """Dense fp32, for comparison: what an uncompressed update costs."""


@dataclass(frozen=True)
class TopK:
    """Keep the largest-magnitude ``density`` share of each tensor, ``bits`` per value."""

    density: float = 0.01
    bits: int = 8

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")


Codec = Identity | TopK


def codec_to_config(codec: Codec) -> dict[str, str | float | int]:
    """Codec settings as ConfigRecord entries sent to clients each round."""
    if isinstance(codec, TopK):
        return {"codec.name": "topk", "codec.density": codec.density, "codec.bits": codec.bits}
    return {"codec.name": "identity"}


def codec_from_config(config: Mapping) -> Codec:
    name = config.get("codec.name", "identity")
    if name == "topk":
        return TopK(density=float(config["codec.density"]), bits=int(config["codec.bits"]))
    if name == "identity":
        return Identity()
    raise CodecError(f"unknown codec {name!r}")


def layout_of(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """The layout (names and shapes) of a record of dense arrays."""
    return {name: tuple(array.shape) for name, array in arrays.items()}


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes Flower puts on the wire for this record: every serialized object in its tree."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def encode(update: Mapping[str, np.ndarray], codec: Codec) -> ArrayRecord:
    """Encode a dict of float32 arrays (in layout order) into an ArrayRecord."""
    if isinstance(codec, Identity):
        return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32, order="C")) for k, v in update.items()})
    header = [MAGIC, struct.pack("<BB", VERSION, TOPK_ID), _varint(len(update)),
              struct.pack("<I", _layout_crc({k: v.shape for k, v in update.items()}))]
    body = []
    for array in update.values():
        flat = np.asarray(array, dtype=np.float32).reshape(-1)
        indices, levels, scale = _sparsify(flat, codec)
        gaps = np.diff(indices, prepend=-1) - 1
        rice = _best_rice_parameter(gaps)
        unary = _unary_stream(gaps >> rice)
        header += [bytes([0, array.ndim]), b"".join(_varint(d) for d in array.shape),
                   _varint(len(indices)), bytes([rice]), struct.pack("<f", scale),
                   _varint(len(unary))]
        body += [unary, _pack(gaps & ((1 << rice) - 1), rice),
                 _pack(levels + _max_level(codec.bits), codec.bits)]
    blob = np.frombuffer(b"".join(header + body), dtype=np.uint8)
    return ArrayRecord({"update": Array(dtype="uint8", shape=(blob.size,), stype=TOPK_STYPE,
                                        data=blob.tobytes())})


def decode(record: ArrayRecord, layout: Layout, codec: Codec) -> dict[str, np.ndarray]:
    """Decode and validate a record against the expected layout; raise CodecError if it doesn't fit."""
    if isinstance(codec, Identity):
        return _decode_dense(record, layout)
    if list(record.keys()) != ["update"]:
        raise CodecError(f"expected one array named 'update', got {list(record.keys())}")
    array = record["update"]
    if array.stype != TOPK_STYPE or array.dtype != "uint8":
        raise CodecError(f"expected a {TOPK_STYPE} uint8 blob, got {array.stype}/{array.dtype}")
    return _TopKReader(array.data, layout, codec.bits).read()


def _decode_dense(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    if list(record.keys()) != list(layout):
        raise CodecError(f"arrays {list(record.keys())} do not match the model's {list(layout)}")
    out = {}
    for name, shape in layout.items():
        array = record[name]
        if array.stype != "numpy.ndarray" or array.dtype != "float32" or tuple(array.shape) != shape:
            raise CodecError(f"{name}: expected float32 {shape}, got {array.dtype} {tuple(array.shape)}")
        if len(array.data) > 4 * int(np.prod(shape)) + 1024:
            raise CodecError(f"{name}: {len(array.data)} bytes is too large for float32 {shape}")
        try:
            value = array.numpy()
        except Exception as error:  # numpy's own parser: any failure means a bad payload
            raise CodecError(f"{name}: unreadable array ({error})") from None
        if value.dtype != np.float32 or value.shape != shape:
            raise CodecError(f"{name}: payload holds {value.dtype} {value.shape}, header says float32 {shape}")
        if not np.isfinite(value).all():
            raise CodecError(f"{name}: contains NaN or infinity")
        out[name] = value
    return out


def _max_level(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _sparsify(flat: np.ndarray, codec: TopK) -> tuple[np.ndarray, np.ndarray, float]:
    """Indices (sorted) and integer levels of the top-k entries, and their scale."""
    nonzero = int(np.count_nonzero(flat))
    k = min(nonzero, max(1, round(codec.density * flat.size)))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0
    if k < flat.size:
        indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
    else:
        indices = np.arange(flat.size)
    values = flat[indices]
    peak = float(np.abs(values).max())
    if not np.isfinite(peak):
        raise CodecError("update contains NaN or infinity")
    scale = np.float32(peak / _max_level(codec.bits))
    levels = np.rint(values / scale).astype(np.int64) if scale > 0 else np.zeros(k, np.int64)
    return indices.astype(np.int64), np.clip(levels, -_max_level(codec.bits), _max_level(codec.bits)), float(scale)


def _best_rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter that minimises this tensor's index bits (unary + remainder)."""
    if gaps.size == 0:
        return 0
    top = min(int(gaps.max()).bit_length(), _MAX_RICE)
    costs = [int((gaps >> r).sum()) + gaps.size * (r + 1) for r in range(top + 1)]
    return int(np.argmin(costs))


def _unary_stream(quotients: np.ndarray) -> bytes:
    """q ones then a zero for each quotient, packed MSB first."""
    ends = np.cumsum(quotients + 1) - 1
    bits = np.ones(int(ends[-1]) + 1 if ends.size else 0, dtype=np.uint8)
    bits[ends] = 0
    return np.packbits(bits).tobytes()


def _pack(values: np.ndarray, width: int) -> bytes:
    """Fixed-width unsigned fields, MSB first, packed into bytes."""
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((values[:, None].astype(np.int64) >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack(data: memoryview, count: int, width: int) -> np.ndarray:
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * width)
    return bits.reshape(count, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _layout_crc(layout: Mapping[str, tuple[int, ...]]) -> int:
    text = ";".join(f"{name}:{','.join(map(str, shape))}" for name, shape in layout.items())
    return zlib.crc32(text.encode())


def _packed_size(bits: int) -> int:
    return (bits + 7) // 8


class _TopKReader:
    """Bounds-checked reader of one TopK blob."""

    def __init__(self, data: bytes, layout: Layout, bits: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.layout = layout
        self.bits = bits

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError(f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                             f"{len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def varint(self, what: str, limit: int) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1, what)[0]
            value |= (byte & 0x7F) << shift
            if value > limit:
                raise CodecError(f"{what} = {value} exceeds its bound {limit}")
            if not byte & 0x80:
                return value
            shift += 7

    def read(self) -> dict[str, np.ndarray]:
        if bytes(self.take(4, "magic")) != MAGIC:
            raise CodecError("not a Pollen update (bad magic bytes)")
        version, codec_id = self.take(2, "version")
        if version != VERSION:
            raise CodecError(f"unsupported format version {version} (this build reads {VERSION})")
        if codec_id != TOPK_ID:
            raise CodecError(f"unexpected codec id {codec_id} (expected top-k {TOPK_ID})")
        count = self.varint("tensor count", len(self.layout))
        if count != len(self.layout):
            raise CodecError(f"payload has {count} tensors, the model has {len(self.layout)}")
        (crc,) = struct.unpack("<I", self.take(4, "layout checksum"))
        if crc != _layout_crc(self.layout):
            raise CodecError("tensor names or shapes differ from the model's (layout checksum mismatch)")
        heads = [self.tensor_header(name, shape) for name, shape in self.layout.items()]
        out = {name: self.tensor_body(name, shape, *head)
               for (name, shape), head in zip(self.layout.items(), heads)}
        if self.pos != len(self.data):
            raise CodecError(f"{len(self.data) - self.pos} unexpected trailing bytes")
        return out

    def tensor_header(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, float, int]:
        dtype, ndim = self.take(2, f"{name} dtype")
        if dtype not in _DTYPES:
            raise CodecError(f"{name}: unknown dtype code {dtype}")
        if ndim != len(shape):
            raise CodecError(f"{name}: {ndim} dimensions, expected {len(shape)}")
        dims = tuple(self.varint(f"{name} dim", max(shape, default=0)) for _ in range(ndim))
        if dims != shape:
            raise CodecError(f"{name}: shape {dims}, expected {shape}")
        size = int(np.prod(shape))
        k = self.varint(f"{name} kept count", size)
        rice = self.take(1, f"{name} rice parameter")[0]
        if rice > _MAX_RICE:
            raise CodecError(f"{name}: rice parameter {rice} above {_MAX_RICE}")
        (scale,) = struct.unpack("<f", self.take(4, f"{name} scale"))
        if not np.isfinite(scale) or scale < 0:
            raise CodecError(f"{name}: invalid scale {scale}")
        unary_len = self.varint(f"{name} unary length", _packed_size(size + k))
        return k, rice, scale, unary_len

    def tensor_body(self, name: str, shape: tuple[int, ...], k: int, rice: int,
                    scale: float, unary_len: int) -> np.ndarray:
        size = int(np.prod(shape))
        unary = self.take(unary_len, f"{name} index stream")
        remainders = self.take(_packed_size(k * rice), f"{name} remainder stream")
        levels_raw = self.take(_packed_size(k * self.bits), f"{name} value stream")
        out = np.zeros(size, dtype=np.float32)
        if k == 0:
            if unary_len:
                raise CodecError(f"{name}: index stream present but no values kept")
            return out.reshape(shape)
        bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
        ends = np.flatnonzero(bits == 0)
        if ends.size < k or _packed_size(int(ends[k - 1]) + 1) != unary_len:
            raise CodecError(f"{name}: index stream does not hold exactly {k} codes")
        quotients = np.diff(ends[:k], prepend=-1) - 1
        gaps = (quotients << rice) | _unpack(remainders, k, rice)
        if gaps.max() >= size:
            raise CodecError(f"{name}: index gap {int(gaps.max())} out of range for {size} entries")
        indices = np.cumsum(gaps + 1) - 1
        if indices[-1] >= size:
            raise CodecError(f"{name}: index {int(indices[-1])} out of range for {size} entries")
        levels = _unpack(levels_raw, k, self.bits) - _max_level(self.bits)
        if levels.max() > _max_level(self.bits):
            raise CodecError(f"{name}: value level out of range for {self.bits} bits")
        out[indices] = levels.astype(np.float32) * np.float32(scale)
        return out.reshape(shape)
