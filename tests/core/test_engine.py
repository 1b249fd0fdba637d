"""The graph builders of :mod:`lplr_dask.core.engine` on their own: products against NumPy,
the sketch's seed contract (regenerated per block, independent of the blocking), the fixed
reduction trees (same bits on every scheduler), and the stage runner."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from lplr_dask.core.engine import (
    Stages,
    gram,
    left_multiply,
    right_multiply,
    sketch_matrix,
    sketch_with_norms,
    tile_sumsq,
)


@pytest.fixture(scope="module")
def a():
    return np.random.default_rng(4).standard_normal((700, 530)).astype(np.float32)


def _blocked(x, chunks=(256, 128)):
    return da.from_array(x, chunks=chunks)


def test_products_equal_numpy_in_float64(a):
    """Partial products in float32, sums in float64: within float32 rounding of the exact
    product (|error| ≤ ~d·eps·|a||b| per entry; 1e-4 relative is ample at d = 530)."""
    b = np.random.default_rng(5).standard_normal((530, 12)).astype(np.float32)
    left = np.random.default_rng(6).standard_normal((700, 9)).astype(np.float32)
    exact_r = a.astype(np.float64) @ b.astype(np.float64)
    exact_l = left.astype(np.float64).T @ a.astype(np.float64)
    with dask.config.set(scheduler="sync"):
        r = right_multiply(_blocked(a), da.from_array(b, chunks=(128, 12))).compute()
        lft = left_multiply(_blocked(a), da.from_array(left, chunks=(256, 9))).compute()
        g = gram(da.from_array(left, chunks=(256, 9))).compute()
    assert r.dtype == lft.dtype == np.float64
    np.testing.assert_allclose(r, exact_r, rtol=1e-4, atol=1e-4 * np.abs(exact_r).max())
    np.testing.assert_allclose(lft, exact_l, rtol=1e-4, atol=1e-4 * np.abs(exact_l).max())
    np.testing.assert_allclose(g, left.astype(np.float64).T @ left, rtol=1e-5)


def test_reductions_are_bitwise_the_same_on_every_scheduler(a):
    """The sum over blocks is a fixed tree: sync, threads and a shuffled task order agree
    bit for bit (the codes depend on it)."""
    s = sketch_matrix(530, 16, seed=3, row_chunks=(128, 128, 128, 128, 18), dtype=np.float32)
    y = sketch_with_norms(_blocked(a), s)
    with dask.config.set(scheduler="sync"):
        ref = y.compute()
    with dask.config.set(scheduler="threads", num_workers=4):
        for _ in range(3):
            np.testing.assert_array_equal(y.compute(), ref)
    np.testing.assert_allclose(ref[:, -1], (a.astype(np.float64) ** 2).sum(axis=1), rtol=1e-6)


def test_sketch_is_regenerated_from_the_seed_whatever_the_blocking():
    """S depends on (seed, row, column) only: the same for any row blocking, a prefix of a
    wider sketch (entries are N(0, 1/k), so up to the scale √(k/K)), and a different matrix
    for another seed."""
    one = sketch_matrix(300, 8, seed=7, row_chunks=(300,), dtype=np.float64).compute()
    many = sketch_matrix(300, 8, seed=7, row_chunks=(64, 100, 136), dtype=np.float64).compute()
    wide = sketch_matrix(300, 20, seed=7, row_chunks=(150, 150), dtype=np.float64).compute()
    other = sketch_matrix(300, 8, seed=8, row_chunks=(300,), dtype=np.float64).compute()
    np.testing.assert_array_equal(one, many)
    np.testing.assert_allclose(one, wide[:, :8] * np.sqrt(20 / 8), rtol=1e-6)
    assert not np.allclose(one, other)
    assert abs(one.std() * np.sqrt(8) - 1) < 0.1  # N(0, 1/k) entries (2400 draws)


def test_tile_sumsq_locates_non_finite_blocks(a):
    x = a.copy()
    x[300, 200] = np.nan
    sums = tile_sumsq(_blocked(x)).compute(scheduler="sync")
    assert sums.shape == (3, 5)
    assert [tuple(ix) for ix in np.argwhere(~np.isfinite(sums))] == [(1, 1)]
    finite = tile_sumsq(_blocked(a)).compute(scheduler="sync")
    assert finite.sum() == pytest.approx((a.astype(np.float64) ** 2).sum(), rel=1e-12)


def test_stages_record_seconds_and_compute_on_a_cluster(a, client):
    """The stage runner adds each stage's wall time under its name and runs on the active
    distributed client (the progress callback sees the futures)."""
    seen = []
    stages = Stages(on_stage=lambda name, futures: seen.append((name, len(futures))))
    x = _blocked(a)
    (total,) = stages.compute("sum", (x.astype(np.float64) ** 2).sum())
    (p,) = stages.persist("persist", x + 1)
    stages.compute("sum", x.sum())
    assert total == pytest.approx((a.astype(np.float64) ** 2).sum(), rel=1e-9)
    assert set(stages.seconds) == {"sum", "persist"} and min(stages.seconds.values()) > 0
    assert [name for name, _ in seen] == ["sum", "persist", "sum"]
    np.testing.assert_array_equal(p.compute(), a + 1)
