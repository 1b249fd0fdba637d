"""The bodies of the methods on Dask: the checks, orthonormalization, rotation and direct
quantization steps that the stages of :mod:`lplr_dask.core.job` and the budget search share."""

from __future__ import annotations

import os
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize

from lplr_dask.core.engine import (
    Stages,
    decode,
    encode,
    left_multiply,
    shared_state,
    tile_sumsq,
)
from lplr_dask.errors import NonFiniteInputError
from lplr_dask.kernels.quantize import block_range
from lplr_dask.kernels.random import STREAM_BASIS_ROTATION, STREAM_DITHER_MATRIX, block_generator
from lplr_dask.kernels.xp import array_namespace, asarray_like, to_numpy
from lplr_dask.storage.format import create_factor

__all__ = [
    "ROTATED_METHODS",
    "basis_rotation",
    "check_finite_input",
    "extend_orthonormal",
    "npy_array",
    "nq_residual",
    "orthonormal_row_chunks",
    "orthonormalize",
    "quantize_matrix",
    "residual_array",
    "rotation_array",
    "times",
]

# ----------------------------------------------------------------------------- method bodies


def _check_finite(sumsq: np.ndarray, a: da.Array, source: str) -> None:
    bad = np.argwhere(~np.isfinite(sumsq))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        r0, c0 = int(sum(a.chunks[0][:i])), int(sum(a.chunks[1][:j]))
        r1, c1 = r0 + a.chunks[0][i], c0 + a.chunks[1][j]
        raise NonFiniteInputError(
            f"INPUT {source} contains NaN or Inf, first in the tile rows {r0}:{r1}, columns "
            f"{c0}:{c1} ({len(bad)} of {sumsq.size} tiles affected). Clean or mask those "
            "values before compressing; nothing was written."
        )


def check_finite_input(norm2: float, a: da.Array, source: str, stages: Stages) -> None:
    """Raise NonFiniteInputError naming a tile when ‖A‖² is not finite (one extra pass over A,
    only in that case)."""
    if not np.isfinite(norm2):
        (sumsq,) = stages.compute("locate-non-finite", tile_sumsq(a))
        _check_finite(to_numpy(sumsq), a, source)


def orthonormal_row_chunks(row_chunks, k: int) -> tuple[int, ...]:
    """The row blocks of :func:`orthonormalize`'s basis of an n × k array whose row blocks are
    ``row_chunks``: the same blocks, unless one is shorter than k (TSQR needs blocks at least
    as tall as wide); then blocks of max(k, the tallest block) rows."""
    row_chunks = tuple(int(c) for c in row_chunks)
    rows = max(k, max(row_chunks))
    if min(row_chunks[:-1] or (rows,)) >= k and row_chunks[-1] >= k:
        return row_chunks
    full, rem = divmod(sum(row_chunks), rows)
    return (rows,) * full + ((rem,) if rem else ())


def orthonormalize(y: da.Array) -> da.Array:
    """An orthonormal basis of the range of the row-blocked n × k array ``y`` (TSQR), in the
    row blocks :func:`orthonormal_row_chunks` gives."""
    chunks = orthonormal_row_chunks(y.chunks[0], y.shape[1])
    if chunks != y.chunks[0]:
        y = y.rechunk({0: chunks[0]})
    q, _ = da.linalg.tsqr(y.rechunk({1: -1}))
    return q


def extend_orthonormal(q: da.Array, y: da.Array) -> da.Array:
    """[Q, Q₂]: the orthonormal basis ``q`` (n × k, from :func:`orthonormalize`) continued by
    the range of ``y`` (n × j) that it lacks, so that its first k columns stay as they are
    (what a QR of [Y₁, Y] gives up to the signs of the new columns).

    Block classical Gram–Schmidt twice, each sweep followed by a TSQR of the remainder
    (BCGS2: "twice is enough"; normalizing between the sweeps keeps the new columns
    orthogonal to Q to working precision even where Y adds almost nothing to Q's range, as
    when the sketch is wider than A's rank). Costs about 4·n·k·j + 4·n·j² flops, against
    2·n·(k + j)² for a QR of the whole sketch.
    """
    q2 = y.rechunk({0: q.chunks[0], 1: -1})
    for _ in range(2):  # Qᵀ·Q₂ is one k × j block, made on the workers
        q2 = orthonormalize(q2 - times(q, left_multiply(q2, q)))
        if q2.chunks[0] != q.chunks[0]:
            q2 = q2.rechunk({0: q.chunks[0]})
    return da.concatenate([q, q2.astype(q.dtype)], axis=1).rechunk({1: -1})


ROTATED_METHODS = ("lplr", "nq+lplr")


def basis_rotation(seed: int, rank: int) -> np.ndarray:
    """The seeded random orthogonal rank × rank matrix applied to the orthonormal basis.

    Q·H spans the same subspace as Q (the paper's bound is unchanged), but spreads energy
    evenly over the columns of L and the rows of R, so that per-column and group-wise scales
    waste fewer levels ("incoherence processing"). On an outlier-heavy 2048 × 1024 matrix at
    rank 337 and 8/8 bits it lowered the error from 0.0381 to 0.0278.
    """
    g = block_generator(seed, STREAM_BASIS_ROTATION).standard_normal((rank, rank))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))  # Haar-distributed


def _matmul_small(block, t):
    return block @ asarray_like(t, block)


def times(x: da.Array, t) -> da.Array:
    """x @ t for a row-blocked x and a small dense t (k × r), block by block; ``t`` a NumPy
    array (embedded in every task) or a one-block Dask array (made once, on a worker)."""
    if isinstance(t, da.Array):
        return da.blockwise(_matmul_small, "ij", x, "ik", t, "kj", dtype=x.dtype, concatenate=True)
    return da.map_blocks(_matmul_small, x, t, chunks=(x.chunks[0], (t.shape[1],)), dtype=x.dtype)


def npy_array(path) -> da.Array:
    """A ``.npy`` file (a small matrix: a Gram matrix, a coefficient matrix) as a one-block Dask
    array read on a worker, so that it does not travel in a task graph. The task's key
    follows the file's path, size and modification time."""
    path = Path(path)
    st = os.stat(path)
    head = np.load(path, mmap_mode="r")  # the header only: shape and dtype
    name = "lplr-npy-" + tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)
    block = dask.delayed(np.load, pure=True)(str(path), dask_key_name=name)
    return da.from_delayed(block, shape=head.shape, dtype=head.dtype)


def rotation_array(seed: int, rank: int) -> da.Array:
    """:func:`basis_rotation` as a one-block Dask array built on a worker from the seed, so no
    rank × rank matrix travels in a task graph."""
    return da.from_delayed(
        dask.delayed(basis_rotation, pure=True)(seed, rank), shape=(rank, rank), dtype=np.float64
    )


def _nq_block(a, *, spec, lo, hi, seed, writer=None, codebook=None, block_info=None):
    loc = block_info[0]
    i, j = loc["chunk-location"]
    rng = (
        block_generator(seed, STREAM_DITHER_MATRIX, i, j) if spec.rounding == "stochastic" else None
    )
    if spec.is_float or lo is None:
        lo_b, hi_b = (None, None) if spec.is_float else block_range(a, spec=spec)
        local = not spec.is_float
    else:
        lo_b, hi_b, local = asarray_like(lo, a), asarray_like(hi, a), False
    codes = encode(a, spec, lo_b, hi_b, rng, codebook)
    ahat = decode(codes, spec, lo_b, hi_b, dtype=a.dtype, codebook=codebook)
    if writer is not None:
        r0, c0 = loc["array-location"][0][0], loc["array-location"][1][0]
        writer.write(r0, c0, codes, *((lo_b, hi_b) if local else (None, None)))
    return a, ahat


def _nq_write_stats(a, *, spec, lo, hi, seed, writer, codebook=None, block_info=None):
    kw = dict(spec=spec, lo=lo, hi=hi, seed=seed, codebook=codebook)
    a, ahat = _nq_block(a, writer=writer, block_info=block_info, **kw)
    # Sums of squares accumulated in float64 without float64 copies of the tile: a 4096²
    # float32 tile is 64 MiB, and three float64 temporaries of it had workers with a 1 GiB
    # limit killed.
    xp = array_namespace(a)
    diff = a - ahat
    stats = xp.stack(
        [
            xp.einsum("ij,ij->", a, a, dtype=np.float64),
            xp.einsum("ij,ij->", diff, diff, dtype=np.float64),
        ]
    )
    return to_numpy(stats).reshape(1, 2)


def nq_residual(a, *, spec, lo, hi, seed, codebook=None, block_info=None):
    a, ahat = _nq_block(
        a, spec=spec, lo=lo, hi=hi, seed=seed, codebook=codebook, block_info=block_info
    )
    return a - ahat


def residual_array(a: da.Array, spec, *, seed: int, lo=None, hi=None) -> da.Array:
    """A − Q(A) block by block (``nq_residual``), in ``a``'s array library: the operand of the
    low-rank stages of ``nq+lplr``. ``lo``/``hi``: per-matrix ranges, or None for ranges per
    block."""
    return da.map_blocks(
        nq_residual,
        a,
        dtype=a.dtype,
        meta=meta_from_array(a),  # Dask would infer NumPy for CuPy blocks
        spec=spec,
        lo=lo,
        hi=hi,
        seed=seed,
    )


def quantize_matrix(a, spec, root, stages, seed, source):
    """Q(A) for ``nq`` and ``nq+lplr``: write its codes in a pass of its own (one more for
    per-matrix ranges). Returns ‖A‖², ‖A − Q(A)‖² and the per-matrix (lo, hi) or (None, None);
    the residual A − Q(A) is ``a.map_blocks(nq_residual, ...)`` with those ranges.

    A ``lloyd`` quantizer fits its codebook first, to a seeded sample of 1/16 of A's entries
    (whole blocks, or rows of them); it is written with Q, and only ``nq`` (no residual) takes
    it."""
    writer = create_factor(root, "Q", a.shape, spec, a.chunksize)
    spans = spec.granularity == "tensor"
    lo, hi, codebook = shared_state(
        a, spec, writer, stages, "matrix", spans=spans, sample_seed=seed
    )
    if lo is not None:  # the whole-matrix range: NaN/Inf anywhere make it non-finite
        check_finite_input(float(hi.sum() - lo.sum()), a, source, stages)
    kw = dict(spec=spec, lo=lo, hi=hi, seed=seed, codebook=codebook)
    chunks = ((1,) * a.numblocks[0], (2,) * a.numblocks[1])
    stats = a.map_blocks(_nq_write_stats, writer=writer, chunks=chunks, dtype=np.float64, **kw)
    (s,) = stages.compute("quantize-matrix", stats)
    s = to_numpy(s).reshape(a.numblocks[0], a.numblocks[1], 2)
    _check_finite(s[..., 0], a, source)
    return float(s[..., 0].sum()), float(s[..., 1].sum()), lo, hi
