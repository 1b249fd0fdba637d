"""Unit tests of the per-block quantizer kernels in :mod:`lplr_dask.kernels.quantize`."""

from __future__ import annotations

import json
import warnings
from functools import reduce
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.quantize import (
    QuantizerSpec,
    block_range,
    dequantize,
    expand_range,
    merge_ranges,
    quantize,
)

BITS = list(range(1, 9))

# (granularity, group_size)
GRANULARITIES = [
    ("tensor", None),
    ("column", None),
    ("row", None),
    ("group", 8),
    ("group", 16),
    ("group", 64),
]
GRAN_IDS = [g if s is None else f"group{s}" for g, s in GRANULARITIES]

# 150 columns: 150 % 8 == 6, 150 % 16 == 6, 150 % 64 == 22, so every group size has a ragged
# last group. 37 < 64 columns: a single, partial group of 64.
SHAPES = [(13, 150), (5, 37)]
SHAPE_IDS = ["13x150", "5x37"]

F32_EPS = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def group_labels(shape, granularity, group_size):
    """Integer group id of every entry, computed without the package."""
    cols = shape[1]
    r, c = np.indices(shape)
    if granularity == "tensor":
        return np.zeros(shape, dtype=np.int64)
    if granularity == "column":
        return c
    if granularity == "row":
        return r
    n_groups = -(-cols // group_size)
    return r * n_groups + c // group_size


def reference_ranges(x, spec):
    """Per-entry (lo, hi) of the group of each entry, in float64, computed without the package."""
    labels = group_labels(x.shape, spec.granularity, spec.group_size).ravel()
    n = labels.max() + 1
    vals = x.astype(np.float64).ravel()
    gmin = np.full(n, np.inf)
    gmax = np.full(n, -np.inf)
    np.minimum.at(gmin, labels, vals)
    np.maximum.at(gmax, labels, vals)
    lo, hi = gmin[labels].reshape(x.shape), gmax[labels].reshape(x.shape)
    if spec.symmetric:
        hi = np.maximum(np.abs(lo), np.abs(hi))
        lo = -hi
    return lo, hi


def per_entry(r, shape, spec):
    """A range array of ``spec.range_shape`` broadcast to one value per entry (float64)."""
    return np.broadcast_to(expand_range(r, shape, spec=spec), shape).astype(np.float64)


def slack(lo, hi):
    # dequantize() returns float32: a reconstructed value carries a rounding error of at most
    # half a float32 ulp of its magnitude, i.e. <= eps32/2 * max(|lo|, |hi|). We allow twice
    # that, plus the brief's 1e-6 of the range for the float64 arithmetic of the step.
    return 1e-6 * (hi - lo) + F32_EPS * np.maximum(np.abs(lo), np.abs(hi))


def make_spec(bits, granularity, group_size, symmetric, rounding="nearest"):
    return QuantizerSpec(
        bits=bits,
        granularity=granularity,
        group_size=group_size,
        symmetric=symmetric,
        rounding=rounding,
    )


def paper_reference(x, bits):
    """Float64 transcription of the LPLR paper's reference quantizer (nearest, ties up).

    Returns (dequantized values, level indices).
    """
    x = x.astype(np.float64)
    mn, mx = x.min(), x.max()
    X = np.interp(x, [mn, mx], [-1.0, 1.0])
    res = 2.0 / (2**bits - 1)
    L_idx = np.floor((X + 1) / res)
    L = -1 + L_idx * res
    U = L + res
    out = np.zeros_like(X)
    take_lower = np.abs(X - L) <= res / 2
    out[take_lower] = L[take_lower]
    take_upper = np.abs(U - X) <= res / 2  # applied second, so exact ties go up
    out[take_upper] = U[take_upper]
    values = np.interp(out, [-1.0, 1.0], [mn, mx])
    levels = np.rint((out + 1) / res).astype(np.int64)
    return values, levels


# --------------------------------------------------------------------------------------------
# Nearest rounding: every bit width, granularity and symmetry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES, ids=GRAN_IDS)
@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def test_nearest_roundtrip_properties(bits, granularity, group_size, symmetric, shape):
    spec = make_spec(bits, granularity, group_size, symmetric)
    rng = np.random.default_rng(1000 * bits + len(granularity) + (group_size or 0))
    # Per-row and per-column scales, so that different groups have clearly different ranges.
    x = (
        rng.standard_normal(shape)
        * rng.uniform(0.1, 10.0, size=(shape[0], 1))
        * rng.uniform(0.5, 2.0, size=(1, shape[1]))
        + rng.uniform(-1.0, 1.0, size=(shape[0], 1))
    ).astype(np.float32)

    lo, hi = block_range(x, spec=spec)
    assert lo.shape == hi.shape == spec.range_shape(shape)
    assert lo.dtype == hi.dtype == np.float32
    lo_e, hi_e = per_entry(lo, shape, spec), per_entry(hi, shape, spec)
    ref_lo, ref_hi = reference_ranges(x, spec)
    # min, max and abs of float32 data are exact, so the ranges match the reference exactly.
    np.testing.assert_array_equal(lo_e, ref_lo)
    np.testing.assert_array_equal(hi_e, ref_hi)

    codes = quantize(x, lo, hi, spec=spec)
    assert codes.dtype == np.uint8
    assert codes.shape == shape
    assert int(codes.max()) < 2**bits

    deq = dequantize(codes, lo, hi, spec=spec)
    assert deq.dtype == np.float32
    assert deq.shape == shape
    # lo and hi are float32 and float rounding is monotone, so no tolerance is needed here.
    assert np.all(deq >= lo_e)
    assert np.all(deq <= hi_e)

    step = (hi_e - lo_e) / (2**bits - 1)
    err = np.abs(x.astype(np.float64) - deq.astype(np.float64))
    assert np.all(err <= step / 2 + slack(lo_e, hi_e))

    # Idempotence: the levels are fixed points of the quantizer.
    np.testing.assert_array_equal(quantize(deq, lo, hi, spec=spec), codes)

    # The extremes of every group are levels and come back exactly.
    if symmetric:
        extreme = np.abs(x.astype(np.float64)) == hi_e
    else:
        extreme = (x == lo_e) | (x == hi_e)
    assert extreme.any()
    np.testing.assert_array_equal(deq[extreme], x[extreme])


@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def test_symmetric_negative_extreme_is_exact(bits):
    # The symmetric range is [-max|x|, max|x|]; when the extreme is negative it must still
    # come back exactly (it is the level lo).
    x = np.array([[-3.0, 0.5, 1.0, -0.25]], dtype=np.float32)
    spec = make_spec(bits, "tensor", None, True)
    lo, hi = block_range(x, spec=spec)
    assert float(hi[0, 0]) == 3.0 and float(lo[0, 0]) == -3.0
    codes = quantize(x, lo, hi, spec=spec)
    assert codes[0, 0] == 0
    assert dequantize(codes, lo, hi, spec=spec)[0, 0] == np.float32(-3.0)


@pytest.mark.parametrize("lo_value", [-1.0, -3.7, -123.456], ids=["lo-1", "lo-3.7", "lo-123.456"])
@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def test_asymmetric_zero_max_is_exact(bits, lo_value):
    # Non-positive data whose maximum is exactly 0: hi = 0 is a level (the top one) and must
    # come back as 0, inside [lo, hi]. (dequantize computes lo + k * (hi - lo) / (2^B - 1) in
    # float64; for some (lo, B) the top level lands a few float64 ulps of |lo| away from 0.)
    x = np.array([[lo_value, 0.0, lo_value / 2]], dtype=np.float32)
    spec = make_spec(bits, "tensor", None, False)
    lo, hi = block_range(x, spec=spec)
    assert float(hi[0, 0]) == 0.0
    codes = quantize(x, lo, hi, spec=spec)
    assert codes[0, 1] == 2**bits - 1
    deq = dequantize(codes, lo, hi, spec=spec)
    assert deq[0, 1] <= hi[0, 0]
    assert deq[0, 1] == 0.0
    assert deq[0, 0] == x[0, 0]


@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def test_ties_go_up(bits):
    # A value exactly half-way between two levels takes the upper one (as in the paper's code).
    # With lo = 0 and hi = 2^B - 1 the levels are the integers, so k + 0.5 is an exact tie.
    levels = 2**bits
    x = np.array([[0.0, levels - 1.0] + [k + 0.5 for k in range(levels - 1)]], dtype=np.float32)
    spec = make_spec(bits, "tensor", None, False)
    lo, hi = block_range(x, spec=spec)
    codes = quantize(x, lo, hi, spec=spec)
    np.testing.assert_array_equal(codes[0, 2:], np.arange(1, levels))


# --------------------------------------------------------------------------------------------
# Constant groups and all-zero matrices
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES, ids=GRAN_IDS)
@pytest.mark.parametrize("bits", [1, 4, 8], ids=["b1", "b4", "b8"])
def test_all_zero_matrix(bits, granularity, group_size, symmetric):
    spec = make_spec(bits, granularity, group_size, symmetric)
    x = np.zeros((6, 70), dtype=np.float32)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        lo, hi = block_range(x, spec=spec)
        codes = quantize(x, lo, hi, spec=spec)
        deq = dequantize(codes, lo, hi, spec=spec)
    np.testing.assert_array_equal(codes, 0)
    np.testing.assert_array_equal(deq, 0.0)
    assert not np.isnan(deq).any()


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES, ids=GRAN_IDS)
@pytest.mark.parametrize("bits", [1, 3, 8], ids=["b1", "b3", "b8"])
def test_constant_groups_asymmetric(bits, granularity, group_size):
    # Each group is constant (a different nonzero constant per group), so every step is 0:
    # code 0, and the value comes back exactly.
    shape = (6, 70)
    labels = group_labels(shape, granularity, group_size)
    x = (1.5 - 0.75 * labels + 0.125 * (labels % 3)).astype(np.float32)
    spec = make_spec(bits, granularity, group_size, False)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        lo, hi = block_range(x, spec=spec)
        np.testing.assert_array_equal(lo, hi)  # step 0 in every group
        codes = quantize(x, lo, hi, spec=spec)
        deq = dequantize(codes, lo, hi, spec=spec)
    np.testing.assert_array_equal(codes, 0)
    np.testing.assert_array_equal(deq, x)
    assert not np.isnan(deq).any()


@pytest.mark.parametrize("bits", [1, 3, 8], ids=["b1", "b3", "b8"])
def test_constant_groups_mixed_with_varying_groups(bits):
    # Column granularity, some columns constant (step 0), others not: the constant columns get
    # code 0 and come back exactly, the others are quantized normally.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((9, 12)).astype(np.float32)
    x[:, 0] = 2.5
    x[:, 5] = -1.25
    x[:, 11] = 0.0
    spec = make_spec(bits, "column", None, False)
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        lo, hi = block_range(x, spec=spec)
        codes = quantize(x, lo, hi, spec=spec)
        deq = dequantize(codes, lo, hi, spec=spec)
    for j in (0, 5, 11):
        np.testing.assert_array_equal(codes[:, j], 0)
        np.testing.assert_array_equal(deq[:, j], x[:, j])
    assert codes[:, 1].max() > 0


@pytest.mark.parametrize("bits", [1, 3, 8], ids=["b1", "b3", "b8"])
@pytest.mark.parametrize("value", [2.5, -0.75], ids=["pos", "neg"])
def test_constant_nonzero_symmetric_is_exact(bits, value):
    # Symmetric range of a constant c != 0 is [-|c|, |c|] (step > 0); c is an endpoint level.
    x = np.full((4, 10), value, dtype=np.float32)
    spec = make_spec(bits, "tensor", None, True)
    lo, hi = block_range(x, spec=spec)
    codes = quantize(x, lo, hi, spec=spec)
    np.testing.assert_array_equal(dequantize(codes, lo, hi, spec=spec), x)


# --------------------------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------------------------


def tile_range(r, n):
    """Repeat per-row ranges for a block made of ``n`` stacked copies."""
    return r if r.shape[0] == 1 else np.tile(r, (n, 1))


@pytest.mark.parametrize(
    ("bits", "granularity", "group_size", "symmetric"),
    [
        (1, "tensor", None, False),
        (2, "column", None, True),
        (3, "row", None, False),
        (4, "group", 8, True),
        (8, "group", 16, False),
    ],
    ids=["b1-tensor-asym", "b2-column-sym", "b3-row-asym", "b4-group8-sym", "b8-group16-asym"],
)
def test_stochastic_rounding_is_unbiased(bits, granularity, group_size, symmetric):
    spec = make_spec(bits, granularity, group_size, symmetric, rounding="stochastic")
    rows, cols = 4, 20  # 20 columns: ragged last group for group_size 8 and 16
    n_draws = 4000
    x = np.random.default_rng(11).standard_normal((rows, cols)).astype(np.float32)
    lo, hi = block_range(x, spec=spec)
    # n_draws independent dithers of the same block, drawn in one call on a stacked block
    # (each entry of the stack gets its own uniform).
    stacked = np.tile(x, (n_draws, 1))
    lo_s, hi_s = tile_range(lo, n_draws), tile_range(hi, n_draws)
    codes = quantize(stacked, lo_s, hi_s, spec=spec, rng=np.random.default_rng(12))
    deq = dequantize(codes, lo_s, hi_s, spec=spec).astype(np.float64)

    lo_e, hi_e = per_entry(lo, x.shape, spec), per_entry(hi, x.shape, spec)
    step = (hi_e - lo_e) / (2**bits - 1)
    deq_e_lo = np.tile(lo_e, (n_draws, 1))
    step_s = np.tile(step, (n_draws, 1))
    # Every draw is one of the two levels around x.
    assert np.all(np.abs(deq - stacked) <= step_s + np.tile(slack(lo_e, hi_e), (n_draws, 1)))
    assert np.all(deq >= deq_e_lo)

    mean = deq.reshape(n_draws, rows, cols).mean(axis=0)
    # A draw is lower or upper level with probabilities (1-p, p): variance step^2 p(1-p) <=
    # step^2/4, so the standard error of the mean of n_draws draws is <= step / (2 sqrt(N)).
    # Five standard errors (two-sided Gaussian tail ~6e-7 per entry, and the seed is fixed),
    # plus the float32 rounding slack of each dequantized value.
    tol = 5 * step / (2 * np.sqrt(n_draws)) + slack(lo_e, hi_e)
    assert np.all(np.abs(mean - x) <= tol)


def test_stochastic_same_seed_same_codes():
    spec = make_spec(4, "column", None, False, rounding="stochastic")
    x = np.random.default_rng(3).standard_normal((30, 17)).astype(np.float32)
    lo, hi = block_range(x, spec=spec)
    a = quantize(x, lo, hi, spec=spec, rng=np.random.default_rng(99))
    b = quantize(x, lo, hi, spec=spec, rng=np.random.default_rng(99))
    c = quantize(x, lo, hi, spec=spec, rng=np.random.default_rng(100))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_stochastic_without_rng_raises():
    spec = make_spec(4, "tensor", None, True, rounding="stochastic")
    x = np.ones((2, 3), dtype=np.float32)
    lo, hi = block_range(x, spec=spec)
    with pytest.raises(ParameterError, match="rng"):
        quantize(x, lo, hi, spec=spec)


def test_quantize_rejects_float_passthrough():
    spec = QuantizerSpec(bits=16)
    x = np.ones((2, 3), dtype=np.float32)
    lo = hi = np.ones((1, 1), dtype=np.float32)
    with pytest.raises(ParameterError):
        quantize(x, lo, hi, spec=spec)


# --------------------------------------------------------------------------------------------
# The paper's reference quantizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("bits", BITS, ids=[f"b{b}" for b in BITS])
def test_paper_quantizer_matches_reference(bits, dist):
    rng = np.random.default_rng(500 + bits)
    shape = (64, 48)
    if dist == "normal":
        x = rng.standard_normal(shape).astype(np.float32)
    else:
        x = rng.uniform(-0.3, 2.0, size=shape).astype(np.float32)
    spec = QuantizerSpec.paper(bits)
    assert (spec.granularity, spec.symmetric, spec.rounding) == ("tensor", False, "nearest")

    lo, hi = block_range(x, spec=spec)
    codes = quantize(x, lo, hi, spec=spec)
    deq = dequantize(codes, lo, hi, spec=spec)

    ref_values, ref_levels = paper_reference(x, bits)
    # Code for code: the level index of every entry is the same.
    np.testing.assert_array_equal(codes.astype(np.int64), ref_levels)
    # rtol 1e-6: deq is float32 (relative rounding <= 6e-8). The atol (1e-12 of the range)
    # only covers a level that is 0 in one computation and ~1e-16 in the other.
    atol = 1e-12 * float(x.max() - x.min())
    np.testing.assert_allclose(deq, ref_values, rtol=1e-6, atol=atol)


# --------------------------------------------------------------------------------------------
# QuantizerSpec validation and bookkeeping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"bits": 0}, "0"),
        ({"bits": 9}, "9"),
        ({"bits": 17}, "17"),
        ({"bits": -1}, "-1"),
        ({"bits": True}, "True"),
        ({"bits": 2.5}, "2.5"),
        ({"bits": "4"}, "'4'"),
        ({"granularity": "group"}, "None"),
        ({"granularity": "group", "group_size": 12}, "12"),
        ({"granularity": "group", "group_size": 0}, "0"),
        ({"granularity": "group", "group_size": -8}, "-8"),
        ({"granularity": "group", "group_size": 16.0}, "16.0"),
        ({"granularity": "column", "group_size": 64}, "64"),
        ({"granularity": "tensor", "group_size": 8}, "8"),
        ({"rounding": "truncate"}, "truncate"),
        ({"granularity": "block"}, "block"),
        ({"float_format": "float8"}, "float8"),
    ],
    ids=[
        "bits0",
        "bits9",
        "bits17",
        "bits-neg",
        "bits-bool",
        "bits-float",
        "bits-str",
        "group-no-size",
        "group-size12",
        "group-size0",
        "group-size-neg",
        "group-size-float",
        "column-with-size",
        "tensor-with-size",
        "bad-rounding",
        "bad-granularity",
        "bad-float-format",
    ],
)
def test_spec_validation(kwargs, needle):
    with pytest.raises(ParameterError) as excinfo:
        QuantizerSpec(**kwargs)
    assert needle in str(excinfo.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 8},
        {"bits": 16},
        {"bits": np.int64(4)},
        {"granularity": "group", "group_size": 8},
        {"granularity": "group", "group_size": 128},
        {"bits": 16, "float_format": "bfloat16"},
        {"rounding": "stochastic", "symmetric": False},
    ],
    ids=["b1", "b8", "b16", "np-int", "group8", "group128", "bf16", "stochastic"],
)
def test_spec_valid(kwargs):
    QuantizerSpec(**kwargs)


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        # 10 rows * ceil(7*4/8)=4 bytes + one float32
        (QuantizerSpec(bits=4), (10, 7), 10 * 4 + 4),
        # 5 * ceil(33/8)=5 bytes + 11 columns * (lo, hi) float32
        (QuantizerSpec(bits=3, granularity="column", symmetric=False), (5, 11), 25 + 4 * 22),
        # 6 * 4 bytes + 6 rows * one float32
        (QuantizerSpec(bits=2, granularity="row"), (6, 16), 24 + 24),
        # 3 * ceil(520/8)=65 bytes + 3 rows * 3 groups * (lo, hi) float32
        (
            QuantizerSpec(bits=4, granularity="group", group_size=64, symmetric=False),
            (3, 130),
            195 + 4 * 18,
        ),
        # 2 * 8 bytes + 2 rows * 1 group * one float32
        (QuantizerSpec(bits=8, granularity="group", group_size=8), (2, 8), 16 + 8),
        # 1 * ceil(9/8)=2 bytes + (lo, hi)
        (QuantizerSpec(bits=1, symmetric=False), (1, 9), 2 + 8),
        # float passthrough: 2 bytes per entry, no ranges
        (QuantizerSpec(bits=16), (4, 5), 40),
    ],
    ids=["b4-tensor", "b3-column-asym", "b2-row", "b4-group64-asym", "b8-group8", "b1", "f16"],
)
def test_nbytes(spec, shape, expected):
    assert spec.nbytes(shape) == expected


@pytest.mark.parametrize(
    ("spec", "shape", "expected"),
    [
        (QuantizerSpec(granularity="tensor"), (7, 9), (1, 1)),
        (QuantizerSpec(granularity="column"), (7, 9), (1, 9)),
        (QuantizerSpec(granularity="row"), (7, 9), (7, 1)),
        (QuantizerSpec(granularity="group", group_size=64), (7, 130), (7, 3)),
        (QuantizerSpec(granularity="group", group_size=16), (7, 16), (7, 1)),
        (QuantizerSpec(granularity="group", group_size=8), (7, 7), (7, 1)),
        (QuantizerSpec(granularity="group", group_size=8), (2, 17), (2, 3)),
    ],
    ids=["tensor", "column", "row", "group64-ragged", "group16-exact", "group8-short", "g8-17"],
)
def test_range_shape(spec, shape, expected):
    assert spec.range_shape(shape) == expected


@pytest.mark.parametrize(
    "spec",
    [
        QuantizerSpec(),
        QuantizerSpec.paper(3),
        QuantizerSpec(bits=2, granularity="group", group_size=64, rounding="stochastic"),
        QuantizerSpec(bits=16, float_format="bfloat16"),
    ],
    ids=["default", "paper3", "group-stochastic", "bf16"],
)
def test_spec_dict_roundtrip(spec):
    d = spec.to_dict()
    assert QuantizerSpec.from_dict(d) == spec
    # The dict is plain JSON (it is stored in metadata).
    assert QuantizerSpec.from_dict(json.loads(json.dumps(d))) == spec


# --------------------------------------------------------------------------------------------
# merge_ranges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", ["tensor", "column"])
def test_merge_ranges_over_row_blocks(granularity, symmetric):
    spec = make_spec(4, granularity, None, symmetric)
    x = np.random.default_rng(21).standard_normal((23, 11)).astype(np.float32)
    x[17, 3] = 9.0  # the extremes sit in different blocks
    x[2, 5] = -7.0
    bounds = [0, 3, 10, 11, 23]
    parts = [block_range(x[a:b], spec=spec) for a, b in pairwise(bounds)]
    lo, hi = reduce(merge_ranges, parts)
    whole_lo, whole_hi = block_range(x, spec=spec)
    np.testing.assert_array_equal(lo, whole_lo)
    np.testing.assert_array_equal(hi, whole_hi)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_merge_ranges_row_granularity_over_column_blocks(symmetric):
    spec = make_spec(4, "row", None, symmetric)
    x = np.random.default_rng(22).standard_normal((6, 30)).astype(np.float32)
    parts = [block_range(x[:, a:b], spec=spec) for a, b in [(0, 7), (7, 8), (8, 30)]]
    lo, hi = reduce(merge_ranges, parts)
    whole_lo, whole_hi = block_range(x, spec=spec)
    np.testing.assert_array_equal(lo, whole_lo)
    np.testing.assert_array_equal(hi, whole_hi)


# --------------------------------------------------------------------------------------------
# Hypothesis property
# --------------------------------------------------------------------------------------------


@st.composite
def matrices_and_specs(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 40))
    x = draw(
        hnp.arrays(
            np.float32,
            (rows, cols),
            elements=st.floats(
                -1e4, 1e4, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False
            ),
        )
    )
    granularity = draw(st.sampled_from(["tensor", "column", "row", "group"]))
    group_size = draw(st.sampled_from([8, 16, 64])) if granularity == "group" else None
    spec = QuantizerSpec(
        bits=draw(st.integers(1, 8)),
        granularity=granularity,
        group_size=group_size,
        symmetric=draw(st.booleans()),
    )
    return x, spec


@settings(max_examples=300, deadline=None, database=None)
@given(matrices_and_specs())
def test_property_error_at_most_half_step(case):
    x, spec = case
    lo, hi = block_range(x, spec=spec)
    codes = quantize(x, lo, hi, spec=spec)
    assert codes.dtype == np.uint8 and int(codes.max()) < spec.levels
    deq = dequantize(codes, lo, hi, spec=spec)
    lo_e, hi_e = per_entry(lo, x.shape, spec), per_entry(hi, x.shape, spec)
    step = (hi_e - lo_e) / (spec.levels - 1)
    err = np.abs(x.astype(np.float64) - deq.astype(np.float64))
    assert np.all(err <= step / 2 + slack(lo_e, hi_e))


@pytest.mark.parametrize("granularity", ["tensor", "column", "row", "group"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_row_slabs_change_no_code_and_no_value(monkeypatch, granularity, rounding):
    """Large blocks are (de)quantized in row slabs to bound the float64 temporaries; the codes
    and values must equal the one-piece computation (dither drawn in the same order)."""
    from lplr_dask.kernels import quantize as qmod

    group = {"group_size": 16} if granularity == "group" else {}
    spec = QuantizerSpec(bits=3, granularity=granularity, rounding=rounding, **group)
    x = np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)
    lo, hi = block_range(x, spec=spec)
    whole = qmod._quantize_slab(x, lo, hi, spec=spec, rng=np.random.default_rng(7))
    values = dequantize(whole, lo, hi, spec=spec)
    from lplr_dask.kernels import spec as smod

    monkeypatch.setattr(smod, "SLAB_ENTRIES", 7 * 40)  # slabs of 7 rows: 8 slabs, last short
    assert len(smod.row_slabs(50, 40)) == 8
    sliced = quantize(x, lo, hi, spec=spec, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(sliced, whole)
    np.testing.assert_array_equal(dequantize(sliced, lo, hi, spec=spec), values)
