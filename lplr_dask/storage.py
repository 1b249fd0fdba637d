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

Writers put everything under a temporary sibling directory and :func:`publish` renames it into
place only when complete, so an existing OUTPUT is never half-overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .errors import OutputExistsError, StorageFormatError
from .packing import BIT_ORDER, decode_float, pack_codes, packed_width, unpack_codes
from .quantize import QuantizerSpec, dequantize

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FactorWriter",
    "check_output_path",
    "create_factor",
    "publish",
    "read_metadata",
    "scratch_dir",
    "temporary_output",
    "write_json_atomic",
]

FORMAT_NAME = "lplr-dask"
FORMAT_VERSION = 1


def check_output_path(output: str | os.PathLike, *, overwrite: bool, inputs=()) -> Path:
    """Refuse an OUTPUT that exists (without ``overwrite``) or that overlaps an input."""
    out = Path(output).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputExistsError(
                f"OUTPUT {output} overlaps INPUT {src}: writing there could destroy the input. "
                "Choose an OUTPUT outside the input's directory."
            )
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"OUTPUT {output} already exists. Pass --overwrite (overwrite=True) to replace it "
            "once the new result is complete, or choose another path."
        )
    if not out.parent.is_dir():
        raise OutputExistsError(
            f"The directory {out.parent} for OUTPUT does not exist; create it first."
        )
    return out


@contextlib.contextmanager
def temporary_output(output: Path):
    """A fresh temporary directory beside ``output``; removed if the block fails."""
    tmp = output.parent / f".{output.name}.lplr-tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(output: Path, work_dir=None):
    """``work_dir`` as given (kept), or a fresh ``.NAME.lplr-work-*`` directory beside
    ``output`` that is removed when the block ends, whatever happens."""
    if work_dir is not None:
        yield Path(work_dir)
        return
    tmp = output.parent / f".{output.name}.lplr-work-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON so that ``path`` is either absent/old or complete (rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def publish(tmp: Path, output: Path) -> None:
    """Move a complete ``tmp`` into place, replacing ``output`` only after the move succeeds."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.lplr-old-{uuid.uuid4().hex[:12]}"
        output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def create_factor(root: Path, name: str, shape, spec: QuantizerSpec, chunks) -> FactorWriter:
    """Create the arrays of one factor (``L``, ``R`` or ``Q``) under the group at ``root``."""
    group = zarr.open_group(str(root), mode="a").require_group(name)
    group.attrs.update({"quantizer": spec.to_dict(), "shape": list(shape)})
    rows, cols = shape
    crow, ccol = min(chunks[0], rows), min(chunks[1], cols)
    if spec.is_float:
        group.create_array(
            "codes",
            shape=(rows, cols),
            chunks=(crow, ccol),
            dtype="uint16",
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
    else:
        group.create_array(
            "codes",
            shape=(rows, packed_width(cols, spec.bits)),
            chunks=(crow, packed_width(ccol, spec.bits)),
            dtype="uint8",
            compressors=None,
            fill_value=0,
            overwrite=True,
        )
        rshape = spec.range_shape(shape)
        rchunks = {
            "tensor": (1, 1),
            "column": (1, ccol),
            "row": (crow, 1),
            "group": (crow, -(-ccol // (spec.group_size or 1))),
        }[spec.granularity]
        for part in ("hi",) if spec.symmetric else ("hi", "lo"):
            group.create_array(
                part,
                shape=rshape,
                chunks=rchunks,
                dtype="float32",
                compressors=None,
                fill_value=0.0,
                overwrite=True,
            )
    return FactorWriter(str(root / name), (rows, cols), spec, (crow, ccol))


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
