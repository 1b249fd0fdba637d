"""Non-uniform codebooks: normal-float levels, Lloyd–Max fits, and codebook (de)quantization.

A codebook quantizer with ``bits`` = B stores, per group, one scale ``s`` and per entry the
index k of one of 2^B sorted levels ``c_k`` in [-1, 1]; the value is ``s · c_k``. The levels:

- ``"normal"``: quantiles of N(0, 1) normalized to [-1, 1], built as QLoRA's NF4
  (Dettmers et al. 2023, arXiv 2305.14314; bitsandbytes ``create_normal_map``): 2^(B-1)
  positive quantiles of float32 ``linspace(0.9677083, 0.5, 2^(B-1) + 1)``, 2^(B-1) − 1
  negative ones, and an exact zero. :func:`normal_levels` (4) is the published NF4 table
  bit for bit. Scale: the group's max |x|.
- ``"sign"`` (1 bit): levels ±1 with the group's mean |x| as scale, the MSE-optimal
  symmetric 1-bit code (its squared error is Σx² − n·mean|x|², never above storing zeros).
- ``"lloyd"``: 2^B levels fitted to the factor's own entries normalized by their group's
  max |x|, each weighted by that scale squared so that the fit minimizes the squared error in
  the factor's units (:func:`fit_lloyd`, Lloyd–Max iterations on a histogram, one level
  pinned at zero), stored with the factor.

Every level set except ``sign`` contains 0, so with nearest rounding no entry is moved
further than storing 0 would: codes of those kinds are never worse than zeros, group by group.

Stochastic rounding picks one of the two levels around ``x / s`` with the probabilities that
make it unbiased (inside the outer levels), from the same per-block dither stream as the
uniform grid. Pure per-block NumPy/CuPy kernels; no Dask.
"""

from __future__ import annotations

from functools import cache, lru_cache
from statistics import NormalDist

import numpy as np

from lplr_dask.kernels.xp import array_namespace, asarray_like

__all__ = [
    "HIST_BINS",
    "NF4",
    "NORMAL_OFFSET",
    "block_histogram",
    "dequantize_codebook",
    "fit_lloyd",
    "nearest_codes",
    "normal_levels",
    "quantize_codebook",
]

NORMAL_OFFSET = 0.9677083
"""The outermost quantile of the normal-float construction (bitsandbytes' choice for NF4)."""

#: The published NF4 table (bitsandbytes ``csrc/kernels.cu``, QLoRA appendix E).
NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

HIST_BINS = 1 << 14
"""Bins of the histogram over [-1, 1] that Lloyd–Max codebooks are fitted to (the bin width,
2^-13, bounds how far a fitted level can be from the exact Lloyd–Max centroid)."""

_LLOYD_ITERS = 100


def _linspace32(start: float, stop: float, num: int) -> np.ndarray:
    """float32 ``linspace`` computed as ``torch.linspace`` does (from both ends), which the
    published NF4 table was built with."""
    step = np.float32((np.float32(stop) - np.float32(start)) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float32)
    head = np.float32(start) + step * i
    tail = np.float32(stop) - step * (np.float32(num - 1) - i)
    return np.where(i < num // 2, head, tail).astype(np.float32)


@cache
def _normal_levels(bits: int) -> tuple:
    nd = NormalDist()
    n_pos, n_neg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    pos = [nd.inv_cdf(float(p)) for p in _linspace32(NORMAL_OFFSET, 0.5, n_pos + 1)[:-1]]
    neg = (
        [-nd.inv_cdf(float(p)) for p in _linspace32(NORMAL_OFFSET, 0.5, n_neg + 1)[:-1]]
        if n_neg
        else []
    )
    v = np.sort(np.array([*pos, 0.0, *neg], dtype=np.float32))
    return tuple((v / v.max()).tolist())


def normal_levels(bits: int) -> np.ndarray:
    """The 2^``bits`` sorted normal-float levels in [-1, 1] (float32), NF4 for 4 bits.

    One bit gives {0, 1} (the construction's zero and its one positive quantile); the
    ``sign`` kind is the better 1-bit code.
    """
    return np.array(_normal_levels(int(bits)), dtype=np.float32)


def _levels_like(levels, like):
    return asarray_like(np.asarray(levels, dtype=np.float64), like)


_LUT_BINS = 1 << 14


@lru_cache(maxsize=64)
def _nearest_table(levels: tuple) -> tuple | None:
    """(mids, lut) for :func:`nearest_codes`: float32 midpoints (+inf appended) and, per bin
    of :data:`_LUT_BINS` over [-1, 1], the number of midpoints at or below its left edge; None
    when some bin holds two midpoints (then a binary search decides)."""
    c = np.asarray(levels, dtype=np.float64)
    mids = ((c[1:] + c[:-1]) * 0.5).astype(np.float32)
    edges = (np.arange(_LUT_BINS + 1, dtype=np.float64) / (_LUT_BINS / 2) - 1.0).astype(np.float32)
    lut = np.searchsorted(mids, edges, side="right")
    if np.any(np.diff(lut) > 1) or np.any(np.abs(mids) > 1):
        return None
    return np.append(mids, np.float32(np.inf)), lut[:-1].astype(np.uint8)


def nearest_codes(t, levels):
    """Codes (uint8) of the nearest of the sorted ``levels`` (exact midpoints go up) for
    float32 normalized values ``t``: a table lookup on a fine grid of [-1, 1] and one
    comparison with the midpoint the cell may hold (3× faster than a binary search)."""
    xp = array_namespace(t)
    table = _nearest_table(tuple(np.asarray(levels, dtype=np.float32).tolist()))
    if table is None:
        c = np.asarray(levels, dtype=np.float64)
        mids = xp.asarray(((c[1:] + c[:-1]) * 0.5).astype(np.float32))
        return xp.searchsorted(mids, t, side="right").astype(np.uint8)
    mids, lut = (xp.asarray(v) for v in table)
    idx = ((t + np.float32(1.0)) * np.float32(_LUT_BINS / 2)).astype(np.int32)
    xp.clip(idx, 0, _LUT_BINS - 1, out=idx)
    k = lut[idx]
    return (k + (t >= mids[k])).astype(np.uint8)


def quantize_codebook(t, levels, *, rng=None):
    """Codes (uint8) of the normalized values ``t`` (``x / scale``) on the sorted ``levels``:
    nearest (:func:`nearest_codes`, on float32 t) or, with ``rng``, unbiased stochastic
    rounding between the two levels around t (float64; values outside the outer levels go to
    them)."""
    xp = array_namespace(t)
    if rng is None:
        return nearest_codes(t.astype(np.float32, copy=False), levels)
    c = _levels_like(levels, t)
    top = c.shape[0] - 1
    t = xp.clip(t.astype(np.float64, copy=False), c[0], c[top])
    k = xp.clip(xp.searchsorted(c, t, side="right") - 1, 0, max(top - 1, 0))
    if top == 0:
        return xp.zeros(t.shape, dtype=np.uint8)
    lo, hi = c[k], c[k + 1]
    p = (t - lo) / (hi - lo)
    u = xp.asarray(rng.random(t.shape))
    return (k + (u < p)).astype(np.uint8)


def dequantize_codebook(codes, scale, levels, *, dtype=np.float32):
    """``scale · levels[codes]`` (scale broadcast over the block) as ``dtype``: the exact
    product of the two float32 numbers, rounded once (float32 arithmetic gives the same
    bits as float64 arithmetic rounded to float32, at half the memory traffic)."""
    xp = array_namespace(codes)
    if np.dtype(dtype) == np.float32:
        c = xp.asarray(np.asarray(levels, dtype=np.float32))
        return scale.astype(np.float32, copy=False) * c[codes]
    c = _levels_like(levels, codes)
    return (scale.astype(np.float64) * c[codes]).astype(dtype)


def block_histogram(t, weights=None):
    """Histogram (float64, :data:`HIST_BINS` bins over [-1, 1]) of normalized values ``t``,
    each counted with its weight (1 by default). Partial histograms of blocks add up; in a
    fixed order of blocks the sum is the same for every run."""
    xp = array_namespace(t)
    idx = xp.floor((xp.clip(t, -1.0, 1.0) + 1.0) * (HIST_BINS / 2.0)).astype(np.int64)
    idx = xp.clip(idx, 0, HIST_BINS - 1)
    w = None if weights is None else xp.broadcast_to(weights, t.shape).ravel()
    return xp.bincount(idx.ravel(), weights=w, minlength=HIST_BINS).astype(np.float64)


def fit_lloyd(counts: np.ndarray, bits: int) -> np.ndarray:
    """A Lloyd–Max codebook of 2^``bits`` sorted float32 levels in [-1, 1] for the
    distribution of :func:`block_histogram` ``counts`` (bin centres as the samples, weighted),
    one level pinned at exactly 0 (never worse than zeros, exact for zero groups).

    Deterministic: a fixed start (the normal-float levels), a fixed number of iterations at
    most, float64 arithmetic on the driver. Cost O(HIST_BINS · iterations).
    """
    counts = np.asarray(counts, dtype=np.float64)
    centres = (np.arange(HIST_BINS) + 0.5) / (HIST_BINS / 2.0) - 1.0
    levels = normal_levels(bits).astype(np.float64)
    if bits == 1:
        levels = (
            np.array([0.0, 1.0])
            if counts[centres > 0].sum() >= counts[centres < 0].sum()
            else np.array([-1.0, 0.0])
        )
    zero = int(np.argmin(np.abs(levels)))
    total = counts.sum()
    if total == 0:
        return levels.astype(np.float32)
    cum_n = np.concatenate([[0.0], np.cumsum(counts)])
    cum_s = np.concatenate([[0.0], np.cumsum(counts * centres)])
    for _ in range(_LLOYD_ITERS):
        mids = (levels[1:] + levels[:-1]) * 0.5
        cut = np.searchsorted(centres, mids, side="left")
        bounds = np.concatenate([[0], cut, [HIST_BINS]])
        n = cum_n[bounds[1:]] - cum_n[bounds[:-1]]
        s = cum_s[bounds[1:]] - cum_s[bounds[:-1]]
        new = np.where(n > 0, s / np.where(n > 0, n, 1.0), levels)
        new[zero] = 0.0
        new = np.sort(new)
        if np.array_equal(new, levels):
            break
        levels = new
    # Distinct float32 levels (empty cells keep their start values, which are distinct).
    out = np.unique(levels.astype(np.float32))
    if out.size < levels.size:
        out = normal_levels(bits) if bits > 1 else levels.astype(np.float32)
    return out.astype(np.float32)
