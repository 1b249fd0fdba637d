"""Seeded random streams that do not depend on tiling, worker count or backend.

Every random number the engine uses comes from a NumPy ``Generator`` keyed by
``(seed, stream, block coordinates)`` through ``SeedSequence.spawn_key``; global random state
is never touched. Streams are drawn on the host and moved to the block's device, so NumPy and
CuPy runs with the same seed see the same numbers.

The Gaussian sketch S (d × m) is generated in fixed *seed blocks* of :data:`SEED_BLOCK` rows.
Any row range of S, whatever tile asks for it, is cut from the same seed blocks, so A·S does not
change when A's tiling changes. Within a seed block the values are drawn column by column
(``standard_normal((m, SEED_BLOCK)).T``), which gives the *prefix property*: the first k
columns of the m-column sketch equal the k-column sketch's (before scaling), for every k ≤ m.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "SEED_BLOCK",
    "STREAM_CODEBOOK_SAMPLE",
    "STREAM_DITHER_LEFT",
    "STREAM_DITHER_MATRIX",
    "STREAM_DITHER_RIGHT",
    "STREAM_ERROR_TEST",
    "STREAM_SKETCH",
    "STREAM_SPARSE_CORANGE",
    "block_generator",
    "sketch_rows",
    "sparse_sign_rows",
]

SEED_BLOCK = 1024

STREAM_SKETCH = 0
STREAM_DITHER_LEFT = 1
STREAM_DITHER_RIGHT = 2
STREAM_DITHER_MATRIX = 3
STREAM_LPLR_SVD_MIX = 4
STREAM_BASIS_ROTATION = 5
STREAM_CORANGE = 6
"""Retired, not to be reused: the Gaussian Ψ of the single-pass mode before the sparse sign
Ψ of :data:`STREAM_SPARSE_CORANGE` replaced it."""
STREAM_ERROR_TEST = 7
"""Γ (q × n), the test sketch Γ·A of the single-pass mode's error estimate, independent of
S and Ψ (hence of the factors it tests)."""
STREAM_CODEBOOK_SAMPLE = 8
"""The seeded choice of A's blocks that a ``lloyd`` codebook of Q(A) is fitted to."""
STREAM_SPARSE_CORANGE = 9
"""Ψ (ℓ × n) of the single-pass mode as a sparse sign matrix (:func:`sparse_sign_rows`): the
co-range sketch W = Ψ·A at ζ·n·d additions instead of ℓ·n·d multiply-adds."""


def block_generator(seed: int, stream: int, *key: int) -> np.random.Generator:
    """An independent generator for ``(seed, stream, *key)``."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, *key)))
    )


def sketch_rows(
    seed: int,
    start: int,
    stop: int,
    n_cols: int,
    *,
    dtype=np.float32,
    stream: int = STREAM_SKETCH,
) -> np.ndarray:
    """Rows ``start:stop`` of the Gaussian sketch S with ``n_cols`` columns.

    Entries are i.i.d. N(0, 1/n_cols), the paper's scaling. Returns a C-contiguous NumPy array
    of shape (stop - start, n_cols). Cost: at most two seed blocks beyond the rows asked for.
    ``stream`` draws another matrix the same way: ``STREAM_ERROR_TEST`` gives Γᵀ (n × q) of
    the single-pass mode.
    """
    if stop <= start:
        return np.zeros((0, n_cols), dtype=dtype)
    first, last = start // SEED_BLOCK, -(-stop // SEED_BLOCK)
    parts = [
        block_generator(seed, stream, b).standard_normal((n_cols, SEED_BLOCK), dtype=np.float32).T
        for b in range(first, last)
    ]
    block = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    offset = start - first * SEED_BLOCK
    rows = block[offset : offset + (stop - start)]
    return np.ascontiguousarray(rows * np.float32(1.0 / np.sqrt(n_cols)), dtype=dtype)


def _distinct_columns(g: np.random.Generator, rows: int, n_cols: int, k: int) -> np.ndarray:
    """``k`` distinct columns of ``range(n_cols)`` per row, uniformly (Floyd's algorithm,
    vectorized over the rows: O(k²) per row, whatever ``n_cols``); sorted within each row."""
    out = np.empty((rows, k), dtype=np.int64)
    for i, j in enumerate(range(n_cols - k, n_cols)):
        t = g.integers(0, j + 1, size=rows)
        taken = (out[:, :i] == t[:, None]).any(axis=1)
        out[:, i] = np.where(taken, j, t)
    return np.sort(out, axis=1)


def sparse_sign_rows(
    seed: int,
    start: int,
    stop: int,
    n_cols: int,
    *,
    nnz: int,
    stream: int = STREAM_SPARSE_CORANGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start:stop`` of a sparse sign matrix Ψᵀ (n × ``n_cols``).

    Each row has ζ = ``min(nnz, n_cols)`` nonzeros, at distinct columns drawn uniformly, each
    ±1/√ζ with a fair sign (Tropp, Yurtsever, Udell & Cevher 2019, Sec. 3.3): every row of A
    is added, with signs, to ζ rows of W = Ψ·A. Drawn per seed block of :data:`SEED_BLOCK`
    rows like :func:`sketch_rows`, so any row range is independent of who asks for it.

    Returns
    -------
    columns : numpy.ndarray
        (stop − start) × ζ int64, sorted within each row.
    values : numpy.ndarray
        (stop − start) × ζ float32, ±1/√ζ.
    """
    k = min(int(nnz), int(n_cols))
    if stop <= start:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k), dtype=np.float32)
    first, last = start // SEED_BLOCK, -(-stop // SEED_BLOCK)
    cols, signs = [], []
    for b in range(first, last):
        g = block_generator(seed, stream, b)
        cols.append(_distinct_columns(g, SEED_BLOCK, n_cols, k))
        signs.append(g.integers(0, 2, size=(SEED_BLOCK, k), dtype=np.int8))
    offset = start - first * SEED_BLOCK
    rows = slice(offset, offset + (stop - start))
    c = np.concatenate(cols)[rows]
    v = (np.concatenate(signs)[rows] * 2 - 1).astype(np.float32) * np.float32(1 / np.sqrt(k))
    return np.ascontiguousarray(c), np.ascontiguousarray(v)
