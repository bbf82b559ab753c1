"""Wire format of model updates: ``encode(update, TopK(density=0.01))`` -> ArrayRecord.

A TopK payload is one byte blob (a single Flower ``Array`` with stype
``pollen.topk``), so per-tensor record overhead does not eat the compression.
The tensors of an update are treated as one flat vector in layout order:

    header   magic "PLNU", version, codec id, value bits, flags (scope, dense),
             tensor count, crc32 of the layout, block, kept count K,
             [Rice parameter, unary stream length]      (absent when all entries are kept)
    streams  unary | remainders                         Golomb-Rice coded index gaps
             scales                                     bfloat16, one per scale group
             values                                     K fields of ``bits`` bits
    trailer  CRC-32 of every byte before it             (version 3 on)

Index gaps follow a geometric law at density p, so Rice codes land within a few
percent of the entropy H(p)/p bits per kept value, against 32 for raw int32.
A scale group is the kept values of one tensor (``scope="tensor"``) or of the
whole update (``scope="model"``), cut every ``block`` values when ``block`` > 0;
the decoder derives the groups from the indices, so only the scales travel.

Values: ``bits`` >= 2 gives symmetric integer levels (+-(2**(bits-1) - 1)) times
the group's scale, rounded to nearest or stochastically (unbiased);
``bits`` = 1 sends signs only, with the group's mean magnitude as the scale
(Sparse Ternary Compression). The client's error feedback uses the decoded
payload, so it assumes exactly what the server will see.

The decoder trusts nothing: it checks the magic, the version and the CRC-32 of the
whole payload first (a corrupted byte anywhere is rejected before anything is
decoded), then every count, length, index and level against the expected layout
(known from the global model) before allocating, and raises ``CodecError`` naming
what is wrong.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from pollen.bits import (
    MAX_RICE,
    ByteReader,
    CodecError,
    best_rice_parameter,
    pack,
    packed_size,
    rice_decode,
    rice_encode,
    unpack,
    varint,
)
from pollen.flower_internals import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, get_all_nested_objects

MAGIC = b"PLNU"
VERSION = 3  # 3: a CRC-32 trailer over the whole payload
TOPK_ID = 1
TOPK_STYPE = "pollen.topk"
SCOPES = ("tensor", "model")
SELECTIONS = ("magnitude", "salience")
_MODEL_SCOPE, _DENSE = 1, 2  # header flags

Layout = Mapping[str, tuple[int, ...]]  # tensor name -> shape, in wire order

__all__ = ["CodecError", "Identity", "TopK", "Codec", "encode", "decode", "wire_bytes", "dense_wire_bytes",
           "layout_of", "decode_sparse", "codec_of", "sealed"]


@dataclass(frozen=True)
class Identity:
    """Dense fp32, for comparison: what an uncompressed update costs."""

    uses_gradient_rms = False


@dataclass(frozen=True)
class TopK:
    """Keep the largest-magnitude ``density`` share of each tensor (or of the whole update).

    ``bits``: 8 (default), 2..7, or 1 for signs with a mean magnitude (ternary with
    the zeros implied by top-k). ``block``: kept values per scale, 0 = one scale per
    tensor (or per update with ``scope="model"``). ``stochastic``: unbiased
    stochastic rounding, seeded by the ``seed`` given to ``encode``. ``select``:
    which entries count as largest, ``magnitude`` |u| or ``salience`` |u| times the
    RMS of the entry's training gradients, a first-order estimate of how much of the
    local loss decrease each change carries (with a small AdamW epsilon the steps are
    nearly equal in size, so their magnitude alone says little). It is the sender's
    choice: the payload and the decoder are the same either way.
    """

    density: float = 0.01
    bits: int = 8
    block: int = 0
    scope: str = "tensor"
    stochastic: bool = False
    select: str = "magnitude"

    @property
    def uses_gradient_rms(self) -> bool:
        """Whether ``encode`` needs the update's ``gradient_rms``."""
        return self.select == "salience"

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be between 1 and 8, got {self.bits}")
        if self.block < 0:
            raise ValueError(f"block must be 0 (one scale per group) or positive, got {self.block}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.stochastic and self.bits == 1:
            raise ValueError("stochastic rounding needs bits >= 2 (1-bit values are signs)")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")

    def max_kept(self, sizes: list[int]) -> int:
        """Most values an update of these tensor sizes may carry."""
        if self.scope == "model":
            return _kept(sum(sizes), self.density)
        return sum(_kept(size, self.density) for size in sizes)


Codec = Identity | TopK


def _kept(size: int, density: float) -> int:
    return min(size, max(1, round(density * size))) if size else 0


def layout_of(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The layout (names and shapes) of a record or dict of dense arrays."""
    return {name: tuple(array.shape) for name, array in arrays.items()}


def wire_bytes(record: ArrayRecord) -> int:
    """Bytes Flower puts on the wire for this record: every serialized object in its tree.

    Flower sends an object once however often it occurs, so identical arrays count once.
    The size is fixed by each array's name, dtype, shape, stype and data length and by
    which arrays are identical (object ids are fixed-length hashes), so it is measured
    once per such signature: serializing and hashing every update just to count it
    cost more than the codec. Arrays big enough to be cut into chunks (which can repeat
    inside one array) are measured every time.
    """
    arrays = list(record.items())
    if any(len(array.data) > FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE for _, array in arrays):
        return _serialized_bytes(record)
    first: dict[tuple, int] = {}  # an array's content -> where it first occurs
    signature = tuple(
        (name, array.dtype, tuple(array.shape), array.stype, len(array.data),
         first.setdefault((array.dtype, tuple(array.shape), array.stype, array.data), i))
        for i, (name, array) in enumerate(arrays))
    size = _WIRE_BYTES.get(signature)
    if size is None:
        if len(_WIRE_BYTES) >= _WIRE_BYTES_CACHED:
            _WIRE_BYTES.clear()
        size = _WIRE_BYTES[signature] = _serialized_bytes(record)
    return size


def dense_wire_bytes(layout: Layout) -> int:
    """Bytes of a dense fp32 update of this layout on the wire (the reference for ratios).

    Fixed by the layout, so measured once per layout. Each tensor gets its own fill
    value: identical arrays travel once, and a real update's tensors never repeat.
    """
    return _dense_wire_bytes(tuple((name, tuple(shape)) for name, shape in layout.items()))


@functools.lru_cache(maxsize=16)
def _dense_wire_bytes(layout: tuple[tuple[str, tuple[int, ...]], ...]) -> int:
    return wire_bytes(encode({name: np.full(shape, i, np.float32) for i, (name, shape) in enumerate(layout)},
                             Identity()))


def _serialized_bytes(record: ArrayRecord) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


_WIRE_BYTES: dict[tuple, int] = {}
_WIRE_BYTES_CACHED = 4096  # signatures; top-k blobs vary in length, so the memo is bounded


def encode(update: Mapping[str, np.ndarray], codec: Codec, seed: int = 0,
           gradient_rms: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """Encode a dict of float32 arrays (in layout order) into an ArrayRecord.

    ``seed`` drives stochastic rounding only; the same inputs and seed give the same bytes.
    ``gradient_rms`` (same names and shapes, non-negative) is needed by ``select="salience"``.
    """
    if isinstance(codec, Identity):
        return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32, order="C"))
                            for k, v in update.items()})
    layout = layout_of(update)
    flat = flatten(update)
    if not np.isfinite(flat).all():
        raise CodecError("update contains NaN or infinity")
    offsets = _offsets(layout)
    indices = _select(_ranking(flat, layout, codec, gradient_rms), offsets, codec)
    scales, codes, indices = _quantize_nonzero(flat, indices, offsets, codec, seed)
    dense = indices.size == flat.size
    flags = (_MODEL_SCOPE if codec.scope == "model" else 0) | (_DENSE if dense else 0)
    header = [MAGIC, bytes([VERSION, TOPK_ID, codec.bits, flags]), varint(len(layout)),
              struct.pack("<I", _layout_crc(layout)), varint(codec.block), varint(indices.size)]
    streams = []
    if not dense:
        gaps = np.diff(indices, prepend=-1) - 1
        rice = best_rice_parameter(gaps)
        unary, remainders = rice_encode(gaps, rice)
        header += [bytes([rice]), varint(len(unary))]
        streams += [unary, remainders]
    streams += [scales.astype("<u2").tobytes(), pack(codes, codec.bits)]
    blob = sealed(b"".join(header + streams))
    return ArrayRecord({"update": Array(dtype="uint8", shape=(len(blob),), stype=TOPK_STYPE,
                                        data=blob)})


def decode(record: ArrayRecord, layout: Layout, codec: Codec) -> dict[str, np.ndarray]:
    """Decode and validate a record against the expected layout; raise CodecError if it doesn't fit."""
    if isinstance(codec, Identity):
        return _decode_dense(record, layout)
    indices, values = decode_sparse(record, layout, codec)
    flat = np.zeros(int(_offsets(layout)[-1]), dtype=np.float32)
    flat[indices] = values
    return unflatten(flat, layout)


def decode_sparse(record: ArrayRecord, layout: Layout, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """Like ``decode``, but only what was sent: (int64 flat indices in layout order, float32 values).

    Sparse-aware aggregation reads updates this way, without a dense array per client.
    """
    if isinstance(codec, Identity):
        flat = flatten(_decode_dense(record, layout))
        return np.arange(flat.size, dtype=np.int64), flat
    if list(record.keys()) != ["update"]:
        raise CodecError(f"expected one array named 'update', got {list(record.keys())}")
    array = record["update"]
    if array.stype != TOPK_STYPE or array.dtype != "uint8":
        raise CodecError(f"expected a {TOPK_STYPE} uint8 blob, got {array.stype}/{array.dtype}")
    return _read_topk(ByteReader(_checked_body(array.data)), layout, codec)


def codec_of(array: Array) -> TopK:
    """The settings a top-k payload was encoded with (its header's bits, block and scope).

    The density is given as 1, which admits any kept count, so ``decode_sparse(record,
    layout, codec_of(record["update"]))`` reads a payload of unknown origin; the CRC-32
    and every other check still apply.
    """
    if array.stype != TOPK_STYPE:
        raise CodecError(f"expected a {TOPK_STYPE} blob, got {array.stype}")
    reader = ByteReader(_checked_body(array.data))
    reader.take(len(MAGIC) + 2, "magic, version and codec id")
    bits, flags = reader.take(2, "bits and flags")
    reader.varint("tensor count", 2**32)
    reader.take(4, "layout checksum")
    if not 1 <= bits <= 8:
        raise CodecError(f"payload has {bits}-bit values")
    return TopK(density=1.0, bits=bits, block=reader.varint("block", 2**40),
                scope="model" if flags & _MODEL_SCOPE else "tensor")


def sealed(body: bytes) -> bytes:
    """A payload: ``body`` followed by its CRC-32 (little-endian), as the decoder checks it."""
    return body + struct.pack("<I", zlib.crc32(body))


# --- encoding -------------------------------------------------------------------------

def flatten(update: Mapping[str, np.ndarray]) -> np.ndarray:
    """The tensors as one float32 vector, in layout order (the order top-k and the indices use)."""
    if not update:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in update.values()])


def unflatten(flat: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """A vector in layout order as the layout's tensors (views into it): ``flatten`` undone."""
    offsets = _offsets(layout)
    return {name: flat[a:b].reshape(shape) for (name, shape), a, b in zip(layout.items(), offsets[:-1], offsets[1:])}


def _offsets(layout: Layout) -> np.ndarray:
    """Start of each tensor in the flat vector, plus the total size at the end."""
    return np.cumsum([0] + [int(np.prod(shape)) for shape in layout.values()], dtype=np.int64)


def _ranking(flat: np.ndarray, layout: Layout, codec: TopK,
             gradient_rms: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """The scores top-k picks by (largest absolute value first)."""
    if codec.select == "magnitude":
        return flat
    if gradient_rms is None:
        raise ValueError("select='salience' needs the gradients' RMS per entry")
    if layout_of(gradient_rms) != dict(layout):
        raise ValueError("gradient RMS names or shapes differ from the update's")
    rms = flatten(gradient_rms).astype(np.float64)
    if not (np.isfinite(rms).all() and (rms >= 0).all()):
        raise ValueError("gradient RMS must be finite and non-negative")
    magnitude = np.abs(flat).astype(np.float64)
    # Entries no gradient reached (an error-feedback residual alone) rank below the rest,
    # by magnitude among themselves.
    return magnitude * rms + magnitude * 1e-200


def largest(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest magnitudes among the nonzero entries of a flat array, sorted."""
    k = min(k, int(np.count_nonzero(values)))
    if k == 0:
        return np.zeros(0, np.int64)
    if k == values.size:
        return np.arange(values.size, dtype=np.int64)
    return np.sort(np.argpartition(np.abs(values), values.size - k)[values.size - k:]).astype(np.int64)


def _select(flat: np.ndarray, offsets: np.ndarray, codec: TopK) -> np.ndarray:
    if codec.scope == "model":
        return largest(flat, _kept(flat.size, codec.density))
    parts = [start + largest(flat[start:end], _kept(int(end - start), codec.density))
             for start, end in zip(offsets[:-1], offsets[1:])]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _group_starts(indices: np.ndarray, offsets: np.ndarray, codec: TopK) -> np.ndarray:
    """Where each scale group begins among the kept values (same rule in both directions)."""
    if indices.size == 0:
        return np.zeros(0, np.int64)
    bounds = [0, indices.size]
    if codec.scope == "tensor":
        bounds = np.unique(np.searchsorted(indices, offsets)).tolist()
    starts = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if end > begin:
            starts.append(np.arange(begin, end, codec.block or end - begin, dtype=np.int64))
    return np.concatenate(starts)


def _quantize_nonzero(flat: np.ndarray, indices: np.ndarray, offsets: np.ndarray, codec: TopK,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scales, codes, indices) without the entries whose value rounds to zero.

    Such an entry would cost an index and a value and decode to nothing (error feedback
    keeps it for later). With one scale per tensor or model, dropping it leaves every
    scale as it was. With ``block`` > 0 it regroups the kept values, so quantization
    repeats until none rounds to zero; stochastic rounding then keeps its zeros, as a
    second draw over the survivors would bias it.
    """
    while True:
        starts = _group_starts(indices, offsets, codec)
        scales, codes = _quantize(flat[indices], starts, codec, np.random.default_rng(seed))
        nonzero = codes != _max_level(codec.bits)
        if codec.bits == 1 or nonzero.all() or (codec.block and codec.stochastic):
            return scales, codes, indices
        if not codec.block:
            return scales, codes[nonzero], indices[nonzero]
        indices = indices[nonzero]


def _max_level(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _quantize(values: np.ndarray, starts: np.ndarray, codec: TopK,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(bfloat16 scale bits per group, unsigned value codes)."""
    if values.size == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.int64)
    magnitude = np.abs(values)
    group = np.repeat(np.arange(starts.size), np.diff(starts, append=values.size))
    if codec.bits == 1:
        mean = np.add.reduceat(magnitude.astype(np.float64), starts) / np.diff(starts, append=values.size)
        scales = _to_bfloat16(mean.astype(np.float32), round_up=False)
        return scales, (values > 0).astype(np.int64)
    top = _max_level(codec.bits)
    scales = _to_bfloat16(np.maximum.reduceat(magnitude, starts) / np.float32(top), round_up=True)
    levels = values / _from_bfloat16(scales)[group]
    levels = np.floor(levels + rng.random(levels.size)) if codec.stochastic else np.rint(levels)
    return scales, np.clip(levels, -top, top).astype(np.int64) + top


def _to_bfloat16(x: np.ndarray, round_up: bool) -> np.ndarray:
    """bfloat16 bit patterns of positive float32 values (rounded up, or to nearest even)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    if round_up:  # a scale rounded up keeps the peak inside the top level
        bits = bits + 0xFFFF
    else:
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
    out = (bits >> 16).astype(np.uint16)
    if np.any((out & 0x7F80) == 0x7F80):
        raise CodecError("update too large to scale (bfloat16 overflow)")
    return out


def _from_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _dequantize(codes: np.ndarray, scales: np.ndarray, starts: np.ndarray, bits: int) -> np.ndarray:
    group = np.repeat(np.arange(starts.size), np.diff(starts, append=codes.size))
    levels = np.where(codes > 0, 1, -1) if bits == 1 else codes - _max_level(bits)
    return (levels.astype(np.float32) * _from_bfloat16(scales)[group]).astype(np.float32)


def _layout_crc(layout: Layout) -> int:
    text = ";".join(f"{name}:{','.join(map(str, shape))}" for name, shape in layout.items())
    return zlib.crc32(text.encode())


# --- decoding -------------------------------------------------------------------------

def _checked_body(data: bytes | memoryview) -> memoryview:
    """The payload without its CRC trailer, once magic, version and CRC-32 are right."""
    reader = ByteReader(data)
    if bytes(reader.take(4, "magic")) != MAGIC:
        raise CodecError("not a Pollen update (bad magic bytes)")
    version = reader.byte("version")
    if version != VERSION:
        raise CodecError(f"payload is in wire format version {version}, this build reads version {VERSION}: "
                         f"run the same Pollen release on the server and every client")
    if len(reader.data) < len(MAGIC) + 1 + 4:
        raise CodecError("truncated payload: no room for its CRC-32")
    body, (crc,) = reader.data[:-4], struct.unpack("<I", reader.data[-4:])
    if zlib.crc32(body) != crc:
        raise CodecError("corrupted payload: CRC-32 mismatch")
    return body


def _read_topk(reader: ByteReader, layout: Layout, codec: TopK) -> tuple[np.ndarray, np.ndarray]:
    reader.take(len(MAGIC) + 1, "magic and version")  # checked with the CRC by _checked_body
    codec_id, bits, flags = reader.take(3, "codec id, bits, flags")
    if codec_id != TOPK_ID:
        raise CodecError(f"unexpected codec id {codec_id} (expected top-k {TOPK_ID})")
    if bits != codec.bits:
        raise CodecError(f"payload has {bits}-bit values, this round expects {codec.bits}")
    if flags & ~(_MODEL_SCOPE | _DENSE):
        raise CodecError(f"unknown flags {flags:#x}")
    scope = "model" if flags & _MODEL_SCOPE else "tensor"
    if scope != codec.scope:
        raise CodecError(f"payload selects per {scope}, this round expects per {codec.scope}")
    count = reader.varint("tensor count", len(layout))
    if count != len(layout):
        raise CodecError(f"payload has {count} tensors, the model has {len(layout)}")
    (crc,) = struct.unpack("<I", reader.take(4, "layout checksum"))
    if crc != _layout_crc(layout):
        raise CodecError("tensor names or shapes differ from the model's (layout checksum mismatch)")
    offsets = _offsets(layout)
    size = int(offsets[-1])
    block = reader.varint("block", size)
    if block != codec.block:
        raise CodecError(f"payload has block {block}, this round expects {codec.block}")
    limit = codec.max_kept([int(b - a) for a, b in zip(offsets[:-1], offsets[1:])])
    kept = reader.varint("kept count", limit)
    if flags & _DENSE:
        if kept != size:
            raise CodecError(f"dense payload keeps {kept} of {size} entries")
        indices = np.arange(size, dtype=np.int64)
    else:
        indices = _read_indices(reader, kept, size)
    starts = _group_starts(indices, offsets, codec)
    raw_scales = np.frombuffer(reader.take(2 * starts.size, "scales"), dtype="<u2")
    if np.any(raw_scales & 0x8000) or np.any((raw_scales & 0x7F80) == 0x7F80):
        raise CodecError("negative, infinite or NaN scale")
    codes = unpack(reader.take(packed_size(kept * bits), "value stream"), kept, bits)
    if bits > 1 and codes.size and codes.max() > 2 * _max_level(bits):
        raise CodecError(f"value level out of range for {bits} bits")
    reader.finish()
    with np.errstate(over="ignore"):
        values = _dequantize(codes, raw_scales.astype(np.uint16), starts, bits)
    if not np.isfinite(values).all():
        raise CodecError("scale too large: decoded values overflow float32")
    return indices, values


def _read_indices(reader: ByteReader, kept: int, size: int) -> np.ndarray:
    rice = reader.byte("rice parameter")
    if rice > MAX_RICE:
        raise CodecError(f"rice parameter {rice} above {MAX_RICE}")
    unary_len = reader.varint("unary length", packed_size(size + kept))
    unary = reader.take(unary_len, "index stream")
    remainders = reader.take(packed_size(kept * rice), "remainder stream")
    gaps = rice_decode(unary, remainders, kept, rice)
    if gaps.size and gaps.max() >= size:
        raise CodecError(f"index gap {int(gaps.max())} out of range for {size} entries")
    indices = np.cumsum(gaps + 1) - 1
    if indices.size and indices[-1] >= size:
        raise CodecError(f"index {int(indices[-1])} out of range for {size} entries")
    return indices


def _read_float32(name: str, array: Array, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array of ``shape`` that ``array`` holds, read without a copy (read-only).

    ``Array.numpy()`` parses the .npy header of every array anew (``ast.literal_eval``),
    which costs more than the arithmetic on a small tensor. A header byte-identical to
    the one NumPy writes for this shape is all that can precede the values, so the
    values are read in place after it; anything else goes through NumPy's own parser.
    """
    header = _npy_header(shape)
    data = array.data
    if len(data) == len(header) + 4 * math.prod(shape) and data.startswith(header):
        return np.frombuffer(data, dtype="<f4", offset=len(header)).reshape(shape)
    try:
        value = array.numpy()
    except Exception as error:  # numpy's own parser: any failure means a bad payload
        raise CodecError(f"{name}: unreadable array ({error})") from None
    if value.dtype != np.float32 or value.shape != shape:
        raise CodecError(f"{name}: payload holds {value.dtype} {value.shape}, header says float32 {shape}")
    return value


@functools.lru_cache(maxsize=1024)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The exact bytes ``np.save`` writes before the values of a C-order float32 array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


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
        value = _read_float32(name, array, shape)
        if not np.isfinite(value).all():
            raise CodecError(f"{name}: contains NaN or infinity")
        out[name] = value
    return out
