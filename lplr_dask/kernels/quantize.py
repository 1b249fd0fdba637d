"""Uniform scalar quantizers: pure per-block kernels for NumPy and CuPy.

A quantizer with ``bits`` = B maps every value of a group to one of 2^B evenly spaced levels
from the group's low end ``lo`` to its high end ``hi``, both endpoints included:

    level(k) = lo + k * (hi - lo) / (2^B - 1),   k = 0 .. 2^B - 1.

Symmetric quantizers use ``lo = -hi = -max|x|`` (one stored number per group); asymmetric ones
use ``lo = min x`` and ``hi = max x`` (two). Groups are the whole matrix (``"tensor"``), each
column (``"column"``), each row (``"row"``) or runs of ``group_size`` consecutive entries of a
row (``"group"``, the layout of group-wise weight quantizers). Rounding is to the nearest level
(exact ties go up, as in the reference code of the LPLR paper) or unbiased stochastic rounding
(``floor(t + u)`` with ``u ~ U[0, 1)``, so that E[level] = x inside the range).

The reference quantizer of the paper's code (one min–max range per matrix, 2^B levels including
both endpoints, nearest rounding) is :meth:`QuantizerSpec.paper`.

The family (``QuantizerSpec.kind``; :data:`KINDS`):

- ``"minmax"``: the grid above with the group's min–max (or ±max|x|) range; the default, and
  byte for byte what every earlier version stored.
- ``"clipped"``: the same grid on the MSE-optimal shrunken range: of the 21 candidates
  ``s · (lo, hi)``, s = 1, 0.95, …, 0 (:data:`CLIP_FACTORS`), each group keeps the one with the
  smallest squared error (expected squared error under stochastic rounding). s = 1 is min–max
  and s = 0 is all zeros, so a group's error is never above either. Groups that span blocks
  are searched exactly: min–max reduced first, then per-candidate error sums per block
  (:func:`clip_errors`, summed over blocks), then :func:`pick_clipped`.
- ``"normal"``, ``"lloyd"``, ``"sign"``: codebooks (:mod:`lplr_dask.kernels.codebooks`):
  normal-float levels (NF4 at 4 bits), a Lloyd–Max codebook fitted to the factor (stored with
  it), and sign times the group's mean |x| (1 bit).

``scale_dtype="float16"`` stores every range or scale as float16 (16 bits) instead of float32:
ranges are rounded outward (lo down, hi up) so the grid still covers the group; a range beyond
float16's ±65504 raises :class:`~lplr_dask.errors.ParameterError`.

Every function here works on one block and never imports Dask; the graph builders in
:mod:`lplr_dask.core.engine` combine per-block statistics (:mod:`lplr_dask.kernels.ranges`)
when a group spans several blocks. The spec lives in :mod:`lplr_dask.kernels.spec`, ranges and
scales in :mod:`lplr_dask.kernels.ranges`, codebooks in :mod:`lplr_dask.kernels.codebooks`; this
module re-exports what callers use. Ranges are kept in float32 holding values of the stored
precision, so that the engine and every reader dequantize to bit-identical values.
"""

from __future__ import annotations

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.codebooks import dequantize_codebook, normal_levels, quantize_codebook
from lplr_dask.kernels.ranges import (
    CLIP_FACTORS,
    block_range,
    clip_errors,
    entry_histogram,
    merge_ranges,
    merge_stats,
    normalized,
    pick_clipped,
    range_stats,
    scales_for_storage,
    scales_from_storage,
    stats_ranges,
)
from lplr_dask.kernels.spec import (
    CODEBOOK_KINDS,
    FLOAT_FORMATS,
    GRANULARITIES,
    KINDS,
    QUANTIZERS,
    ROUNDINGS,
    SCALE_DTYPES,
    SLAB_ENTRIES,
    QuantizerSpec,
    expand_range,
    quantizer_spec,
    row_slabs,
)
from lplr_dask.kernels.xp import array_namespace

__all__ = [
    "CLIP_FACTORS",
    "CODEBOOK_KINDS",
    "FLOAT_FORMATS",
    "GRANULARITIES",
    "KINDS",
    "QUANTIZERS",
    "ROUNDINGS",
    "SCALE_DTYPES",
    "SLAB_ENTRIES",
    "QuantizerSpec",
    "block_range",
    "clip_errors",
    "codebook_levels",
    "dequantize",
    "entry_histogram",
    "expand_range",
    "merge_ranges",
    "merge_stats",
    "normalized",
    "pick_clipped",
    "quantize",
    "quantizer_spec",
    "range_stats",
    "scales_for_storage",
    "scales_from_storage",
    "stats_ranges",
]


def codebook_levels(spec: QuantizerSpec, codebook=None) -> np.ndarray:
    """The sorted levels in [-1, 1] of a codebook kind: normal-float, ±1 (``sign``), or the
    fitted ``codebook`` (``lloyd``, required)."""
    if spec.kind == "normal":
        return normal_levels(spec.bits)
    if spec.kind == "sign":
        return np.array([-1.0, 1.0], dtype=np.float32)
    if codebook is None:
        raise ParameterError(
            "kind='lloyd' needs the factor's fitted codebook (codebook=...): fit it with "
            "codebooks.fit_lloyd over the histogram of the normalized entries."
        )
    return np.asarray(codebook, dtype=np.float32).ravel()


def _steps(lo, hi, levels: int):
    return (hi.astype(np.float64) - lo.astype(np.float64)) / (levels - 1)


def _by_row_slabs(fn, x, lo, hi, *, spec: QuantizerSpec, **kw):
    """``fn(x, lo, hi, spec=spec, **kw)`` slab by slab of rows, concatenated."""
    slabs = row_slabs(*x.shape)
    if len(slabs) == 1:
        return fn(x, lo, hi, spec=spec, **kw)

    def rows(r, r0, r1):  # per-row ranges follow the slab; per-column/tensor ones are shared
        return r[r0:r1] if spec.granularity in ("row", "group") else r

    parts = [fn(x[r0:r1], rows(lo, r0, r1), rows(hi, r0, r1), spec=spec, **kw) for r0, r1 in slabs]
    return array_namespace(x).concatenate(parts, axis=0)


def quantize(
    x, lo, hi, *, spec: QuantizerSpec, rng: np.random.Generator | None = None, codebook=None
):
    """Integer codes (uint8, one per entry, in ``[0, 2^bits)``) of one block.

    Parameters
    ----------
    x : array of shape (rows, cols)
        The block, float16/32/64, NumPy or CuPy.
    lo, hi : arrays of ``spec.range_shape`` for this block
        Group ranges, from :func:`block_range` (merged over blocks where groups span several).
    spec : QuantizerSpec
        Must have ``bits <= 8``.
    rng : numpy.random.Generator, optional
        Source of the uniform dither for ``rounding="stochastic"``; drawn on the host and moved
        to the block's device, so CPU and GPU runs with the same stream give the same codes.
    codebook : array of 2^bits floats, optional
        The fitted levels of a ``lloyd`` quantizer (required for it, ignored otherwise).

    Returns
    -------
    codes : uint8 array of shape (rows, cols)
    """
    if spec.is_float:
        raise ParameterError(
            "quantize() makes integer codes; 16-bit values use packing.encode_float."
        )
    if spec.rounding == "stochastic" and rng is None:
        raise ParameterError("rounding='stochastic' needs a random stream (rng=...).")
    if spec.kind in CODEBOOK_KINDS:
        levels = codebook_levels(spec, codebook)
        return _by_row_slabs(_quantize_book_slab, x, lo, hi, spec=spec, rng=rng, levels=levels)
    return _by_row_slabs(_quantize_slab, x, lo, hi, spec=spec, rng=rng)


def _quantize_book_slab(x, lo, hi, *, spec: QuantizerSpec, rng, levels):
    if spec.rounding == "stochastic":
        return quantize_codebook(normalized(x, hi, spec=spec), levels, rng=rng)
    # Nearest: x / scale in float32 (the codes need no more), 0 where the scale is 0.
    xp = array_namespace(x)
    h = expand_range(hi, x.shape, spec=spec).astype(np.float32)
    live = h > 0
    t = x.astype(np.float32) / xp.where(live, h, np.float32(1.0))
    return quantize_codebook(xp.where(live, t, np.float32(0.0)), levels)


def _dequantize_book_slab(codes, lo, hi, *, spec: QuantizerSpec, dtype, levels):
    scale = expand_range(hi, codes.shape, spec=spec)
    return dequantize_codebook(codes, scale, levels, dtype=dtype)


def _quantize_slab(x, lo, hi, *, spec: QuantizerSpec, rng):
    xp = array_namespace(x)
    shape = x.shape
    lo = expand_range(lo, shape, spec=spec)
    hi = expand_range(hi, shape, spec=spec)
    step = _steps(lo, hi, spec.levels)
    # A constant group (step == 0) is represented exactly by code 0 (= lo).
    safe = xp.where(step > 0, step, 1.0)
    t = (x.astype(np.float64) - lo) / safe
    if spec.rounding == "stochastic":
        t = t + xp.asarray(rng.random(shape))
    else:
        t = t + 0.5
    codes = xp.clip(xp.floor(t), 0, spec.levels - 1)
    codes = xp.where(step > 0, codes, 0)
    return codes.astype(np.uint8)


def dequantize(codes, lo, hi, *, spec: QuantizerSpec, dtype=np.float32, codebook=None):
    """Values of the levels that ``codes`` name, as ``dtype`` (float32 by default);
    ``codebook``: the fitted levels of a ``lloyd`` quantizer."""
    if spec.kind in CODEBOOK_KINDS:
        levels = codebook_levels(spec, codebook)
        return _by_row_slabs(
            _dequantize_book_slab, codes, lo, hi, spec=spec, dtype=dtype, levels=levels
        )
    return _by_row_slabs(_dequantize_slab, codes, lo, hi, spec=spec, dtype=dtype)


def _dequantize_slab(codes, lo, hi, *, spec: QuantizerSpec, dtype):
    lo = expand_range(lo, codes.shape, spec=spec)
    hi = expand_range(hi, codes.shape, spec=spec)
    # lo·(1 − t) + hi·t with t = k / (2^B − 1) hits both endpoints exactly (lo + k·step can
    # miss hi by a rounding unit of |lo|).
    t = codes.astype(np.float64) / (spec.levels - 1)
    return (lo.astype(np.float64) * (1.0 - t) + hi.astype(np.float64) * t).astype(dtype)
