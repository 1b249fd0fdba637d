"""Per-group ranges and scales of one block: mergeable statistics, the scale precision, the
MSE-optimal clipped range search, and the histogram that ``lloyd`` codebooks are fitted to.

A group that spans several blocks (a column of a row-chunked factor, a row of a column-paneled
one, the whole tensor) is reduced in a fixed order: :func:`range_stats` per block, combined with
:func:`merge_stats`, finished with :func:`stats_ranges`; for ``"clipped"`` then
:func:`clip_errors` per block, summed, and :func:`pick_clipped`. A group inside one block takes
:func:`block_range`, which does all of it. Pure per-block NumPy/CuPy; no Dask.
"""

from __future__ import annotations

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.codebooks import HIST_BINS, block_histogram
from lplr_dask.kernels.packing import decode_float, encode_float
from lplr_dask.kernels.spec import QuantizerSpec, expand_range, row_slabs
from lplr_dask.kernels.xp import array_namespace

__all__ = [
    "CLIP_FACTORS",
    "CLIP_MARGIN",
    "block_range",
    "clip_errors",
    "entry_histogram",
    "merge_ranges",
    "merge_stats",
    "normalized",
    "pick_clipped",
    "range_stats",
    "scales_for_storage",
    "scales_from_storage",
    "stats_ranges",
]

#: Shrink factors that the ``"clipped"`` kind tries per group, 1 (min–max) down to 0 (zeros).
CLIP_FACTORS = tuple(round(1.0 - 0.05 * i, 2) for i in range(21))
CLIP_MARGIN = 1e-4
"""Relative margin by which a clipped range must beat min–max (float32 scoring accuracy)."""
_FLOAT16_MAX = 65504.0


def _group_view(x, spec: QuantizerSpec, pad_value=None):
    """``x`` as (rows, n_groups, group_size) for ``"group"``; the last group padded with
    ``pad_value`` (or copies of the row's last entry, neutral for min and max)."""
    xp = array_namespace(x)
    g = spec.group_size
    rows, cols = x.shape
    n_groups = -(-cols // g)
    pad = n_groups * g - cols
    if pad:
        fill = (
            xp.repeat(x[:, -1:], pad, axis=1)
            if pad_value is None
            else xp.full((rows, pad), pad_value, dtype=x.dtype)
        )
        x = xp.concatenate([x, fill], axis=1)
    return x.reshape(rows, n_groups, g)


def _reduce(x, spec: QuantizerSpec, op: str):
    """Per-group ``op`` ("min", "max", "sum") of a block, shaped like ``spec.range_shape``."""
    xp = array_namespace(x)
    fn = getattr(xp, op)
    if spec.granularity == "tensor":
        return fn(x, keepdims=True).reshape(1, 1)
    if spec.granularity == "column":
        return fn(x, axis=0, keepdims=True)
    if spec.granularity == "row":
        return fn(x, axis=1, keepdims=True)
    return fn(_group_view(x, spec, 0 if op == "sum" else None), axis=2)


def range_stats(x, *, spec: QuantizerSpec) -> tuple:
    """Mergeable per-group statistics of one block: ``(lo, hi)`` (float32 min and max, or
    ∓max|x| for symmetric kinds), or for ``"sign"`` ``(Σ|x|, count)`` in float64. Combine
    blocks of the same groups with :func:`merge_stats`, finish with :func:`stats_ranges`."""
    xp = array_namespace(x)
    if spec.kind == "sign":
        ax = xp.abs(x).astype(np.float64)
        ones = xp.ones(x.shape, dtype=np.float64)
        return _reduce(ax, spec, "sum"), _reduce(ones, spec, "sum")
    lo, hi = _reduce(x, spec, "min"), _reduce(x, spec, "max")
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    if spec.symmetric:
        hi = xp.maximum(xp.abs(lo), xp.abs(hi))
        lo = -hi
    return lo, hi


def merge_stats(a: tuple, b: tuple, *, spec: QuantizerSpec) -> tuple:
    """Combine two :func:`range_stats` of the same groups (exact and order-independent for
    min–max; a sum in float64 for ``"sign"``)."""
    if spec.kind == "sign":
        return a[0] + b[0], a[1] + b[1]
    return merge_ranges(a, b)


def _round_bfloat16(v, direction: int):
    xp = array_namespace(v)
    u = xp.ascontiguousarray(v).view(np.uint32)
    if direction == 0:
        return ((u + (((u >> 16) & 1) + 0x7FFF)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    trunc = u & np.uint32(0xFFFF0000)  # toward zero
    inexact = (u & np.uint32(0xFFFF)) != 0
    away = inexact & ((v > 0) if direction > 0 else (v < 0))
    return xp.where(away, trunc + np.uint32(0x10000), trunc).astype(np.uint32).view(np.float32)


def scales_for_storage(v, spec: QuantizerSpec):
    """Range or scale values (float32, already of ``scale_dtype``) as stored on disk."""
    if spec.scale_dtype == "bfloat16":
        return encode_float(v, "bfloat16")
    return v.astype(spec.scale_dtype)


def scales_from_storage(a, spec: QuantizerSpec):
    """Inverse of :func:`scales_for_storage`: float32 values."""
    if spec.scale_dtype == "bfloat16":
        return decode_float(a, "bfloat16", np.float32)
    return a.astype(np.float32)


def _round_scale(v, spec: QuantizerSpec, direction: int):
    """float32 ``v`` rounded to a value of ``spec.scale_dtype`` (float32 back): up
    (``direction`` 1), down (-1) or to nearest (0)."""
    if spec.scale_dtype == "float32":
        return v.astype(np.float32)
    xp = array_namespace(v)
    v = v.astype(np.float32)
    if spec.scale_dtype == "bfloat16":
        return _round_bfloat16(v, direction)
    if bool(xp.any(xp.abs(v) > _FLOAT16_MAX)):
        big = float(xp.max(xp.abs(v)))
        raise ParameterError(
            f"a quantizer range reaches {big:.6g}, beyond float16's {_FLOAT16_MAX:g}: "
            "scale_dtype='float16' cannot store it. Use scale_dtype='float32' (the 'minmax' "
            "quantizer), or rescale the matrix."
        )
    h = v.astype(np.float16)
    back = h.astype(np.float32)
    if direction > 0:
        h = xp.where(back < v, xp.nextafter(h, xp.asarray(np.inf, dtype=np.float16)), h)
    elif direction < 0:
        h = xp.where(back > v, xp.nextafter(h, xp.asarray(-np.inf, dtype=np.float16)), h)
    return h.astype(np.float32)


def _rounded_range(lo, hi, spec: QuantizerSpec):
    hi = _round_scale(hi, spec, 1)
    lo = -hi if spec.symmetric else _round_scale(lo, spec, -1)
    return lo, hi


def stats_ranges(stats: tuple, *, spec: QuantizerSpec):
    """The stored ``(lo, hi)`` (float32 arrays of values of ``scale_dtype``) from merged
    :func:`range_stats`: the min–max range rounded outward, or ``±mean|x|`` for ``"sign"``.
    For ``"clipped"`` this is the range the search starts from (see :func:`pick_clipped`)."""
    if spec.kind == "sign":
        xp = array_namespace(stats[0])
        mean = stats[0] / xp.maximum(stats[1], 1.0)
        hi = _round_scale(mean.astype(np.float32), spec, 0)
        return -hi, hi
    lo, hi = stats
    return _rounded_range(lo, hi, spec)


def block_range(x, *, spec: QuantizerSpec):
    """Per-group ``(lo, hi)`` of one block, as float32 arrays of ``spec.range_shape``.

    For ``"group"`` the block must start at a multiple of ``group_size`` along its rows. A
    group that spans several blocks (a column of a row-chunked matrix, the whole tensor) gets
    partial ranges here; combine :func:`range_stats` with :func:`merge_stats` instead (and,
    for ``"clipped"``, :func:`clip_errors` summed over blocks). Codebook kinds return
    ``(-scale, scale)``.
    """
    lo, hi = stats_ranges(range_stats(x, spec=spec), spec=spec)
    if spec.kind == "clipped":
        lo, hi = pick_clipped(lo, hi, clip_errors(x, lo, hi, spec=spec), spec=spec)
    return lo, hi


def _candidates(lo, hi, spec: QuantizerSpec):
    for s in CLIP_FACTORS:
        f = np.float32(s)
        yield _rounded_range(lo * f, hi * f, spec)


def clip_errors(x, lo, hi, *, spec: QuantizerSpec):
    """Squared errors (float64, shape ``(len(CLIP_FACTORS), *spec.range_shape)``) of this
    block's groups on each shrunken candidate range of the full ranges ``lo, hi`` (of the
    whole groups, from :func:`stats_ranges`): with nearest rounding the error of the codes,
    with stochastic rounding its expectation. Sums over the blocks of a group are the input of
    :func:`pick_clipped`.

    Scored in float32 arithmetic (per-group sums in float64), in row slabs of about
    :data:`SLAB_ENTRIES` entries with in-place temporaries: 21 passes over the block, about
    1.1 s for a 4096² tile on one core (min–max quantization: 0.4 s).
    """
    xp = array_namespace(x)
    cands = list(_candidates(lo, hi, spec))
    per_row = spec.granularity in ("row", "group")
    out: list[list] = [[] for _ in cands]
    for r0, r1 in row_slabs(*x.shape):
        xs = x[r0:r1].astype(np.float32, copy=False)
        mask = None
        if spec.granularity == "group":
            cols = xs.shape[1]
            xs = _group_view(xs, spec, 0)
            if xs.shape[1] * xs.shape[2] != cols:
                mask = (xp.arange(xs.shape[1] * xs.shape[2]) < cols).reshape(xs.shape[1:])
        buf, val = xp.empty_like(xs), xp.empty_like(xs)
        for i, (clo, chi) in enumerate(cands):
            if per_row:
                clo, chi = clo[r0:r1], chi[r0:r1]
            if spec.granularity == "group":
                clo, chi = clo[:, :, None], chi[:, :, None]
            e = _error_f32(xs, clo, chi, spec, buf, val)
            if mask is not None:
                e = e * mask
            if spec.granularity == "group":
                part = xp.einsum("ijk,ijk->ij", e, e).astype(np.float64)
            else:
                part = _reduce((e * e).astype(np.float64), spec, "sum")
            out[i].append(part)
    rows = [xp.concatenate(p, axis=0) if per_row else _sum_all(p) for p in out]
    return xp.stack(rows)


def _sum_all(parts):
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def _error_f32(x, lo, hi, spec: QuantizerSpec, buf, val):
    """Per-entry error (float32, in ``val``) of ``x`` on the grid ``lo..hi``: the error of
    nearest rounding, or with stochastic rounding the root of its expected square."""
    xp = array_namespace(x)
    top = spec.levels - 1
    step = ((hi - lo) / np.float32(top)).astype(np.float32)
    live = step > 0
    inv = xp.where(live, np.float32(1.0) / xp.where(live, step, np.float32(1.0)), 0).astype(
        np.float32
    )
    xp.subtract(x, lo, out=buf)
    xp.multiply(buf, inv, out=buf)  # t; 0 where the range is empty (value lo)
    if spec.rounding == "nearest":
        buf += np.float32(0.5)
        xp.floor(buf, out=val)
        xp.clip(val, 0, top, out=val)
        xp.multiply(val, step, out=val)
        xp.add(val, lo, out=val)
        xp.subtract(x, val, out=val)
        return val
    # Stochastic: inside the range E[err²] = step²·f(1 − f); outside, the error to the end;
    # an empty range (step 0) stores lo.
    xp.clip(buf, 0, top, out=val)  # clipped t
    outside = xp.where(live, (buf - val) * step, x - lo)
    xp.subtract(val, xp.floor(val), out=val)  # f
    val *= np.float32(1.0) - val
    val *= step * step
    val += outside * outside
    return xp.sqrt(val, out=val)


def pick_clipped(lo, hi, errors, *, spec: QuantizerSpec):
    """The candidate range with the smallest error per group; ``errors`` from
    :func:`clip_errors`, summed over every block of the groups.

    A shrunken range replaces min–max only when it is better by more than the float32
    scoring's relative accuracy (:data:`CLIP_MARGIN`), so a group's error never exceeds its
    min–max error. Ties keep the widest range.
    """
    xp = array_namespace(errors)
    scored = xp.concatenate([errors[:1] * (1.0 - CLIP_MARGIN), errors[1:]], axis=0)
    best = xp.argmin(scored, axis=0)
    out_lo, out_hi = xp.zeros_like(lo), xp.zeros_like(hi)
    for i, (clo, chi) in enumerate(_candidates(lo, hi, spec)):
        mask = best == i
        out_lo = xp.where(mask, clo, out_lo)
        out_hi = xp.where(mask, chi, out_hi)
    return out_lo.astype(np.float32), out_hi.astype(np.float32)


def entry_histogram(x, hi, *, spec: QuantizerSpec):
    """:func:`~lplr_dask.kernels.codebooks.block_histogram` of a block's entries normalized by
    their group's scale ``hi``, weighted by the scale squared (so that the fitted codebook
    minimizes the squared error in the factor's units), in row slabs; what a ``lloyd``
    codebook is fitted to (sum the blocks' histograms in a fixed order)."""
    xp = array_namespace(x)
    total = xp.zeros(HIST_BINS, dtype=np.float64)
    for r0, r1 in row_slabs(*x.shape):
        h = hi[r0:r1] if spec.granularity in ("row", "group") else hi
        w = expand_range(h, (r1 - r0, x.shape[1]), spec=spec).astype(np.float64) ** 2
        total = total + block_histogram(normalized(x[r0:r1], h, spec=spec), w)
    return total


def normalized(x, hi, *, spec: QuantizerSpec):
    """``x / scale`` (float64) of a block, the values a codebook quantizes (0 where the
    group's scale is 0)."""
    xp = array_namespace(x)
    h = expand_range(hi, x.shape, spec=spec).astype(np.float64)
    return xp.where(h > 0, x.astype(np.float64) / xp.where(h > 0, h, 1.0), 0.0)


def merge_ranges(a, b):
    """Combine two partial ranges ``(lo, hi)`` of the same groups."""
    xp = array_namespace(a[0])
    return xp.minimum(a[0], b[0]), xp.maximum(a[1], b[1])
