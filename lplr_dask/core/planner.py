"""The rate–distortion planner: estimated errors of every candidate from one sketch.

One planner serves ``--budget``, ``--method auto``, ``--max-error`` and (per tensor) the
checkpoint policy. It reads A once (more only when the data ask for it, see *Passes*), keeps
on the workers

- Y = A·S, the sketch of the largest rank K that the candidates need (for ``nq+lplr`` also
  the sketch of each residual A − Q(A)), with ‖A‖²;
- a seeded sample of whole column groups of A (``sample_cols`` columns; all of A when d is
  smaller), taken in the same pass: one task per tile computes its sketch partial and cuts
  its sampled columns, so each tile of A has one consumer and is freed at once (streaming).

**Exact on the sample.** Given the quantized left factor L̂, the error separates over columns,
‖A − L̂R̂‖² = Σ_j ‖A_j − L̂R̂_j‖², and R̂_j depends only on column j and its scale group, so
the error on the sampled columns is computed exactly as the run computes it (the same L̂ over
all n rows, G = L̂ᵀL̂, R = G⁺L̂ᵀA_sample, R quantized group by group); the reported estimate is
the ratio estimator √(err²_sample / ‖A_sample‖²). When the sample holds every column the
estimate is the run's error, up to rounding (a K-column QR against the m-column one).

**One sketch, every rank.** The sketch has the prefix property (:mod:`lplr_dask.kernels.random`):
the first m columns of the K-column sketch are the rank-m sketch (scaled), and the first m
columns of its QR factor span the rank-m range. The rank-m basis of each method is Q_K times
a small K × m matrix built *on the workers* from the seed (the rank-m rotation of ``lplr``,
the eigenvectors of the leading block of B·Bᵀ for ``dsvd``/``lplr-svd``), so no data is
embedded in a task graph and the driver only receives errors.

**Screen, then score.** For a budget b and a method, each pair of bit widths (B, B′) has one
candidate, its largest rank m(B, B′) within b (up to 64 pairs). Scoring one exactly costs a
quantized n × m left factor, its Gram matrix and L̂ᵀ·A_sample (O(n·m·(m + s)) flops); a model
of the error costs a few flops. The screen measures, once per sketch, the captured energy
head(m) = ‖Q_mᵀ·A_sample‖² of every rank (one K × n × s product over at most
:data:`SCREEN_SAMPLE` of the sample's columns: the prefix property again)
and, once per method, the relative error ρ of every left and right quantizer of the grid on a
sample of the rotated basis's rows and of R; its estimate is error² ≈ tail(m) + (ρ_L·(1 − m/n)
+ ρ_R)·head(m) (:func:`_modelled`; within 1 % of the exact scores on the benchmarks' matrices
at 3–8 bits, 2 % at 1 bit). Pairs are then scored exactly in the order of the estimate, one at
a time, until no unscored pair's estimate, scaled by the smallest exact/estimate ratio seen, is
below the best exact error (the ratio never above 1): usually one or two exact scores instead
of a grid. The choice is always an exactly scored point. Pairs whose rank exceeds the sketch
are estimated with the tail's chord over its last K/8 ranks, extended (below a convex tail:
optimistic); those whose scaled estimate is above the best error found are pruned, and only
otherwise is the sketch extended by the missing columns (one more pass, prefix property; the
basis of the wider sketch continues the narrower one's, :func:`extend_orthonormal`). The
first pass covers the pairs within :data:`COVER_BITS` of the widest (later searches of a
family: of its last best pair), where the best pair usually lies.
``--max-error E`` doubles the budget until an estimate meets E; the screen's model, calibrated
on that point, then places the budget, and exact searches just below and above the guess
confirm it (bisection, the error being monotone in the budget, if they do not).
``exhaustive=True`` scores every pair (the test of the screen compares the two).

**Memory guard.** The sketch is n × K float64 on the workers (per operand): K is at most
``min(n, d) − 1`` and at most :data:`PLAN_SKETCH_BYTES` / (8 n). Ranks above the guard are
capped (``Plan.capped``); the run itself needs its n × m sketch anyway.

**Passes.** ``plan`` makes one pass over A (the sketch and the sample), plus 2 per power
iteration for the methods that use them, plus one for the truncation of ``dsvd`` and
``lplr-svd``, plus one per sketch extension. The job reuses the sketch of the chosen
configuration and the orthonormal basis of it (:meth:`Plan.sketch_for`), so a budget run of
``lplr`` reads A twice, like a run with the rank given, and runs no QR of its own; for an
``lplr`` choice it also takes the rotated basis Q_m·H the planner scored (no rotation either).

**In memory.** :func:`curve_in_memory` scores the candidates of ``lplr`` and ``nq+lplr`` of a
matrix held in memory (a checkpoint's tensor, inside its Dask task) with NumPy in the calling
thread: the same sketch stream, the run's TSQR over A's row blocks and the same exact score,
without a graph per step (on a 384 × 384 weight ~150 graphs cost 5× the arithmetic).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass, field, replace

import dask
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from lplr_dask.core.engine import (
    Stages,
    decode,
    encode,
    global_ranges_many,
    gram,
    left_multiply,
    local_codebook,
    one_blas_thread,
    quantize_rows_block,
    right_multiply,
)
from lplr_dask.core.methods import (
    basis_rotation,
    check_finite_input,
    extend_orthonormal,
    nq_residual,
    orthonormalize,
    residual_array,
    times,
)
from lplr_dask.core.params import (
    DEFAULT_SVD_POWER_ITER,
    CompressionConfig,
    CompressionOptions,
)
from lplr_dask.errors import ParameterError
from lplr_dask.kernels.codebooks import fit_lloyd
from lplr_dask.kernels.linalg import gram_pinv, top_eigenvectors
from lplr_dask.kernels.quantize import block_range, entry_histogram, quantizer_spec
from lplr_dask.kernels.random import (
    SEED_BLOCK,
    STREAM_LPLR_SVD_MIX,
    STREAM_SKETCH,
    block_generator,
)
from lplr_dask.kernels.xp import array_namespace, asarray_like, to_numpy
from lplr_dask.storage.inputs import InputMatrix

__all__ = [
    "FAMILIES",
    "PLAN_SKETCH_BYTES",
    "Plan",
    "Point",
    "curve_in_memory",
    "default_max_passes",
    "family_passes",
    "max_rank_for",
    "plan",
]

PLAN_SKETCH_BYTES = 4 << 30
"""The memory guard: the planner's sketch (n × K float64 per operand, on the workers) stays
below this many bytes; larger ranks are capped and the plan says so."""

IN_MEMORY_BYTES = 4 << 30
"""``max_passes=None`` leaves the passes unbounded for inputs up to this size (read from the
page cache, a pass costs its GEMM) and bounds them to 3 above it (every pass a cold read)."""

BIT_CHOICES = tuple(range(1, 9))
KIND_CHOICES = {1: ("sign",), 2: ("clipped",), 3: ("clipped",)}
"""The quantizers the planner weighs against the default kind of L and R at each width (when
``quantizer`` is not given): a pair (B, B′) becomes one candidate per combination of kinds,
screened and scored like the widths. Measured with ``benchmarks/planner_reference.py
--methods lplr:lloyd,lplr:clipped,lplr:normal,lplr:uniform`` (every factor of one kind):
``clipped`` won cells whose factors had 1–3 bits (MiniLM's weights, by up to 2 %), ``lloyd``
every cell with 4 bits or more, ``normal`` and ``uniform`` none; at 1 bit ``sign`` is the
symmetric alternative to the default ``clipped``. Each kind weighed costs the screen one
quantization of its sample per width (0.1 s for ``clipped`` at rank 869)."""
SCREEN_ROWS = 1024
"""Rows of the basis (whole scale groups, seeded) on which the screen measures what each left
quantizer costs."""
SCREEN_SAMPLE = 1024
"""Columns of the sample (every t-th whole group) on which the screen's model measures the
energy that each rank captures: half of the default sample, halving the screen's product
Q_Kᵀ·A_sample (its tasks: 1.1 s of compute before, 0.6 s after, on 12288² at one bit per
entry). The exact scores use the whole sample."""
SCREEN_COLS = 512
"""Sampled columns on which the screen measures what each right quantizer costs."""
SMALL_ENTRIES = 1 << 22
"""Matrices up to this many entries (16 MiB in float32: most of a checkpoint's tensors) get a
sketch wide enough for every pair at once (for ``auto`` only up to :data:`AUTO_EVERY_WIDTH`)."""
AUTO_EVERY_WIDTH = 512
"""``auto`` sketches every pair at once only when min(n, d) is at most this: its power
iterations, bases and screens of several operands grow with the width (2048² at 4 bits: 63.5 s
with every pair's 2047 columns, 17.8 s with those within a bit of the widest, 1147 columns after
one extension; the same choice), while on MiniLM's 384-wide weights the narrower cover cost
nothing and chose worse by up to 1 % (the screen's model pruned the best pair)."""
SCREEN_ROUND = 1
"""Candidates scored exactly per round of the screened search."""
COVER_BITS = 1
"""The first planning pass sketches the rank of every pair within this many bits of the
widest (B, B′): where the best pair usually lies. Pairs with fewer bits (and more rank) are
pruned by the screen's optimistic estimate or widen the sketch in a second pass, whose basis
continues the first's (:func:`lplr_dask.core.methods.extend_orthonormal`). Two bits made the
first pass 17 % wider and its QR 36 % dearer on 12288² at one bit per entry, for pairs that
were pruned."""

FAMILIES = ("lplr", "lplr+power", "dsvd", "lplr-svd", "nq", "nq+lplr")
"""What ``method="auto"`` considers (``paper`` only when asked for by name)."""


def family_passes(
    family: str, n_power_iter: int = 0, *, single_pass: bool = False, n_oversamples: int = 0
) -> int:
    """Passes over A of a compression of ``family`` (the plan's shared sketch counted as the
    sketch pass it replaces): lplr and paper 2 (1 single-pass), + 2 per power iteration,
    + 1 for the truncation of an oversampled sketch, dsvd and lplr-svd 3 + 2 per power
    iteration (their oversampling is part of the truncation), nq 1, nq+lplr 3."""
    q = int(n_power_iter or 0)
    if family == "nq":
        return 1
    if family == "nq+lplr":
        return 3 + 2 * q
    if family in ("dsvd", "lplr-svd"):
        return 3 + 2 * q
    return 1 if single_pass else 2 + 2 * q + (n_oversamples > 0)


def default_max_passes(nbytes: int) -> int | None:
    """``max_passes=None``: no bound up to :data:`IN_MEMORY_BYTES` of input (in memory an extra
    pass costs only its GEMM), 3 beyond (out of core every pass is a cold read of A: lplr,
    nq and nq+lplr stay available, the power-iteration methods do not)."""
    return None if nbytes <= IN_MEMORY_BYTES else 3


@dataclass(frozen=True)
class Point:
    """One scored candidate.

    ``method`` is the family label (``"lplr+power"`` is ``lplr`` with power iterations),
    ``passes`` the passes over A of its compression, ``estimated_rel_error`` the error on the
    column sample (exact there).
    """

    config: CompressionConfig
    bits_per_entry: float
    estimated_rel_error: float
    method: str
    passes: int

    @property
    def quantizers(self) -> dict:
        """The kind of each stored factor's codes ({"left": ..., "right": ..., "matrix": ...})."""
        return _kinds(self.config)

    def to_dict(self) -> dict:
        c = self.config
        return {
            "method": self.method,
            "rank": c.rank,
            "bits_left": c.left.bits if c.left is not None else None,
            "bits_right": c.right.bits if c.right is not None else None,
            "bits_matrix": c.matrix.bits if c.matrix is not None else None,
            "quantizers": self.quantizers,
            "n_power_iter": c.n_power_iter,
            "passes": self.passes,
            "bits_per_entry": self.bits_per_entry,
            "estimated_rel_error": self.estimated_rel_error,
            "config": c.to_dict(),
        }


def _kinds(cfg: CompressionConfig) -> dict:
    """The kind of each stored factor's codes ({"left": ..., "right": ..., "matrix": ...})."""
    return {
        name: spec.kind
        for name, spec in (("left", cfg.left), ("right", cfg.right), ("matrix", cfg.matrix))
        if spec is not None and not spec.is_float
    }


def _named(spec, name):
    """``spec`` with the level set of the named quantizer (None: unchanged)."""
    if name is None or spec is None or spec.is_float:
        return spec
    return quantizer_spec(
        name,
        bits=spec.bits,
        granularity=spec.granularity,
        group_size=spec.group_size,
        rounding=spec.rounding,
    )


def _left_of(cand) -> tuple:
    """What fixes a candidate's L̂: its rank, L's width and L's kind."""
    return cand[0], cand[1], cand[3]


def _order(pair) -> tuple:
    """A total order on pairs (B, B′, kind of L, kind of R); a default kind (None) first."""
    return pair[0], pair[1], pair[2] or "", pair[3] or ""


@dataclass
class Plan:
    """Every scored candidate of one matrix (:attr:`curve`) and the choices over it.

    Attributes
    ----------
    shape : (int, int)
    curve : list of Point
        Every candidate scored, in the order scored.
    sample_columns : int
        Columns in the sample; ``exact`` is True when that is every column of A.
    sketch_rank : int
        K, the columns of the planner's sketch.
    capped : bool
        True when the memory guard capped a rank (see :data:`PLAN_SKETCH_BYTES`).
    pruned : list of dict
        Pairs beyond the sketch ruled out by the screen without being scored (method, bits,
        rank, the scaled estimate as ``bound``).
    passes : int
        Passes over A the planner made.
    seconds : float
    """

    shape: tuple[int, int]
    curve: list = field(default_factory=list)
    sample_columns: int = 0
    exact: bool = False
    sketch_rank: int = 0
    capped: bool = False
    pruned: list = field(default_factory=list)
    passes: int = 0
    seconds: float = 0.0
    _handover: dict = field(default_factory=dict, repr=False)
    _rotated: tuple = field(default=(None, None), repr=False)  # ((q, m), Q_m·H)

    def best(self, budget: float) -> Point:
        """The lowest estimated error among points with ``bits_per_entry <= budget``."""
        fits = [p for p in self.curve if p.bits_per_entry <= budget * (1 + 1e-12)]
        if not fits:
            cheapest = min(self.curve, key=lambda p: p.bits_per_entry, default=None)
            need = f"{cheapest.bits_per_entry:.4f}" if cheapest else "more"
            raise ParameterError(
                f"budget={budget} bits per entry is too small: the cheapest configuration "
                f"scored needs {need} bits per entry for a {self.shape[0]}×{self.shape[1]} "
                "matrix. Raise --budget to at least that, or use --method nq."
            )
        return min(fits, key=lambda p: (p.estimated_rel_error, p.bits_per_entry))

    def cheapest(self, max_error: float) -> Point:
        """The fewest bits per entry among points whose estimate is ``<= max_error``."""
        meets = [p for p in self.curve if p.estimated_rel_error <= max_error]
        if not meets:
            best = min(self.curve, key=lambda p: p.estimated_rel_error)
            raise ParameterError(
                f"max_error={max_error} is out of reach: the lowest estimated error is "
                f"{best.estimated_rel_error:.4g} at {best.bits_per_entry:.3f} bits per entry "
                f"({best.method}, rank {best.config.rank}). Raise --max-error, or give "
                "--budget for the best error within a size."
            )
        return min(meets, key=lambda p: (p.bits_per_entry, p.estimated_rel_error))

    def frontier(self) -> list[Point]:
        """The Pareto points: each has a lower estimate than every cheaper point."""
        out, best = [], math.inf
        for p in sorted(self.curve, key=lambda p: (p.bits_per_entry, p.estimated_rel_error)):
            if p.estimated_rel_error < best:
                out.append(p)
                best = p.estimated_rel_error
        return out

    def table(self) -> list[dict]:
        """The curve as rows (the ``budget_search`` of a result), without the configs."""
        return [{k: v for k, v in p.to_dict().items() if k != "config"} for p in self.curve]

    def sketch_for(self, config: CompressionConfig):
        """What the job's ``sketch`` stage would compute for ``config``, cut from the
        planner's: ``(Y, ‖A‖², Q, X)`` with Y the n × k sketch (float64, on the workers) and Q
        the first k columns of the planner's orthonormal basis of its K-column sketch (on the
        workers; by the prefix property they span the range of Y, so the ``basis`` stage
        need not orthonormalize Y again), Q None when the planner made no basis; X the
        rotated basis Q_k·H that the planner scored for ``config`` (``lplr`` without
        oversampling, the best point scored), else None. None when the planner has no sketch
        for ``config``."""
        key = _operand_key(config)
        entry = self._handover.get((key, int(config.n_power_iter)))
        if entry is None or not config.rank:
            return None
        y, norm2, scale_cols, basis = entry
        k = config.rank + config.n_oversamples
        if config.method in ("dsvd", "lplr-svd"):
            k = min(config.rank + max(config.n_oversamples, 10), min(self.shape))
        if k > y.shape[1]:
            return None
        out = y[:, :k]
        if scale_cols:  # a plain sketch: A·S_k has entries of S scaled by 1/√k, ours by 1/√K₀
            out = out * math.sqrt(scale_cols / k)
        q = basis[:, :k] if basis is not None and k <= basis.shape[1] else None
        at, rotated = self._rotated
        wanted = (int(config.n_power_iter), config.rank)
        if config.method != "lplr" or config.n_oversamples or at != wanted:
            rotated = None
        return out, norm2, q, rotated


def _operand_key(config: CompressionConfig):
    return None if config.matrix is None else tokenize(config.matrix.to_dict())


def max_rank_for(shape, *, budget: float, make) -> int:
    """Largest m with ``make(m).bits_per_entry(shape) <= budget`` (0 if none): a bisection
    over 1 ≤ m < min(n, d) (bits grow with m)."""
    lo, hi = 0, min(shape) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid).bits_per_entry(shape) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ----------------------------------------------------------------------------- kernels


def _sketch_cols(seed: int, start: int, stop: int, c0: int, c1: int, scale: float):
    """Rows start:stop, columns c0:c1 of the unscaled sketch stream, times ``scale``: the
    columns of :func:`lplr_dask.kernels.random.sketch_rows` (drawn column by column per seed
    block, so any column range is cut from the same numbers)."""
    first, last = start // SEED_BLOCK, -(-stop // SEED_BLOCK)
    parts = [
        block_generator(seed, STREAM_SKETCH, b)
        .standard_normal((c1, SEED_BLOCK), dtype=np.float32)[c0:c1]
        .T
        for b in range(first, last)
    ]
    block = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    off = start - first * SEED_BLOCK
    return np.ascontiguousarray(block[off : off + stop - start] * np.float32(scale))


def _sketch_block(seed, start, stop, c0, c1, scale, dtype, like):
    return asarray_like(_sketch_cols(seed, start, stop, c0, c1, scale).astype(dtype), like)


def _sketch_columns(d, c0, c1, *, seed, scale, row_chunks, dtype, meta):
    """Columns c0:c1 of the sketch S (d × (c1 − c0)), each block built on its worker."""
    name = "lplr-plan-sketch-" + tokenize(seed, d, c0, c1, scale, row_chunks, np.dtype(dtype).str)
    bounds = np.cumsum((0, *row_chunks))
    dsk = {
        (name, j, 0): (
            _sketch_block,
            seed,
            int(bounds[j]),
            int(bounds[j + 1]),
            c0,
            c1,
            scale,
            dtype,
            meta,
        )
        for j in range(len(row_chunks))
    }
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks=(tuple(row_chunks), (c1 - c0,)), dtype=dtype, meta=meta)


def _plan_tile(a, s, ii, jj, *, specs, seed, row_chunks, col_chunks, sample):
    """One tile's share of the planning pass: ([A·S | (A − Q(A))·S per spec | row ‖A‖² |
    row ‖A_sample‖²] as a float64 partial sum, the tile's sampled columns of A)."""
    xp = array_namespace(a)
    r0, c0 = int(to_numpy(ii[:1])[0]), int(to_numpy(jj[:1])[0])  # the tile's first row, column
    i = int(np.searchsorted(np.cumsum(row_chunks), r0, side="right"))
    j = int(np.searchsorted(np.cumsum(col_chunks), c0, side="right"))
    s = s.astype(a.dtype, copy=False)
    parts = [xp.matmul(a, s).astype(np.float64)]
    info = {
        0: {
            "chunk-location": (i, j),
            "array-location": [(r0, r0 + a.shape[0]), (c0, c0 + a.shape[1])],
        }
    }
    for spec in specs:
        res = nq_residual(a, spec=spec, lo=None, hi=None, seed=seed, block_info=info)
        parts.append(xp.matmul(res, s).astype(np.float64))
    taken = None
    if sample is not None:
        lo, hi = np.searchsorted(sample, [c0, c0 + a.shape[1]])
        taken = a[:, asarray_like(sample[lo:hi] - c0, a)]
        for x in (a, taken):
            parts.append(xp.einsum("ij,ij->i", x, x, dtype=np.float64)[:, None])
    return xp.concatenate(parts, axis=1), taken


def _partial_of(t):
    return t[0][:, None, :]


def _sample_of(t):
    return t[1]


def _planning_pass(a, s, *, specs, seed, sample):
    """One pass over A: (Σ_j partials, n × width float64; the sample A[:, sample] or None).

    Each tile has one consumer (the kernel), whose small result two cheap tasks split: the
    partial goes to the fixed summation tree, the sampled columns to the sample."""
    k = s.shape[1]
    width = k * (1 + len(specs)) + (0 if sample is None else 2)
    ii = da.arange(a.shape[0], chunks=(a.chunks[0],))  # row and column numbers, built on the
    jj = da.arange(a.shape[1], chunks=(a.chunks[1],))  # workers: they locate each tile
    tiles = da.blockwise(
        _plan_tile,
        "ij",
        a,
        "ij",
        s,
        "jk",
        ii,
        "i",
        jj,
        "j",
        dtype=object,
        meta=np.empty((0, 0), dtype=object),
        concatenate=True,
        specs=specs,
        seed=seed,
        row_chunks=a.chunks[0],
        col_chunks=a.chunks[1],
        sample=sample,
    )
    part = da.blockwise(
        _partial_of,
        "ijk",
        tiles,
        "ij",
        new_axes={"k": width},
        adjust_chunks={"j": 1},
        dtype=np.float64,
        meta=np.empty((0, 0, 0)),
    )
    total = part.sum(axis=1, split_every=8)
    if sample is None:
        return total, None
    bounds = np.cumsum((0, *a.chunks[1]))
    per_block = tuple(
        int(np.searchsorted(sample, bounds[j + 1]) - np.searchsorted(sample, bounds[j]))
        for j in range(a.numblocks[1])
    )
    cols = da.blockwise(
        _sample_of,
        "ij",
        tiles,
        "ij",
        adjust_chunks={"j": per_block},
        dtype=a.dtype,
        meta=meta_from_array(a),
    )
    return total, cols.rechunk({1: -1})


def _rotation(seed, m):
    return basis_rotation(seed, m)


def _svd_transform(bbt, k, m, method, seed, n_cols):
    """The K × m matrix T with basis = Q_K·T of ``dsvd`` (U_m of the leading k × k block of
    B·Bᵀ) or ``lplr-svd`` (U_m Σ_m Ω_m, Ω the run's seeded k... m × m mix)."""
    bbt = to_numpy(bbt)
    u, w = top_eigenvectors(bbt[:k, :k], m)
    if method == "lplr-svd":
        sig = np.sqrt(np.maximum(w, 0.0))
        mix = block_generator(seed, STREAM_LPLR_SVD_MIX).standard_normal((m, m)) / np.sqrt(m)
        u = u @ (sig[:, None] * mix)
    t = np.zeros((n_cols, m))
    t[:k] = u
    return t


def _score(g, p, given, norms, rights):
    """Estimated relative errors, one per right quantizer, of the left factor whose G = L̂ᵀL̂
    and P = L̂ᵀA_sample are given: R = G⁺P (or ``given``, dsvd), quantized as the run does."""
    g, p = to_numpy(g), to_numpy(p)
    sub2, orig2 = (float(v) for v in to_numpy(norms))
    r = gram_pinv(g) @ p if given is None else to_numpy(given)
    out = []
    for spec in rights:
        lo, hi = (None, None) if spec.is_float else block_range(r, spec=spec)
        book = local_codebook(r, spec, hi)
        rhat = decode(encode(r, spec, lo, hi, codebook=book), spec, lo, hi, np.float64, book)
        err2 = sub2 - 2 * float(np.sum(rhat * p)) + float(np.sum(rhat * (g @ rhat)))
        out.append(float(np.sqrt(max(err2, 0.0) / orig2)) if orig2 > 0 else 0.0)
    return out


def _given(t, qts):
    return to_numpy(t).T @ to_numpy(qts)


def _histogram(block, spec, hi):
    if hi is None:
        _, hi = block_range(block, spec=spec)
    return to_numpy(entry_histogram(block, asarray_like(hi, block), spec=spec))


def _nq_score(sub, spec, seed):
    """Relative error of Q(A) on the sample (exact for group-wise scales, whose groups the
    sample keeps whole; a ``lloyd`` codebook is fitted to the sample)."""
    info = {0: {"chunk-location": (0, 0), "array-location": [(0, sub.shape[0]), (0, sub.shape[1])]}}
    book = None
    if not spec.is_float and spec.stores_codebook:
        _, hi = block_range(sub, spec=spec)
        book = local_codebook(sub, spec, hi)
    res = nq_residual(sub, spec=spec, lo=None, hi=None, seed=seed, block_info=info, codebook=book)
    num = float(np.einsum("ij,ij->", res, res, dtype=np.float64))
    den = float(np.einsum("ij,ij->", sub, sub, dtype=np.float64))
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _rel_mse(x, spec):
    """‖x − Q(x)‖² / ‖x‖² of one block quantized on its own ranges (and codebook)."""
    lo, hi = (None, None) if spec.is_float else block_range(x, spec=spec)
    book = local_codebook(x, spec, hi)
    xhat = decode(encode(x, spec, lo, hi, codebook=book), spec, lo, hi, np.float64, book)
    den = float(np.sum(x * x))
    return float(np.sum((x - xhat) ** 2)) / den if den > 0 else 0.0


def _screen_head(c, norms, *, span, svd, n):
    """The captured energy ``head[m − 1]`` on the sample of every rank m ≤ ``span`` (the
    prefix of Q_K for ``lplr``, the leading eigenvalues of C·Cᵀ for the SVD methods), with
    ‖operand sample‖², ‖A_sample‖² and A's rows ``n``; ``c`` = Q_Kᵀ·A_sample (K × s), of which
    the first ``span`` rows are used (the prefix property)."""
    c = to_numpy(c)[:span].astype(np.float64)
    sub2, orig2 = (float(v) for v in to_numpy(norms))
    if svd:
        energy = np.clip(np.linalg.eigvalsh(c @ c.T)[::-1], 0.0, None)
    else:
        energy = np.einsum("ij,ij->i", c, c)
    return {"head": np.cumsum(energy), "sub2": sub2, "orig2": orig2, "n": n}


def _screen_errors(x, *, m, seed, specs, side):
    """The relative squared error of every quantizer of ``specs`` on the rank-m rotated L's
    sampled rows (``side="left"``, ``x`` a row sample of Q_K) or on R = Hᵀ·C_m (``"right"``,
    ``x`` = C, up to :data:`SCREEN_COLS` sampled columns)."""
    h = basis_rotation(seed, m)
    if side == "left":
        y = to_numpy(x)[:, :m].astype(np.float64) @ h
    else:
        y = h.T @ to_numpy(x)[:m, :SCREEN_COLS].astype(np.float64)
    return {spec: _rel_mse(y, spec) for spec in specs}


def _modelled(scr, m, left, right, *, given_right: bool) -> float:
    """The screen's estimate of one candidate's relative error (a model, calibrated against
    the exact scores by the search).

    error² ≈ tail(m) + (ρ_L·(1 − m/n) + ρ_R)·head(m). A quantizer that meets the centroid
    condition (``lloyd``, the MSE-optimal scales of ``clipped``) gives L̂ = (1 − ρ_L)·L + E
    with E uncorrelated with L, which tilts L's span by tan²θ = ρ_L/(1 − ρ_L) and loses
    sin²θ = ρ_L of the captured energy; the refitted R wins back about the share m/n that
    E's n dimensions put in its span (all of ρ_L is lost when R is not refitted, ``dsvd``).
    R's own quantization adds ρ_R of it. Beyond the sketch (m > K) the tail follows its
    chord over its last K/8 ranks, extended: below the tail where it is convex, so an
    optimistic estimate."""
    head, sub2 = scr["head"], scr["sub2"]
    k = len(head)
    if m <= k:
        cap, tail = head[m - 1], sub2 - head[m - 1]
    else:
        k0 = max(1, k - max(8, k // 8))
        t0, t1 = sub2 - head[k0 - 1], sub2 - head[k - 1]
        slope = min(0.0, (t1 - t0) / max(k - k0, 1))
        cap, tail = head[k - 1], t1 + slope * (m - k)
    rl = scr["left"][left]
    lost = rl if given_right else rl * max(0.0, 1 - m / scr["n"])
    err2 = max(tail, 0.0) + (lost + scr["right"][right]) * cap
    return float(np.sqrt(max(err2, 0.0) / scr["orig2"])) if scr["orig2"] > 0 else 0.0


def _sample_columns(
    d: int, *, group: int, sample_cols: int, seed: int, key: int = 99
) -> np.ndarray:
    """Sorted column indices of whole groups, chosen by a seeded generator (all if d small)."""
    if d <= sample_cols:
        return np.arange(d)
    n_groups = -(-d // group)
    take = max(1, sample_cols // group)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))
    chosen = np.sort(rng.choice(n_groups, size=min(take, n_groups), replace=False))
    return np.concatenate([np.arange(g * group, min((g + 1) * group, d)) for g in chosen])


# ----------------------------------------------------------------------------- the planner


@dataclass(frozen=True)
class _Family:
    label: str  # lplr, lplr+power, paper, dsvd, lplr-svd, nq+lplr, nq
    method: str
    n_power_iter: int
    bits_matrix: int | None = None
    quantizer: str | None = None
    single_pass: bool = False  # scored as two-pass, run with passes=1 (max_passes=1)


SINGLE_PASS_FACTOR = float(np.sqrt(4.0 / 3.0))
"""``passes=1`` with its default co-range sketch ℓ = 4m + 1: the error is about
√(1 + m/(ℓ − m − 1)) = √(4/3) times the two-pass error (Tropp et al. 2017, Thm. 4.3), the
factor the planner applies to the two-pass estimate."""


class _Planner:
    def __init__(self, matrix: InputMatrix, options: CompressionOptions, stages, sample_cols):
        self.matrix, self.options, self.stages = matrix, options, stages
        self.a = matrix.data
        self.shape = tuple(int(v) for v in matrix.shape)
        n, d = self.shape
        self.sample_cols = sample_cols
        group = options.group_size or 128
        self.cols = _sample_columns(d, group=group, sample_cols=sample_cols, seed=options.seed)
        self.k0 = 0  # the scale of the sketch columns: entries N(0, 1/k0)
        self.k = 0
        self.y: dict = {}  # operand key -> n × K sketch (float64)
        self.residual_specs: dict = {}  # operand key -> QuantizerSpec of Q(A)
        self.bases: dict = {}  # (operand, q) -> Q, and (operand, q, "svd") -> (bbt, QᵀA_sub)
        self.narrower: dict = {}  # (operand, 0) -> Q of a sketch since extended
        self.centre: dict = {}  # family -> (B, B′) of its last search's best
        self.rotated: tuple = (math.inf, None, None)  # best lplr point: (error, (q, m), Q_m·H)
        self.power: dict = {}
        self.sub = None  # A_sample (n × s, A's dtype)
        self.subs: dict = {}
        self.norm2 = None
        self.scored: dict = {}  # (family, m, B, B') or (family, B_nq) -> Point
        self.cache: dict = {}  # configs, ranks, sample norms, quantizer errors
        self.curve: list[Point] = []
        self.pruned: list = []
        self.best_at: dict = {}  # budget -> the lowest exact error scored there by any family
        self.passes = 0
        self.capped = False
        itemsize = 8
        self.k_limit = max(1, min(min(n, d) - 1, PLAN_SKETCH_BYTES // (itemsize * n)))

    # -------------------------------------------------------------- configurations

    def config(self, fam: _Family, m=None, bl=None, br=None, kl=None, kr=None):
        """The configuration of candidate (m, B, B′) with the quantizers ``kl`` and ``kr`` of
        L and R (None: the factor's default)."""
        key = ("config", fam, m, bl, br, kl, kr)
        if key not in self.cache:
            cfg = self._resolve(fam, m, bl, br)
            if kl is not None or kr is not None:
                cfg = replace(cfg, left=_named(cfg.left, kl), right=_named(cfg.right, kr))
            self.cache[key] = cfg
        return self.cache[key]

    def _resolve(self, fam: _Family, m, bl, br) -> CompressionConfig:
        opts = replace(
            self.options,
            method=fam.method,
            budget=None,
            max_error=None,
            rank=m,
            bits_left=bl,
            bits_right=br,
            bits_matrix=fam.bits_matrix,
            n_power_iter=fam.n_power_iter,
            quantizer=fam.quantizer,
            max_rank=None,
        )
        return opts.resolve(self.shape, block_shape=self.matrix.block_shape)

    def rank_for(self, fam, b, bl, br, kl=None, kr=None) -> int:
        key = ("rank", fam, b, bl, br, kl, kr)
        if key not in self.cache:
            # Only the rank changes the stored bytes: resolve once, vary the rank.
            base = self.config(fam, 1, bl, br, kl, kr)
            self.cache[key] = max_rank_for(
                self.shape, budget=b, make=lambda m: replace(base, rank=m)
            )
        return self.cache[key]

    def ranks(self, fam, b, pairs=None) -> dict:
        """{(B, B′, kind of L, kind of R): m} for every pair of ``fam``'s grid (or of
        ``pairs``) with a rank m ≥ 1 within budget b."""
        out = {}
        for p in self.pairs(fam) if pairs is None else pairs:
            try:
                m = self.rank_for(fam, b, *p)
            except ParameterError:  # e.g. quantizer "sign" with more than 1 bit
                continue
            if m >= 1:
                out[p] = m
        return out

    def operand(self, fam: _Family):
        if fam.method != "nq+lplr":
            return None
        spec = self.config(fam, 1, 8, 8).matrix
        assert spec is not None  # nq+lplr always quantizes A
        if not spec.is_float and spec.granularity == "tensor":
            raise ParameterError(
                "method='nq+lplr' with a budget needs group-wise scales for Q(A); set "
                "--group-size to a multiple of 8 (such as 128)."
            )
        key = tokenize(spec.to_dict())
        self.residual_specs.setdefault(key, spec)
        return key

    # -------------------------------------------------------------- passes over A

    def ensure(self, k: int, operands) -> int:
        """Make the sketch of every operand at least k columns wide (capped by the guard);
        returns the columns available."""
        if k > self.k_limit:
            self.capped = True
        k = max(1, min(k, self.k_limit))
        new_ops = [o for o in operands if o not in self.y]
        if self.sub is None:
            self._first_pass(max(k, 1), [o for o in dict.fromkeys([None, *operands])])
            return self.k
        if new_ops:
            self._extend(0, self.k, new_ops)
        if k > self.k:
            self._extend(self.k, k, list(self.y))
        return self.k

    def _first_pass(self, k, operands):
        a, seed = self.a, self.options.seed
        self.k0 = self.k = k
        s = _sketch_columns(
            a.shape[1],
            0,
            k,
            seed=seed,
            scale=1 / math.sqrt(k),
            row_chunks=a.chunks[1],
            dtype=a.dtype,
            meta=meta_from_array(a),
        )
        res = [o for o in operands if o is not None]
        specs = [self.residual_specs[o] for o in res]
        ext, sub = _planning_pass(a, s, specs=specs, seed=seed, sample=self.cols)
        ext, sub = self.stages.persist("plan-sketch", ext, sub)
        self.passes += 1
        for i, o in enumerate([None, *res]):
            self.y[o] = ext[:, i * k : (i + 1) * k]
        at = k * (1 + len(res))
        norm2, sub2 = (float(v) for v in ext[:, at : at + 2].sum(axis=0).compute())
        check_finite_input(norm2, a, self.matrix.path or "array", self.stages)
        self.norm2 = norm2
        self.cache[("norms", None)] = np.array([sub2, sub2])  # ‖A_sample‖², from the pass
        self.sub = sub
        self.subs = {None: self.sub}

    def _extend(self, c0, c1, operands):
        a, seed = self.a, self.options.seed
        s = _sketch_columns(
            a.shape[1],
            c0,
            c1,
            seed=seed,
            scale=1 / math.sqrt(self.k0),
            row_chunks=a.chunks[1],
            dtype=a.dtype,
            meta=meta_from_array(a),
        )
        res = [o for o in operands if o is not None]
        plain = None in operands
        specs = [self.residual_specs[o] for o in res]
        ext, _ = _planning_pass(a, s, specs=specs, seed=seed, sample=None)
        (ext,) = self.stages.persist("plan-extend", ext)
        self.passes += 1
        w = c1 - c0
        for i, o in enumerate([None, *res]):
            if o is None and not plain:
                continue
            part = ext[:, i * w : (i + 1) * w]
            y = part if c0 == 0 else da.concatenate([self.y[o], part], axis=1)
            (self.y[o],) = self.stages.persist("plan-extend", y.rechunk({1: -1}))
        if c0 == self.k or (c0 == 0 and c1 > self.k):
            self.k = c1
        # What was built on the narrower sketch is stale; its orthonormal bases are kept to
        # be continued (the prefix property: Q of the wider sketch starts with them).
        self.narrower.update(
            {
                k: v
                for k, v in self.bases.items()
                if k[0] in operands and k[1:] in ((0,), (0, "screen-parts"))
            }
        )
        self.bases = {k: v for k, v in self.bases.items() if k[0] not in operands}
        self.power = {k: v for k, v in self.power.items() if k[0] not in operands}

    def sample_of(self, op):
        if op not in self.subs:
            sub = residual_array(self.sub, self.residual_specs[op], seed=self.options.seed)
            (self.subs[op],) = self.stages.persist("plan-sample", sub)
        return self.subs[op]

    def sketch(self, op, q):
        """The (power-iterated) sketch of an operand, n × K."""
        if q == 0:
            return self.y[op]
        key = (op, q)
        if key not in self.power:
            a = self.a if op is None else self._operand_array(op)
            y = self.y[op]
            for _ in range(q):
                z = orthonormalize(left_multiply(a, orthonormalize(y)).T)
                (z,) = self.stages.persist("plan-power-iteration", z)
                (y,) = self.stages.persist("plan-power-iteration", right_multiply(a, z))
                self.passes += 2
            self.power[key] = y
        return self.power[key]

    def _operand_array(self, op):
        return residual_array(self.a, self.residual_specs[op], seed=self.options.seed)

    def basis(self, op, q):
        key = (op, q)
        if key not in self.bases:
            y = self.sketch(op, q)
            old = self.narrower.pop(key, None)
            if old is not None:  # continue the narrower sketch's basis: QR of the new columns
                basis = extend_orthonormal(old, y[:, old.shape[1] :])
            else:
                basis = orthonormalize(y)
            (self.bases[key],) = self.stages.persist("plan-basis", basis)
        return self.bases[key]

    def svd_parts(self, op, q):
        key = (op, q, "svd")
        if key not in self.bases:
            a = self.a if op is None else self._operand_array(op)
            qb = self.basis(op, q)
            b = left_multiply(a, qb)  # K × d: one pass over A
            bbt, qts = self.stages.persist(
                "plan-truncate", gram(b.T), left_multiply(self.sample_of(op), qb)
            )
            self.passes += 1
            self.bases[key] = (bbt, qts)
        return self.bases[key]

    # -------------------------------------------------------------- scoring

    def norms(self, op):
        """(‖operand sample‖², ‖A_sample‖²): A's from the planning pass, a residual's
        summed on the workers."""
        key = ("norms", op)
        if key not in self.cache:
            orig2 = self.cache[("norms", None)][1]  # kept by the planning pass
            (sub2,) = self.stages.compute("plan-sample", _sq(self.sample_of(op)))
            self.cache[key] = np.array([float(sub2), orig2])
        return self.cache[key]

    def screen(self, fam: _Family, span: int) -> dict:
        """The screen's measurements for ``fam`` on the current sketch: one product
        Q_Kᵀ·A_sample on the workers, over :data:`SCREEN_SAMPLE` of the sample's columns
        (:func:`_screen_head`), and once per family the errors of
        every left and right quantizer of its grid on a sample (:func:`_screen_errors`); a
        few floats come back."""
        op, q, svd = self.operand(fam), fam.n_power_iter, fam.method in ("dsvd", "lplr-svd")
        span = min(span, self.k)
        key, quant = (op, q, "screen", svd, span), ("quantizer-errors", fam)
        if key in self.bases and quant in self.cache:
            return {**self.bases[key], **self.cache[quant]}
        parts = (op, q, "screen-parts")
        if parts not in self.bases:
            qb = self.basis(op, q)
            rows = _sample_columns(
                self.shape[0],
                group=self.options.group_size or 128,
                sample_cols=SCREEN_ROWS,
                seed=self.options.seed,
                key=98,
            )
            # The screen's columns: every t-th group of the sample, at most SCREEN_SAMPLE.
            t = -(-len(self.cols) // SCREEN_SAMPLE)
            group = self.options.group_size or 128
            cols = np.flatnonzero(np.arange(len(self.cols)) // group % t == 0)
            sub = self.sample_of(op)[:, cols] if t > 1 else self.sample_of(op)
            old = self.narrower.pop(parts, None)
            sq: tuple = ()  # the subset's (‖operand‖², ‖A‖²), made with C
            if old is not None:  # the basis was continued: only its new columns' products
                c = da.concatenate([old[0], left_multiply(sub, qb[:, old[0].shape[0] :])])
                norms = old[2]
            else:
                c = left_multiply(sub, qb)
                norms = self.norms(op)
                if t > 1:
                    sq = (da.stack([_sq(sub), _sq(self.sub[:, cols])]),)  # type: ignore[index]
            made = self.stages.persist("plan-screen", c, qb[rows], *sq)
            self.bases[parts] = (made[0], made[1], made[2] if sq else norms)
        c, rows, norms = self.bases[parts]
        tasks: dict = {}
        if key not in self.bases:
            tasks[key] = dask.delayed(_screen_head)(c, norms, span=span, svd=svd, n=self.shape[0])
        if quant not in self.cache:
            lefts, rights = set(), set()
            for p in self.pairs(fam):
                try:
                    cfg = self.config(fam, 1, *p)
                except ParameterError:  # e.g. quantizer "sign" with more than 1 bit
                    continue
                lefts.add(cfg.left)
                rights.add(cfg.right)
            m = max(1, span - self.extra_cols(fam))  # these errors barely move with m
            for side, x, specs in (("left", rows, lefts), ("right", c, rights)):
                tasks[side] = dask.delayed(_screen_errors)(
                    x, m=m, seed=self.options.seed, specs=specs, side=side
                )
        done = dict(zip(tasks, self.stages.compute("plan-screen", *tasks.values()), strict=True))
        if key in done:
            self.bases[key] = done[key]
        if quant not in self.cache:
            self.cache[quant] = {"left": done["left"], "right": done["right"]}
        return {**self.bases[key], **self.cache[quant]}

    def modelled(self, fam: _Family, cands, span: int) -> dict:
        """The screen's estimate of each candidate (m, B, B′), ranks beyond the sketch
        included (optimistic there), from the first ``span`` columns of the sketch (the
        family's own: the same estimates alone or in ``auto``)."""
        cfgs = {c: self.config(fam, *c) for c in cands}
        scr = self.screen(fam, span)
        return {
            c: _modelled(scr, c[0], g.left, g.right, given_right=fam.method == "dsvd")
            for c, g in cfgs.items()
        }

    def score(self, fam: _Family, cands) -> None:
        """Score candidates [(m, B, B′)] of one family (all ranks ≤ the sketch)."""
        cands = [c for c in cands if (fam, *c) not in self.scored]
        if not cands:
            return
        op = self.operand(fam)
        q = fam.n_power_iter
        sub = self.sample_of(op)
        norms = self.norms(op)
        dtype = self.a.dtype
        lefts: dict = {}  # (m, B, kind of L) -> (X, spec, given)
        for c in cands:
            m = c[0]
            if _left_of(c) in lefts:
                continue
            cfg = self.config(fam, *c)
            given = None
            if fam.method == "paper":
                x = self.y[op][:, :m] * math.sqrt(self.k0 / m)
            elif fam.method in ("dsvd", "lplr-svd"):
                bbt, qts = self.svd_parts(op, q)
                qb = self.basis(op, q)
                kk = min(m + max(cfg.n_oversamples, 10), min(self.shape), qb.shape[1])
                t = da.from_delayed(
                    dask.delayed(_svd_transform)(bbt, kk, m, fam.method, cfg.seed, qb.shape[1]),
                    shape=(qb.shape[1], m),
                    dtype=np.float64,
                )
                x = times(qb, t)  # t is made on the host: times moves it to qb's device
                if fam.method == "dsvd":
                    given = dask.delayed(_given)(t, qts)
            else:
                qb = self.basis(op, q)
                t = da.from_delayed(
                    dask.delayed(_rotation)(cfg.seed, m), shape=(m, m), dtype=np.float64
                )
                x = times(qb[:, :m], t)
            lefts[_left_of(c)] = (x, cfg.left, given)
        # X is read three times (ranges, codebook, L̂): keep this round's on the workers
        keys = list(lefts)
        xs = self.stages.persist("plan-basis", *[lefts[key][0] for key in keys])
        lefts = {key: (x, *lefts[key][1:]) for key, x in zip(keys, xs, strict=True)}
        # L's ranges with its own quantizer, all in one stage
        ranges = {}
        by_spec: dict = {}
        for key, (_x, spec, _) in lefts.items():
            if not spec.is_float:
                by_spec.setdefault(spec, []).append(key)
        for spec, keys in by_spec.items():
            found = global_ranges_many(
                [lefts[k][0] for k in keys], spec, self.stages, "plan-ranges"
            )
            ranges.update(dict(zip(keys, found, strict=True)))
        books = self._codebooks(lefts, ranges)
        work = {}
        for key, (x, spec, given) in lefts.items():
            lo, hi = ranges.get(key, (None, None))
            book = books.get(key)
            lhat = x.map_blocks(
                quantize_rows_block,
                spec=spec,
                lo=lo,
                hi=hi,
                seed=fam_seed(self.options),
                codebook=book,
                out_dtype=dtype,
                dtype=dtype,
            )
            rights = [self.config(fam, *c).right for c in cands if _left_of(c) == key]
            work[key] = dask.delayed(_score)(
                gram(lhat), left_multiply(sub, lhat), given, norms, rights
            )
        errs = self.stages.compute("plan-score", *work.values())
        for key, errors in zip(work, errs, strict=True):
            if op is None and fam.method == "lplr" and min(errors) < self.rotated[0]:
                # the best plain lplr point's rotated basis, for a budget run's basis stage
                self.rotated = (min(errors), (q, key[0]), lefts[key][0])
            mine = [c for c in cands if _left_of(c) == key]
            for c, e in zip(mine, errors, strict=True):
                cfg = self.config(fam, *c)
                pt = Point(
                    cfg,
                    cfg.bits_per_entry(self.shape),
                    e * SINGLE_PASS_FACTOR if fam.single_pass else e,
                    fam.label,
                    family_passes(fam.label, fam.n_power_iter, single_pass=fam.single_pass),
                )
                self.scored[(fam, *c)] = pt
                self.curve.append(pt)

    def _codebooks(self, lefts, ranges) -> dict:
        """The ``lloyd`` codebooks of every left factor of a round in one stage, as
        :func:`lplr_dask.core.engine.fit_codebook` fits them (histograms of the blocks summed
        in block order, then Lloyd–Max)."""
        tasks = {}
        for key, (x, spec, _) in lefts.items():
            if spec.is_float or not spec.stores_codebook:
                continue
            hi = ranges.get(key, (None, None))[1]
            tasks[key] = [dask.delayed(_histogram)(b, spec, hi) for b in x.to_delayed().ravel()]
        if not tasks:
            return {}
        flat = [t for ts in tasks.values() for t in ts]
        counts = list(self.stages.compute("plan-codebook", *flat))
        out, at = {}, 0
        for key, ts in tasks.items():
            out[key] = fit_lloyd(sum(counts[at : at + len(ts)]), lefts[key][1].bits)
            at += len(ts)
        return out

    def score_nq(self, fam: _Family, bits) -> None:
        todo = [b for b in bits if (fam, b) not in self.scored]
        if not todo:
            return
        if self.sub is None:
            self.ensure(1, [None])
        cfgs = {b: replace_bits(self, fam, b) for b in todo}
        tasks = [dask.delayed(_nq_score)(self.sub, c.matrix, c.seed) for c in cfgs.values()]
        errs = self.stages.compute("plan-score", *tasks)
        for b, e in zip(cfgs, errs, strict=True):
            cfg = cfgs[b]
            pt = Point(cfg, cfg.bits_per_entry(self.shape), e, "nq", 1)
            self.scored[(fam, b)] = pt
            self.curve.append(pt)

    # -------------------------------------------------------------- searches

    def grid(self):
        o = self.options
        lefts = (o.bits_left,) if o.bits_left is not None else BIT_CHOICES
        rights = (o.bits_right,) if o.bits_right is not None else BIT_CHOICES
        return lefts, rights

    def pairs(self, fam: _Family) -> list:
        """The (B, B′, kind of L, kind of R) pairs of ``fam``'s search: each width with its
        factor's default kind (None) and, with no ``quantizer`` given, each of
        :data:`KIND_CHOICES`."""
        if fam.method == "paper":
            return [(self.options.bits_left or 8, self.options.bits_right or 8, None, None)]
        lefts, rights = self.grid()
        choose = fam.quantizer is None

        def kinds(bits):
            return (None, *KIND_CHOICES.get(bits, ())) if choose else (None,)

        return [
            (bl, br, kl, kr)
            for bl in lefts
            for br in rights
            for kl in kinds(bl)
            for kr in kinds(br)
        ]

    def search_budget(
        self, fam: _Family, b: float, exhaustive: bool = False, across: bool = False
    ) -> Point | None:
        """The best candidate of ``fam`` within ``b`` (screened over the pairs (B, B′) and
        the kinds of L and R; every pair with ``exhaustive``). With ``across`` (auto's budget
        searches) the screen stops at the best exact error of every family searched at b so
        far: a pair that cannot beat another family's point is not scored, and the point
        returned is then the best of those scored, not necessarily the family's best."""
        bound = self.best_at.get(b, math.inf) if across and not exhaustive else math.inf
        point = self._search_budget(fam, b, exhaustive, bound)
        if across and point is not None:
            self.best_at[b] = min(bound, point.estimated_rel_error)
        return point

    def _search_budget(self, fam: _Family, b: float, exhaustive: bool, bound: float):
        if fam.method == "nq":
            bits = (fam.bits_matrix,) if fam.bits_matrix else (16, *BIT_CHOICES[::-1])
            fits = [x for x in bits if replace_bits(self, fam, x).bits_per_entry(self.shape) <= b]
            if not fits:
                return None
            self.score_nq(fam, fits[:1])  # the widest that fits: Q's error falls with bits
            return self.scored[(fam, fits[0])]
        pairs = self.ranks(fam, b)
        if not pairs:
            return None
        op = self.operand(fam)
        extra = self.extra_cols(fam)
        # The family's own span (not the shared sketch's width, which other families of auto
        # may have widened): the same search, hence the same choice, alone or in auto.
        span = min(self.cover(fam, b), self.k_limit)
        if span < self.cover(fam, b):
            self.capped = True
        self.ensure(span, [op])

        def cand(p):
            return (max(1, min(pairs[p], span - extra)), *p)

        def covered():
            return [p for p in pairs if pairs[p] + extra <= span or span >= self.k_limit]

        inside = covered()
        best = self._screened(fam, inside, cand, span, exhaustive, bound)
        # Pairs beyond the span: pruned by the screen's optimistic estimate at their own
        # rank, or the sketch is extended and they join the search.
        beyond = [p for p in pairs if p not in inside]
        if beyond:
            found = min(bound, self.scored[(fam, *cand(best))].estimated_rel_error)
            est = self.modelled(fam, [(pairs[p], *p) for p in beyond], span)
            ratio = self._calibration(fam, inside, cand, span)
            live = []
            for p in beyond:
                lb = est[(pairs[p], *p)] * ratio
                if lb >= found and not exhaustive:
                    self.pruned.append(
                        {
                            "method": fam.label,
                            "bits_left": p[0],
                            "bits_right": p[1],
                            "quantizers": _kinds(self.config(fam, 1, *p)),
                            "rank": pairs[p],
                            "budget": b,
                            "bound": lb,
                        }
                    )
                else:
                    live.append(p)
            if live:
                want = max(pairs[p] for p in live) + extra
                span = min(want, self.k_limit)
                self.capped |= span < want
                self.ensure(span, [op])
                inside = covered()
                best = self._screened(fam, inside, cand, span, exhaustive, bound)
        self.centre[fam] = best[:2]
        return self.scored[(fam, *cand(best))]

    def extra_cols(self, fam) -> int:
        """Sketch columns beyond the rank: the oversampling of dsvd and lplr-svd."""
        if fam.method in ("dsvd", "lplr-svd"):
            return max(self.options.n_oversamples, 10)
        return self.options.n_oversamples

    def cover(self, fam, b) -> int:
        """The sketch columns that the pairs within :data:`COVER_BITS` of the widest (or of
        the family's last best pair) need at budget b (every pair's on a matrix of at most
        :data:`SMALL_ENTRIES` entries: there a wider sketch costs less than a second pass;
        for ``auto`` only up to :data:`AUTO_EVERY_WIDTH` columns)."""
        if fam.method == "nq":
            return 1
        pairs = self.pairs(fam)
        # around the best pair of this family's last search (max_error's doubling and
        # bisection, a curve's budgets), else the widest
        cl, cr = self.centre.get(fam) or (max(p[0] for p in pairs), max(p[1] for p in pairs))
        every = self.shape[0] * self.shape[1] <= SMALL_ENTRIES and (
            self.options.method != "auto" or min(self.shape) <= AUTO_EVERY_WIDTH
        )
        ranks = [
            m
            for p, m in self.ranks(fam, b).items()
            if every or (abs(p[0] - cl) <= COVER_BITS and abs(p[1] - cr) <= COVER_BITS)
        ]
        return max(ranks, default=0) + self.extra_cols(fam)

    def _err(self, fam, c) -> float:
        return self.scored[(fam, *c)].estimated_rel_error

    def _calibration(self, fam, pairs, cand, span) -> float:
        """min over the scored pairs of exact / modelled, and 1: the screen made optimistic,
        never scaled up (a pair the model flatters, such as a 1-bit one, must not hide the
        others)."""
        done = [cand(p) for p in pairs if (fam, *cand(p)) in self.scored]
        est = self.modelled(fam, done, span)
        ratios = [self._err(fam, c) / est[c] for c in done if est[c] > 0]
        return min([1.0, *ratios])

    def _screened(self, fam, pairs, cand, span, exhaustive, bound=math.inf):
        """The best of ``pairs`` (all within the sketch): score them in the order of the
        screen's estimate, :data:`SCREEN_ROUND` at a time, until no unscored pair's
        calibrated estimate is below the best exact error, this family's or ``bound`` (every
        pair with ``exhaustive``)."""
        if exhaustive:
            self.score(fam, [cand(p) for p in pairs])
        else:
            est = self.modelled(fam, [cand(p) for p in pairs], span)
            order = sorted(pairs, key=lambda p: (est[cand(p)], _order(p)))
            self.score(fam, [cand(p) for p in order[:SCREEN_ROUND]])
            while True:
                done = [p for p in order if (fam, *cand(p)) in self.scored]
                found = min(bound, *(self._err(fam, cand(p)) for p in done))
                ratio = self._calibration(fam, pairs, cand, span)
                nxt = [p for p in order if p not in done and est[cand(p)] * ratio < found]
                if not nxt:
                    break
                self.score(fam, [cand(p) for p in nxt[:SCREEN_ROUND]])
        return min(
            (p for p in pairs if (fam, *cand(p)) in self.scored),
            key=lambda p: (self._err(fam, cand(p)), _order(p)),
        )

    def search_error(self, fam: _Family, max_error: float, b0: float) -> Point | None:
        """The fewest bits of ``fam`` with an estimate ≤ max_error, to 1/64 of the budget:
        double the budget from b0 until one meets it; then the screen's model, calibrated on
        that exact point, places the budget between (:meth:`_modelled_budget`), and exact
        searches just below and above the guess close the bracket (bisection if they miss)."""
        lo, hi, found = 0.0, b0, None
        limit = 32.0
        while hi <= limit:
            p = self.search_budget(fam, hi)
            if p is not None and p.estimated_rel_error <= max_error:
                found = p
                break
            if p is not None and self.k >= self.k_limit and p.config.rank == self.k:
                break
            lo, hi = hi, hi * 2
        if found is None:
            return None
        lo = max(lo, hi / 2) if lo else hi / 8
        step = hi / 64  # the precision of the five halvings this replaces

        def meets(b):
            p = self.search_budget(fam, b)
            return p if p is not None and p.estimated_rel_error <= max_error else None

        if fam.method not in ("nq", "paper") and hi - lo > 2 * step:
            guess = self._modelled_budget(fam, max_error, lo, hi, found)
            if lo < guess < hi:
                p = meets(guess)
                if p is not None:
                    hi, found = guess, p
                    if guess - step > lo and meets(guess - step) is None:
                        lo = guess - step
                else:
                    lo = guess
                    if guess + step < hi and (p := meets(guess + step)) is not None:
                        hi, found = guess + step, p
        while hi - lo > step:
            mid = (lo + hi) / 2
            p = meets(mid)
            if p is not None:
                hi, found = mid, p
            else:
                lo = mid
        return found

    def _modelled_budget(self, fam: _Family, max_error: float, lo, hi, ref: Point) -> float:
        """The budget in (lo, hi] at which the screen's estimate of ``fam``'s best pair, scaled
        by exact/modelled at ``ref`` (a scored point that meets max_error), meets it: a
        bisection on the model alone (no exact score, no pass over A)."""
        span = min(self.k, self.k_limit)
        _, left, right = ref.config.low_rank()
        scr = self.screen(fam, span)
        model = _modelled(scr, ref.config.rank, left, right, given_right=fam.method == "dsvd")
        scale = ref.estimated_rel_error / model if model > 0 else 1.0

        def best(b) -> float:
            cands = [(m, *p) for p, m in self.ranks(fam, b).items()]
            est = self.modelled(fam, cands, span)
            return min(est.values(), default=math.inf) * scale

        for _ in range(12):
            mid = (lo + hi) / 2
            if best(mid) <= max_error:
                hi = mid
            else:
                lo = mid
        return hi


def fam_seed(options):
    return options.seed


def replace_bits(planner: _Planner, fam: _Family, bits: int) -> CompressionConfig:
    return planner.config(replace(fam, bits_matrix=bits))


def _families(options: CompressionOptions, shape, nbytes, budgets) -> list[_Family]:
    method, q_opt = options.method, options.n_power_iter
    assert method is not None  # set by CompressionOptions.__post_init__
    max_passes = options.max_passes
    if max_passes is None:
        max_passes = default_max_passes(nbytes)
    if method != "auto":
        q = (
            q_opt
            if q_opt is not None
            else (DEFAULT_SVD_POWER_ITER if method in ("dsvd", "lplr-svd") else 0)
        )
        label = "lplr+power" if method == "lplr" and q else method
        one = max_passes == 1 and method in ("lplr", "paper") and not q
        if method == "nq+lplr":
            bms = _matrix_bits(options, budgets, shape)
            fams = [_Family(label, method, q, bm, options.quantizer) for bm in bms]
        else:
            fams = [_Family(label, method, q, options.bits_matrix, options.quantizer, one)]
        need = family_passes(label, q, single_pass=one)
        if max_passes is not None and need > max_passes:
            raise ParameterError(
                f"method={method!r} reads A {need} times, more than max_passes={max_passes}. "
                "Raise --max-passes, or use --method lplr (2 passes) or nq (1)."
            )
        return fams
    q = DEFAULT_SVD_POWER_ITER if q_opt is None else q_opt
    one = max_passes == 1
    fams = [_Family("lplr", "lplr", 0, None, options.quantizer, one)]
    if q:
        fams.append(_Family("lplr+power", "lplr", q, None, options.quantizer))
        fams.append(_Family("dsvd", "dsvd", q, None, options.quantizer))
        fams.append(_Family("lplr-svd", "lplr-svd", q, None, options.quantizer))
    fams.append(_Family("nq", "nq", 0, options.bits_matrix, options.quantizer))
    if options.quantizer != "lloyd":
        for bm in _matrix_bits(options, budgets, shape):
            fams.append(_Family("nq+lplr", "nq+lplr", 0, bm, options.quantizer))
    if max_passes is not None:
        fams = [
            f
            for f in fams
            if family_passes(f.label, f.n_power_iter, single_pass=f.single_pass) <= max_passes
        ]
    return fams


def _matrix_bits(options, budgets, shape):
    """B_nq of the nq+lplr families: ⌊b⌋ − 1 and ⌊b⌋ for each budget b; when scales and padded
    edge chunks leave no room for a rank-1 correction at those, the widest B_nq that does."""
    if options.bits_matrix is not None:
        return [options.bits_matrix]

    def fits(bm, b):
        opts = replace(
            options,
            method="nq+lplr",
            budget=None,
            max_error=None,
            rank=1,
            bits_left=1,
            bits_right=1,
            bits_matrix=bm,
            passes=2,
            corange_size=None,
        )
        try:
            return opts.resolve(shape).bits_per_entry(shape) <= b
        except ParameterError:
            return False

    out = set()
    for b in budgets:
        top = int(min(8, np.floor(b)))
        pair = {max(1, top - 1), max(1, top)}
        if not any(fits(bm, b) for bm in pair):
            pair = {bm for bm in range(top - 1, 0, -1) if fits(bm, b)}
            pair = {max(pair)} if pair else {max(1, top)}
        out |= pair
    return sorted(out)


def plan(
    matrix: InputMatrix,
    options: CompressionOptions,
    *,
    stages: Stages | None = None,
    sample_cols: int = 2048,
    budgets=None,
    exhaustive: bool = False,
) -> Plan:
    """Score the candidate configurations of ``matrix`` under ``options`` from one sketch.

    Parameters
    ----------
    matrix : InputMatrix
        The opened input (:func:`lplr_dask.storage.inputs.open_input`).
    options : CompressionOptions
        ``method`` (one method, or ``"auto"``: every family of :data:`FAMILIES` that
        ``max_passes`` allows), and what to plan for: ``budget`` (b, bits per entry),
        ``max_error`` (E, relative Frobenius error) or neither (then ``budgets``). Fixed
        ``bits_left`` (B), ``bits_right`` (B′), ``bits_matrix`` (B_nq), ``quantizer``,
        ``group_size``, ``seed``, ``rounding``, ``n_oversamples`` and ``n_power_iter`` bound
        the candidates; ``max_rank`` caps the rank (default: no cap but the memory guard).
    stages : Stages, optional
        The stage runner (progress, timings, BLAS threads); a new one by default.
    sample_cols : int, default 2048
        Columns of A kept, in whole scale groups, to score candidates exactly on them.
    budgets : sequence of float, optional
        Score the best candidate of every method at each of these budgets (the checkpoint
        policy asks for a curve this way); default ``(options.budget,)``.
    exhaustive : bool, default False
        Score every pair of bit widths instead of the screened search (a check of the
        search; costs about four times more scoring).

    Returns
    -------
    Plan
        ``curve`` (every candidate scored), ``best(b)``, ``cheapest(E)``, ``frontier()``.

    Raises
    ------
    ParameterError
        If no candidate fits (the message gives the smallest budget that does) or a method
        needs more passes than ``max_passes``.

    Notes
    -----
    Passes over A: one (sketch of the largest rank needed, ‖A‖² and the column sample), plus
    2 per power iteration and one truncation for ``dsvd``/``lplr-svd`` and ``lplr+power``
    (``auto`` when ``max_passes`` allows them), plus one per sketch extension (only when the
    screen cannot rule out a wider sketch; ``max_error`` extends as it doubles the
    budget). Memory on the workers: the n × K float64 sketch per operand, its basis, and the
    n × s sample (K ≤ :data:`PLAN_SKETCH_BYTES` / 8n); the driver holds scalars.

    References
    ----------
    R. Saha, V. Srivastava, M. Pilanci. Matrix Compression via Randomized Low Rank and Low
    Precision Factorization. NeurIPS 2023. arXiv:2310.11028.
    H. Guo et al. LQ-LoRA: Low-rank plus quantized matrix decomposition. ICLR 2024.
    arXiv:2311.12023 (the budgeted choice of a low-rank-plus-quantized configuration).
    """
    t0 = time.perf_counter()
    stages = stages or Stages()
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    if budgets is None:
        budgets = (options.budget,) if options.budget is not None else ()
    budgets = tuple(float(b) for b in budgets)
    if not budgets and options.max_error is None:
        raise ParameterError(
            "plan needs something to plan for: a budget (--budget BITS_PER_ENTRY), a maximum "
            "error (--max-error E) or budgets=(...)."
        )
    nbytes = int(np.prod(shape)) * matrix.data.dtype.itemsize
    fams = _families(options, shape, nbytes, budgets or (1.0,))
    pl = _Planner(matrix, options, stages, sample_cols)
    if options.max_rank is not None:
        pl.k_limit = min(pl.k_limit, options.max_rank)
    # One pass for every operand at the widest budget's cover (nq+lplr's residuals included;
    # nq needs no sketch, nor, under budgets alone, a family with no candidate within them).
    ops, cover = [None], 1
    for fam in fams:
        if fam.method == "nq" or (
            options.max_error is None and not any(pl.ranks(fam, b) for b in budgets)
        ):
            continue
        try:
            ops.append(pl.operand(fam))
            cover = max(cover, *(pl.cover(fam, b) for b in budgets or (1.0,)))
        except ParameterError:
            continue
    pl.ensure(cover, list(dict.fromkeys(ops)))
    across = len(fams) > 1  # auto: a family stops at the best point of those searched before
    searches = [
        functools.partial(pl.search_budget, b=b, exhaustive=exhaustive, across=across)
        for b in budgets
    ]
    if options.max_error is not None:
        searches.append(functools.partial(pl.search_error, max_error=options.max_error, b0=1.0))
    for search in searches:
        for fam in fams:
            try:
                search(fam)
            except ParameterError:  # this family cannot reach it; alone, that is the answer
                if len(fams) == 1:
                    raise
    result = Plan(
        shape,
        curve=pl.curve,
        sample_columns=len(pl.cols),
        exact=len(pl.cols) == shape[1],
        sketch_rank=pl.k,
        capped=pl.capped,
        pruned=pl.pruned,
        passes=pl.passes,
    )
    if not pl.curve:
        _raise_too_small(pl, fams, budgets, shape)
    # The job's sketch stage takes its sketch from here (A's only: a residual's own norm is
    # not kept).
    # Its basis stage takes the planner's orthonormal basis of that sketch (the first k
    # columns span the rank-k range: the prefix property), when the planner made one.
    if None in pl.y:
        result._handover[(None, 0)] = (pl.y[None], pl.norm2, pl.k0, pl.bases.get((None, 0)))
    # ... and, when it is the best lplr point scored, that point's rotated basis Q_m·H
    result._rotated = pl.rotated[1:]
    for (op, q), y in pl.power.items():
        if op is None:
            result._handover[(None, q)] = (y, pl.norm2, 0, pl.bases.get((None, q)))
    result.seconds = time.perf_counter() - t0
    return result


def _raise_too_small(pl: _Planner, fams, budgets, shape):
    needs = []
    for fam in fams:
        try:
            if fam.method == "nq":
                cfg = replace_bits(pl, fam, 1)
            else:
                lefts, rights = pl.grid()
                cfg = pl.config(fam, 1, min(lefts), min(rights))
            needs.append(cfg.bits_per_entry(shape))
        except ParameterError:
            continue
    need = min(needs) if needs else float("nan")
    raise ParameterError(
        f"budget={min(budgets) if budgets else '?'} bits per entry is too small: the "
        f"cheapest configuration needs {need:.4f} bits per entry for a {shape[0]}×{shape[1]} "
        "matrix. Raise --budget to at least that, or use --method nq."
    )


# ----------------------------------------------------------------------------- in memory

IN_MEMORY_METHODS = ("lplr", "nq+lplr")
"""Methods that :func:`curve_in_memory` scores (without power iterations)."""


def curve_in_memory(
    matrix: InputMatrix,
    a: np.ndarray,
    options: CompressionOptions,
    *,
    budgets,
    sample_cols: int = 2048,
) -> list[Point]:
    """The points :func:`plan` scores for ``options`` at ``budgets``, for a matrix held in
    memory, computed in the calling thread with NumPy: no Dask graph, no stage.

    A checkpoint's tensors are small and many: there the planner's cost is Dask's, not the
    arithmetic (a 384 × 384 weight took ~150 graph computations). This is the same estimate
    without the graphs: one sketch of the widest rank asked, its QR, and for each candidate
    (m, B, B′) the exact error on the column sample (all columns when d ≤ ``sample_cols``) of
    the rank-m rotated basis Q_K[:, :m]·H_m (Q_K from the run's TSQR over A's row blocks: the
    same column signs, hence the same rotated basis) quantized as the run quantizes it, with
    R = G⁺L̂ᵀA quantized as the run does (:func:`_score`). Every pair of the (B, B′) grid is
    scored (no screen), so fix ``bits_left`` and ``bits_right`` to keep it cheap. Each factor
    keeps its default kind: the points equal :func:`plan`'s where that weighs no other kind
    (widths above those of :data:`KIND_CHOICES`, or a ``quantizer`` given: the checkpoint's
    curves, B = B′ = 4).

    Parameters
    ----------
    matrix : InputMatrix
        The opened input (its shape and canonical grid).
    a : numpy.ndarray
        The same matrix, in memory (n × d, float32 or float64).
    options : CompressionOptions
        ``method`` one of :data:`IN_MEMORY_METHODS`, ``n_power_iter`` 0 or None; bit widths,
        quantizer, group size, seed and ``max_rank`` as for :func:`plan`.
    budgets : sequence of float
        Bits per entry; the best candidate of each family at each budget is scored.
    sample_cols : int, default 2048

    Returns
    -------
    list of Point
        One point per family, budget and pair of bit widths (duplicates removed).

    Notes
    -----
    Memory: A, the n × K float64 sketch and its Q, and an n × m left factor at a time. Time:
    O(n·d·K) for the sketch and O(n·m·(m + s)) per candidate, s the sampled columns.
    """
    if options.method not in IN_MEMORY_METHODS or options.n_power_iter:
        raise ParameterError(
            f"curve_in_memory scores methods {IN_MEMORY_METHODS} without power iterations, "
            f"not method={options.method!r} with n_power_iter={options.n_power_iter}; use plan()."
        )
    with one_blas_thread():
        return _curve_in_memory(matrix, a, options, budgets=budgets, sample_cols=sample_cols)


def _curve_in_memory(matrix, a, options, *, budgets, sample_cols):
    shape = (int(a.shape[0]), int(a.shape[1]))
    budgets = tuple(float(b) for b in budgets)
    fams = _families(options, shape, a.nbytes, budgets)
    pl = _Planner(matrix, options, None, sample_cols)
    if options.max_rank is not None:
        pl.k_limit = min(pl.k_limit, options.max_rank)
    n, d = shape
    seed = options.seed
    info = {0: {"chunk-location": (0, 0), "array-location": [(0, n), (0, d)]}}
    cols = pl.cols if len(pl.cols) < d else slice(None)
    orig2 = _sumsq(a[:, cols])
    points: dict = {}
    for fam in fams:
        extra = pl.extra_cols(fam)
        want: dict = {}  # (m, B) -> [B′]
        defaults = [p for p in pl.pairs(fam) if p[2] is None and p[3] is None]
        for b in budgets:
            for (bl, br, _, _), rank in pl.ranks(fam, b, defaults).items():
                m = min(rank, pl.k_limit - extra)
                if m >= 1 and br not in want.setdefault((m, bl), []):
                    want[(m, bl)].append(br)
        if not want:
            continue
        op = pl.operand(fam)
        x = a
        if op is not None:
            spec = pl.residual_specs[op]
            x = nq_residual(a, spec=spec, lo=None, hi=None, seed=seed, block_info=info)
        k = max(m for m, _ in want) + extra
        s = _sketch_cols(seed, 0, d, 0, k, 1 / math.sqrt(k)).astype(x.dtype)  # as the run's
        bounds = np.cumsum((0, *pl.a.chunks[1]))  # summed over A's column blocks, as the run
        y = sum(
            np.matmul(x[:, c0:c1], s[c0:c1]).astype(np.float64)
            for c0, c1 in itertools.pairwise(bounds)
        )
        y = da.from_array(y, chunks=(pl.a.chunks[0], -1))
        q = orthonormalize(y).compute(scheduler="sync")  # the run's TSQR: same signs
        xs = np.ascontiguousarray(x[:, cols])
        norms = np.array([_sumsq(xs), orig2])
        for (m, bl), brs in sorted(want.items()):
            cfgs = [pl.config(fam, m, bl, br) for br in brs]
            left = cfgs[0].left
            basis = q[:, :m] @ basis_rotation(cfgs[0].seed, m)
            lo = hi = None
            if not left.is_float:
                lo, hi = block_range(basis, spec=left)
            lhat = quantize_rows_block(
                basis,
                spec=left,
                lo=lo,
                hi=hi,
                seed=cfgs[0].seed,
                codebook=local_codebook(basis, left, hi),
                out_dtype=a.dtype,
                block_info=info,
            )
            # G and P as the run's GEMMs make them: in A's precision, then float64
            g, p = ((lhat.T @ v).astype(np.float64) for v in (lhat, xs))
            errs = _score(g, p, None, norms, [c.right for c in cfgs])
            for cfg, e in zip(cfgs, errs, strict=True):
                points[(fam.label, m, bl, cfg.right.bits, fam.bits_matrix)] = Point(
                    cfg, cfg.bits_per_entry(shape), e, fam.label, family_passes(fam.label)
                )
    return list(points.values())


def _sq(x: da.Array) -> da.Array:
    return (x.astype(np.float64) ** 2).sum()


def _sumsq(x) -> float:
    return float(np.einsum("ij,ij->", x, x, dtype=np.float64))
