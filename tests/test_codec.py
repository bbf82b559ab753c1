import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client.error_feedback import ErrorFeedback
from pollen.codec import (
    CodecError,
    Identity,
    TopK,
    codec_from_config,
    codec_to_config,
    decode,
    encode,
    wire_bytes,
)

rng = np.random.default_rng(1)
UPDATE = {
    "conv": rng.normal(size=(16, 8, 1, 1)).astype(np.float32),
    "fc": rng.normal(size=(50, 40)).astype(np.float32),
    "bias": rng.normal(size=(50,)).astype(np.float32),
    "scalar": np.array(0.5, dtype=np.float32),
    "zero": np.zeros((7, 3), dtype=np.float32),
}
LAYOUT = {k: v.shape for k, v in UPDATE.items()}


def test_identity_round_trip_is_exact():
    out = decode(encode(UPDATE, Identity()), LAYOUT, Identity())
    assert all(np.array_equal(out[k], UPDATE[k]) for k in UPDATE)


@pytest.mark.parametrize("density", [1.0, 0.1, 0.01])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_topk_keeps_the_largest_entries_within_half_a_step(density, bits):
    codec = TopK(density=density, bits=bits)
    out = decode(encode(UPDATE, codec), LAYOUT, codec)
    for name, value in UPDATE.items():
        flat, got = value.reshape(-1), out[name].reshape(-1)
        assert got.shape == flat.shape and got.dtype == np.float32
        if not flat.any():
            assert not got.any()  # an all-zero tensor sends nothing
            continue
        k = max(1, round(density * flat.size))
        kept = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
        step = np.abs(flat[kept]).max() / (2 ** (bits - 1) - 1)
        assert np.count_nonzero(got) <= k
        assert np.all(got[np.setdiff1d(np.arange(flat.size), kept)] == 0)
        assert np.all(np.abs(got[kept] - flat[kept]) <= step / 2 + 1e-6)


def test_error_feedback_loses_nothing_over_rounds():
    codec, state = TopK(density=0.05, bits=4), RecordDict()
    feedback = ErrorFeedback(state)
    total_updates = {k: np.zeros_like(v) for k, v in UPDATE.items()}
    total_sent = {k: np.zeros_like(v) for k, v in UPDATE.items()}
    for _ in range(6):
        update = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in UPDATE.items()}
        with_residual = feedback.add_residual(update)
        sent = decode(encode(with_residual, codec), LAYOUT, codec)
        feedback.keep(with_residual, sent)
        for k in UPDATE:
            total_updates[k] += update[k]
            total_sent[k] += sent[k]
    residual = feedback.residual()
    for k in UPDATE:
        np.testing.assert_allclose(total_sent[k] + residual[k], total_updates[k], atol=1e-5)
        if round(0.05 * total_updates[k].size) > 1:  # a tensor sent whole leaves no residual
            assert np.abs(residual[k]).any()


def test_error_feedback_resets_when_the_layout_changes():
    feedback = ErrorFeedback(RecordDict())
    feedback.keep({"a": np.ones(3, np.float32)}, {"a": np.zeros(3, np.float32)})
    assert np.array_equal(feedback.add_residual({"a": np.ones(3, np.float32)})["a"], np.full(3, 2.0))
    assert np.array_equal(feedback.add_residual({"b": np.ones(2, np.float32)})["b"], np.ones(2))


def blob_of(record):
    return bytearray(record["update"].data)


def record_of(blob):
    return ArrayRecord({"update": Array(dtype="uint8", shape=(len(blob),), stype="pollen.topk",
                                        data=bytes(blob))})


SMALL = {"w": np.array([[0.0, 3.0, 0.0, -1.0], [0.5, 0.0, 0.0, 2.0]], np.float32)}
SMALL_LAYOUT = {"w": (2, 4)}
CODEC = TopK(density=0.5, bits=8)


def valid_blob():
    return blob_of(encode(SMALL, CODEC))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
    (lambda b: b[:5] + bytes([7]) + b[6:], "codec id"),
    (lambda b: b + b"\x00", "trailing"),
])
def test_decoder_names_what_is_wrong(mutate, message):
    with pytest.raises(CodecError, match=message):
        decode(record_of(mutate(valid_blob())), SMALL_LAYOUT, CODEC)


def test_every_truncation_is_rejected():
    blob = valid_blob()
    for length in range(len(blob)):
        with pytest.raises(CodecError):
            decode(record_of(blob[:length]), SMALL_LAYOUT, CODEC)


def test_layout_mismatches_are_rejected():
    record = encode(SMALL, CODEC)
    with pytest.raises(CodecError, match="layout"):
        decode(record, {"v": (2, 4)}, CODEC)
    with pytest.raises(CodecError, match="tensors"):
        decode(record, {"w": (2, 4), "b": (3,)}, CODEC)
    with pytest.raises(CodecError, match="layout|shape"):
        decode(record, {"w": (4, 2)}, CODEC)


def hand_made(k: int, rice: int, unary: bytes, remainders: bytes, values: bytes) -> bytearray:
    """A TopK blob for SMALL_LAYOUT with chosen fields, to reach the deeper checks."""
    from pollen.codec import MAGIC, _layout_crc

    header = MAGIC + bytes([1, 1, 1]) + struct.pack("<I", _layout_crc(SMALL_LAYOUT))
    header += bytes([0, 2, 2, 4, k, rice]) + struct.pack("<f", 1.0) + bytes([len(unary)])
    return bytearray(header + unary + remainders + values)


def test_kept_count_above_the_tensor_size_is_rejected():
    with pytest.raises(CodecError, match="kept count"):
        decode(record_of(hand_made(9, 0, b"", b"", b"")), SMALL_LAYOUT, CODEC)


def test_index_past_the_end_is_rejected():
    # Rice parameter 4, one gap of 12 (quotient 0 -> "0", remainder 1100): index 12 >= 8.
    blob = hand_made(1, 4, bytes([0b0000_0000]), bytes([0b1100_0000]), bytes([127]))
    with pytest.raises(CodecError, match="out of range"):
        decode(record_of(blob), SMALL_LAYOUT, CODEC)


def test_value_level_outside_the_bit_range_is_rejected():
    blob = hand_made(1, 0, bytes([0b0000_0000]), b"", bytes([255]))
    with pytest.raises(CodecError, match="level"):
        decode(record_of(blob), SMALL_LAYOUT, CODEC)


def test_wrong_record_shape_is_rejected():
    with pytest.raises(CodecError, match="one array"):
        decode(encode(SMALL, Identity()), SMALL_LAYOUT, CODEC)
    odd = ArrayRecord({"update": Array(np.zeros(4, np.float32))})
    with pytest.raises(CodecError, match="blob"):
        decode(odd, SMALL_LAYOUT, CODEC)


def test_dense_payloads_are_checked():
    bad = {"w": SMALL["w"].copy()}
    bad["w"][0, 0] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        decode(encode(bad, Identity()), SMALL_LAYOUT, Identity())
    with pytest.raises(CodecError, match="float32"):
        decode(ArrayRecord({"w": Array(SMALL["w"].astype(np.float64))}), SMALL_LAYOUT, Identity())
    with pytest.raises(CodecError, match="match"):
        decode(encode({"v": SMALL["w"]}, Identity()), SMALL_LAYOUT, Identity())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_decoder(data):
    with pytest.raises(CodecError):
        decode(record_of(data), SMALL_LAYOUT, CODEC)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_mutated_payloads_decode_to_the_layout_or_raise_codec_error(position, byte):
    blob = valid_blob()
    blob[position % len(blob)] = byte
    try:
        out = decode(record_of(blob), SMALL_LAYOUT, CODEC)
    except CodecError:
        return
    assert out["w"].shape == (2, 4) and np.isfinite(out["w"]).all()


def test_one_percent_update_is_over_100x_smaller_on_the_wire():
    update = {"w": rng.normal(size=(200_000,)).astype(np.float32)}
    codec = TopK(density=0.01, bits=8)
    compressed = wire_bytes(encode(update, codec))
    dense = wire_bytes(encode(update, Identity()))
    assert dense / compressed >= 100
    index_bits = 8 * compressed / 2000 - 8  # bytes per kept value minus its 8-bit value
    assert index_bits < 12  # gap coded: an int32 index would cost 32


def test_codec_settings_round_trip_through_config():
    for codec in (Identity(), TopK(density=0.02, bits=4)):
        assert codec_from_config(codec_to_config(codec)) == codec
    with pytest.raises(CodecError, match="unknown codec"):
        codec_from_config({"codec.name": "gzip"})
