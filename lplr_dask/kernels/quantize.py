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
:mod:`lplr_dask.core.engine` combine per-block ranges with :func:`merge_ranges` when a group spans
several blocks. Ranges are kept in float32, the precision they are stored in, so that the
engine and every reader dequantize to bit-identical values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.codebooks import (
    HIST_BINS,
    block_histogram,
    dequantize_codebook,
    normal_levels,
    quantize_codebook,
)
from lplr_dask.kernels.xp import array_namespace

__all__ = [
    "CLIP_FACTORS",
    "CODEBOOK_KINDS",
    "FLOAT_FORMATS",
    "GRANULARITIES",
    "KINDS",
    "SCALE_DTYPES",
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
    "range_stats",
    "stats_ranges",
]

GRANULARITIES = ("tensor", "column", "row", "group")
FLOAT_FORMATS = ("float16", "bfloat16")
ROUNDINGS = ("nearest", "stochastic")
#: Quantizer kinds; ``"minmax"`` is the reference grid (and the default).
KINDS = ("minmax", "clipped", "normal", "lloyd", "sign")
#: Kinds that map codes to levels of a codebook times one scale per group.
CODEBOOK_KINDS = ("normal", "lloyd", "sign")
#: Precisions of the stored ranges and scales.
SCALE_DTYPES = ("float32", "float16")
#: Shrink factors that the ``"clipped"`` kind tries per group, 1 (min–max) down to 0 (zeros).
CLIP_FACTORS = tuple(round(1.0 - 0.05 * i, 2) for i in range(21))
_FLOAT16_MAX = 65504.0
CLIP_MARGIN = 1e-4
"""Relative margin by which a clipped range must beat min–max (float32 scoring accuracy)."""


@dataclass(frozen=True)
class QuantizerSpec:
    """How one matrix is quantized.

    Parameters
    ----------
    bits : int, default 8
        Bits per entry, 1–8 for integer codes, or 16 for a float passthrough
        (``float_format``) that stores no scales.
    granularity : {"tensor", "column", "row", "group"}, default "tensor"
        Which entries share one range: the whole matrix, a column, a row, or ``group_size``
        consecutive entries of a row.
    group_size : int, optional
        Entries per group along a row; required for (and only allowed with) ``"group"``.
        Must be a multiple of 8 so that groups start on whole bytes for every bit width.
    symmetric : bool, default True
        Range ``[-max|x|, max|x|]`` (one float32 per group) instead of ``[min x, max x]`` (two).
    rounding : {"nearest", "stochastic"}, default "nearest"
        Round to the nearest level, or unbiased stochastic rounding (needs a random stream).
    float_format : {"float16", "bfloat16"}, default "float16"
        The 16-bit format used when ``bits == 16``.
    kind : {"minmax", "clipped", "normal", "lloyd", "sign"}, default "minmax"
        The level set (see the module notes): the min–max grid, the grid on the MSE-optimal
        clipped range, normal-float levels, a fitted Lloyd–Max codebook, or sign × mean|x|
        (``bits=1`` only). Codebook kinds have one scale per group (``symmetric=True``).
    scale_dtype : {"float32", "float16"}, default "float32"
        Precision of the stored ranges and scales (32 or 16 bits each).
    """

    bits: int = 8
    granularity: str = "tensor"
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "nearest"
    float_format: str = "float16"
    kind: str = "minmax"
    scale_dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ParameterError(f"bits must be an integer, got {self.bits!r}.")
        if not (1 <= self.bits <= 8 or self.bits == 16):
            raise ParameterError(
                f"bits={self.bits} is out of range: use 1 to 8 for integer codes, or 16 for a "
                "float16/bfloat16 passthrough."
            )
        if self.granularity not in GRANULARITIES:
            raise ParameterError(
                f"granularity={self.granularity!r} is unknown; use one of {GRANULARITIES}."
            )
        if self.granularity == "group":
            gs = self.group_size
            if not isinstance(gs, (int, np.integer)) or isinstance(gs, bool) or gs < 8 or gs % 8:
                raise ParameterError(
                    f"group_size={self.group_size!r} is invalid for group-wise scales: use a "
                    "positive multiple of 8, such as 64 or 128."
                )
        elif self.group_size is not None:
            raise ParameterError(
                f"group_size={self.group_size} is only meaningful with granularity='group', "
                f"not {self.granularity!r}; drop it or set granularity='group'."
            )
        if self.rounding not in ROUNDINGS:
            raise ParameterError(f"rounding={self.rounding!r} is unknown; use one of {ROUNDINGS}.")
        if self.float_format not in FLOAT_FORMATS:
            raise ParameterError(
                f"float_format={self.float_format!r} is unknown; use one of {FLOAT_FORMATS}."
            )
        if self.kind not in KINDS:
            raise ParameterError(
                f"kind={self.kind!r} is not a quantizer kind; use one of {', '.join(KINDS)}."
            )
        if self.scale_dtype not in SCALE_DTYPES:
            raise ParameterError(
                f"scale_dtype={self.scale_dtype!r} is unknown; use one of {SCALE_DTYPES}."
            )
        if self.is_float and (self.kind != "minmax" or self.scale_dtype != "float32"):
            raise ParameterError(
                f"bits=16 stores float values and no codes, so kind={self.kind!r} and "
                f"scale_dtype={self.scale_dtype!r} mean nothing; drop them or use 1-8 bits."
            )
        if self.kind in CODEBOOK_KINDS and not self.symmetric:
            raise ParameterError(
                f"kind={self.kind!r} scales a fixed codebook by one number per group and has no "
                "zero point; use symmetric=True, or kind='clipped' for asymmetric ranges."
            )
        if self.kind == "sign" and self.bits != 1:
            raise ParameterError(
                f"kind='sign' is a 1-bit code (sign × mean|x|), not a {self.bits}-bit one; use "
                "bits=1, or kind='normal' or 'clipped' for more bits."
            )

    @classmethod
    def paper(cls, bits: int) -> QuantizerSpec:
        """The reference quantizer of the LPLR paper's code: per-matrix min–max, nearest."""
        return cls(bits=bits, granularity="tensor", symmetric=False, rounding="nearest")

    @property
    def is_float(self) -> bool:
        """True for the 16-bit passthrough, which stores values rather than codes."""
        return self.bits == 16

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def stores_codebook(self) -> bool:
        """True when the factor stores its own codebook (2^bits float32 levels: ``lloyd``)."""
        return self.kind == "lloyd" and not self.is_float

    @property
    def scale_bytes(self) -> int:
        """Bytes per stored range end or scale."""
        return np.dtype(self.scale_dtype).itemsize

    def range_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """Shape of the per-group range arrays (``lo``, ``hi``) of a matrix of ``shape``."""
        rows, cols = shape
        return {
            "tensor": (1, 1),
            "column": (1, cols),
            "row": (rows, 1),
            "group": (rows, -(-cols // (self.group_size or 1))),
        }[self.granularity]

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes stored for a matrix of ``shape``: packed codes, ranges at ``scale_dtype``
        and a ``lloyd`` codebook (2^bits float32).

        Codes are packed along rows, each row padded to whole bytes (exact when
        ``cols * bits`` is a multiple of 8).
        """
        rows, cols = shape
        if self.is_float:
            return rows * cols * 2
        r_rows, r_cols = self.range_shape(shape)
        n_ranges = r_rows * r_cols * (1 if self.symmetric else 2)
        book = 4 * self.levels if self.stores_codebook else 0
        return rows * (-(-cols * self.bits // 8)) + self.scale_bytes * n_ranges + book

    def to_dict(self) -> dict:
        """The fields as a dict; ``kind`` and ``scale_dtype`` only when not their defaults,
        so a min–max spec reads (and hashes) exactly as earlier versions wrote it."""
        d = asdict(self)
        for name in ("kind", "scale_dtype"):
            if d[name] == type(self).__dataclass_fields__[name].default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantizerSpec:
        """Inverse of :meth:`to_dict`; dicts without ``kind``/``scale_dtype`` (every output of
        earlier versions) give the min–max spec with float32 ranges."""
        return cls(**d)

    def describe(self) -> str:
        """A short human label, e.g. ``"4-bit group(128) sym"`` or
        ``"4-bit group(128) normal fp16"``."""
        if self.is_float:
            return self.float_format
        gran = f"group({self.group_size})" if self.granularity == "group" else self.granularity
        if self.kind in CODEBOOK_KINDS:
            label = f"{self.bits}-bit {gran} {self.kind}"
        else:
            label = f"{self.bits}-bit {gran} {'sym' if self.symmetric else 'asym'}"
            if self.kind != "minmax":
                label += f" {self.kind}"
        return label + (" fp16" if self.scale_dtype == "float16" else "")


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


def _round_scale(v, spec: QuantizerSpec, direction: int):
    """float32 ``v`` rounded to a value of ``spec.scale_dtype`` (float32 back): up
    (``direction`` 1), down (-1) or to nearest (0)."""
    if spec.scale_dtype == "float32":
        return v.astype(np.float32)
    xp = array_namespace(v)
    v = v.astype(np.float32)
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
    return _rounded_range(*stats, spec)


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
    out = [[] for _ in cands]
    for r0, r1 in _row_slabs(*x.shape):
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
    their group's scale ``hi`` (int64 counts, :data:`~lplr_dask.kernels.codebooks.HIST_BINS`),
    in row slabs; what a ``lloyd`` codebook is fitted to (sum the blocks' counts)."""
    xp = array_namespace(x)
    total = None
    for r0, r1 in _row_slabs(*x.shape):
        h = hi[r0:r1] if spec.granularity in ("row", "group") else hi
        part = block_histogram(normalized(x[r0:r1], h, spec=spec))
        total = part if total is None else total + part
    return total if total is not None else xp.zeros(HIST_BINS, dtype=np.int64)


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


def expand_range(r, shape: tuple[int, int], *, spec: QuantizerSpec):
    """Broadcastable view of a per-group range array over a block of ``shape``."""
    if spec.granularity != "group":
        return r
    xp = array_namespace(r)
    return xp.repeat(r, spec.group_size, axis=1)[:, : shape[1]]


def _steps(lo, hi, levels: int):
    return (hi.astype(np.float64) - lo.astype(np.float64)) / (levels - 1)


SLAB_ENTRIES = 1 << 20
"""Blocks are (de)quantized in row slabs of about this many entries: the float64 arithmetic
needs ~12 bytes of temporaries per entry, 785 MiB for a whole 4096² tile, ~100 MiB per slab.
Elementwise, so slabs change no value (and dither is drawn in the same order)."""


def _row_slabs(rows: int, cols: int):
    step = max(1, SLAB_ENTRIES // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def _by_row_slabs(fn, x, lo, hi, *, spec: QuantizerSpec, **kw):
    """``fn(x, lo, hi, spec=spec, **kw)`` slab by slab of rows, concatenated."""
    slabs = _row_slabs(*x.shape)
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
    t = normalized(x, hi, spec=spec)
    return quantize_codebook(t, levels, rng=rng if spec.rounding == "stochastic" else None)


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
