"""The method bodies of lplr_dask.core.methods that the job and the planner share."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from lplr_dask.core.methods import extend_orthonormal, orthonormalize


@pytest.mark.parametrize("rows", [100, 48], ids=["blocks", "short-blocks"])
def test_extend_orthonormal_continues_the_basis(rows):
    """[Q, Q₂] keeps Q's columns bit for bit, is orthonormal to working precision, and spans
    what a QR of the whole sketch spans, also when the new columns are nearly in Q's span
    (a sketch wider than the matrix's rank): there one Gram–Schmidt sweep alone leaves a
    loss of orthogonality of about ‖Y₂‖/‖Y₂ − QQᵀY₂‖ times the rounding."""
    rng = np.random.default_rng(0)
    n, k, j = 400, 60, 40
    s = 0.8 ** np.arange(90)  # rank 90 < k + j: the last columns are rounding-level
    a = (np.linalg.qr(rng.standard_normal((n, 90)))[0] * s) @ rng.standard_normal((90, 200))
    y = da.from_array(a @ rng.standard_normal((200, k + j)), chunks=(rows, -1))
    q = orthonormalize(y[:, :k])
    full = extend_orthonormal(q, y[:, k:]).compute()
    assert full.shape == (n, k + j)
    np.testing.assert_array_equal(full[:, :k], q.compute())
    assert np.abs(full.T @ full - np.eye(k + j)).max() < 1e-12
    # It spans the sketch: Y − [Q, Q₂][Q, Q₂]ᵀY is rounding (measured 7e-16 relative).
    yy = y.compute()
    assert np.linalg.norm(yy - full @ (full.T @ yy)) < 1e-13 * np.linalg.norm(yy)
