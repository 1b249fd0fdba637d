"""What a quantizer is: :class:`QuantizerSpec` (kind, bits, groups, rounding, scale precision),
the named quantizers users pick (:func:`quantizer_spec`), and the layout helpers that every
kernel shares (:func:`expand_range`, :func:`row_slabs`). See :mod:`lplr_dask.kernels.quantize`
for the family; this module has no arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.xp import array_namespace

__all__ = [
    "CODEBOOK_KINDS",
    "FLOAT_FORMATS",
    "GRANULARITIES",
    "KINDS",
    "QUANTIZERS",
    "ROUNDINGS",
    "SCALE_DTYPES",
    "SLAB_ENTRIES",
    "QuantizerSpec",
    "expand_range",
    "quantizer_spec",
    "row_slabs",
]

GRANULARITIES = ("tensor", "column", "row", "group")
FLOAT_FORMATS = ("float16", "bfloat16")
ROUNDINGS = ("nearest", "stochastic")
#: Quantizer kinds; ``"minmax"`` is the reference grid (and the default).
KINDS = ("minmax", "clipped", "normal", "lloyd", "sign")
#: Kinds that map codes to levels of a codebook times one scale per group.
CODEBOOK_KINDS = ("normal", "lloyd", "sign")
#: Precisions of the stored ranges and scales.
SCALE_DTYPES = ("float32", "float16", "bfloat16")
#: The named quantizers that users pick (``--quantizer``), see :func:`quantizer_spec`.
QUANTIZERS = ("minmax", "uniform", "clipped", "normal", "lloyd", "sign")


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
    scale_dtype : {"float32", "float16", "bfloat16"}, default "float32"
        Precision of the stored ranges and scales (32 or 16 bits each). bfloat16 has
        float32's exponent range (no overflow) and 8 significant bits; float16 has 11 and
        refuses ranges beyond ±65504.
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
        return 4 if self.scale_dtype == "float32" else 2

    @property
    def stored_scale_dtype(self) -> str:
        """Zarr dtype of the range arrays (bfloat16 as uint16 bit patterns)."""
        return "uint16" if self.scale_dtype == "bfloat16" else self.scale_dtype

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
        return label + {"float32": "", "float16": " fp16", "bfloat16": " bf16"}[self.scale_dtype]


def quantizer_spec(
    name: str,
    *,
    bits: int,
    granularity: str,
    group_size: int | None = None,
    rounding: str = "nearest",
) -> QuantizerSpec:
    """The :class:`QuantizerSpec` of a named quantizer (:data:`QUANTIZERS`).

    ``"minmax"``: symmetric ±max|x| grid with float32 scales (the reference quantizer of
    every earlier version). ``"uniform"``: asymmetric min–max grid (a zero point) with
    bfloat16 low and high ends. ``"clipped"``: the same on the MSE-optimal shrunken range.
    ``"normal"``: normal-float levels (NF4 at 4 bits) times a bfloat16 absmax. ``"lloyd"``:
    the fitted Lloyd–Max codebook times a bfloat16 absmax. ``"sign"``: 1 bit, sign times a
    bfloat16 mean |x|. 16 bits is the float passthrough whatever the name.
    """
    if name not in QUANTIZERS:
        raise ParameterError(f"quantizer={name!r} is unknown; use one of {', '.join(QUANTIZERS)}.")
    if bits == 16:
        return QuantizerSpec(bits=16)
    common: dict[str, Any] = dict(
        bits=bits, granularity=granularity, group_size=group_size, rounding=rounding
    )
    if name == "minmax":
        return QuantizerSpec(**common)
    kind = {"uniform": "minmax"}.get(name, name)
    symmetric = name not in ("uniform", "clipped")
    return QuantizerSpec(**common, kind=kind, symmetric=symmetric, scale_dtype="bfloat16")


def expand_range(r, shape: tuple[int, int], *, spec: QuantizerSpec):
    """Broadcastable view of a per-group range array over a block of ``shape``."""
    if spec.granularity != "group":
        return r
    xp = array_namespace(r)
    return xp.repeat(r, spec.group_size, axis=1)[:, : shape[1]]


SLAB_ENTRIES = 1 << 20
"""Blocks are (de)quantized in row slabs of about this many entries: the float64 arithmetic
needs ~12 bytes of temporaries per entry, 785 MiB for a whole 4096² tile, ~100 MiB per slab.
Elementwise, so slabs change no value (and dither is drawn in the same order)."""


def row_slabs(rows: int, cols: int):
    step = max(1, SLAB_ENTRIES // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]
