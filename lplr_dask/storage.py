"""The compressed format: a Zarr v3 group of packed codes and float32 ranges.

Layout of a compressed group (format ``lplr-dask``, version 1)::

    OUTPUT/                     group; attrs["lplr_dask"] holds the metadata below
        L/codes   uint8 (n, ceil(m·B/8))       packed codes of the left factor (n × m)
        L/hi      float32 (1, m)               per-column high ends (symmetric: lo = -hi)
        L/lo      float32 (1, m)               only for asymmetric quantizers
        R/codes   uint8 (m, ceil(d·B'/8))      packed codes of the right factor (m × d)
        R/hi, R/lo                             ranges, shape QuantizerSpec.range_shape((m, d))
        Q/...                                  the directly quantized matrix (``nq``, ``nq+lplr``)

A factor quantized to 16 bits stores ``codes`` as uint16 float16/bfloat16 bit patterns and no
ranges. Codes are packed as :mod:`lplr_dask.packing` describes (``bit_order``). Each factor
group carries ``attrs["quantizer"]`` (a :class:`~lplr_dask.quantize.QuantizerSpec`) and
``attrs["shape"]``. Arrays are stored without a general-purpose compressor, so the bytes on
disk are the reported ``stored_bytes`` (plus Zarr's padding of edge chunks to the full chunk
shape, and the metadata JSON).

Writers put everything under a temporary sibling directory and :func:`lplr_dask.fs.publish`
renames it into place only when complete, so an existing OUTPUT is never half-overwritten.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .errors import StorageFormatError
from .packing import BIT_ORDER, decode_float, pack_codes, packed_width, unpack_codes
from .quantize import QuantizerSpec, dequantize

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ArrayLayout",
    "FactorWriter",
    "bytes_on_disk",
    "create_factor",
    "factor_layout",
    "layout_nbytes",
    "read_factor_block",
    "read_metadata",
    "write_metadata",
]

FORMAT_NAME = "lplr-dask"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FactorWriter:
    """Picklable handle that writes one factor's codes and ranges block by block.

    Tasks write whole chunks only: ``row_block``/``col_block`` are the chunk shape of the
    (unpacked) factor, and the graph builders call :meth:`write` once per chunk.
    """

    path: str
    shape: tuple[int, int]
    spec: QuantizerSpec
    chunks: tuple[int, int]

    def _array(self, name):
        return zarr.open_array(os.path.join(self.path, name), mode="r+")

    def write(self, row0: int, col0: int, codes, lo=None, hi=None) -> None:
        """Write the codes (unpacked, uint8, or float values for 16 bits) of the block at
        ``(row0, col0)``, and its ranges when they are local to the block."""
        from ._array import to_numpy

        rows, cols = codes.shape
        if self.spec.is_float:
            self._array("codes")[row0 : row0 + rows, col0 : col0 + cols] = to_numpy(codes)
        else:
            b = self.spec.bits
            packed = to_numpy(pack_codes(codes, b))
            c0 = col0 * b // 8
            self._array("codes")[row0 : row0 + rows, c0 : c0 + packed.shape[1]] = packed
        if hi is not None:
            self.write_ranges(lo, hi, row0=row0, col0=col0)

    def write_ranges(self, lo, hi, *, row0: int = 0, col0: int = 0) -> None:
        """Write (part of) the range arrays; ``row0, col0`` are coordinates in the factor."""
        from ._array import to_numpy

        spec = self.spec
        r0 = row0 if spec.granularity in ("row", "group") else 0
        c0 = {"column": col0, "group": col0 // (spec.group_size or 1)}.get(spec.granularity, 0)
        hi = to_numpy(hi)
        self._array("hi")[r0 : r0 + hi.shape[0], c0 : c0 + hi.shape[1]] = hi
        if not spec.symmetric:
            lo = to_numpy(lo)
            self._array("lo")[r0 : r0 + lo.shape[0], c0 : c0 + lo.shape[1]] = lo


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, chunk shape and dtype of one stored array of a factor."""

    shape: tuple[int, int]
    chunks: tuple[int, int]
    dtype: str

    @property
    def n_chunks(self) -> int:
        return math.prod(-(-s // c) for s, c in zip(self.shape, self.chunks, strict=True))

    @property
    def nbytes(self) -> int:
        """Bytes of its chunk payloads as stored: Zarr pads edge chunks to the full chunk
        shape, so this counts ``n_chunks`` whole chunks."""
        return self.n_chunks * math.prod(self.chunks) * np.dtype(self.dtype).itemsize


def factor_layout(shape, spec: QuantizerSpec, chunks) -> dict[str, ArrayLayout]:
    """The arrays that store one factor of ``shape`` (``codes``, ``hi`` and maybe ``lo``).

    ``chunks`` is the chunk shape of the unpacked factor (its compute blocks: each task writes
    whole chunks). This is the one definition of the stored layout: :func:`create_factor`
    creates these arrays and the bit accounting sums their :attr:`ArrayLayout.nbytes`.
    """
    rows, cols = (int(v) for v in shape)
    crow, ccol = min(int(chunks[0]), rows), min(int(chunks[1]), cols)
    if spec.is_float:
        return {"codes": ArrayLayout((rows, cols), (crow, ccol), "uint16")}
    b = spec.bits
    out = {
        "codes": ArrayLayout((rows, packed_width(cols, b)), (crow, packed_width(ccol, b)), "uint8")
    }
    rchunks = {
        "tensor": (1, 1),
        "column": (1, ccol),
        "row": (crow, 1),
        "group": (crow, -(-ccol // (spec.group_size or 1))),
    }[spec.granularity]
    for part in ("hi",) if spec.symmetric else ("hi", "lo"):
        out[part] = ArrayLayout(spec.range_shape((rows, cols)), rchunks, "float32")
    return out


def layout_nbytes(shape, spec: QuantizerSpec, chunks) -> int:
    """Stored bytes of a factor (codes and ranges, edge chunks padded); see
    :func:`factor_layout`."""
    return sum(a.nbytes for a in factor_layout(shape, spec, chunks).values())


def create_factor(root: Path, name: str, shape, spec: QuantizerSpec, chunks) -> FactorWriter:
    """Create the arrays of one factor (``L``, ``R`` or ``Q``) under the group at ``root``."""
    group = zarr.open_group(str(root), mode="a").require_group(name)
    group.attrs.update({"quantizer": spec.to_dict(), "shape": list(shape)})
    layout = factor_layout(shape, spec, chunks)
    for part, lay in layout.items():
        group.create_array(
            part,
            shape=lay.shape,
            chunks=lay.chunks,
            dtype=lay.dtype,
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
    rows, cols = shape
    return FactorWriter(
        str(root / name), (rows, cols), spec, (min(chunks[0], rows), min(chunks[1], cols))
    )


def write_metadata(root: Path, meta: dict) -> None:
    group = zarr.open_group(str(root), mode="a")
    group.attrs["lplr_dask"] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "bit_order": BIT_ORDER,
        **meta,
    }


def read_metadata(path) -> dict:
    """The ``lplr_dask`` metadata of a compressed group, validating format and version."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise StorageFormatError(
            f"{path} is not a compressed lplr-dask result (no zarr.json there). Give the OUTPUT "
            "path of `lplr compress`."
        )
    try:
        attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise StorageFormatError(f"{path}/zarr.json cannot be read: {exc}") from exc
    meta = attrs.get("lplr_dask")
    if not meta or meta.get("format") != FORMAT_NAME:
        raise StorageFormatError(
            f"{path} is a Zarr store but not an lplr-dask result (no 'lplr_dask' attributes)."
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise StorageFormatError(
            f"{path} has format version {meta.get('format_version')}; this lplr-dask reads "
            f"version {FORMAT_VERSION}. Upgrade lplr-dask or recompress."
        )
    return meta


def read_factor_block(
    path: str, spec: QuantizerSpec, shape, rows: slice, cols: slice, dtype=np.float32
):
    """Dequantized values of ``factor[rows, cols]`` read from the factor group at ``path``.

    ``cols.start`` must be a multiple of 8 (whole packed bytes) and, for group-wise ranges, of
    ``group_size``; the readers in :mod:`lplr_dask.reader` only ask for such blocks.
    """
    codes_arr = zarr.open_array(os.path.join(path, "codes"), mode="r")
    c0, c1 = cols.start or 0, min(cols.stop, shape[1])
    r0, r1 = rows.start or 0, min(rows.stop, shape[0])
    if spec.is_float:
        return decode_float(codes_arr[r0:r1, c0:c1], spec.float_format, dtype)
    b = spec.bits
    if (c0 * b) % 8:
        raise ValueError(f"column offset {c0} is not byte-aligned for {b}-bit codes")
    packed = codes_arr[r0:r1, c0 * b // 8 : packed_width(c1, b)]
    codes = unpack_codes(packed, b, c1 - c0)
    hi = zarr.open_array(os.path.join(path, "hi"), mode="r")
    lo = zarr.open_array(os.path.join(path, "lo"), mode="r") if not spec.symmetric else None
    gran = spec.granularity
    rsl = slice(r0, r1) if gran in ("row", "group") else slice(None)
    if gran == "column":
        csl = slice(c0, c1)
    elif gran == "group":
        g = spec.group_size
        csl = slice(c0 // g, -(-c1 // g))
    else:
        csl = slice(None)
    hi_b = hi[rsl, csl]
    lo_b = lo[rsl, csl] if lo is not None else -hi_b
    return dequantize(codes, lo_b, hi_b, spec=spec, dtype=dtype)


def bytes_on_disk(path) -> dict:
    """Sizes of the files of a compressed group: chunk files of the code and range arrays
    (``arrays``) and Zarr metadata (``metadata``), in bytes; compare ``arrays`` with the
    reported ``stored_bytes``."""
    arrays = metadata = 0
    for f in Path(path).rglob("*"):
        if f.is_file():
            if f.name == "zarr.json":
                metadata += f.stat().st_size
            else:
                arrays += f.stat().st_size
    return {"arrays": arrays, "metadata": metadata}
