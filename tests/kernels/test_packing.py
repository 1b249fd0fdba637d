"""Unit tests of bit packing and the 16-bit float passthrough (:mod:`lplr_dask.kernels.packing`)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.packing import (
    BIT_ORDER,
    decode_float,
    encode_float,
    pack_codes,
    packed_width,
    unpack_codes,
)

BITS = list(range(1, 9))
BIT_IDS = [f"b{b}" for b in BITS]

SHAPES = [(1, 1), (4, 1), (3, 7), (5, 13), (2, 8), (6, 37), (3, 64), (0, 5), (3, 0)]
SHAPE_IDS = [f"{r}x{c}" for r, c in SHAPES]


def reference_pack(codes, bits):
    """Bit-by-bit transcription of the documented layout (slow, independent of the package)."""
    rows, cols = codes.shape
    out = np.zeros((rows, -(-cols * bits // 8)), dtype=np.uint8)
    for r in range(rows):
        for j in range(cols):
            for b in range(bits):
                i = j * bits + b  # stream bit of bit b (LSB first) of code j
                if (int(codes[r, j]) >> b) & 1:
                    out[r, i // 8] |= np.uint8(1 << (i % 8))
    return out


# --------------------------------------------------------------------------------------------
# pack_codes / unpack_codes
# --------------------------------------------------------------------------------------------


def test_bit_order_name():
    assert BIT_ORDER == "lsb-first-rows"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
def test_roundtrip(bits, shape):
    rng = np.random.default_rng(bits * 100 + shape[0] * 10 + shape[1])
    codes = rng.integers(0, 2**bits, size=shape, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (shape[0], packed_width(shape[1], bits))
    out = unpack_codes(packed, bits, shape[1])
    assert out.dtype == np.uint8
    assert out.shape == shape
    np.testing.assert_array_equal(out, codes)


@pytest.mark.parametrize("bits", BITS, ids=BIT_IDS)
def test_matches_reference_layout(bits):
    rng = np.random.default_rng(40 + bits)
    codes = rng.integers(0, 2**bits, size=(4, 23), dtype=np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, bits), reference_pack(codes, bits))


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        # stream bits 0 and 8 set
        (1, [1, 0, 0, 0, 0, 0, 0, 0, 1], [0x01, 0x01]),
        # code 0 = bits 0-7 of the stream: bit 7 is the 8th code
        (1, [0, 0, 0, 0, 0, 0, 0, 1], [0x80]),
        # code 0 in the low nibble, code 1 in the high nibble
        (4, [0x3, 0xA], [0xA3]),
        (4, [0xF, 0x0, 0x1], [0x0F, 0x01]),
        # 7 = bits 0-2, 1 = bit 3, code 2 (= 0) in bits 6-8; 9 bits -> 2 bytes
        (3, [7, 1, 0], [0x0F, 0x00]),
        # 7 in bits 6, 7, 8: bits 6-7 of byte 0 and bit 0 of byte 1
        (3, [0, 0, 7], [0xC0, 0x01]),
        # 31 in bits 0-4, 1 at bit 5
        (5, [31, 1], [0x3F, 0x00]),
        # 31 in bits 5-9: bits 5-7 of byte 0, bits 0-1 of byte 1
        (5, [0, 31], [0xE0, 0x03]),
        # 64 = bit 6 of code 1 = stream bit 13 = bit 5 of byte 1
        (7, [1, 64], [0x01, 0x20]),
        # 2 = 0b10 at bits 2-3 (bit 3 set); 3 at bits 4-5
        (2, [0, 2, 3, 1], [0b01111000]),
        (2, [1, 2], [0b00001001]),
        (6, [0x3F, 0x01], [0x7F, 0x00]),
        (8, [0x12, 0xFE], [0x12, 0xFE]),
    ],
    ids=[
        "b1-9codes",
        "b1-bit7",
        "b4-two",
        "b4-three",
        "b3-7-1-0",
        "b3-0-0-7",
        "b5-31-1",
        "b5-0-31",
        "b7-1-64",
        "b2-four",
        "b2-two",
        "b6-two",
        "b8-identity",
    ],
)
def test_hand_computed_bit_order(bits, codes, expected):
    codes = np.array([codes], dtype=np.uint8)
    packed = pack_codes(codes, bits)
    np.testing.assert_array_equal(packed, np.array([expected], dtype=np.uint8))
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.shape[1]), codes)


def test_rows_pack_independently():
    codes = np.array([[7, 1, 0], [0, 0, 7]], dtype=np.uint8)
    expected = np.array([[0x0F, 0x00], [0xC0, 0x01]], dtype=np.uint8)
    np.testing.assert_array_equal(pack_codes(codes, 3), expected)


@pytest.mark.parametrize("cols", [1, 3, 5, 7, 9, 13], ids=lambda c: f"c{c}")
@pytest.mark.parametrize("bits", list(range(1, 8)), ids=BIT_IDS[:7])
def test_padding_bits_are_zero(bits, cols):
    codes = np.full((3, cols), 2**bits - 1, dtype=np.uint8)  # every code bit set
    packed = pack_codes(codes, bits)
    used = cols * bits
    pad = packed.shape[1] * 8 - used
    assert 0 <= pad < 8
    # All bits of full bytes are set; in the last byte exactly the low (8 - pad) bits are.
    np.testing.assert_array_equal(packed[:, :-1], 0xFF)
    np.testing.assert_array_equal(packed[:, -1], (1 << (8 - pad)) - 1)


@pytest.mark.parametrize(
    ("cols", "bits", "width"),
    [(1, 1, 1), (8, 1, 1), (9, 1, 2), (3, 3, 2), (8, 3, 3), (7, 5, 5), (5, 8, 5), (0, 4, 0)],
)
def test_packed_width(cols, bits, width):
    assert packed_width(cols, bits) == width


@pytest.mark.parametrize("bits", [0, 9, -1, 16], ids=["b0", "b9", "b-1", "b16"])
def test_bits_out_of_range(bits):
    codes = np.zeros((2, 3), dtype=np.uint8)
    with pytest.raises(ParameterError, match=str(bits)):
        pack_codes(codes, bits)
    with pytest.raises(ParameterError, match=str(bits)):
        unpack_codes(np.zeros((2, 3), dtype=np.uint8), bits, 3)


@pytest.mark.parametrize("bits", [3, 8], ids=["b3", "b8"])
@pytest.mark.parametrize("n_cols", [20, 2], ids=["too-many", "too-few"])
def test_unpack_wrong_width_raises(bits, n_cols):
    # 9 codes pack into packed_width(9, bits) bytes per row (4 for 3 bits, 9 for 8 bits); asking
    # for a different number of codes must be refused for every width, 8 bits included.
    packed = pack_codes(np.zeros((2, 9), dtype=np.uint8), bits)
    assert packed.shape[1] == packed_width(9, bits) != packed_width(n_cols, bits)
    with pytest.raises(ParameterError):
        unpack_codes(packed, bits, n_cols)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    rows = draw(st.integers(0, 5))
    cols = draw(st.integers(0, 50))
    codes = draw(hnp.arrays(np.uint8, (rows, cols), elements=st.integers(0, 2**bits - 1)))
    return codes, bits


@settings(max_examples=300, deadline=None, database=None)
@given(codes_and_bits())
def test_property_roundtrip(case):
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert packed.shape == (codes.shape[0], packed_width(codes.shape[1], bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.shape[1]), codes)


# --------------------------------------------------------------------------------------------
# encode_float / decode_float
# --------------------------------------------------------------------------------------------


def special_float32_values():
    f32 = np.finfo(np.float32)
    rng = np.random.default_rng(5)
    parts = [
        rng.standard_normal(2000),
        rng.standard_normal(500) * 1e30,
        rng.standard_normal(500) * 1e-30,
        rng.standard_normal(200) * 6e4,  # around the float16 overflow threshold
        rng.standard_normal(200) * 1e-6,  # float16 subnormals
        [0.0, -0.0, np.inf, -np.inf, f32.max, -f32.max, f32.tiny, -f32.tiny],
        [f32.smallest_subnormal, -f32.smallest_subnormal, 1e-40, -1e-40, 3e-39, 1e-44],
        [65504.0, 65519.0, 65520.0, 1.0 + 2**-11, 1.0 + 3 * 2**-11],  # float16 ties / overflow
        [2.0**-24, 2.0**-25, 3 * 2.0**-26, 1.0 + 2**-8, 1.0 + 3 * 2**-8],
    ]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts]).astype(np.float32)


def assert_same_bits_or_both_nan(a_bits, b_bits, fmt):
    exp_mask, man_mask = (0x7C00, 0x03FF) if fmt == "float16" else (0x7F80, 0x007F)
    a_nan = ((a_bits & exp_mask) == exp_mask) & ((a_bits & man_mask) != 0)
    b_nan = ((b_bits & exp_mask) == exp_mask) & ((b_bits & man_mask) != 0)
    np.testing.assert_array_equal(a_nan, b_nan)
    np.testing.assert_array_equal(a_bits[~a_nan], b_bits[~b_nan])


def test_float16_encode_matches_numpy():
    x = special_float32_values()
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
        got = encode_float(x, "float16")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, expected)


def test_float16_decode_all_patterns():
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    got = decode_float(patterns, "float16")
    assert got.dtype == np.float32
    expected = patterns.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    ok = ~np.isnan(expected)
    # bit-exact, so that -0.0 and 0.0 are told apart
    np.testing.assert_array_equal(got[ok].view(np.uint32), expected[ok].view(np.uint32))


def test_float16_roundtrip_of_representable_values():
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = decode_float(patterns, "float16")
    assert_same_bits_or_both_nan(encode_float(values, "float16"), patterns, "float16")


def test_bfloat16_encode_matches_ml_dtypes():
    x = special_float32_values()
    got = encode_float(x, "bfloat16")
    assert got.dtype == np.uint16
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(got, expected)


def test_bfloat16_encode_all_rounding_cases():
    # Every upper half-word (every bfloat16 pattern, both signs, subnormals, inf) combined with
    # lower half-words just below, at and above the half-way point and at the extremes: this
    # covers round-down, round-up, ties to even (0x8000 with even and odd upper halves), and
    # carries into the exponent (0x7F7F_FFFF -> inf).
    upper = np.arange(2**16, dtype=np.uint32) << 16
    lower = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    x = (upper[:, None] | lower[None, :]).ravel().view(np.float32)
    x = x[~np.isnan(x)]
    got = encode_float(x, "bfloat16")
    expected = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0 + 2**-8, 0x3F80),  # tie, 0x3F80 is even: down
        (1.0 + 3 * 2**-8, 0x3F82),  # tie, 0x3F81 is odd: up to 0x3F82
        (1.0 + 2**-8 + 2**-20, 0x3F81),  # just above the tie: up
        (-(1.0 + 3 * 2**-8), 0xBF82),
        (float(np.finfo(np.float32).max), 0x7F80),  # rounds to +inf
        (-0.0, 0x8000),
    ],
    ids=["tie-even-down", "tie-odd-up", "above-tie", "neg-tie-up", "max-to-inf", "neg-zero"],
)
def test_bfloat16_hand_cases(value, expected):
    got = encode_float(np.array([value], dtype=np.float32), "bfloat16")
    assert int(got[0]) == expected


def test_bfloat16_decode_all_patterns():
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    got = decode_float(patterns, "bfloat16")
    assert got.dtype == np.float32
    expected = patterns.view(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    ok = ~np.isnan(expected)
    # bit-exact, so that -0.0 and 0.0 are told apart
    np.testing.assert_array_equal(got[ok].view(np.uint32), expected[ok].view(np.uint32))
    # decode then encode gives the same pattern back (except NaNs, which are canonicalised)
    assert_same_bits_or_both_nan(encode_float(got, "bfloat16"), patterns, "bfloat16")


def test_bfloat16_float64_input_representable_in_float32():
    # float64 inputs that are exact float32 values encode like their float32 counterparts.
    x32 = special_float32_values()
    np.testing.assert_array_equal(
        encode_float(x32.astype(np.float64), "bfloat16"), encode_float(x32, "bfloat16")
    )


def test_decode_dtype_argument():
    u = encode_float(np.array([1.5, -2.25], dtype=np.float32), "bfloat16")
    out = decode_float(u, "bfloat16", dtype=np.float64)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.5, -2.25])


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_nan_encodes_to_nan(fmt):
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], dtype=np.uint32)
    x = np.concatenate([np.array([np.nan, -np.nan], dtype=np.float32), nan_bits.view(np.float32)])
    u = encode_float(x, fmt)
    exp_mask, man_mask = (0x7C00, 0x03FF) if fmt == "float16" else (0x7F80, 0x007F)
    assert np.all((u & exp_mask) == exp_mask)
    assert np.all((u & man_mask) != 0)
    assert np.all(np.isnan(decode_float(u, fmt)))


@pytest.mark.parametrize("fmt", ["float8", "bf16", "FLOAT16"])
def test_unknown_float_format(fmt):
    with pytest.raises(ParameterError, match=fmt):
        encode_float(np.zeros(3, dtype=np.float32), fmt)
    with pytest.raises(ParameterError, match=fmt):
        decode_float(np.zeros(3, dtype=np.uint16), fmt)
