import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.client.error_feedback import ErrorFeedback
from pollen.codec import (
    CodecError,
    Identity,
    TopK,
    codec_of,
    decode,
    decode_sparse,
    dense_wire_bytes,
    encode,
    layout_of,
    sealed,
    _serialized_bytes,
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
        step = np.abs(flat[kept]).max() / (2 ** (bits - 1) - 1) * (1 + 2 ** -7)  # bfloat16 scale, rounded up
        assert np.count_nonzero(got) <= k
        assert np.all(got[np.setdiff1d(np.arange(flat.size), kept)] == 0)
        assert np.all(np.abs(got[kept] - flat[kept]) <= step / 2 + 1e-6)


def test_sign_values_carry_the_mean_magnitude_of_each_tensor():
    codec = TopK(density=0.1, bits=1)
    out = decode(encode(UPDATE, codec), LAYOUT, codec)
    for name, value in UPDATE.items():
        flat, got = value.reshape(-1), out[name].reshape(-1)
        kept = np.flatnonzero(got)
        assert np.array_equal(np.sign(got[kept]), np.sign(flat[kept]))
        np.testing.assert_allclose(np.abs(got[kept]), np.abs(flat[kept]).mean(), rtol=2 ** -8)


def test_block_scales_follow_local_magnitudes():
    update = {"w": np.concatenate([np.full(64, 100.0), np.full(64, 0.01)]).astype(np.float32)}
    per_tensor, per_block = TopK(density=1.0, bits=4), TopK(density=1.0, bits=4, block=64)
    coarse = decode(encode(update, per_tensor), layout_of(update), per_tensor)["w"]
    fine = decode(encode(update, per_block), layout_of(update), per_block)["w"]
    assert not coarse[64:].any()  # 0.01 rounds to level 0 under a scale set by 100
    np.testing.assert_allclose(fine, update["w"], rtol=2 ** -7)


def test_model_scope_keeps_the_largest_entries_of_the_whole_update():
    codec = TopK(density=0.01, scope="model")
    update = {"small": np.full(900, 0.1, np.float32), "large": np.arange(1, 101, dtype=np.float32)}
    out = decode(encode(update, codec), layout_of(update), codec)
    assert not out["small"].any()
    assert np.flatnonzero(out["large"]).tolist() == list(range(90, 100))


def test_salience_ranks_by_magnitude_times_gradient_rms():
    codec = TopK(density=0.3, select="salience")
    update = {"w": np.array([4.0, 3.0, 2.0, 1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)}
    rms = {"w": np.array([0.1, 0.1, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)}
    out = decode(encode(update, codec, gradient_rms=rms), layout_of(update), codec)
    assert np.flatnonzero(out["w"]).tolist() == [0, 2, 3]  # scores 0.4, 2.0, 1.0 beat 0.3
    assert out["w"][2] == pytest.approx(2.0, abs=0.02)  # the values sent are the update's
    # An entry no gradient reached (a residual alone) still goes, after every scored one.
    wide = decode(encode(update, TopK(density=0.5, select="salience"), gradient_rms=rms),
                  layout_of(update), TopK(density=0.5, select="salience"))
    assert np.flatnonzero(wide["w"]).tolist() == [0, 1, 2, 3, 4]
    # The same payload format: a magnitude decoder reads it, only the choice of entries differs.
    plain = decode(encode(update, TopK(density=0.3)), layout_of(update), TopK(density=0.3))
    assert np.flatnonzero(plain["w"]).tolist() == [0, 1, 2]


def test_salience_without_gradients_or_with_bad_ones_is_refused():
    codec = TopK(density=0.5, select="salience")
    update = {"w": np.ones(4, np.float32)}
    with pytest.raises(ValueError, match="RMS"):
        encode(update, codec)
    with pytest.raises(ValueError, match="shapes"):
        encode(update, codec, gradient_rms={"w": np.ones(5, np.float32)})
    with pytest.raises(ValueError, match="non-negative"):
        encode(update, codec, gradient_rms={"w": -np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="select"):
        TopK(select="random")


def test_stochastic_rounding_is_unbiased_and_seeded():
    codec = TopK(density=1.0, bits=2, stochastic=True)  # levels -1, 0, +1
    update = {"w": np.concatenate([[1.0], np.full(20_000, 0.25)]).astype(np.float32)}
    first = decode(encode(update, codec, seed=1), layout_of(update), codec)["w"]
    again = decode(encode(update, codec, seed=1), layout_of(update), codec)["w"]
    other = decode(encode(update, codec, seed=2), layout_of(update), codec)["w"]
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert set(np.unique(first[1:]).tolist()) == {0.0, 1.0}
    assert abs(first[1:].mean() - 0.25) < 0.01  # nearest rounding would give exactly 0
    nearest = TopK(density=1.0, bits=2)
    assert not decode(encode(update, nearest), layout_of(update), nearest)["w"][1:].any()


@pytest.mark.parametrize("density", [0.1, 0.01, 0.001])
def test_index_and_value_bits_stay_near_the_entropy(density):
    size, bits = 1_000_000, 8
    update = {"w": rng.normal(size=size).astype(np.float32)}
    blob = encode(update, TopK(density=density, bits=bits))["update"].data
    entropy = -(density * np.log2(density) + (1 - density) * np.log2(1 - density)) + density * bits
    assert 8 * len(blob) / size <= 1.06 * entropy


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


def resealed(blob):
    """A mutated body with a CRC that fits it again, to reach the checks behind the CRC."""
    return bytearray(sealed(bytes(blob[:-4])))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version 9, this build reads version 3"),
    (lambda b: b[:5] + bytes([7]) + b[6:], "CRC-32"),
    (lambda b: b + b"\x00", "CRC-32"),
    (lambda b: resealed(b[:5] + bytes([7]) + b[6:]), "codec id"),
    (lambda b: resealed(b[:-4] + b"\x00" + b[-4:]), "trailing"),
])
def test_decoder_names_what_is_wrong(mutate, message):
    with pytest.raises(CodecError, match=message):
        decode(record_of(mutate(valid_blob())), SMALL_LAYOUT, CODEC)


def test_a_version_2_payload_gets_one_line_naming_both_versions():
    old = valid_blob()
    old[4] = 2
    with pytest.raises(CodecError, match="^payload is in wire format version 2, this build reads version 3: "
                                         "run the same Pollen release on the server and every client$"):
        decode(record_of(old), SMALL_LAYOUT, CODEC)


@pytest.mark.parametrize("codec", [CODEC, TopK(density=1.0, bits=4, block=2), TopK(density=0.25, bits=1)])
def test_every_single_bit_flip_is_rejected_before_decoding(codec):
    blob = blob_of(encode(SMALL, codec))
    for bit in range(8 * len(blob)):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError, match="magic|version|CRC-32"):
            decode(record_of(flipped), SMALL_LAYOUT, codec)


def test_payload_ends_with_the_crc_of_everything_before_it():
    import zlib

    blob = bytes(valid_blob())
    assert struct.unpack("<I", blob[-4:])[0] == zlib.crc32(blob[:-4])


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


def hand_made(kept: int, rice: int, unary: bytes, remainders: bytes, scales: bytes, values: bytes,
              bits: int = 8, flags: int = 0) -> bytearray:
    """A TopK blob for SMALL_LAYOUT with chosen fields, to reach the deeper checks."""
    from pollen.codec import MAGIC, VERSION, _layout_crc

    header = MAGIC + bytes([VERSION, 1, bits, flags, 1]) + struct.pack("<I", _layout_crc(SMALL_LAYOUT))
    header += bytes([0, kept, rice, len(unary)])
    return bytearray(sealed(header + unary + remainders + scales + values))


ONE = struct.pack("<H", 0x3F80)  # bfloat16 1.0


def test_hand_made_blob_decodes():
    # Rice parameter 0, gaps 1 and 2 ("10", "110"): indices 1 and 4, levels +3 and -1.
    blob = hand_made(2, 0, bytes([0b1011_0111]), b"", ONE, bytes([130, 126]))
    out = decode(record_of(blob), SMALL_LAYOUT, CODEC)["w"].reshape(-1)
    assert out.tolist() == [0, 3, 0, 0, -1, 0, 0, 0]


def test_kept_count_above_the_codec_bound_is_rejected():
    with pytest.raises(CodecError, match="kept count"):
        decode(record_of(hand_made(5, 0, b"", b"", b"", b"")), SMALL_LAYOUT, CODEC)


def test_index_past_the_end_is_rejected():
    # Rice parameter 4, one gap of 12 (quotient 0 -> "0", remainder 1100): index 12 >= 8.
    blob = hand_made(1, 4, bytes([0b0111_1111]), bytes([0b1100_0000]), ONE, bytes([127]))
    with pytest.raises(CodecError, match="out of range"):
        decode(record_of(blob), SMALL_LAYOUT, CODEC)


def test_value_level_outside_the_bit_range_is_rejected():
    blob = hand_made(1, 0, bytes([0b0111_1111]), b"", ONE, bytes([255]))
    with pytest.raises(CodecError, match="level"):
        decode(record_of(blob), SMALL_LAYOUT, CODEC)


@pytest.mark.parametrize("scale", [0xBF80, 0x7F80, 0x7FC0])  # -1.0, inf, NaN
def test_bad_scales_are_rejected(scale):
    blob = hand_made(1, 0, bytes([0b0111_1111]), b"", struct.pack("<H", scale), bytes([127]))
    with pytest.raises(CodecError, match="scale"):
        decode(record_of(blob), SMALL_LAYOUT, CODEC)


def test_scale_that_overflows_float32_is_rejected():
    blob = hand_made(1, 0, bytes([0b0111_1111]), b"", struct.pack("<H", 0x7F7F), bytes([254]))
    with pytest.raises(CodecError, match="overflow"):
        decode(record_of(blob), SMALL_LAYOUT, CODEC)


def test_payload_must_use_the_rounds_codec_settings():
    record = encode(SMALL, CODEC)
    with pytest.raises(CodecError, match="4, this round expects 8|8-bit values, this round expects 4"):
        decode(record, SMALL_LAYOUT, TopK(density=0.5, bits=4))
    with pytest.raises(CodecError, match="per tensor, this round expects per model"):
        decode(record, SMALL_LAYOUT, TopK(density=0.5, scope="model"))
    with pytest.raises(CodecError, match="block"):
        decode(record, SMALL_LAYOUT, TopK(density=0.5, block=2))
    with pytest.raises(CodecError, match="kept count"):  # more values than this round allows
        decode(encode(SMALL, TopK(density=1.0)), SMALL_LAYOUT, TopK(density=0.25))


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
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255), st.booleans())
def test_mutated_payloads_decode_to_the_layout_or_raise_codec_error(position, byte, reseal):
    blob = valid_blob()
    blob[position % len(blob)] = byte
    blob = resealed(blob) if reseal else blob  # resealed: the parser behind the CRC sees the mutation
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


def test_dense_wire_bytes_depend_only_on_the_layout():
    other = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in UPDATE.items()}
    for update in (UPDATE, other):
        assert dense_wire_bytes(LAYOUT) == wire_bytes(encode(update, Identity()))


def test_wire_bytes_match_a_fresh_serialization_of_every_record():
    codec = TopK(density=0.05, bits=8)
    records = [encode({k: rng.normal(size=v.shape).astype(np.float32) for k, v in UPDATE.items()}, c)
               for c in (codec, codec, Identity(), Identity(), TopK(density=0.2, bits=3))]
    records.append(ArrayRecord({"other": Array(np.zeros((3, 3), np.float64))}))
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in UPDATE.items()}
    twins = dict(UPDATE, bias=UPDATE["bias"], bias2=UPDATE["bias"].copy())
    records += [encode(zeros, Identity()), encode(twins, Identity()),  # identical arrays travel once
                encode(dict(twins, bias2=UPDATE["bias"] + 1), Identity())]
    for record in records:
        assert wire_bytes(record) == _serialized_bytes(record)  # the memo against a fresh serialization
    assert wire_bytes(records[-2]) < wire_bytes(records[-1])


def test_dense_payloads_decode_in_place_and_odd_encodings_still_decode():
    record = encode(UPDATE, Identity())
    fast = decode(record, LAYOUT, Identity())
    assert not fast["fc"].flags.writeable  # a view of the payload, no copy
    fortran = dict(record.items())
    fortran["fc"] = Array(np.asfortranarray(UPDATE["fc"]))  # a header NumPy writes differently
    slow = decode(ArrayRecord(fortran), LAYOUT, Identity())
    assert all(np.array_equal(slow[k], UPDATE[k]) for k in UPDATE)
    truncated = dict(record.items())
    truncated["fc"] = Array(dtype="float32", shape=(50, 40), stype="numpy.ndarray",
                            data=record["fc"].data[:-4])
    with pytest.raises(CodecError, match="fc: unreadable"):
        decode(ArrayRecord(truncated), LAYOUT, Identity())


def test_error_feedback_clear_leaves_no_residual():
    feedback = ErrorFeedback(RecordDict())
    feedback.keep({"a": np.ones(3, np.float32)}, {"a": np.zeros(3, np.float32)})
    feedback.clear()
    assert feedback.residual() == {}
    feedback.clear()  # nothing held: still fine


def test_error_feedback_drops_a_residual_older_than_max_age():
    feedback = ErrorFeedback(RecordDict(), max_age=2)
    ones = {"a": np.ones(3, np.float32)}
    feedback.keep(ones, {"a": np.zeros(3, np.float32)}, server_round=5)
    assert np.array_equal(feedback.add_residual(ones, server_round=7)["a"], np.full(3, 2.0))  # age 2: used
    assert np.array_equal(feedback.add_residual(ones, server_round=8)["a"], np.ones(3))  # age 3: stale
    forever = ErrorFeedback(feedback.state, max_age=0)
    assert np.array_equal(forever.add_residual(ones, server_round=100)["a"], np.full(3, 2.0))


@pytest.mark.parametrize("block", [0, 2])
def test_entries_that_round_to_zero_cost_nothing(block):
    update = {"w": np.array([1.0, 0.001, 0.5, -0.0002, 0.0, 0.25], np.float32)}
    codec = TopK(density=1.0, block=block)  # keeps every nonzero entry
    indices, values = decode_sparse(encode(update, codec), layout_of(update), codec)
    assert indices.tolist() == [0, 2, 5]  # 0.001 and -0.0002 are below half a level: not sent
    np.testing.assert_allclose(values, [1.0, 0.5, 0.25], atol=1 / 127)


@pytest.mark.parametrize("codec", [TopK(density=0.1), TopK(density=0.05, bits=4, block=16, scope="model"),
                                   TopK(density=1.0, bits=1)])
def test_codec_of_reads_a_payloads_settings(codec):
    record = encode(UPDATE, codec)
    found = codec_of(record["update"])
    assert (found.bits, found.block, found.scope) == (codec.bits, codec.block, codec.scope)
    indices, values = decode_sparse(record, LAYOUT, found)
    expected_indices, expected_values = decode_sparse(record, LAYOUT, codec)
    assert np.array_equal(indices, expected_indices) and np.array_equal(values, expected_values)


def test_codec_of_rejects_what_is_not_a_payload():
    with pytest.raises(CodecError, match="expected a pollen.topk blob"):
        codec_of(encode(UPDATE, Identity())["fc"])
    blob = bytearray(encode(UPDATE, TopK())["update"].data)
    blob[8] ^= 1
    with pytest.raises(CodecError, match="CRC-32"):
        codec_of(Array(dtype="uint8", shape=(len(blob),), stype="pollen.topk", data=bytes(blob)))
