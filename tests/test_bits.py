import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.bits import (
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


@given(st.integers(min_value=0, max_value=2**63))
def test_varint_round_trip(value):
    data = varint(value)
    reader = ByteReader(data)
    assert reader.varint("v", 2**63) == value
    reader.finish()


def test_varint_bound_is_checked_before_the_value_grows():
    with pytest.raises(CodecError, match="count = 300 exceeds its bound 299"):
        ByteReader(varint(300)).varint("count", 299)
    with pytest.raises(CodecError, match="exceeds its bound"):  # an endless varint stops early
        ByteReader(b"\xff" * 1000).varint("count", 10**6)


@settings(max_examples=50)
@given(st.integers(min_value=1, max_value=31), st.lists(st.integers(min_value=0), max_size=40))
def test_fixed_width_fields_round_trip(width, raw):
    values = np.array([v % (1 << width) for v in raw], dtype=np.int64)
    data = pack(values, width)
    assert len(data) == packed_size(values.size * width)
    assert np.array_equal(unpack(data, values.size, width), values)


@settings(max_examples=50)
@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=200))
def test_rice_codes_round_trip(gaps):
    gaps = np.array(gaps, dtype=np.int64)
    rice = best_rice_parameter(gaps)
    unary, remainders = rice_encode(gaps, rice)
    assert np.array_equal(rice_decode(unary, remainders, gaps.size, rice), gaps)


def test_best_rice_parameter_matches_the_gap_scale():
    gaps = np.random.default_rng(0).geometric(0.01, size=10_000) - 1  # mean gap ~99
    assert best_rice_parameter(gaps) in (6, 7)
    assert best_rice_parameter(np.zeros(5, np.int64)) == 0


def test_rice_stream_with_the_wrong_code_count_is_rejected():
    unary, remainders = rice_encode(np.array([3, 1, 4]), 0)
    assert np.unpackbits(np.frombuffer(unary, np.uint8)).tolist() == [1, 1, 1, 0, 1, 0, 1, 1,
                                                                      1, 1, 0, 1, 1, 1, 1, 1]
    for wrong in (2, 4):
        with pytest.raises(CodecError, match=f"exactly {wrong} codes"):
            rice_decode(unary, remainders, wrong, 0)
    with pytest.raises(CodecError, match="exactly 3 codes"):  # a spare byte after the codes
        rice_decode(unary + b"\xff", remainders, 3, 0)
    with pytest.raises(CodecError, match="no values kept"):
        rice_decode(unary, b"", 0, 0)


def test_reader_names_what_was_cut_off():
    reader = ByteReader(b"abc")
    assert bytes(reader.take(2, "head")) == b"ab"
    with pytest.raises(CodecError, match="body needs 5 bytes at offset 2, 1 left"):
        reader.take(5, "body")
    with pytest.raises(CodecError, match="1 unexpected trailing bytes"):
        reader.finish()
