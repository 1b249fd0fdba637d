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
    "STREAM_CORANGE",
    "STREAM_DITHER_LEFT",
    "STREAM_DITHER_MATRIX",
    "STREAM_DITHER_RIGHT",
    "STREAM_ERROR_TEST",
    "STREAM_SKETCH",
    "block_generator",
    "sketch_rows",
]

SEED_BLOCK = 1024

STREAM_SKETCH = 0
STREAM_DITHER_LEFT = 1
STREAM_DITHER_RIGHT = 2
STREAM_DITHER_MATRIX = 3
STREAM_LPLR_SVD_MIX = 4
STREAM_BASIS_ROTATION = 5
STREAM_CORANGE = 6
"""Ψ (ℓ × n), the co-range sketch W = Ψ·A of the single-pass mode, drawn like S (its
transpose's rows are cut from seed blocks), independent of S."""
STREAM_ERROR_TEST = 7
"""Γ (q × n), the test sketch Γ·A of the single-pass mode's error estimate, independent of
S and Ψ (hence of the factors it tests)."""
STREAM_CODEBOOK_SAMPLE = 8
"""The seeded choice of A's blocks that a ``lloyd`` codebook of Q(A) is fitted to."""


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
    ``stream`` draws another matrix the same way: ``STREAM_CORANGE`` gives Ψᵀ and
    ``STREAM_ERROR_TEST`` Γᵀ of the single-pass mode (n × ℓ and n × q).
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
