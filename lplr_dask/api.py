"""The public entry point :func:`compress` and its result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import dask.array as da
import numpy as np

from ._array import array_namespace, asarray_like, to_numpy
from .engine import (
    StageCallback,
    Stages,
    decode,
    encode,
    global_ranges,
    tile_sumsq,
)
from .errors import NonFiniteInputError, ParameterError
from .inputs import canonical_block_shape
from .quantize import QuantizerSpec, block_range
from .random import (
    STREAM_BASIS_ROTATION,
    STREAM_DITHER_MATRIX,
    block_generator,
)
from .storage import create_factor, layout_nbytes

__all__ = ["METHODS", "CompressionConfig", "CompressionResult", "compress", "make_config"]

METHODS = ("lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr", "auto")
LOW_RANK_METHODS = ("lplr", "paper", "dsvd", "lplr-svd", "nq+lplr")
DEFAULT_GROUP_SIZE = 128
DEFAULT_SVD_POWER_ITER = 2


@dataclass(frozen=True)
class CompressionConfig:
    """A fully resolved configuration: method, rank, the quantizer of every factor and the
    block grid of A, which fixes the chunk shapes of the stored arrays (L in row blocks of
    ``block_shape[0]`` × rank, R in rank × ``block_shape[1]`` panels, Q(A) in blocks)."""

    method: str
    rank: int | None
    left: QuantizerSpec | None
    right: QuantizerSpec | None
    matrix: QuantizerSpec | None
    n_oversamples: int
    n_power_iter: int
    seed: int
    block_shape: tuple[int, int] | None = None
    """Rows and columns of A's canonical blocks; None (plan records of earlier versions):
    the default grid of :func:`lplr_dask.inputs.canonical_block_shape`."""

    def blocks(self, shape) -> tuple[int, int]:
        """The block grid for a matrix of ``shape``, clipped to it."""
        if self.block_shape is not None:
            return (
                min(int(self.block_shape[0]), shape[0]),
                min(int(self.block_shape[1]), shape[1]),
            )
        groups = [s.group_size for s in (self.right, self.matrix) if s is not None and s.group_size]
        return canonical_block_shape(shape, group_size=groups[0] if groups else None)

    def nbytes(self, shape) -> int:
        """Bytes stored for the codes and ranges of every factor of a matrix of ``shape``:
        the chunk payloads as they lie on disk, edge chunks padded to the full chunk shape
        (:func:`lplr_dask.storage.layout_nbytes`), without checksums or metadata."""
        n, d = (int(v) for v in shape)
        br, bc = self.blocks((n, d))
        total = 0
        if self.matrix is not None:
            total += layout_nbytes((n, d), self.matrix, (br, bc))
        if self.rank:
            total += layout_nbytes((n, self.rank), self.left, (br, self.rank))
            total += layout_nbytes((self.rank, d), self.right, (self.rank, bc))
        return total

    def bits_per_entry(self, shape) -> float:
        """8 × :meth:`nbytes` / (n·d): what the result costs on disk per entry of A."""
        return 8.0 * self.nbytes(shape) / (shape[0] * shape[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("left", "right", "matrix"):
            spec = getattr(self, name)
            d[name] = spec.to_dict() if spec is not None else None
        d["block_shape"] = list(self.block_shape) if self.block_shape is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CompressionConfig:
        specs = {
            name: QuantizerSpec.from_dict(d[name]) if d.get(name) else None
            for name in ("left", "right", "matrix")
        }
        block = d.get("block_shape")
        return cls(**{**d, **specs, "block_shape": tuple(block) if block else None})


@dataclass(frozen=True)
class CompressionResult:
    """What :func:`compress` wrote and measured (also stored in the group's attributes)."""

    output: str
    shape: tuple[int, int]
    source_dtype: str
    method: str
    rank: int | None
    bits_left: int | None
    bits_right: int | None
    bits_matrix: int | None
    group_size: int | None
    rel_fro_error: float
    bits_per_entry: float
    stored_bytes: int
    seconds: float
    seed: int
    n_oversamples: int
    n_power_iter: int
    stage_seconds: dict = field(default_factory=dict)
    budget: float | None = None
    budget_search: list = field(default_factory=list)
    """With ``budget``: every candidate scored (rank, bits, bits_per_entry,
    estimated_rel_error), as :func:`lplr_dask.budget.choose_config` measured them."""
    reused_stages: list = field(default_factory=list)
    """Stages a resumed job took from an earlier run (see :mod:`lplr_dask.job`)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _check_int(name, value, lo, hi=None, fix=""):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer, got {value!r}.")
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ParameterError(f"{name}={value} is out of range: it must be {bound}. {fix}".strip())


def _check_bits(name, bits):
    if bits is None:
        return
    if (
        isinstance(bits, bool)
        or not isinstance(bits, (int, np.integer))
        or not (1 <= bits <= 8 or bits == 16)
    ):
        raise ParameterError(
            f"{name}={bits!r} is out of range: use 1 to 8 bits for integer codes, or 16 for a "
            "float16 passthrough."
        )


def make_config(
    *,
    method: str,
    shape,
    rank: int | None,
    bits_left: int | None = None,
    bits_right: int | None = None,
    bits_matrix: int | None = None,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    n_oversamples: int = 0,
    n_power_iter: int | None = None,
    seed: int = 0,
    rounding: str = "nearest",
    block_shape: tuple[int, int] | None = None,
) -> CompressionConfig:
    """Validate parameters and build the quantizers of ``method`` (see :func:`compress`).

    ``block_shape`` is A's canonical block grid (``InputMatrix.block_shape``); by default
    :func:`lplr_dask.inputs.canonical_block_shape` of ``shape`` and ``group_size``. It fixes
    the stored chunk shapes, hence the bytes that :meth:`CompressionConfig.nbytes` counts.
    """
    if method not in METHODS:
        raise ParameterError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if method == "auto":
        raise ParameterError(
            "method='auto' chooses among lplr, nq+lplr and nq by their measured errors under a "
            "budget: give --budget BITS_PER_ENTRY (budget=...) instead of a rank."
        )
    n, d = shape
    for name, b in (
        ("bits_left", bits_left),
        ("bits_right", bits_right),
        ("bits_matrix", bits_matrix),
    ):
        _check_bits(name, b)
    _check_int("n_oversamples", n_oversamples, 0)
    _check_int("seed", seed, 0, fix="Use a non-negative integer seed.")
    if group_size is not None and group_size != 0 and (group_size < 8 or group_size % 8):
        raise ParameterError(
            f"group_size={group_size} is invalid: use a positive multiple of 8 (such as 128), "
            "or 0 for one scale per row (nq: per matrix)."
        )
    if n_power_iter is None:
        n_power_iter = DEFAULT_SVD_POWER_ITER if method in ("dsvd", "lplr-svd") else 0
    _check_int("n_power_iter", n_power_iter, 0)
    group = group_size or None
    if block_shape is None:
        blocks = canonical_block_shape((n, d), group_size=group)
    else:
        blocks = (min(int(block_shape[0]), n), min(int(block_shape[1]), d))

    def grouped(bits, fallback):
        if bits == 16:
            return QuantizerSpec(bits=16)
        if group:
            return QuantizerSpec(
                bits=bits, granularity="group", group_size=group, rounding=rounding
            )
        return QuantizerSpec(bits=bits, granularity=fallback, rounding=rounding)

    matrix = left = right = None
    if method in ("nq", "nq+lplr"):
        matrix = grouped(bits_matrix if bits_matrix is not None else 4, "tensor")
    if method == "nq":
        if rank is not None:
            raise ParameterError("method='nq' quantizes A directly and takes no rank; drop --rank.")
        return CompressionConfig(method, None, None, None, matrix, 0, 0, seed, blocks)
    if rank is None:
        raise ParameterError(
            f"method={method!r} needs a rank (--rank M) or a budget (--budget BITS_PER_ENTRY)."
        )
    limit = min(n, d) - 1
    _check_int(
        "rank",
        rank,
        1,
        limit,
        fix=f"For a {n}×{d} matrix the rank must be below min(n, d) = {min(n, d)}.",
    )
    if rank + n_oversamples > min(n, d):
        raise ParameterError(
            f"rank + n_oversamples = {rank + n_oversamples} exceeds min(n, d) = {min(n, d)}; "
            "lower n_oversamples."
        )
    bl = 8 if bits_left is None else bits_left
    br = 8 if bits_right is None else bits_right
    if method == "paper":
        if rounding != "nearest" or n_oversamples or n_power_iter:
            raise ParameterError(
                "method='paper' reproduces the reference code exactly: nearest rounding, no "
                "oversampling, no power iterations. Use method='lplr' for those options."
            )
        left = QuantizerSpec(bits=16) if bl == 16 else QuantizerSpec.paper(bl)
        right = QuantizerSpec(bits=16) if br == 16 else QuantizerSpec.paper(br)
    else:
        left = (
            QuantizerSpec(bits=16)
            if bl == 16
            else QuantizerSpec(bits=bl, granularity="column", rounding=rounding)
        )
        right = grouped(br, "row")
    return CompressionConfig(
        method, rank, left, right, matrix, n_oversamples, n_power_iter, seed, blocks
    )


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


def _orthonormalize(y: da.Array) -> da.Array:
    rows = max(y.shape[1], max(y.chunks[0]))
    if min(y.chunks[0][:-1] or (rows,)) < y.shape[1] or y.chunks[0][-1] < y.shape[1]:
        y = y.rechunk({0: rows})
    q, _ = da.linalg.tsqr(y.rechunk({1: -1}))
    return q


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


def _times(x: da.Array, t: np.ndarray) -> da.Array:
    """x @ t for a row-blocked x and a small dense t (k × r), block by block."""
    return x.map_blocks(_matmul_small, t, chunks=(x.chunks[0], (t.shape[1],)), dtype=x.dtype)


def _nq_block(a, *, spec, lo, hi, seed, writer=None, block_info=None):
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
    codes = encode(a, spec, lo_b, hi_b, rng)
    ahat = decode(codes, spec, lo_b, hi_b, dtype=a.dtype)
    if writer is not None:
        r0, c0 = loc["array-location"][0][0], loc["array-location"][1][0]
        writer.write(r0, c0, codes, *((lo_b, hi_b) if local else (None, None)))
    return a, ahat


def _nq_write_stats(a, *, spec, lo, hi, seed, writer, block_info=None):
    a, ahat = _nq_block(a, spec=spec, lo=lo, hi=hi, seed=seed, writer=writer, block_info=block_info)
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


def _nq_residual(a, *, spec, lo, hi, seed, block_info=None):
    a, ahat = _nq_block(a, spec=spec, lo=lo, hi=hi, seed=seed, block_info=block_info)
    return a - ahat


def _quantize_matrix(a, spec, root, stages, seed, source):
    """Q(A) for ``nq`` and ``nq+lplr``: write its codes in a pass of its own (one more for
    per-matrix ranges). Returns ‖A‖², ‖A − Q(A)‖² and the per-matrix (lo, hi) or (None, None);
    the residual A − Q(A) is ``a.map_blocks(_nq_residual, ...)`` with those ranges."""
    lo = hi = None
    writer = create_factor(root, "Q", a.shape, spec, a.chunksize)
    if not spec.is_float and spec.granularity == "tensor":
        lo, hi = global_ranges(a, spec, stages, "matrix-ranges")
        check_finite_input(float(hi.sum() - lo.sum()), a, source, stages)
        writer.write_ranges(lo, hi)
    kw = dict(spec=spec, lo=lo, hi=hi, seed=seed)
    chunks = ((1,) * a.numblocks[0], (2,) * a.numblocks[1])
    stats = a.map_blocks(_nq_write_stats, writer=writer, chunks=chunks, dtype=np.float64, **kw)
    (s,) = stages.compute("quantize-matrix", stats)
    s = to_numpy(s).reshape(a.numblocks[0], a.numblocks[1], 2)
    _check_finite(s[..., 0], a, source)
    return float(s[..., 0].sum()), float(s[..., 1].sum()), lo, hi


def compress(
    source,
    output,
    *,
    method: str = "lplr",
    rank: int | None = None,
    budget: float | None = None,
    bits_left: int | None = None,
    bits_right: int | None = None,
    bits_matrix: int | None = None,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    n_oversamples: int = 0,
    n_power_iter: int | None = None,
    seed: int = 0,
    rounding: str = "nearest",
    block_shape: tuple[int, int] | None = None,
    max_rank: int = 512,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = False,
    on_stage: StageCallback | None = None,
    allow_missing_chunks: bool = False,
) -> CompressionResult:
    """Compress a matrix into low-rank, low-precision factors A ≈ L·R stored in Zarr.

    LPLR (Saha, Srivastava & Pilanci, 2023), out of core: the sketch Y = A·S is a blocked
    reduction over A's tiles with S regenerated per tile from ``seed``; Y is orthonormalized by
    tall-skinny QR and quantized (per-column scales); the projection R = (LᵀL)⁺LᵀA is computed
    per column panel, re-quantized (group-wise scales along d) and written where it is
    computed. Neither A nor R is ever gathered. The paper's symbols: m = ``rank``,
    B = ``bits_left``, B′ = ``bits_right``.

    Parameters
    ----------
    source : str, path, zarr.Array, numpy.ndarray or dask.array.Array
        The n × d float16/32/64 matrix: a Zarr v3 array (or a group holding one), or ``.npy``.
    output : str or path
        Where the compressed Zarr group goes; written under a temporary name and renamed into
        place when complete.
    method : {"lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr", "auto"}, default "lplr"
        ``lplr``: as above. ``paper``: Algorithm 1 with the reference quantizer (no QR,
        per-matrix min–max). ``nq``: A quantized directly. ``dsvd``: L = Q(U_k),
        R = Q′(Σ_k V_kᵀ) from a randomized SVD (``n_power_iter`` power iterations, 10 extra
        columns). ``lplr-svd``: the SVD-based LPLR of the paper (Z = U_k Σ_k Ω, Ω a k × k
        Gaussian). ``nq+lplr``: group-wise Q(A) plus LPLR of the residual A − Q(A).
        ``auto`` (with ``budget``): the best of ``lplr``, ``nq+lplr`` and ``nq``, each scored
        on the same column sample (one sketch pass per low-rank method more).
    rank : int, optional
        m, the inner dimension of L·R, 1 ≤ m < min(n, d). Required unless ``budget`` is given
        (or for ``nq``).
    budget : float, optional
        Bits per entry of A: choose rank and bit widths so that ``bits_per_entry <= budget``
        with the lowest error (see :func:`lplr_dask.budget.choose_config`).
    bits_left, bits_right : int, optional
        B and B′: bits per entry of L and R, 1–8, or 16 for float16. Default 8 (the paper's).
    bits_matrix : int, optional
        Bits per entry of Q(A) for ``nq`` and ``nq+lplr``. Default 4.
    group_size : int, default 128
        Entries per scale along the rows of R (and of A for ``nq``); a multiple of 8, or 0 for
        one scale per row of R (``nq``: one scale for the matrix).
    n_oversamples : int, default 0
        Extra sketch columns; the rank-m basis is then the top-m subspace of the larger sketch
        (one more pass over A). Increase this before ``n_power_iter``.
    n_power_iter : int, optional
        Power iterations (two passes over A each). Default 0 (2 for ``dsvd``/``lplr-svd``).
    seed : int, default 0
        Seeds every random stream; the same seed and ``block_shape`` give byte-identical codes
        for any storage tiling, worker count or backend.
    rounding : {"nearest", "stochastic"}, default "nearest"
    block_shape : (int, int), optional
        The canonical block grid of the computation, and the chunk shape of the stored
        factors. Default: at most 4096 × 4096, in nearly equal blocks (see
        :func:`lplr_dask.inputs.canonical_block_shape`).
    max_rank : int, default 512
        Largest rank the budget search considers.
    overwrite : bool, default False
        Replace an existing ``output`` (only once the new result is complete).
    resume : bool, default False
        Keep the intermediate results of finished stages if the run fails, and reuse those of
        an earlier failed run with the same input (fingerprint) and parameters; the result is
        byte-identical to an uninterrupted run. See :mod:`lplr_dask.job`.
    verify : bool, default False
        Also check the reported error by an independent blockwise pass over A and the stored
        codes (one more pass) before publishing.
    on_stage : callable, optional
        ``on_stage(stage, futures)`` for progress display on a distributed cluster.
    allow_missing_chunks : bool, default False
        A chunk missing from a Zarr INPUT is refused
        (:class:`~lplr_dask.errors.DamagedInputError` naming it): Zarr would read it as the
        fill value. With True, missing chunks are read as the fill value (Zarr leaves out
        chunks that hold only the fill value unless written with ``write_empty_chunks``).

    Returns
    -------
    CompressionResult
        The measured ``rel_fro_error`` (exact, from LᵀA and LᵀL, no extra pass),
        ``bits_per_entry`` = 8 · stored bytes / (n·d), where the stored bytes are the chunk
        payloads on disk (edge chunks padded; checksums and metadata aside), timings and the
        configuration.

    Notes
    -----
    Passes over A: 2 for ``lplr`` (+2 per power iteration, +1 with oversampling), +1 pass over
    a column sample and one sketch for ``budget``. Memory beyond one tile per worker thread:
    the n × (m + p) sketch and basis and the m × d_panel projection partials, on the workers.
    The driver holds only m × m matrices.

    References
    ----------
    R. Saha, V. Srivastava, M. Pilanci. Matrix Compression via Randomized Low Rank and Low
    Precision Factorization. NeurIPS 2023. arXiv:2310.11028.
    """
    from .job import CompressionJob

    job = CompressionJob.create(
        source,
        output,
        method=method,
        rank=rank,
        budget=budget,
        bits_left=bits_left,
        bits_right=bits_right,
        bits_matrix=bits_matrix,
        group_size=group_size,
        n_oversamples=n_oversamples,
        n_power_iter=n_power_iter,
        seed=seed,
        rounding=rounding,
        block_shape=block_shape,
        max_rank=max_rank,
        overwrite=overwrite,
        resume=resume,
        verify=verify,
        on_stage=on_stage,
        allow_missing_chunks=allow_missing_chunks,
    )
    return job.run()
