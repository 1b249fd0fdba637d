"""The single-pass mode (``passes=1``): graph builders that read A once.

After Tropp, Yurtsever, Udell & Cevher (2017), adapted to quantized factors. In one streaming
pass over A's canonical blocks, each tile A_ij is read once and feeds three sketches:

- the range sketch Y = A·S (n × m, the two-pass mode's sketch, bit for bit: the same stream,
  the same per-tile GEMM and the same reduction tree, so L̂ is the two-pass mode's L̂), with
  the row sums of squares of A (‖A‖²_F, exact);
- the co-range sketch W = Ψ·A (ℓ × d), Ψ Gaussian with ℓ rows (``corange_size``), kept in
  column panels on the workers, never gathered;
- the test sketch T = Γ·A (q × d, q = :data:`ERROR_TEST_ROWS`) for the error estimate.

Ψᵀ and Γᵀ are regenerated per row block from the seed (:data:`STREAM_CORANGE`,
:data:`STREAM_ERROR_TEST`), like S, so every result is independent of the storage tiling and
of the worker count. After the basis stage (L̂ from Y as in the two-pass mode), the
projection needs no pass over A: Ψ·L̂ and Γ·L̂ (ℓ × m and q × m) are reduced over L̂'s row
blocks, and per column panel R_j = (Ψ·L̂)⁺·W_j is quantized where it is computed and written,
and the panel's share of the estimate ‖T_j − (Γ·L̂)·R̂_j‖² is returned.

Why (Ψ·L̂)⁺ is right for a quantized L̂: for any L̂ = Q·T with T invertible,
L̂(ΨL̂)⁺ = Q(ΨQ)⁺, so L̂·R equals Tropp et al.'s QX with Q an orthonormal basis of span(L̂),
and their Theorem 4.3 applies to span(L̂): with Ψ independent of L̂,
E‖A − L̂R‖²_F = (1 + m/(ℓ − m − 1))·‖A − P_L̂·A‖²_F, where the second factor is the two-pass
mode's error before R is quantized. The error estimate follows Tropp, Yurtsever, Udell &
Cevher (2019), Sec. 6: with Γ Gaussian of q rows scaled by 1/√q and independent of L̂R̂,
‖Γ(A − L̂R̂)‖²_F is an unbiased estimate of ‖A − L̂R̂‖²_F distributed as Σ_i σ_i²·χ²_q/q over
the singular values σ_i of the residual.

References
----------
J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. Practical sketching algorithms for low-rank
matrix approximation. SIAM J. Matrix Anal. Appl. 38(4), 2017. arXiv:1609.00048.

J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher. Streaming low-rank matrix approximation with
an application to scientific simulation. SIAM J. Sci. Comput. 41(4), 2019. arXiv:1902.08651.
"""

from __future__ import annotations

import operator

import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from lplr_dask.core.engine import (
    Stages,
    check_one_block,
    decode,
    encode,
    left_multiply,
    panel_of,
    shared_state,
    sketch_matrix,
)
from lplr_dask.errors import ParameterError
from lplr_dask.kernels.quantize import QuantizerSpec, block_range
from lplr_dask.kernels.random import (
    STREAM_CORANGE,
    STREAM_DITHER_RIGHT,
    STREAM_ERROR_TEST,
    block_generator,
    sketch_rows,
)
from lplr_dask.kernels.xp import array_namespace, asarray_like, to_numpy

__all__ = [
    "CORANGE_FACTOR",
    "ERROR_TEST_ROWS",
    "SinglePassSketch",
    "check_corange_size",
    "corange_size",
    "corange_test_matrix",
    "error_estimate_note",
    "single_pass_sketch",
    "sketch_left",
    "solve_and_quantize",
    "stored_estimate",
]

CORANGE_FACTOR = 4
"""ℓ = CORANGE_FACTOR·m + 1 by default. Tropp et al. (2017) suggest ℓ = 2m + 1, whose factor
1 + m/(ℓ − m − 1) = 2 doubles the squared error of the two-pass projection (×1.41 in the
relative error; measured ×1.41–1.44 at rank 64 and 128 on an 8192² matrix by
``benchmarks/bench_single_pass.py``); ℓ = 4m + 1 gives 1 + 1/3 (×1.155; measured
×1.150–1.153), within the goal of 1.25× the two-pass error, for (m + ℓ + q)·n·d =
(5m + 11)·n·d multiply-adds in the one pass instead of 2m·n·d over two."""

ERROR_TEST_ROWS = 10
"""q, the rows of the test sketch Γ of the error estimate (Tropp et al. 2019 use q = 10)."""


def corange_size(rank: int, n_rows: int, size: int | None = None) -> int:
    """ℓ, the rows of the co-range sketch Ψ: ``size`` if given, else
    ``min(CORANGE_FACTOR·rank + 1, n_rows)`` (more rows than A has add nothing: with ℓ ≥ n,
    (Ψ·L̂)⁺·Ψ·A = L̂⁺·A, the two-pass projection)."""
    if size is not None:
        return int(size)
    return int(min(CORANGE_FACTOR * rank + 1, n_rows))


def check_corange_size(size: int | None, rank: int, n_rows: int) -> None:
    """ParameterError unless rank + 2 ≤ ℓ ≤ n (the bound's factor m/(ℓ − m − 1) needs
    ℓ ≥ m + 2; Ψ·L̂ must have at least as many rows as L̂ has columns)."""
    if size is None:
        if rank + 2 > n_rows:
            raise ParameterError(
                f"passes=1 needs a co-range sketch of at least rank + 2 = {rank + 2} rows, but A "
                f"has only {n_rows} rows. Lower the rank to at most {n_rows - 2}, or use "
                "passes=2."
            )
        return
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ParameterError(f"corange_size must be an integer, got {size!r}.")
    if not rank + 2 <= size <= n_rows:
        raise ParameterError(
            f"corange_size={size} is out of range for rank {rank} and a matrix of {n_rows} "
            f"rows: it must be between rank + 2 = {rank + 2} and {n_rows}. The single-pass "
            f"error is about √(1 + rank/(corange_size − rank − 1)) times the two-pass error; "
            f"leave it unset for {CORANGE_FACTOR}·rank + 1."
        )


def error_estimate_note(test_rows: int = ERROR_TEST_ROWS) -> str:
    """How the single-pass error is obtained, for the result and the stored attributes."""
    return (
        f"estimate: ‖Γ·A − (Γ·L̂)·R̂‖_F / ‖A‖_F with a {test_rows}-row Gaussian test sketch Γ "
        "taken in the same pass (Tropp, Yurtsever, Udell & Cevher 2019, Sec. 6); ‖A‖_F is "
        "exact. Unbiased in the square; the exact error needs a second pass (verify)."
    )


# ----------------------------------------------------------------------------- the pass


def _stream_block(seed, start, stop, sizes, streams, dtype, like):
    """Rows start:stop of [Ψᵀ | Γᵀ] (n × (ℓ + q)), each from its own stream."""
    parts = [
        sketch_rows(seed, start, stop, cols, dtype=dtype, stream=stream)
        for stream, cols in zip(streams, sizes, strict=True)
    ]
    return asarray_like(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0], like)


def corange_test_matrix(
    n, sizes, *, seed, row_chunks, dtype, meta=None, streams=(STREAM_CORANGE, STREAM_ERROR_TEST)
) -> da.Array:
    """[Ψᵀ | Γᵀ] (n × (ℓ + q)) as a Dask array in ``row_chunks``; blocks from the seed.
    ``streams`` and ``sizes`` pair up: ``streams=(STREAM_ERROR_TEST,), sizes=(q,)`` is Γᵀ."""
    like = meta if meta is not None else np.empty((0, 0), dtype=dtype)
    cols = int(sum(sizes))
    streams = tuple(streams)
    name = "lplr-corange-" + tokenize(
        seed, n, tuple(sizes), streams, row_chunks, np.dtype(dtype).str
    )
    bounds = np.cumsum((0, *row_chunks))
    dsk: dict = {
        (name, i, 0): (
            _stream_block,
            seed,
            int(bounds[i]),
            int(bounds[i + 1]),
            tuple(sizes),
            streams,
            dtype,
            like,
        )
        for i in range(len(row_chunks))
    }
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(
        graph,
        name,
        chunks=(tuple(row_chunks), (cols,)),
        dtype=dtype,
        meta=asarray_like(np.empty((0, 0), dtype=dtype), like),
    )


def _tile(a, s, pg):
    """One tile's share of the three sketches: ([A_ij·S_j | row ‖·‖²] with a singleton middle
    axis, [Ψ_i; Γ_i]·A_ij with a singleton leading axis), float32 GEMMs, float64 out. The
    first is computed exactly as the two-pass sketch's partial, so Y is bit-identical."""
    xp = array_namespace(a)
    y = xp.matmul(a, s.astype(a.dtype, copy=False)).astype(np.float64)
    sq = xp.einsum("ij,ij->i", a, a, dtype=np.float64)
    ext = xp.concatenate([y, sq[:, None]], axis=1)[:, None, :]
    w = xp.matmul(pg.astype(a.dtype, copy=False).T, a).astype(np.float64)[None, :, :]
    return ext, w


class SinglePassSketch:
    """The sketches of one pass over A (lazy Dask arrays, float64).

    Attributes
    ----------
    ext : dask.array.Array
        n × (m + 1): [A·S | row sums of squares], row-blocked like A.
    w : dask.array.Array
        ℓ × d: W = Ψ·A, in A's column panels.
    t : dask.array.Array
        q × d: T = Γ·A, in A's column panels.
    """

    def __init__(self, ext, w, t):
        self.ext, self.w, self.t = ext, w, t


def single_pass_sketch(
    a: da.Array,
    rank: int,
    *,
    seed: int,
    corange_rows: int,
    test_rows: int = ERROR_TEST_ROWS,
) -> SinglePassSketch:
    """Y = A·S, ‖A_i‖², W = Ψ·A and T = Γ·A in one streaming pass over ``a``.

    Each tile of ``a`` has one consumer (a task that returns its three partial products), so
    it is freed as soon as its GEMMs are done. Y is summed over column blocks and W, T over
    row blocks, each by a fixed tree (``split_every=8``) over the canonical block grid.

    Parameters
    ----------
    a : dask.array.Array
        n × d, in the canonical blocks.
    rank : int
        m, the columns of S (and of Y).
    seed : int
        Keys S (``STREAM_SKETCH``), Ψ (``STREAM_CORANGE``) and Γ (``STREAM_ERROR_TEST``).
    corange_rows : int
        ℓ, the rows of Ψ.
    test_rows : int, default ERROR_TEST_ROWS
        q, the rows of Γ.

    Returns
    -------
    SinglePassSketch
        ``ext`` (n × (m + 1)), ``w`` (ℓ × d), ``t`` (q × d), lazy.

    Notes
    -----
    Cost: (m + ℓ + q)·n·d multiply-adds in the input precision, one read of A. Memory beyond
    the tiles in flight: per tile an n_i × (m + 1) and an (ℓ + q) × d_j float64 partial; the
    reductions hold up to 8 of those; the results (n × m and (ℓ + q) × d float64) stay on the
    workers.
    """
    n, d = a.shape
    like = meta_from_array(a)
    s = sketch_matrix(d, rank, seed=seed, row_chunks=a.chunks[1], dtype=a.dtype, meta=like)
    pg = corange_test_matrix(
        n,
        (corange_rows, test_rows),
        seed=seed,
        row_chunks=a.chunks[0],
        dtype=a.dtype,
        meta=like,
    )
    token = tokenize(a, s, pg)
    tname, yname, wname = (f"lplr-single-pass-{part}-{token}" for part in ("tile", "y", "w"))
    ni, nj = a.numblocks
    tiles = {
        (tname, i, j): (_tile, (a.name, i, j), (s.name, j, 0), (pg.name, i, 0))
        for i in range(ni)
        for j in range(nj)
    }
    ys = {
        (yname, i, j, 0): (operator.getitem, (tname, i, j), 0) for i in range(ni) for j in range(nj)
    }
    ws = {
        (wname, i, 0, j): (operator.getitem, (tname, i, j), 1) for i in range(ni) for j in range(nj)
    }
    base = HighLevelGraph.merge(a.dask, s.dask, pg.dask)
    layers: dict = {**base.layers, tname: tiles, yname: ys, wname: ws}
    deps = {
        **base.dependencies,
        tname: {*a.__dask_layers__(), *s.__dask_layers__(), *pg.__dask_layers__()},
        yname: {tname},
        wname: {tname},
    }
    graph = HighLevelGraph(layers, deps)
    meta3 = asarray_like(np.empty((0, 0, 0), dtype=np.float64), like)
    y_part = da.Array(
        graph, yname, chunks=(a.chunks[0], (1,) * nj, (rank + 1,)), dtype=np.float64, meta=meta3
    )
    rows = corange_rows + test_rows
    w_part = da.Array(
        graph, wname, chunks=((1,) * ni, (rows,), a.chunks[1]), dtype=np.float64, meta=meta3
    )
    ext = y_part.sum(axis=1, split_every=8)
    wt = w_part.sum(axis=0, split_every=8)
    return SinglePassSketch(ext, wt[:corange_rows], wt[corange_rows:])


def sketch_left(lhat: da.Array, rows: tuple[int, int], *, seed: int) -> da.Array:
    """[Ψ·L̂; Γ·L̂] ((ℓ + q) × m, float64) for the row-blocked n × m L̂, reduced over L̂'s row
    blocks with Ψ and Γ regenerated from the seed; float32 products like W's and T's, so
    that W − (Ψ·L̂)·R and T − (Γ·L̂)·R̂ compare like with like. Cost: (ℓ + q)·n·m."""
    n = lhat.shape[0]
    pg = corange_test_matrix(
        n, rows, seed=seed, row_chunks=lhat.chunks[0], dtype=lhat.dtype, meta=meta_from_array(lhat)
    )
    return left_multiply(lhat, pg)


# ----------------------------------------------------------------------------- the projection


def _ranges_here(x, spec, lo, hi):
    """Ranges for this panel: given (spanning panels), or computed here (group-wise)."""
    if spec.is_float:
        return None, None, False
    if lo is None:
        lo, hi = block_range(x, spec=spec)
        return lo, hi, True
    return asarray_like(lo, x), asarray_like(hi, x), False


def _pinv(psi_l):
    """(Ψ·L̂)⁺ with ``numpy.linalg.lstsq``'s cutoff: singular values below ℓ·eps·σ_max are
    treated as zero."""
    return np.linalg.pinv(psi_l, rcond=max(psi_l.shape) * np.finfo(np.float64).eps)


def _panel_values(coef, w):
    return asarray_like(coef, w) @ w


def _panel_finish(w, t, cols, coef, gamma_l, *, spec, lo, hi, seed, writer, col_bounds, codebook):
    """R_j = coef·W_j, quantized (dither keyed by the panel, as the two-pass R), written;
    returns [‖T_j − (Γ·L̂)·R̂_j‖²]. ``cols``: the panel's column numbers (the first locates it
    among ``col_bounds``)."""
    xp = array_namespace(w)
    col0, j = panel_of(cols, col_bounds)
    r = _panel_values(coef, w)
    rng = block_generator(seed, STREAM_DITHER_RIGHT, j) if spec.rounding == "stochastic" else None
    lo_b, hi_b, local = _ranges_here(r, spec, lo, hi)
    codes = encode(r, spec, lo_b, hi_b, rng, codebook)
    writer.write(0, col0, codes, *((lo_b, hi_b) if local else (None, None)))
    rhat = decode(codes, spec, lo_b, hi_b, dtype=np.float64, codebook=codebook)
    resid = t - asarray_like(gamma_l, w) @ rhat
    return to_numpy(xp.sum(resid * resid)).reshape(1, 1)


def solve_and_quantize(
    w: da.Array,
    t: da.Array,
    psi_l: da.Array,
    gamma_l: da.Array,
    spec: QuantizerSpec,
    writer,
    *,
    seed: int,
    stages: Stages,
) -> float:
    """R = (Ψ·L̂)⁺·W per column panel of W, quantized and written where it is computed; no
    pass over A. Returns ‖T − (Γ·L̂)·R̂‖²_F (float64), the error estimate's numerator.

    Parameters
    ----------
    w, t : dask.array.Array
        W = Ψ·A (ℓ × d) and T = Γ·A (q × d) in the same column panels.
    psi_l, gamma_l : dask.array.Array
        Ψ·L̂ (ℓ × m) and Γ·L̂ (q × m), float64, each a one-block Dask array loaded or built
        on a worker (such as :func:`lplr_dask.core.methods.npy_array`): the pseudo-inverse
        (Ψ·L̂)⁺ is computed from Ψ·L̂ in one task, and every panel's task takes both from the
        workers, so no ℓ × m or q × m matrix is embedded in a task graph.
    spec : QuantizerSpec
        R's quantizer. Ranges that span panels (``tensor``, ``row``) and a fitted codebook
        are reduced over R's float values kept on the workers first, as in the two-pass
        projection.
    writer
        R's factor writer (:func:`lplr_dask.storage.format.create_factor`).
    seed : int
        Keys the dither of stochastic rounding (per panel).
    stages : Stages
        Runs the stages (``solve`` and, for shared ranges, ``right-ranges``).

    Returns
    -------
    float
        ‖T − (Γ·L̂)·R̂‖²_F.

    Raises
    ------
    ParameterError
        If ``psi_l`` or ``gamma_l`` is not a one-block Dask array.

    Notes
    -----
    (Ψ·L̂)⁺ is the pseudo-inverse with singular values below ℓ·eps·σ_max treated as zero
    (``numpy.linalg.lstsq``'s rule): the minimum-norm solution when a coarse quantizer made
    columns of L̂ collinear. Cost: m·ℓ·d multiply-adds; memory: one m × d_j panel per task.
    """
    check_one_block(psi_l, "psi_l")
    check_one_block(gamma_l, "gamma_l")
    ell, m = psi_l.shape
    coef = da.map_blocks(_pinv, psi_l, chunks=((m,), (ell,)), dtype=np.float64)
    lo = hi = codebook = None
    spans = spec.granularity in ("tensor", "row")
    if not spec.is_float and (spans or spec.stores_codebook):
        # R_j = coef·W_j: index y (coef's m rows) out, i (ℓ, one block) contracted.
        r_float = da.blockwise(
            _panel_values,
            "yj",
            coef,
            "yi",
            w,
            "ij",
            dtype=np.float64,
            meta=meta_from_array(w, ndim=2, dtype=np.float64),
            concatenate=True,
        )
        # (Ψ·L̂)⁺ kept on the workers too: the panels' second reading does not redo the SVD.
        r_float, coef = stages.persist("solve", r_float, coef)
        lo, hi, codebook = shared_state(r_float, spec, writer, stages, "right", spans=spans)
    cols = da.arange(w.shape[1], chunks=(w.chunks[1],))  # column numbers, made on the workers
    # (indices x, y, z, u, v: one block each, handed whole to every panel's task)
    stats = da.blockwise(
        _panel_finish,
        "ij",
        w,
        "ij",
        t,
        "xj",
        cols,
        "j",
        coef,
        "yz",
        gamma_l,
        "uv",
        adjust_chunks={"i": 1, "j": 1},
        dtype=np.float64,
        meta=np.empty((0, 0)),
        concatenate=True,
        spec=spec,
        lo=lo,
        hi=hi,
        seed=seed,
        writer=writer,
        col_bounds=np.cumsum((0, *w.chunks[1])),
        codebook=codebook,
    )
    (s,) = stages.compute("solve", stats)
    return float(to_numpy(s).sum())


def _residual_sumsq(t, r, gamma_l):
    xp = array_namespace(t)
    resid = t - asarray_like(gamma_l, t) @ r.astype(np.float64)
    return to_numpy(xp.sum(resid * resid)).reshape(1, 1)


def stored_estimate(
    t: da.Array, left: da.Array, right: da.Array, *, seed: int, stages: Stages
) -> float:
    """‖T − (Γ·L̂)·R̂‖²_F recomputed from the stored factors (no pass over A).

    The estimate's numerator again, from the codes on disk (``left`` n × m and ``right``
    m × d dequantized as :meth:`~lplr_dask.storage.reader.CompressedMatrix.factor` reads
    them) instead of the values in the workers' memory: it must agree with what
    :func:`solve_and_quantize` returned up to rounding, or the written codes are not those the
    estimate describes. Cost: q·n·m + q·m·d multiply-adds, one read of L and R.
    """
    q = t.shape[0]
    gamma_t = corange_test_matrix(
        left.shape[0],
        (q,),
        seed=seed,
        row_chunks=left.chunks[0],
        dtype=left.dtype,
        meta=meta_from_array(left),
        streams=(STREAM_ERROR_TEST,),
    )
    # Γ·L̂ (q × m) stays on the workers: one block, handed whole to every panel's task.
    gl = left_multiply(left, gamma_t).rechunk((-1, -1))
    right = right.rechunk({0: -1, 1: t.chunks[1]})
    parts = da.blockwise(
        _residual_sumsq,
        "ij",
        t,
        "ij",
        right,
        "kj",
        gl,
        "xy",
        adjust_chunks={"i": 1, "j": 1},
        dtype=np.float64,
        meta=np.empty((0, 0)),
        concatenate=True,
    )
    (s,) = stages.compute("check-codes", parts)
    return float(to_numpy(s).sum())
