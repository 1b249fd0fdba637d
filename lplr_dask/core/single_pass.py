"""The single-pass mode (``passes=1``): graph builders that read A once.

After Tropp, Yurtsever, Udell & Cevher (2017), adapted to quantized factors. In one streaming
pass over A's canonical blocks, each tile A_ij is read once and feeds three sketches:

- the range sketch Y = A·S (n × m, the two-pass mode's sketch, bit for bit: the same stream,
  the same per-tile GEMM and the same reduction tree, so L̂ is the two-pass mode's L̂), with
  the row sums of squares of A (‖A‖²_F, exact);
- the co-range sketch W = Ψ·A (ℓ × d), Ψ a sparse sign matrix with ℓ rows (``corange_size``)
  and :data:`CORANGE_NNZ` nonzeros per column, kept in column panels on the workers, never
  gathered;
- the test sketch T = Γ·A (q × d, q = :data:`ERROR_TEST_ROWS`) for the error estimate.

Ψᵀ and Γᵀ are regenerated per row block from the seed (:data:`STREAM_SPARSE_CORANGE`,
:data:`STREAM_ERROR_TEST`), like S, so every result is independent of the storage tiling and
of the worker count. After the basis stage (L̂ from Y as in the two-pass mode), the
projection needs no pass over A: Ψ·L̂ and Γ·L̂ (ℓ × m and q × m) are reduced over L̂'s row
blocks, and per column panel R_j = (Ψ·L̂)⁺·W_j is quantized where it is computed and written,
and the panel's share of the estimate ‖T_j − (Γ·L̂)·R̂_j‖² is returned.

Why (Ψ·L̂)⁺ is right for a quantized L̂: for any L̂ = Q·T with T invertible,
L̂(ΨL̂)⁺ = Q(ΨQ)⁺, so L̂·R equals Tropp et al.'s QX with Q an orthonormal basis of span(L̂),
and their Theorem 4.3 applies to span(L̂): with Ψ Gaussian and independent of L̂,
E‖A − L̂R‖²_F = (1 + m/(ℓ − m − 1))·‖A − P_L̂·A‖²_F, where the second factor is the two-pass
mode's error before R is quantized. A sparse sign Ψ with ζ = 8 nonzeros per column behaves
like the Gaussian one in this role (Tropp et al. 2019, Sec. 3.3 and 7.3; measured here:
tests/core/test_single_pass.py and ``benchmarks/bench_single_pass.py``) at ζ additions per
entry of A instead of ℓ multiply-adds, which keeps the pass at the disk's speed. The error
estimate follows Tropp, Yurtsever, Udell & Cevher (2019), Sec. 6: with Γ Gaussian of q rows
scaled by 1/√q and independent of L̂R̂, ‖Γ(A − L̂R̂)‖²_F is an unbiased estimate of
‖A − L̂R̂‖²_F distributed as Σ_i σ_i²·χ²_q/q over the singular values σ_i of the residual.

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
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from lplr_dask.core.engine import (
    Stages,
    check_one_block,
    decode,
    encode,
    left_multiply,
    panel_of,
    shared_state,
    sketch_matrix,
    sketch_partial,
)
from lplr_dask.errors import ParameterError
from lplr_dask.kernels.linalg import sparse_rows_product
from lplr_dask.kernels.quantize import QuantizerSpec, block_range
from lplr_dask.kernels.random import (
    STREAM_DITHER_RIGHT,
    STREAM_ERROR_TEST,
    block_generator,
    sketch_rows,
    sparse_sign_rows,
)
from lplr_dask.kernels.xp import array_namespace, asarray_like, to_numpy

__all__ = [
    "CORANGE_FACTOR",
    "CORANGE_NNZ",
    "ERROR_TEST_ROWS",
    "SKETCH_CONFIG",
    "SinglePassSketch",
    "check_corange_size",
    "corange_size",
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
``benchmarks/bench_single_pass.py``); ℓ = 4m + 1 gives 1 + 1/3 (×1.155; measured ×1.157
at ranks 64 and 128 with the sparse sign Ψ, ×1.150–1.153 with the Gaussian one it replaced,
×1.155 at rank 256 on 65536 × 131072), within the goal of 1.25× the two-pass error. With the
sparse Ψ the wider sketch costs ζ·n·d additions whatever ℓ, and (ℓ + q)·d entries of memory in
A's precision."""

CORANGE_NNZ = 8
"""ζ, the nonzeros per column of the sparse sign Ψ (Tropp et al. 2019 recommend ζ = 8). On a
4096² float32 tile with ℓ = 1025 its product takes 0.041 s against 0.415 s for a dense
Gaussian Ψ (one thread; the range sketch's GEMM at m = 256 took 0.113 s in the same run)."""

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


def _operator_block(seed, start, stop, ell, q):
    """Rows start:stop of Ψᵀ (sparse: columns and values) and of Γᵀ (dense, float32)."""
    cols, vals = sparse_sign_rows(seed, start, stop, ell, nnz=CORANGE_NNZ)
    return cols, vals, sketch_rows(seed, start, stop, q, stream=STREAM_ERROR_TEST)


def _operator_layer(seed: int, row_chunks, ell: int, q: int) -> tuple[str, dict]:
    """One task per row block making its share of Ψ and Γ: (layer name, tasks)."""
    name = "lplr-corange-" + tokenize(seed, tuple(row_chunks), ell, q, CORANGE_NNZ)
    bounds = np.cumsum((0, *row_chunks))
    return name, {
        (name, i): (_operator_block, seed, int(bounds[i]), int(bounds[i + 1]), ell, q)
        for i in range(len(row_chunks))
    }


def _corange_product(op, x, ell):
    """[Ψ_i; Γ_i]·X_i ((ℓ + q) × k) for a row block X_i, in X's precision: ζ additions per
    entry of X for Ψ, a q-row GEMM for Γ."""
    cols, vals, gamma_t = op
    xp = array_namespace(x)
    w = sparse_rows_product(cols, vals, ell, x)
    t = xp.matmul(asarray_like(gamma_t, x).astype(x.dtype, copy=False).T, x)
    return xp.concatenate([w, t])


def _tile(a, s, op, ell):
    """One tile's share of the sketches: the two-pass sketch's partial
    (:func:`~lplr_dask.core.engine.sketch_partial`, so Y is the two-pass Y bit for bit) and
    [Ψ_i; Γ_i]·A_ij in A's precision."""
    return sketch_partial(a, s), _corange_product(op, a, ell)


SKETCH_CONFIG = {"optimization.fuse.active": False}
"""Dask configuration under which :func:`single_pass_sketch`'s arrays are computed: Dask's
low-level fusion rebuilds the graph without layer annotations, and would drop the row-first
priority of A's blocks and the tile tasks."""


def _row_first(key) -> int:
    """Scheduler priority of a block (name, i, j) of A or of its tile task: row block i
    before i + 1 (higher first); 0 for other keys."""
    return -key[1] if isinstance(key, tuple) and len(key) == 3 else 0


def _add_partial(total, tile):
    """The running [W; T] sum of a column panel plus one tile's share (A's precision)."""
    return tile[1] if total is None else total + tile[1]


class SinglePassSketch:
    """The sketches of one pass over A (lazy Dask arrays: ``ext`` float64, ``w`` and ``t`` in
    A's precision, float32 for a float32 A).

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
    it is freed as soon as its products are done. Y is summed over column blocks by a fixed
    tree (``split_every=8``, as in the two-pass sketch) and [W; T] down each column panel in
    row-block order, both over the canonical block grid: the same sums for any tiling of the
    input and any worker count. A's blocks and the tile tasks carry a priority, row block i
    before i + 1, which the distributed scheduler honours (compute under
    :data:`SKETCH_CONFIG`, or fusion drops the annotation): each row's Y
    partials are summed as soon as its row is read, so Y's tree never waits on a later row.

    Parameters
    ----------
    a : dask.array.Array
        n × d, in the canonical blocks.
    rank : int
        m, the columns of S (and of Y).
    seed : int
        Keys S (``STREAM_SKETCH``), Ψ (``STREAM_SPARSE_CORANGE``) and Γ
        (``STREAM_ERROR_TEST``).
    corange_rows : int
        ℓ, the rows of the sparse sign Ψ (:data:`CORANGE_NNZ` nonzeros per column).
    test_rows : int, default ERROR_TEST_ROWS
        q, the rows of Γ.

    Returns
    -------
    SinglePassSketch
        ``ext`` (n × (m + 1)), ``w`` (ℓ × d), ``t`` (q × d), lazy.

    Notes
    -----
    Cost: (m + q)·n·d multiply-adds and ζ·n·d additions (ζ = :data:`CORANGE_NNZ`) in the input
    precision, one read of A. Memory beyond the tiles in flight: the partials of the rows in
    progress (one or two rows of n_i × (m + 1) float64 Y partials and (ℓ + q) × d_j tile
    products), and each column panel's running (ℓ + q) × d_j sum in A's precision, which
    becomes the result; the results (n × m float64 and (ℓ + q) × d) stay on the workers.
    Measured (2 workers × 2 threads, m = 256, ℓ = 1025): peak worker RSS 785 MiB on 65536 ×
    32768 float32 and 1326 MiB on 65536 × 131072, against 1500 MiB and 2.47 GB in Dask's
    own order (column panel by column panel).
    """
    d = a.shape[1]
    like = meta_from_array(a)
    s = sketch_matrix(d, rank, seed=seed, row_chunks=a.chunks[1], dtype=a.dtype, meta=like)
    oname, ops = _operator_layer(seed, a.chunks[0], corange_rows, test_rows)
    token = tokenize(a, s, oname)
    tname, yname, wname = (f"lplr-single-pass-{part}-{token}" for part in ("tile", "y", "w"))
    ni, nj = a.numblocks
    # [W; T] is summed down each column panel in row-block order, one running sum
    # per panel (a chain whose last link is W's block). A tree over the row blocks held up
    # to 8 rows of float64 partials and the tile outputs waiting for them: 3.4 GB in a worker
    # on a 65536 × 131072 matrix at ℓ = 1035 (2 workers); this chain 2.5 GB.
    sname = f"lplr-single-pass-wsum-{token}"
    tiles: dict = {}
    ys: dict = {}
    ws: dict = {}
    for j in range(nj):
        prev: tuple | None = None
        for i in range(ni):
            tiles[(tname, i, j)] = (_tile, (a.name, i, j), (s.name, j, 0), (oname, i), corange_rows)
            ys[(yname, i, j, 0)] = (operator.getitem, (tname, i, j), 0)
            key = (wname, 0, j) if i == ni - 1 else (sname, i, j)
            ws[key] = (_add_partial, prev, (tname, i, j))
            prev = key
    base = HighLevelGraph.merge(a.dask, s.dask)
    # A's blocks and the tiles row by row (a priority, honoured by the distributed
    # scheduler): each row's Y partials are summed as soon as its last tile is done, and the
    # [W; T] chains advance one row at a time. In Dask's own order the reads went column
    # panel by column panel and whole rows of tile outputs waited for their row's sum.
    row_first = {"priority": _row_first}
    layers: dict = {
        **base.layers,
        **{
            n: MaterializedLayer(dict(lay), annotations=row_first)
            for n, lay in a.dask.layers.items()
        },
        oname: ops,
        tname: MaterializedLayer(tiles, annotations=row_first),
        yname: ys,
        wname: ws,
    }
    deps = {
        **base.dependencies,
        oname: set(),
        tname: {*a.__dask_layers__(), *s.__dask_layers__(), oname},
        yname: {tname},
        wname: {tname},
    }
    graph = HighLevelGraph(layers, deps)
    y_part = da.Array(
        graph,
        yname,
        chunks=(a.chunks[0], (1,) * nj, (rank + 1,)),
        dtype=np.float64,
        meta=asarray_like(np.empty((0, 0, 0), dtype=np.float64), like),
    )
    rows = corange_rows + test_rows
    wt = da.Array(
        graph,
        wname,
        chunks=((rows,), a.chunks[1]),
        dtype=a.dtype,
        meta=asarray_like(np.empty((0, 0), dtype=a.dtype), like),
    )
    ext = y_part.sum(axis=1, split_every=8)
    return SinglePassSketch(ext, wt[:corange_rows], wt[corange_rows:])


def sketch_left(lhat: da.Array, rows: tuple[int, int], *, seed: int) -> da.Array:
    """[Ψ·L̂; Γ·L̂] ((ℓ + q) × m, float64) for the row-blocked n × m L̂, reduced over L̂'s row
    blocks with Ψ and Γ regenerated from the seed; products in L̂'s precision like W's and
    T's, so that W − (Ψ·L̂)·R and T − (Γ·L̂)·R̂ compare like with like. Cost: ζ·n·m additions
    and q·n·m multiply-adds."""
    ell, q = rows
    lhat = lhat.rechunk({1: -1})
    oname, ops = _operator_layer(seed, lhat.chunks[0], ell, q)
    pname = "lplr-corange-left-" + tokenize(lhat, oname)
    parts: dict = {
        (pname, i, 0, 0): (_leading_axis, (_corange_product, (oname, i), (lhat.name, i, 0), ell))
        for i in range(lhat.numblocks[0])
    }
    graph = HighLevelGraph(
        {**lhat.dask.layers, oname: ops, pname: parts},
        {**lhat.dask.dependencies, oname: set(), pname: {*lhat.__dask_layers__(), oname}},
    )
    part = da.Array(
        graph,
        pname,
        chunks=((1,) * lhat.numblocks[0], (ell + q,), (lhat.shape[1],)),
        dtype=np.float64,
        meta=asarray_like(np.empty((0, 0, 0)), meta_from_array(lhat)),
    )
    return part.sum(axis=0, split_every=8)


def _leading_axis(x):
    return x.astype(np.float64)[None]


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
    # the factors are read back from disk (NumPy) while T may be on the GPU
    resid = t - asarray_like(gamma_l, t) @ asarray_like(r, t).astype(np.float64)
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
    gamma_t = sketch_matrix(
        left.shape[0],
        q,
        seed=seed,
        row_chunks=left.chunks[0],
        dtype=left.dtype,
        meta=meta_from_array(left),
        stream=STREAM_ERROR_TEST,
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
