"""Synthetic matrices with a known spectrum, generated tile by tile into Zarr (demo, tests)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import zarr

from lplr_dask.kernels.random import block_generator

__all__ = ["low_rank_plus_noise"]

_STREAM_U, _STREAM_V, _STREAM_NOISE = 10, 11, 12


def _tile(block_info=None, *, seed, singular_values, noise, n, d):
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    i, j = block_info[None]["chunk-location"]
    k = singular_values.size
    # Gaussian factors scaled by 1/√n, 1/√d: nearly orthonormal columns for large n, d, so the
    # spectrum of U·diag(s)·Vᵀ is close to s.
    u = block_generator(seed, _STREAM_U, i).standard_normal((r1 - r0, k)) / np.sqrt(n)
    v = block_generator(seed, _STREAM_V, j).standard_normal((c1 - c0, k)) / np.sqrt(d)
    tile = (u * singular_values) @ v.T
    if noise:
        tile += noise * block_generator(seed, _STREAM_NOISE, i, j).standard_normal(tile.shape)
    return tile.astype(np.float32)


def low_rank_plus_noise(
    path,
    shape=(16384, 16384),
    *,
    rank: int = 64,
    decay: float = 0.95,
    noise: float = 0.05,
    chunks=(4096, 4096),
    seed: int = 0,
) -> zarr.Array:
    """Write a float32 matrix A = U·diag(s)·Vᵀ + σ·N to a new Zarr array at ``path``.

    ``s_i = decay**i`` for i < ``rank`` (so ‖U·diag(s)·Vᵀ‖_F ≈ ‖s‖₂), and σ is chosen so that the
    noise carries a fraction ``noise`` of ‖A‖_F. Tiles are generated independently from the
    seed, so memory stays at a few tiles whatever the size. Returns the Zarr array.
    """
    n, d = shape
    s = decay ** np.arange(rank, dtype=np.float64)
    signal2 = float(np.sum(s**2))
    # noise fraction f of ‖A‖_F: σ²·n·d = f²/(1−f²) · ‖signal‖²
    sigma = (
        float(np.sqrt(noise**2 / max(1 - noise**2, 1e-12) * signal2 / (n * d))) if noise else 0.0
    )
    lazy = da.map_blocks(
        _tile,
        chunks=da.core.normalize_chunks(chunks, shape),
        dtype=np.float32,
        seed=seed,
        singular_values=s,
        noise=sigma,
        n=n,
        d=d,
        meta=np.empty((0, 0), np.float32),
    )
    arr = zarr.create_array(
        str(path),
        shape=shape,
        chunks=tuple(min(c, s_) for c, s_ in zip(chunks, shape, strict=False)),
        dtype="float32",
        compressors=None,  # noise does not compress; raw chunks read and write fastest
        overwrite=False,
        # Every chunk on disk, even one of zeros: inputs with missing chunks are refused.
        config={"write_empty_chunks": True},
    )
    lazy.to_zarr(arr)
    return arr
