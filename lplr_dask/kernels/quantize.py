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

Every function here works on one block and never imports Dask; the graph builders in
:mod:`lplr_dask.core.engine` combine per-block ranges with :func:`merge_ranges` when a group spans
several blocks. Ranges are kept in float32, the precision they are stored in, so that the
engine and every reader dequantize to bit-identical values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.xp import array_namespace

__all__ = [
    "FLOAT_FORMATS",
    "GRANULARITIES",
    "QuantizerSpec",
    "block_range",
    "dequantize",
    "expand_range",
    "merge_ranges",
    "quantize",
]

GRANULARITIES = ("tensor", "column", "row", "group")
FLOAT_FORMATS = ("float16", "bfloat16")
ROUNDINGS = ("nearest", "stochastic")


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
    """

    bits: int = 8
    granularity: str = "tensor"
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "nearest"
    float_format: str = "float16"

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
        """Bytes stored for a matrix of ``shape``: packed codes plus float32 ranges.

        Codes are packed along rows, each row padded to whole bytes (exact when
        ``cols * bits`` is a multiple of 8).
        """
        rows, cols = shape
        if self.is_float:
            return rows * cols * 2
        r_rows, r_cols = self.range_shape(shape)
        n_ranges = r_rows * r_cols * (1 if self.symmetric else 2)
        return rows * (-(-cols * self.bits // 8)) + 4 * n_ranges

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantizerSpec:
        return cls(**d)

    def describe(self) -> str:
        """A short human label, e.g. ``"4-bit group(128) sym"``."""
        if self.is_float:
            return self.float_format
        gran = f"group({self.group_size})" if self.granularity == "group" else self.granularity
        return f"{self.bits}-bit {gran} {'sym' if self.symmetric else 'asym'}"


def block_range(x, *, spec: QuantizerSpec):
    """Per-group ``(lo, hi)`` of one block, as float32 arrays of ``spec.range_shape``.

    For ``"group"`` the block must start at a multiple of ``group_size`` along its rows. A
    group that spans several blocks (a column of a row-chunked matrix, the whole tensor) gets
    partial ranges here; combine them with :func:`merge_ranges`.
    """
    xp = array_namespace(x)
    if spec.granularity == "tensor":
        lo, hi = xp.min(x, keepdims=True), xp.max(x, keepdims=True)
        lo, hi = lo.reshape(1, 1), hi.reshape(1, 1)
    elif spec.granularity == "column":
        lo, hi = xp.min(x, axis=0, keepdims=True), xp.max(x, axis=0, keepdims=True)
    elif spec.granularity == "row":
        lo, hi = xp.min(x, axis=1, keepdims=True), xp.max(x, axis=1, keepdims=True)
    else:
        g = spec.group_size
        rows, cols = x.shape
        n_groups = -(-cols // g)
        pad = n_groups * g - cols
        if pad:
            # Pad the last group with copies of the row's last entry: neutral for min and max.
            x = xp.concatenate([x, xp.repeat(x[:, -1:], pad, axis=1)], axis=1)
        grouped = x.reshape(rows, n_groups, g)
        lo, hi = xp.min(grouped, axis=2), xp.max(grouped, axis=2)
    lo, hi = lo.astype(np.float32), hi.astype(np.float32)
    if spec.symmetric:
        hi = xp.maximum(xp.abs(lo), xp.abs(hi))
        lo = -hi
    return lo, hi


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


def quantize(x, lo, hi, *, spec: QuantizerSpec, rng: np.random.Generator | None = None):
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
    return _by_row_slabs(_quantize_slab, x, lo, hi, spec=spec, rng=rng)


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


def dequantize(codes, lo, hi, *, spec: QuantizerSpec, dtype=np.float32):
    """Values of the levels that ``codes`` name, as ``dtype`` (float32 by default)."""
    return _by_row_slabs(_dequantize_slab, codes, lo, hi, spec=spec, dtype=dtype)


def _dequantize_slab(codes, lo, hi, *, spec: QuantizerSpec, dtype):
    lo = expand_range(lo, codes.shape, spec=spec)
    hi = expand_range(hi, codes.shape, spec=spec)
    # lo·(1 − t) + hi·t with t = k / (2^B − 1) hits both endpoints exactly (lo + k·step can
    # miss hi by a rounding unit of |lo|).
    t = codes.astype(np.float64) / (spec.levels - 1)
    return (lo.astype(np.float64) * (1.0 - t) + hi.astype(np.float64) * t).astype(dtype)
