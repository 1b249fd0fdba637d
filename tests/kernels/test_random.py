"""Unit tests of the seeded streams in :mod:`lplr_dask.kernels.random` and of
:mod:`lplr_dask.kernels.linalg`."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from lplr_dask.kernels.linalg import gram_pinv, sparse_rows_product
from lplr_dask.kernels.random import (
    SEED_BLOCK,
    STREAM_DITHER_LEFT,
    STREAM_DITHER_MATRIX,
    STREAM_DITHER_RIGHT,
    STREAM_SKETCH,
    block_generator,
    sketch_rows,
    sparse_sign_rows,
)

# --------------------------------------------------------------------------------------------
# sketch_rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_sketch_shape_and_dtype(dtype):
    s = sketch_rows(3, 100, 2500, 12, dtype=dtype)
    assert s.shape == (2400, 12)
    assert s.dtype == dtype
    assert s.flags.c_contiguous
    assert np.all(np.isfinite(s))


def test_sketch_default_dtype_and_float64_values():
    s32 = sketch_rows(3, 10, 50, 6)
    assert s32.dtype == np.float32
    # The float64 variant holds the same (float32-generated) numbers.
    np.testing.assert_array_equal(sketch_rows(3, 10, 50, 6, dtype=np.float64), s32)


@pytest.mark.parametrize(
    ("start", "stop"),
    [(0, 10), (1000, 3100), (1023, 1025), (2047, 4097), (1024, 2048), (4999, 5000), (0, 5000)],
    ids=["head", "unaligned", "straddle-1024", "straddle-3-blocks", "aligned", "one-row", "all"],
)
def test_sketch_deterministic(start, stop):
    a = sketch_rows(17, start, stop, 8)
    b = sketch_rows(17, start, stop, 8)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("start", "stop"),
    [
        (1000, 3100),
        (0, 1024),
        (1024, 2048),
        (1023, 1025),
        (1, 2),
        (2047, 4097),
        (3000, 3001),
        (4096, 5000),
        (17, 4999),
    ],
    ids=[
        "unaligned",
        "first-block",
        "second-block",
        "straddle-1024",
        "one-row-head",
        "straddle-3-blocks",
        "one-row",
        "aligned-start",
        "wide",
    ],
)
@pytest.mark.parametrize("m", [1, 8], ids=["m1", "m8"])
def test_sketch_ranges_agree(start, stop, m):
    # Any row range is cut from the same seed blocks, whatever range asks for it.
    assert SEED_BLOCK == 1024  # the ids above assume it
    whole = sketch_rows(5, 0, 5000, m)
    np.testing.assert_array_equal(sketch_rows(5, start, stop, m), whole[start:stop])


def test_sketch_tiles_concatenate_to_whole():
    whole = sketch_rows(6, 0, 3000, 4)
    bounds = [0, 1, 700, 1024, 1500, 2049, 3000]
    tiles = [sketch_rows(6, a, b, 4) for a, b in pairwise(bounds)]
    np.testing.assert_array_equal(np.concatenate(tiles, axis=0), whole)


@pytest.mark.parametrize("start", [0, 5, 1024, 2048], ids=["a0", "a5", "a1024", "a2048"])
def test_sketch_empty_range(start):
    # An empty row range has shape (0, m), wherever it starts.
    s = sketch_rows(1, start, start, 4)
    assert s.shape == (0, 4)
    assert s.dtype == np.float32


@pytest.mark.parametrize("k", [1, 2, 5, 15], ids=lambda k: f"k{k}")
def test_sketch_prefix_property(k):
    m = 16
    a, b = 1000, 3100
    small = sketch_rows(9, a, b, k).astype(np.float64) * np.sqrt(k)
    big = sketch_rows(9, a, b, m)[:, :k].astype(np.float64) * np.sqrt(m)
    # Both are the same float32 standard normals, each scaled by a float32 1/sqrt(.) and back:
    # two float32 roundings, relative error <= ~2.4e-7, so rtol 1e-6.
    np.testing.assert_allclose(small, big, rtol=1e-6)


def test_sketch_different_seeds_differ():
    a = sketch_rows(0, 0, 2000, 8)
    b = sketch_rows(1, 0, 2000, 8)
    assert not np.any(a == b)  # continuous values: no coincidences expected among 16000


def test_sketch_columns_differ():
    s = sketch_rows(0, 0, 2000, 8)
    assert not np.any(s[:, :1] == s[:, 1:])


def test_sketch_variance_is_one_over_m():
    m = 8
    s = sketch_rows(123, 0, 40_000, m).astype(np.float64)
    n = s.size  # 320,000 draws
    # Entries are i.i.d. N(0, 1/m). The sample variance of n normal draws has relative standard
    # error sqrt(2/n) (~0.25% here); allow five standard errors.
    rel_se = np.sqrt(2.0 / n)
    assert abs(s.var() * m - 1.0) <= 5 * rel_se
    # The mean has standard error sqrt(1/(m n)); allow five.
    assert abs(s.mean()) <= 5 * np.sqrt(1.0 / (m * n))
    # Each column on its own has variance 1/m too (n/m draws each).
    col_rel_se = np.sqrt(2.0 / s.shape[0])
    assert np.all(np.abs(s.var(axis=0) * m - 1.0) <= 5 * col_rel_se)


def test_sketch_does_not_touch_global_state():
    np.random.seed(123)  # noqa: NPY002 - the point is to check the legacy global state
    before = np.random.get_state()  # noqa: NPY002
    sketch_rows(7, 100, 3000, 5)
    block_generator(7, STREAM_SKETCH, 0).standard_normal(10)
    after = np.random.get_state()  # noqa: NPY002
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2:] == after[2:]


# --------------------------------------------------------------------------------------------
# block_generator
# --------------------------------------------------------------------------------------------


def test_block_generator_same_key_same_numbers():
    a = block_generator(42, STREAM_DITHER_LEFT, 3, 4).random(100)
    b = block_generator(42, STREAM_DITHER_LEFT, 3, 4).random(100)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "other",
    [
        (43, STREAM_DITHER_LEFT, 3, 4),
        (42, STREAM_DITHER_RIGHT, 3, 4),
        (42, STREAM_DITHER_LEFT, 4, 3),
        (42, STREAM_DITHER_LEFT, 3, 5),
        (42, STREAM_DITHER_LEFT, 3),
        (42, STREAM_DITHER_LEFT, 3, 4, 0),
    ],
    ids=["seed", "stream", "swapped-key", "key", "shorter-key", "longer-key"],
)
def test_block_generator_different_keys_differ(other):
    a = block_generator(42, STREAM_DITHER_LEFT, 3, 4).random(100)
    b = block_generator(*other).random(100)
    assert not np.any(a == b)


def test_block_generator_returns_generator():
    assert isinstance(block_generator(0, STREAM_SKETCH), np.random.Generator)


# --------------------------------------------------------------------------------------------
# linalg.gram_pinv
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_pinv_full_rank_matches_lstsq(seed):
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((200, 10))
    A = rng.standard_normal((200, 7))
    R = gram_pinv(L.T @ L) @ (L.T @ A)
    expected = np.linalg.lstsq(L, A, rcond=None)[0]
    # Normal equations lose accuracy like cond(L)^2 * eps; a Gaussian 200x10 L has cond ~ 1.6,
    # so the error is ~1e-15 and 1e-8 is a wide margin.
    np.testing.assert_allclose(R, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gram_pinv_duplicate_columns_min_norm(seed):
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((200, 10))
    L[:, 7] = L[:, 2]  # two identical columns: rank 9
    A = rng.standard_normal((200, 7))
    R = gram_pinv(L.T @ L) @ (L.T @ A)
    assert not np.isnan(R).any()
    expected = np.linalg.pinv(L) @ A
    # The minimum-norm solution splits the weight of the duplicated column evenly; the other
    # singular values are well conditioned (see above), so 1e-8 is a wide margin.
    np.testing.assert_allclose(R, expected, rtol=0, atol=1e-8)
    np.testing.assert_allclose(R[2], R[7], rtol=0, atol=1e-8)


def test_gram_pinv_symmetric_result_and_dtype():
    rng = np.random.default_rng(4)
    L = rng.standard_normal((50, 6)).astype(np.float32)
    P = gram_pinv(L.T @ L)
    assert P.dtype == np.float64
    np.testing.assert_allclose(P, P.T, rtol=0, atol=1e-12)
    G = (L.T @ L).astype(np.float64)
    # float32 Gram (relative rounding ~6e-8, condition ~ a few) -> P G = I to ~1e-6.
    np.testing.assert_allclose(P @ G, np.eye(6), rtol=0, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-3, 1e-9], ids=["invertible", "cut"])
def test_gram_pinv_takes_the_inverse_only_when_nothing_is_cut(eps):
    """Column 7 is column 2 plus ``eps`` of noise: G's condition is about 1/eps². At 1e-3
    (1e6) no eigenvalue is below the cutoff m·eps(float64)·λ_max, the fast inverse is taken
    and must equal the eigendecomposition's G⁻¹; at 1e-9 (1e18) one is cut, and the result
    must be the truncated pseudo-inverse (the inverse would be 1e18 times too large there)."""
    rng = np.random.default_rng(5)
    L = rng.standard_normal((200, 10))
    L[:, 7] = L[:, 2] + eps * rng.standard_normal(200)
    G = L.T @ L
    w, v = np.linalg.eigh(G)
    keep = w > 10 * np.finfo(np.float64).eps * w.max()
    expected = (v[:, keep] / w[keep]) @ v[:, keep].T
    assert keep.all() == (eps == 1e-3)
    # Both agree to the rounding of a solve with condition 1e6 (~1e-10 relative).
    np.testing.assert_allclose(gram_pinv(G), expected, rtol=0, atol=1e-8 * np.abs(expected).max())


def test_gram_pinv_zero_matrix():
    P = gram_pinv(np.zeros((4, 4)))
    assert not np.isnan(P).any()
    np.testing.assert_array_equal(P, 0.0)


# --------------------------------------------------------------------------------------------
# golden digests: the seed contract across versions
# --------------------------------------------------------------------------------------------
# Recorded with lplr-dask 0.1.0 (numpy 2.4.6). The same seed must give the same sketch and
# dither in every later version, on every machine (NumPy's PCG64 and its Gaussian are
# platform-independent): stored results are reproducible from
# their recorded seed, and a resumed job must regenerate exactly what an earlier run drew. A
# change here is a breaking change of the format's seed contract, not a test to update.


def _digest(x) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:32]


def test_golden_sketch_streams():
    # rows 1000:2100 straddle two seed blocks
    assert _digest(sketch_rows(7, 1000, 2100, 24)) == "2c0af7ee87ad7bf6f83dcec5c3450681"
    assert _digest(sketch_rows(7, 0, 300, 16, dtype=np.float64)) == (
        "ae802df68d12075095637e3f8ebd680d"
    )


@pytest.mark.parametrize(
    "stream, golden",
    [
        (STREAM_DITHER_LEFT, "ad0bebc2458c029ddcc11395c2c86ca3"),
        (STREAM_DITHER_RIGHT, "3eb54d5e96d1c5717b0fbc5299bac5f7"),
        (STREAM_DITHER_MATRIX, "0c51a28a4acaf1032e40fccb2ac3e092"),
    ],
)
def test_golden_dither_streams(stream, golden):
    """Stochastic rounding of a fixed block with the dither of block 2 of each stream."""
    from lplr_dask.kernels.quantize import QuantizerSpec, block_range, quantize

    x = np.linspace(-1, 1, 64 * 48, dtype=np.float32).reshape(64, 48)
    spec = QuantizerSpec(bits=3, granularity="tensor", rounding="stochastic")
    lo, hi = block_range(x, spec=spec)
    codes = quantize(x, lo, hi, spec=spec, rng=block_generator(7, stream, 2))
    assert _digest(codes) == golden


def test_golden_lplr_svd_mix_stream():
    # (The basis rotation is a QR of such a draw: LAPACK's rounding may differ by machine, so
    # only its stream is pinned.)
    from lplr_dask.kernels.random import STREAM_LPLR_SVD_MIX

    mix = block_generator(7, STREAM_LPLR_SVD_MIX).standard_normal((8, 8))
    assert _digest(mix) == "449eac25b53e37b427367a8a39ebbeaf"


# --------------------------------------------------------------------------------------------
# sparse_sign_rows and its product
# --------------------------------------------------------------------------------------------


def _dense(columns, values, n_cols):
    psi_t = np.zeros((columns.shape[0], n_cols), dtype=np.float64)
    np.put_along_axis(psi_t, columns, values.astype(np.float64), axis=1)
    return psi_t


@pytest.mark.parametrize("n_cols, nnz", [(1025, 8), (9, 8), (5, 8), (40, 1)])
def test_sparse_sign_rows_are_distinct_signs(n_cols, nnz):
    cols, vals = sparse_sign_rows(5, 1000, 3100, n_cols, nnz=nnz)
    k = min(nnz, n_cols)
    assert cols.shape == vals.shape == (2100, k)
    assert vals.dtype == np.float32
    assert np.all(np.diff(cols, axis=1) > 0)  # distinct and sorted within each row
    assert cols.min() >= 0 and cols.max() < n_cols
    np.testing.assert_array_equal(np.abs(vals), np.float32(1 / np.sqrt(k)))
    # every column of Ψᵀ (row of Ψ) is used about equally, signs are fair: ±5 σ
    counts = np.bincount(cols.ravel(), minlength=n_cols)
    mean = 2100 * k / n_cols
    assert np.all(np.abs(counts - mean) < 5 * np.sqrt(mean) + 1)
    plus = np.mean(vals > 0)
    assert abs(plus - 0.5) < 5 * 0.5 / np.sqrt(vals.size)


@pytest.mark.parametrize(
    ("start", "stop"), [(0, 10), (1000, 3100), (1023, 1025), (2047, 4097), (4999, 5000)]
)
def test_sparse_sign_rows_do_not_depend_on_who_asks(start, stop):
    whole = sparse_sign_rows(17, 0, 5000, 300, nnz=8)
    part = sparse_sign_rows(17, start, stop, 300, nnz=8)
    np.testing.assert_array_equal(part[0], whole[0][start:stop])
    np.testing.assert_array_equal(part[1], whole[1][start:stop])
    other = sparse_sign_rows(18, 0, 5000, 300, nnz=8)
    assert not np.array_equal(other[0], whole[0])


def test_sparse_rows_product_is_the_dense_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 33)).astype(np.float32)
    cols, vals = sparse_sign_rows(3, 300, 1000, 50, nnz=8)
    got = sparse_rows_product(cols, vals, 50, x)
    assert got.shape == (50, 33) and got.dtype == np.float32
    want = _dense(cols, vals, 50).T @ x.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    # the embedding preserves norms in expectation: E‖Ψx‖² = ‖x‖²
    big = sparse_sign_rows(3, 0, 20000, 200, nnz=8)
    v = rng.standard_normal((20000, 1)).astype(np.float32)
    ratio = np.sum(sparse_rows_product(*big, 200, v).astype(np.float64) ** 2) / np.sum(v**2.0)
    assert 0.7 < ratio < 1.3  # ‖Ψv‖²/‖v‖² has standard deviation √(2/ℓ) = 0.1 here


def test_golden_sparse_sign_stream():
    """The seed contract of the single-pass co-range sketch: a change here changes Ψ, so a
    job sketched before it must not be resumed after it (the job key names the kind)."""
    import hashlib

    cols, vals = sparse_sign_rows(7, 1000, 3100, 81, nnz=8)
    digest = hashlib.sha256(cols.tobytes() + vals.tobytes()).hexdigest()[:32]
    assert digest == "46cd87c3dc6b32068b4ab25b7d74a56f"
