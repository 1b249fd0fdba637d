"""Choosing rank and bit widths under a budget in bits per entry.

For ``lplr`` (and ``dsvd``, ``lplr-svd``, ``nq+lplr``) every pair of bit widths (B, B′) in 1–8
gets its largest feasible rank m(B, B′) ≤ ``max_rank``; the pair with the lowest *measured*
error wins. Measuring every candidate costs one sketch pass over A plus small work:

1. one sketch of K = max m columns. The sketch has a prefix property (see
   :mod:`lplr_dask.kernels.random`), so the first m columns of its orthonormal basis span
   exactly the rank-m sketch's range, for every candidate m;
2. in the same pass, a seeded sample of whole column groups of A is kept (``sample_cols``
   columns, all of A when d is smaller);
3. given L̂, the error separates over columns, ‖A − L̂R̂‖² = Σ_j ‖A_j − L̂R̂_j‖², and R̂_j depends
   only on column j and its group, so the error on the sampled columns is exact for them and
   an unbiased estimate of the whole (a ratio estimator of the relative error).

The chosen configuration is then compressed for real (two more passes). ``paper`` keeps its
fixed bits (8/8 by default, as in the paper) and takes the largest rank; ``nq`` takes the
largest bit width that fits.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import numpy as np
from dask.array.utils import meta_from_array

from lplr_dask.core.engine import (
    Stages,
    decode,
    encode,
    global_ranges_many,
    gram,
    left_multiply,
    quantize_rows_block,
    right_multiply,
    sketch_matrix,
    sketch_with_norms,
)
from lplr_dask.core.methods import (
    ROTATED_METHODS,
    basis_rotation,
    check_finite_input,
    nq_residual,
    orthonormalize,
    times,
)
from lplr_dask.core.params import CompressionConfig, CompressionOptions
from lplr_dask.errors import ParameterError
from lplr_dask.kernels.linalg import gram_pinv, top_eigenvectors
from lplr_dask.kernels.quantize import QuantizerSpec, block_range
from lplr_dask.kernels.xp import to_numpy
from lplr_dask.storage.inputs import InputMatrix

__all__ = ["choose_config", "max_rank_for"]

BIT_CHOICES = tuple(range(1, 9))


def max_rank_for(shape, *, budget: float, make) -> int:
    """Largest m with ``make(m).bits_per_entry(shape) <= budget`` (0 if none).

    Bits grow linearly in m, so this is a bisection over 1 ≤ m < min(n, d).
    """
    lo, hi = 0, min(shape) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid).bits_per_entry(shape) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _too_small(budget, shape, cfg_min, what):
    need = cfg_min.bits_per_entry(shape)
    return ParameterError(
        f"budget={budget} bits per entry is too small for {what}: the cheapest configuration "
        f"needs {need:.4f} bits per entry for a {shape[0]}×{shape[1]} matrix. Raise --budget "
        "to at least that"
        + (
            ", or use --method nq."
            if what != "nq"
            else " (or, for nq, set --group-size 0 for one scale per matrix)."
        )
    )


def _candidate_grid(bits_left, bits_right):
    lefts = (bits_left,) if bits_left is not None else BIT_CHOICES
    rights = (bits_right,) if bits_right is not None else BIT_CHOICES
    return [(bl, br) for bl in lefts for br in rights]


def choose_config(
    matrix: InputMatrix,
    options: CompressionOptions,
    *,
    stages: Stages | None = None,
    sample_cols: int = 2048,
    samples: dict | None = None,
) -> tuple[CompressionConfig, list[dict]]:
    """The configuration with the lowest measured error among those within ``options.budget``.

    Parameters
    ----------
    matrix : InputMatrix
        The opened input (:func:`lplr_dask.storage.inputs.open_input`).
    options : CompressionOptions
        With ``budget`` set; ``method``, fixed bit widths, ``group_size``, ``seed``,
        ``rounding``, ``n_oversamples``, ``n_power_iter`` and ``max_rank`` bound the search.
    stages : Stages, optional
        The stage runner (progress, BLAS threads); a new one by default.
    sample_cols : int, default 2048
        Columns of A kept (in whole scale groups) to score the candidates exactly on them.
    samples : dict, optional
        A cache of column samples shared by several calls (``auto`` scores every method on
        the same sample, read from A once).

    Returns
    -------
    config : CompressionConfig
    table : list of dict
        Every candidate scored (rank, bits, bits_per_entry, estimated_rel_error); empty for
        ``nq`` and ``paper``, which have one feasible choice.

    Raises
    ------
    ParameterError
        If no configuration of ``method`` fits: the message gives the smallest budget that does.
    """
    stages = stages or Stages()
    shape, budget, method = matrix.shape, options.budget, options.method
    if method == "auto":
        return _choose_auto(matrix, options, stages=stages, sample_cols=sample_cols)
    samples = {} if samples is None else samples
    bits_left, bits_right, bits_matrix = options.bits_left, options.bits_right, options.bits_matrix

    def config(**fields) -> CompressionConfig:
        # block_shape: the stored chunks, which the honest bytes count
        opts = replace(options, budget=None, **fields)
        return opts.resolve(shape, block_shape=matrix.block_shape)

    if method == "nq":
        choices = (bits_matrix,) if bits_matrix is not None else (16, *BIT_CHOICES[::-1])
        for b in choices:
            cfg = config(bits_matrix=b)
            if cfg.bits_per_entry(shape) <= budget:
                return cfg, []
        raise _too_small(budget, shape, config(bits_matrix=min(choices)), "nq")

    def make(m, bl, br, bm=None):
        return config(rank=m, bits_left=bl, bits_right=br, bits_matrix=bm)

    cap = max(1, min(options.max_rank, min(shape) - 1 - options.n_oversamples))
    if method == "paper":
        bl, br = bits_left or 8, bits_right or 8
        m = min(cap, max_rank_for(shape, budget=budget, make=lambda r: make(r, bl, br)))
        if m < 1:
            raise _too_small(budget, shape, make(1, bl, br), f"paper with B={bl}, B'={br}")
        return make(m, bl, br), []

    matrix_bits = [None]
    if method == "nq+lplr":
        if bits_matrix is not None:
            matrix_bits = [bits_matrix]
        else:
            top = int(min(8, np.floor(budget)))
            matrix_bits = sorted({max(1, top - 1), max(1, top)})
            cheapest = min(_candidate_grid(bits_left, bits_right))
            if all(make(1, *cheapest, b).bits_per_entry(shape) > budget for b in matrix_bits):
                # Scales and padded edge chunks can cost more than the fraction of a bit the
                # floor leaves: take the widest Q(A) that still leaves room for rank 1.
                fits = [
                    b
                    for b in BIT_CHOICES[: matrix_bits[0] - 1]
                    if make(1, *cheapest, b).bits_per_entry(shape) <= budget
                ]
                matrix_bits = fits[-1:] or matrix_bits
    candidates = []
    for bm in matrix_bits:
        for bl, br in _candidate_grid(bits_left, bits_right):
            fit = max_rank_for(shape, budget=budget, make=partial(make, bl=bl, br=br, bm=bm))
            m = min(cap, fit)
            if m >= 1:
                candidates.append((m, bl, br, bm))
    if not candidates:
        cheapest = min(_candidate_grid(bits_left, bits_right))
        raise _too_small(budget, shape, make(1, *cheapest, matrix_bits[0]), f"{method} at rank 1")
    best = None
    table = []
    for bm in matrix_bits:
        group = [c for c in candidates if c[3] == bm]
        if not group:
            continue
        errors = _estimate_errors(
            matrix,
            group,
            make,
            stages=stages,
            sample_cols=sample_cols,
            samples=samples,
            seed=options.seed,
            method=method,
            n_power_iter=options.n_power_iter,
        )
        for cand, err in zip(group, errors, strict=False):
            cfg = make(*cand)
            table.append(
                {
                    "rank": cand[0],
                    "bits_left": cand[1],
                    "bits_right": cand[2],
                    "bits_matrix": cand[3],
                    "bits_per_entry": cfg.bits_per_entry(shape),
                    "estimated_rel_error": err,
                }
            )
            if best is None or err < best[0]:
                best = (err, cfg)
    return best[1], table


AUTO_METHODS = ("lplr", "nq+lplr", "nq")


def _choose_auto(matrix: InputMatrix, options: CompressionOptions, *, stages, sample_cols):
    """``method="auto"``: the best configuration of every method in :data:`AUTO_METHODS` that
    fits the budget, each scored on the same seeded column sample; the lowest estimated error
    wins. Costs one sketch pass per low-rank method plus reads of the sample."""
    best, table, refused = None, [], []
    samples: dict = {}  # the column sample is read from A once, shared by every method
    for method in AUTO_METHODS:
        try:
            cfg, rows = choose_config(
                matrix,
                replace(options, method=method),
                stages=stages,
                sample_cols=sample_cols,
                samples=samples,
            )
        except ParameterError as exc:
            refused.append(f"{method}: {exc}")
            continue
        if method == "nq":
            rows = [
                {
                    "rank": None,
                    "bits_left": None,
                    "bits_right": None,
                    "bits_matrix": cfg.matrix.bits,
                    "bits_per_entry": cfg.bits_per_entry(matrix.shape),
                    "estimated_rel_error": _estimate_nq_error(
                        matrix,
                        cfg,
                        stages=stages,
                        sample_cols=sample_cols,
                        samples=samples,
                    ),
                }
            ]
        err = min(r["estimated_rel_error"] for r in rows)
        table += [{"method": method, **r} for r in rows]
        if best is None or err < best[0]:
            best = (err, cfg)
    if best is None:
        raise ParameterError(
            f"budget={options.budget} bits per entry fits none of {', '.join(AUTO_METHODS)}: "
            + " ".join(refused)
        )
    return best[1], table


def _estimate_nq_error(
    matrix: InputMatrix, cfg: CompressionConfig, *, stages, sample_cols, samples
):
    """Relative error of Q(A) on the seeded sample of whole column groups (exact for
    group-wise scales, whose groups the sample keeps whole)."""

    a, spec = matrix.data, cfg.matrix
    group = spec.group_size if spec.granularity == "group" else 128
    cols = _sample_columns(a.shape[1], group=group, sample_cols=sample_cols, seed=cfg.seed)
    sub = _column_sample(a, cols, stages=stages, samples=samples)
    res = sub.map_blocks(nq_residual, dtype=a.dtype, spec=spec, lo=None, hi=None, seed=cfg.seed)
    num, den = stages.compute(
        "search-nq", (res.astype(np.float64) ** 2).sum(), (sub.astype(np.float64) ** 2).sum()
    )
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def _sample_columns(d: int, *, group: int, sample_cols: int, seed: int) -> np.ndarray:
    """Sorted column indices of whole groups, chosen by a seeded generator (all if d small)."""
    if d <= sample_cols:
        return np.arange(d)
    n_groups = -(-d // group)
    take = max(1, sample_cols // group)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99,)))
    chosen = np.sort(rng.choice(n_groups, size=min(take, n_groups), replace=False))
    cols = np.concatenate([np.arange(g * group, min((g + 1) * group, d)) for g in chosen])
    return cols


def _inverse_cholesky(g: np.ndarray) -> np.ndarray | None:
    """C⁻¹ for G = C·Cᵀ when G is comfortably positive definite, else None (use gram_pinv)."""
    try:
        c = np.linalg.cholesky(g)
    except np.linalg.LinAlgError:
        return None
    d = np.abs(np.diag(c))
    if d.size == 0 or d.min() < 1e-6 * d.max():  # near-singular: leave it to gram_pinv
        return None
    return np.linalg.inv(c)


def _column_sample(a, cols: np.ndarray, *, stages: Stages, samples: dict):
    """A[:, cols] as one column block, persisted on the workers in a stage of its own (as a
    second consumer of A's tiles in the sketch stage it would stop Dask from streaming);
    read once per (A, cols) and kept in ``samples`` for the other methods of ``auto``."""
    key = (a.name, cols.tobytes())
    if key not in samples:
        (samples[key],) = stages.persist("search-sample", a[:, cols].rechunk({1: -1}))
    return samples[key]


def _estimate_errors(
    matrix, candidates, make, *, stages, sample_cols, samples, seed, method, n_power_iter
):
    """Estimated relative errors of ``candidates`` [(m, B, B′, B_nq)] from one sketch pass."""

    a = matrix.data
    _n, d = a.shape
    cfg0 = make(*candidates[0])
    k = max(c[0] for c in candidates)
    group = cfg0.right.group_size if cfg0.right.granularity == "group" else 128
    cols = _sample_columns(d, group=group, sample_cols=sample_cols, seed=seed)
    orig_sub = _column_sample(a, cols, stages=stages, samples=samples)
    sub = orig_sub
    if cfg0.matrix is not None:
        # nq+lplr: the low-rank part models the residual of the group-wise quantizer Q(A).
        if not cfg0.matrix.is_float and cfg0.matrix.granularity == "tensor":
            raise ParameterError(
                "method='nq+lplr' with a budget needs group-wise scales for Q(A); set "
                "--group-size to a multiple of 8 (such as 128)."
            )
        # Sampled columns are whole groups, so Q acts on the sample as on A (with stochastic
        # rounding the dither differs from the real run's: an estimate, not the same codes).
        residual = partial(nq_residual, spec=cfg0.matrix, lo=None, hi=None, seed=seed)
        a = a.map_blocks(residual, dtype=a.dtype)
        (sub,) = stages.persist("search-sample", orig_sub.map_blocks(residual, dtype=a.dtype))
    s = sketch_matrix(
        d, k, seed=seed, row_chunks=a.chunks[1], dtype=a.dtype, meta=meta_from_array(a)
    )
    (ext,) = stages.persist("search-sketch", sketch_with_norms(a, s))
    y = ext[:, :k]
    check_finite_input(float(ext[:, -1].sum().compute()), a, matrix.path or "array", stages)
    for _ in range(n_power_iter or 0):
        q = orthonormalize(y)
        (z,) = stages.persist("search-power-iteration", orthonormalize(left_multiply(a, q).T))
        (y,) = stages.persist("search-power-iteration", right_multiply(a, z))
    (basis,) = stages.persist("search-basis", y if method == "paper" else orthonormalize(y))
    given = None
    if method in ("dsvd", "lplr-svd"):
        # Rank-ordered singular vectors of the sketch's projection: prefixes are rank-m SVDs.
        (bbt,) = stages.compute("search-svd", gram(left_multiply(a, basis).T))
        u, w = top_eigenvectors(to_numpy(bbt), k)
        if method == "lplr-svd":
            u = u * np.sqrt(np.maximum(w, 0.0))[None, :]
        (basis,) = stages.persist("search-basis", times(basis, u))
        if method == "dsvd":
            given = left_multiply(sub, basis)
    if method in ROTATED_METHODS:
        # Each rank has its own rotation: score every (rank, B) basis on its own.
        keys = sorted({(c[0], c[1]) for c in candidates})
        bases = {key: times(basis[:, : key[0]], basis_rotation(seed, key[0])) for key in keys}
    else:
        # Prefixes of one basis: every rank shares the quantized K-column basis of its B.
        keys = sorted({(k, c[1]) for c in candidates})
        bases = {key: basis for key in keys}
    distinct = list({x.name: x for x in bases.values()}.values())
    by_column = QuantizerSpec(granularity="column")
    found = global_ranges_many(distinct, by_column, stages, "search-ranges")
    ranges = {x.name: r for x, r in zip(distinct, found, strict=True)}
    work = []
    for key in keys:
        spec = make(key[0], key[1], candidates[0][2], candidates[0][3]).left
        lo, hi = (None, None) if spec.is_float else ranges[bases[key].name]
        lhat = bases[key].map_blocks(
            quantize_rows_block,
            spec=spec,
            lo=lo,
            hi=hi,
            seed=seed,
            out_dtype=a.dtype,
            dtype=a.dtype,
        )
        work += [gram(lhat), left_multiply(sub, lhat)]
    lefts = keys
    norms = [(sub.astype(np.float64) ** 2).sum(), (orig_sub.astype(np.float64) ** 2).sum()]
    out = stages.compute("search-evaluate", *work, *norms, *([given] if given is not None else []))
    out = [to_numpy(x) for x in out]
    per_left = {bl: (out[2 * i], out[2 * i + 1]) for i, bl in enumerate(lefts)}
    sub_norm2, orig_norm2 = float(out[2 * len(lefts)]), float(out[2 * len(lefts) + 1])
    given_np = out[-1] if given is not None else None
    # The Cholesky factor C of G_K, and its inverse, restricted to the leading m × m block are
    # those of G_m: one factorization per left bit width serves every candidate rank.
    inv_chol = {key: _inverse_cholesky(g) for key, (g, _) in per_left.items()}
    errors = []
    for m, bl, br, bm in candidates:
        key = (m, bl) if (m, bl) in per_left else (k, bl)
        g_full, p_full = per_left[key]
        g, p = g_full[:m, :m], p_full[:m]
        if given_np is not None:
            r = given_np[:m]
        elif inv_chol[key] is not None:
            ci = inv_chol[key][:m, :m]
            r = ci.T @ (ci @ p)
        else:
            r = gram_pinv(g) @ p
        spec = make(m, bl, br, bm).right
        lo, hi = (None, None) if spec.is_float else block_range(r, spec=spec)
        rhat = decode(encode(r, spec, lo, hi), spec, lo, hi, dtype=np.float64)
        err2 = sub_norm2 - 2 * float(np.sum(rhat * p)) + float(np.sum(rhat * (g @ rhat)))
        errors.append(float(np.sqrt(max(err2, 0.0) / orig_norm2)) if orig_norm2 > 0 else 0.0)
    return errors
