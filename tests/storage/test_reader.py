"""Readers: dequantized factors, lazy reconstruction, matvec, format checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lplr_dask import ParameterError, StorageFormatError, compress
from lplr_dask.storage.reader import decompress, open_compressed


@pytest.fixture
def compressed(tmp_path, decaying_zarr):
    out = tmp_path / "c.zarr"
    compress(decaying_zarr, out, rank=16, bits_left=5, bits_right=4, block_shape=(256, 128))
    return open_compressed(out)


def test_factors_have_their_shapes_and_reconstruct(compressed, decaying):
    assert compressed.L.shape == (1200, 16) and compressed.R.shape == (16, 700)
    lr = compressed.L.compute() @ compressed.R.compute()
    np.testing.assert_allclose(compressed.to_dask().compute(), lr, rtol=1e-5, atol=1e-5)
    err = np.linalg.norm(lr - decaying) / np.linalg.norm(decaying)
    assert err == pytest.approx(compressed.meta["rel_fro_error"], rel=1e-3)


def test_basis_codes_are_those_of_a_near_orthonormal_basis(compressed):
    """L = Q(orthonormal basis) with 5 bits per entry: LᵀL ≈ I up to the quantizer's noise."""
    lt = compressed.L.compute().astype(np.float64)
    g = lt.T @ lt
    np.testing.assert_allclose(np.diag(g), 1.0, atol=0.05)


def test_matvec_never_forms_a(compressed, decaying):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(700)
    dense = compressed.to_dask().compute()
    np.testing.assert_allclose(compressed.matvec(x), dense @ x, rtol=1e-4, atol=1e-3)
    xs = rng.standard_normal((700, 3))
    np.testing.assert_allclose(compressed.matvec(xs), dense @ xs, rtol=1e-4, atol=1e-3)
    with pytest.raises(ParameterError, match="700 columns"):
        compressed.matvec(np.ones(5))


def test_nq_plus_lplr_reconstruction_adds_both_parts(tmp_path, decaying_zarr, decaying):
    out = tmp_path / "c.zarr"
    res = compress(
        decaying_zarr, out, method="nq+lplr", rank=8, bits_matrix=2, block_shape=(256, 128)
    )
    cm = open_compressed(out)
    assert cm.has("Q") and cm.has("L")
    dense = cm.to_dask().compute()
    err = np.linalg.norm(dense - decaying) / np.linalg.norm(decaying)
    assert err == pytest.approx(res.rel_fro_error, rel=1e-3)


def test_decompress_writes_dense_zarr_and_refuses_existing(tmp_path, compressed):
    import zarr

    dest = decompress(compressed, tmp_path / "d.zarr")
    np.testing.assert_allclose(
        zarr.open_array(dest, mode="r")[:], compressed.to_dask().compute(), rtol=1e-6
    )
    from lplr_dask import OutputExistsError

    with pytest.raises(OutputExistsError):
        decompress(compressed, tmp_path / "d.zarr")


def test_format_checks(tmp_path, compressed):
    with pytest.raises(StorageFormatError, match=r"no zarr\.json"):
        open_compressed(tmp_path)
    meta_file = tmp_path / "c.zarr" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["lplr_dask"]["format_version"] = 99
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(StorageFormatError, match="format version 99"):
        open_compressed(tmp_path / "c.zarr")
