"""The compressed format: a Zarr v3 group of packed codes and float32 ranges, checksummed.

Layout of a compressed group (format ``lplr-dask``, version 2)::

    OUTPUT/                     group; attrs["lplr_dask"] holds the metadata below
        L/codes   uint8 (n, ceil(m·B/8))       packed codes of the left factor (n × m)
        L/hi      float32 (1, m)               per-column high ends (symmetric: lo = -hi)
        L/lo      float32 (1, m)               only for asymmetric quantizers
        R/codes   uint8 (m, ceil(d·B'/8))      packed codes of the right factor (m × d)
        R/hi, R/lo                             ranges, shape QuantizerSpec.range_shape((m, d))
        R/codebook float32 (1, 2^B')           only for ``kind="lloyd"``: the fitted levels
        Q/...                                  the directly quantized matrix (``nq``, ``nq+lplr``)

Ranges are stored in the quantizer's ``scale_dtype`` (float32; float16; bfloat16 as uint16 bit
patterns).
Codebook kinds (``normal``, ``lloyd``, ``sign``) store their per-group scale in ``hi`` (no
``lo``). The quantizer attribute records the kind and scale dtype when they are not the
defaults (``minmax``, float32), so min–max outputs keep their attributes of earlier versions.

A factor quantized to 16 bits stores ``codes`` as uint16 float16/bfloat16 bit patterns and no
ranges. Codes are packed as :mod:`lplr_dask.kernels.packing` describes (``bit_order``). Each factor
group carries ``attrs["quantizer"]`` (a :class:`~lplr_dask.kernels.quantize.QuantizerSpec`) and
``attrs["shape"]``. Chunks follow the computation's blocks (``block_shape``): ``L`` in
``(block_rows, rank)``, ``R`` in ``(rank, block_cols)``, ``Q`` in ``block_shape``;
:func:`factor_layout` is the one definition of every array's shape, chunk shape and dtype.

Format version 2 is checked storage:

- every array's codec pipeline is ``[bytes, crc32c]`` (no general-purpose compressor): each
  chunk file is the raw chunk payload followed by its 4-byte CRC-32C, so a flipped or
  truncated chunk fails to decode;
- every chunk is written, all-zero ones included (``write_empty_chunks``), so a chunk file
  that is not there is damage, never an implicit fill value;
- ``attrs["lplr_dask"]["checksum"]`` is the SHA-256 of the canonical JSON of the root
  ``lplr_dask`` attributes (without ``checksum``) and of every factor group's attributes, so
  an edited attribute is detected;
- :func:`check_group` cross-checks on open the metadata (method, rank, shape, factors, bits)
  against the factor groups and every array's own ``zarr.json`` (shape, chunk shape, dtype,
  codecs); :func:`read_factor_block` refuses missing chunks and names the chunk that fails
  to decode. Damage is an :class:`~lplr_dask.errors.IntegrityError` naming array and chunk.

Version 1 outputs (no checksums; all-zero chunks not written) stay readable, cross-checked
loosely (shapes and dtypes), without the guarantee: damage to them cannot be detected.

Bytes on disk are the reported ``stored_bytes`` (chunk payloads, edge chunks padded to the
full chunk shape) plus 4 bytes of checksum per chunk file and the metadata JSON; see
:func:`bytes_on_disk`. Writers put everything under a temporary sibling directory and
:func:`lplr_dask.storage.fs.publish` renames it into place only when complete, so an existing OUTPUT
is never half-overwritten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from lplr_dask.errors import IntegrityError, LPLRError, ParameterError, StorageFormatError
from lplr_dask.kernels.packing import (
    BIT_ORDER,
    decode_float,
    pack_codes,
    packed_width,
    unpack_codes,
)
from lplr_dask.kernels.quantize import (
    QuantizerSpec,
    dequantize,
    scales_for_storage,
    scales_from_storage,
)

__all__ = [
    "CHECKSUM_BYTES",
    "CHECKSUM_CODECS",
    "CHUNK_CONFIG",
    "DENSE_FORMAT_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "ArrayLayout",
    "FactorWriter",
    "bytes_on_disk",
    "check_group",
    "create_dense",
    "create_factor",
    "factor_layout",
    "layout_nbytes",
    "metadata_checksum",
    "read_chunk",
    "read_factor_block",
    "read_metadata",
    "remove_partial_writes",
    "verify_array",
    "write_metadata",
]

FORMAT_NAME = "lplr-dask"
FORMAT_VERSION = 2
#: Format versions this lplr-dask reads; version 1 has no checksums.
READABLE_VERSIONS = (1, 2)
#: Format of a dense reconstruction written by :func:`lplr_dask.storage.reader.decompress`.
DENSE_FORMAT_NAME = "lplr-dask-dense"
DENSE_FORMAT_VERSION = 1
#: Size of the CRC-32C that the ``crc32c`` codec appends to every chunk file.
CHECKSUM_BYTES = 4
#: Runtime configuration of every array written: all chunks on disk, zero ones included.
CHUNK_CONFIG = {"write_empty_chunks": True}
#: Benchmarks only (``benchmarks/bench_checksums.py``): False writes arrays without the
#: ``crc32c`` codec and makes :func:`check_group` expect that. Read in the driver process;
#: the array metadata carries the codec to the workers.
CHECKSUM_CODECS = True

_METHOD_FACTORS = {"nq": ("Q",), "nq+lplr": ("L", "R", "Q")}
_KNOWN_METHODS = ("lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr")
_FIX = "Restore OUTPUT from a backup, or recompress the input."


def _compressors():
    return [zarr.codecs.Crc32cCodec()] if CHECKSUM_CODECS else None


def _open_for_write(path: str):
    return zarr.open_array(path, mode="r+").with_config(CHUNK_CONFIG)


@dataclass(frozen=True)
class FactorWriter:
    """Picklable handle that writes one factor's codes and ranges block by block.

    Tasks write whole chunks only: ``row_block``/``col_block`` are the chunk shape of the
    (unpacked) factor, and the graph builders call :meth:`write` once per chunk. Every chunk is
    written, all-zero ones included (:data:`CHUNK_CONFIG`).
    """

    path: str
    shape: tuple[int, int]
    spec: QuantizerSpec
    chunks: tuple[int, int]

    def _array(self, name):
        return _open_for_write(os.path.join(self.path, name))

    def write(self, row0: int, col0: int, codes, lo=None, hi=None) -> None:
        """Write the codes (unpacked, uint8, or float values for 16 bits) of the block at
        ``(row0, col0)``, and its ranges when they are local to the block."""
        from lplr_dask.kernels.xp import to_numpy

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

    def write_codebook(self, codebook) -> None:
        """Write the fitted levels of a ``lloyd`` quantizer (2^bits float32)."""
        from lplr_dask.kernels.xp import to_numpy

        book = np.asarray(to_numpy(codebook), dtype=np.float32).reshape(1, -1)
        self._array("codebook")[:, :] = book

    def write_ranges(self, lo, hi, *, row0: int = 0, col0: int = 0) -> None:
        """Write (part of) the range arrays; ``row0, col0`` are coordinates in the factor."""
        from lplr_dask.kernels.xp import to_numpy

        spec = self.spec
        r0 = row0 if spec.granularity in ("row", "group") else 0
        c0 = {"column": col0, "group": col0 // (spec.group_size or 1)}.get(spec.granularity, 0)
        hi = scales_for_storage(to_numpy(hi), spec)
        self._array("hi")[r0 : r0 + hi.shape[0], c0 : c0 + hi.shape[1]] = hi
        if not spec.symmetric:
            lo = scales_for_storage(to_numpy(lo), spec)
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
        shape, so this counts ``n_chunks`` whole chunks (checksums not included)."""
        return self.n_chunks * math.prod(self.chunks) * np.dtype(self.dtype).itemsize


def factor_layout(shape, spec: QuantizerSpec, chunks) -> dict[str, ArrayLayout]:
    """The arrays that store one factor of ``shape`` (``codes``, ``hi`` and maybe ``lo``).

    ``chunks`` is the chunk shape of the unpacked factor (its compute blocks: each task writes
    whole chunks). This is the one definition of the stored layout: :func:`create_factor`
    creates these arrays, :func:`check_group` compares them with what is on disk, and the bit
    accounting sums their :attr:`ArrayLayout.nbytes`.
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
        out[part] = ArrayLayout(spec.range_shape((rows, cols)), rchunks, spec.stored_scale_dtype)
    if spec.stores_codebook:
        out["codebook"] = ArrayLayout((1, spec.levels), (1, spec.levels), "float32")
    return out


@functools.lru_cache(maxsize=1 << 16)
def _layout_nbytes(shape, spec: QuantizerSpec, chunks) -> int:
    return sum(a.nbytes for a in factor_layout(shape, spec, chunks).values())


def layout_nbytes(shape, spec: QuantizerSpec, chunks) -> int:
    """Stored bytes of a factor (codes and ranges, edge chunks padded); see
    :func:`factor_layout`. Memoized: the planner asks for the same layouts many times."""
    return _layout_nbytes(tuple(int(v) for v in shape), spec, tuple(int(v) for v in chunks))


def create_factor(root: Path, name: str, shape, spec: QuantizerSpec, chunks) -> FactorWriter:
    """Create the arrays of one factor (``L``, ``R`` or ``Q``) under the group at ``root``.

    Each array gets the ``[bytes, crc32c]`` codec pipeline (unless :data:`CHECKSUM_CODECS` is
    switched off for a benchmark) and is written with every chunk on disk.
    """
    group = zarr.open_group(str(root), mode="a").require_group(name)
    group.attrs.update({"quantizer": spec.to_dict(), "shape": list(shape)})
    layout = factor_layout(shape, spec, chunks)
    for part, lay in layout.items():
        group.create_array(
            part,
            shape=lay.shape,
            chunks=lay.chunks,
            dtype=lay.dtype,
            compressors=_compressors(),
            fill_value=0,
            overwrite=True,
            config=CHUNK_CONFIG,
        )
    rows, cols = shape
    return FactorWriter(
        str(root / name), (rows, cols), spec, (min(chunks[0], rows), min(chunks[1], cols))
    )


def create_dense(path, shape, chunks, *, source, dtype="float32") -> zarr.Array:
    """Create the dense array that :func:`lplr_dask.storage.reader.decompress` writes, marked as
    lplr-dask's own (``attrs["lplr_dask"]["format"] == "lplr-dask-dense"``), checksummed and
    with every chunk written. The returned array pickles with its configuration, so Dask
    tasks can store into it."""
    attrs = {
        "lplr_dask": {
            "format": DENSE_FORMAT_NAME,
            "format_version": DENSE_FORMAT_VERSION,
            "source": str(source),
            "shape": [int(v) for v in shape],
        }
    }
    return zarr.create_array(
        str(path),
        shape=tuple(int(v) for v in shape),
        chunks=tuple(int(v) for v in chunks),
        dtype=dtype,
        compressors=_compressors(),
        fill_value=0,
        attributes=attrs,
        config=CHUNK_CONFIG,
    )


# ---------------------------------------------------------------------- metadata


def metadata_checksum(meta: dict, factor_attrs: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of the root ``lplr_dask`` attributes ``meta``
    (without ``checksum``) and the attributes of every factor group (``{name: attrs}``)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    doc = {"lplr_dask": body, "factors": factor_attrs}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def write_metadata(root: Path, meta: dict) -> None:
    """Write the root ``lplr_dask`` attributes (format, version, bit order and ``meta``) and
    their checksum over these and the factor groups' attributes (call it after the last
    :func:`create_factor`)."""
    root = Path(root)
    group = zarr.open_group(str(root), mode="a")
    body = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "bit_order": BIT_ORDER}
    body.update({k: v for k, v in meta.items() if k != "checksum"})
    group.attrs["lplr_dask"] = body
    # Hash what was stored (after Zarr's JSON encoding), exactly as a reader will see it.
    stored = _read_node(root / "zarr.json", root, "the root metadata")["attributes"]["lplr_dask"]
    fattrs = {
        name: _read_node(root / name / "zarr.json", root, f"factor group {name}").get(
            "attributes", {}
        )
        for name in sorted(stored.get("factors") or {})
    }
    group.attrs["lplr_dask"] = {**stored, "checksum": metadata_checksum(stored, fattrs)}


def _damaged(path, text: str) -> IntegrityError:
    return IntegrityError(f"The compressed matrix {path} is damaged: {text}. {_FIX}")


def _read_node(file: Path, group, what: str) -> dict:
    """A ``zarr.json`` as a dict; IntegrityError when missing, not UTF-8, not JSON."""
    try:
        raw = Path(file).read_bytes()
    except FileNotFoundError:
        raise _damaged(group, f"{what} is missing ({file} does not exist)") from None
    except OSError as exc:
        raise _damaged(group, f"{what} cannot be read ({file}: {exc.strerror or exc})") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _damaged(group, f"{what} ({file}) is not UTF-8 text") from None
    except ValueError as exc:
        raise _damaged(
            group, f"{what} ({file}) is not valid JSON, truncated or edited ({exc})"
        ) from None
    if not isinstance(doc, dict):
        raise _damaged(group, f"{what} ({file}) is not a JSON object")
    return doc


def read_metadata(path) -> dict:
    """The ``lplr_dask`` metadata of a compressed group, validating format, version and (for
    format version 2) the checksum of the attributes.

    Raises
    ------
    StorageFormatError
        ``path`` is not an lplr-dask result, or of a version this lplr-dask cannot read.
    IntegrityError
        ``zarr.json`` is unreadable (missing factor group, not UTF-8, not JSON), or the
        attributes were changed after they were written.
    """
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise StorageFormatError(
            f"{path} is not a compressed lplr-dask result (no zarr.json there). Give the OUTPUT "
            "path of `lplr compress`."
        )
    doc = _read_node(p / "zarr.json", path, "the root metadata zarr.json")
    attrs = doc.get("attributes")
    meta = attrs.get("lplr_dask") if isinstance(attrs, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise StorageFormatError(
            f"{path} is a Zarr store but not an lplr-dask result (no 'lplr_dask' attributes "
            f"naming the format {FORMAT_NAME!r}). Give the OUTPUT path of `lplr compress`."
        )
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise StorageFormatError(
            f"{path} has format version {version}; this lplr-dask reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade lplr-dask or recompress."
        )
    if version >= 2:
        factors = meta.get("factors")
        if not isinstance(factors, dict):
            raise _damaged(path, f"the attribute 'factors' is {factors!r}, not a mapping")
        fattrs = {}
        for name in sorted(factors):
            if name not in ("L", "R", "Q"):
                raise _damaged(path, f"the attribute 'factors' names an unknown factor {name!r}")
            gdoc = _read_node(p / name / "zarr.json", path, f"factor group {name}")
            fattrs[name] = gdoc.get("attributes", {})
        if meta.get("checksum") != metadata_checksum(meta, fattrs):
            raise IntegrityError(
                f"The attributes of {path} were changed after it was written: their checksum "
                "does not match (an attribute of the root or of a factor group was edited, "
                "added or removed). Its arrays cannot be trusted to mean what the attributes "
                f"say; recompress, or restore the file from a backup."
            )
    return meta


def _pair(v) -> bool:
    return (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)
    )


def _expected_codecs(dtype: str) -> list:
    bytes_codec = {"name": "bytes"}
    if np.dtype(dtype).itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return [bytes_codec, {"name": "crc32c"}] if CHECKSUM_CODECS else [bytes_codec]


_ARRAY_KEYS = {
    "shape",
    "data_type",
    "chunk_grid",
    "chunk_key_encoding",
    "fill_value",
    "codecs",
    "attributes",
    "zarr_format",
    "node_type",
    "storage_transformers",
    "dimension_names",
}


def _check_array_doc(doc: dict, lay: ArrayLayout, label: str, group, *, strict: bool) -> None:
    want = {
        "node_type": "array",
        "zarr_format": 3,
        "shape": list(lay.shape),
        "data_type": lay.dtype,
    }
    if strict:
        want.update(
            chunk_grid={"name": "regular", "configuration": {"chunk_shape": list(lay.chunks)}},
            chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}},
            fill_value=0,
            codecs=_expected_codecs(lay.dtype),
        )
    for key, value in want.items():
        if doc.get(key) != value or isinstance(doc.get(key), bool):
            raise _damaged(
                group,
                f"array {label}: field {key!r} of its zarr.json is {doc.get(key)!r}, but the "
                f"attributes of the group imply {value!r}",
            )
    codecs = doc.get("codecs") if isinstance(doc.get("codecs"), list) else []
    if not strict and any(isinstance(c, dict) and c.get("name") == "crc32c" for c in codecs):
        raise _damaged(
            group,
            f"array {label} carries crc32c checksums, which format version 1 never wrote: the "
            "attribute 'format_version' was changed",
        )
    if strict:
        extra = sorted(set(doc) - _ARRAY_KEYS)
        if extra:
            raise _damaged(group, f"array {label}: its zarr.json has unknown fields {extra}")
        allowed = {"attributes": ({},), "storage_transformers": ([],), "dimension_names": (None,)}
        for key, values in allowed.items():
            if key in doc and doc[key] not in values:
                raise _damaged(
                    group, f"array {label}: field {key!r} of its zarr.json is {doc[key]!r}"
                )


def check_group(path) -> dict:
    """Open a compressed group with every check: format, version, attribute checksum (format
    2), and a cross-check of the attributes against the factor groups and every array's own
    ``zarr.json``.

    Parameters
    ----------
    path : str or os.PathLike
        The OUTPUT of ``lplr compress``.

    Returns
    -------
    dict
        ``meta`` (the ``lplr_dask`` attributes), ``format_version``, ``checked`` (True when
        every chunk carries a checksum and missing chunks are damage: format 2) and
        ``factors``: for each stored factor name, ``spec`` (QuantizerSpec), ``shape``,
        ``chunks`` (of the unpacked factor) and ``arrays`` (name → :class:`ArrayLayout`).

    Raises
    ------
    StorageFormatError
        Not an lplr-dask result, or an unknown format version.
    IntegrityError
        Damaged metadata, attributes edited after writing, a factor group or array missing
        or extra, or an array whose shape, chunks, dtype or codecs disagree with the
        attributes. The message names the array and the field.
    """
    p = Path(path)
    meta = read_metadata(p)
    version = meta["format_version"]
    strict = version >= 2
    if not strict and "checksum" in meta:
        raise _damaged(
            path,
            "it has a 'checksum' attribute, which format version 1 never wrote: the attribute "
            "'format_version' was changed",
        )
    shape, method, rank = meta.get("shape"), meta.get("method"), meta.get("rank")
    if not _pair(shape):
        raise _damaged(path, f"the attribute 'shape' is {shape!r}, not two positive integers")
    if method not in _KNOWN_METHODS:
        raise _damaged(path, f"the attribute 'method' is {method!r}, not a known method")
    names = _METHOD_FACTORS.get(method, ("L", "R"))
    factors = meta.get("factors")
    if not isinstance(factors, dict) or set(factors) != set(names):
        found = sorted(factors) if isinstance(factors, dict) else factors
        raise _damaged(
            path, f"the attribute 'factors' lists {found!r}; method {method} stores {list(names)}"
        )
    if "L" in names:
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise _damaged(path, f"the attribute 'rank' is {rank!r}, not a positive integer")
    elif rank not in (None, 0):
        raise _damaged(path, f"the attribute 'rank' is {rank!r}; method {method} has no rank")
    block = meta.get("block_shape")
    if not _pair(block):
        raise _damaged(path, f"the attribute 'block_shape' is {block!r}, not two positive integers")
    for key, name in (("bits_left", "L"), ("bits_right", "R"), ("bits_matrix", "Q")):
        stored = factors[name].get("bits") if name in factors else None
        if key in meta and meta[key] != stored:
            raise _damaged(
                path,
                f"the attribute {key!r} is {meta[key]!r} but factor {name} is stored with "
                f"{stored!r} bits",
            )
    n, d = shape
    fshape = {"L": (n, rank), "R": (rank, d), "Q": (n, d)}
    fchunks = {"L": (block[0], rank), "R": (rank, block[1]), "Q": tuple(block)}
    out = {}
    for name in names:
        gdir = p / name
        gdoc = _read_node(gdir / "zarr.json", path, f"factor group {name}")
        gattrs = gdoc.get("attributes")
        if gdoc.get("node_type") != "group" or not isinstance(gattrs, dict):
            raise _damaged(path, f"{name}/zarr.json does not describe a Zarr group")
        if gattrs.get("quantizer") != factors[name]:
            raise _damaged(
                path,
                f"attribute 'quantizer' of factor group {name} is {gattrs.get('quantizer')!r} "
                f"but the root attribute factors.{name} is {factors[name]!r}",
            )
        if gattrs.get("shape") != list(fshape[name]):
            raise _damaged(
                path,
                f"attribute 'shape' of factor group {name} is {gattrs.get('shape')!r}; the "
                f"shape {list(shape)} and rank {rank} imply {list(fshape[name])}",
            )
        try:
            spec = QuantizerSpec.from_dict(factors[name])
        except (LPLRError, TypeError, KeyError, ValueError) as exc:
            raise _damaged(path, f"the quantizer of factor {name} is invalid ({exc})") from None
        layout = factor_layout(fshape[name], spec, fchunks[name])
        present = {c.name for c in gdir.iterdir() if c.is_dir()}
        for extra in sorted(present - set(layout)):
            raise _damaged(
                path, f"array {name}/{extra} is there but the {name} quantizer stores no such array"
            )
        for part, lay in layout.items():
            label = f"{name}/{part}"
            if part not in present:
                raise _damaged(path, f"array {label} is missing")
            adoc = _read_node(gdir / part / "zarr.json", path, f"array {label}")
            _check_array_doc(adoc, lay, label, path, strict=strict)
        out[name] = {
            "spec": spec,
            "shape": fshape[name],
            "chunks": (
                min(fchunks[name][0], fshape[name][0]),
                min(fchunks[name][1], fshape[name][1]),
            ),
            "arrays": layout,
        }
    return {
        "meta": meta,
        "format_version": version,
        "checked": strict and CHECKSUM_CODECS,
        "factors": out,
    }


# ---------------------------------------------------------------------- reading chunks


def _names(array_path: str) -> tuple[str, str]:
    """(group path, ``FACTOR/PART``) of an array of a compressed group."""
    factor_dir, part = os.path.split(os.path.normpath(array_path))
    group, factor = os.path.split(factor_dir)
    return group, f"{factor}/{part}"


def _open_array(array_path: str):
    try:
        return zarr.open_array(array_path, mode="r")
    except Exception as exc:  # zarr raises several types for damaged metadata
        group, label = _names(array_path)
        raise _damaged(
            group, f"array {label} cannot be opened ({type(exc).__name__}: {exc})"
        ) from None


def _chunk_file(array_path: str, arr, index) -> tuple[str, str]:
    key = arr.metadata.encode_chunk_key(tuple(int(i) for i in index))
    return key, os.path.join(array_path, *key.split("/"))


def _require_chunk(array_path: str, arr, index) -> None:
    key, file = _chunk_file(array_path, arr, index)
    if not os.path.isfile(file):
        group, label = _names(array_path)
        raise _damaged(
            group,
            f"chunk {label}/{key} is missing (deleted, or never written); format 2 stores "
            "every chunk",
        )


def read_chunk(array_path: str, index, *, require: bool = True, array=None) -> np.ndarray:
    """Read and decode one chunk of a stored array; checks that its file exists
    (``require``) and turns a decoding failure (checksum mismatch, truncated file) into an
    :class:`~lplr_dask.errors.IntegrityError` naming the chunk. ``array`` is the opened Zarr
    array, if the caller has it."""
    arr = array if array is not None else _open_array(array_path)
    if require:
        _require_chunk(array_path, arr, index)
    try:
        return arr.get_block_selection(tuple(int(i) for i in index))
    except LPLRError:
        raise
    except Exception as exc:
        group, label = _names(array_path)
        key, _ = _chunk_file(array_path, arr, index)
        if "checksum" in str(exc):
            what = "fails its crc32c checksum"
        else:
            what = f"cannot be decoded ({type(exc).__name__}: {exc})"
        raise _damaged(
            group, f"chunk {label}/{key} {what}: its bytes were changed or truncated"
        ) from None


def verify_array(array_path: str, *, require: bool = True, executor=None) -> tuple[int, int]:
    """Read and decode every chunk of the array at ``array_path`` once (see
    :func:`read_chunk`), on ``executor`` (a ``concurrent.futures`` executor) if given.

    Returns
    -------
    (int, int)
        The number of chunks and their decoded bytes.
    """
    arr = _open_array(array_path)
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    indices = list(np.ndindex(*grid))

    def read(index):
        return read_chunk(array_path, index, require=require, array=arr).nbytes

    sizes = list(executor.map(read, indices)) if executor is not None else map(read, indices)
    return len(indices), int(sum(sizes))


def _read_region(array_path: str, arr, rsl: slice, csl: slice, *, require: bool):
    r0, r1, _ = rsl.indices(arr.shape[0])
    c0, c1, _ = csl.indices(arr.shape[1])
    ch0, ch1 = arr.chunks
    touched = [
        (i, j) for i in range(r0 // ch0, -(-r1 // ch0)) for j in range(c0 // ch1, -(-c1 // ch1))
    ]
    if require:
        for idx in touched:
            _require_chunk(array_path, arr, idx)
    try:
        return arr[r0:r1, c0:c1]
    except LPLRError:
        raise
    except Exception:
        for idx in touched:  # name the chunk that fails
            read_chunk(array_path, idx, require=require, array=arr)
        raise


def read_factor_block(
    path: str,
    spec: QuantizerSpec,
    shape,
    rows: slice,
    cols: slice,
    dtype=np.float32,
    *,
    require_chunks: bool = True,
):
    """Dequantized values of ``factor[rows, cols]`` read from the factor group at ``path``.

    ``cols.start`` must be a multiple of 8 (whole packed bytes) and, for group-wise ranges, of
    ``group_size``; the readers in :mod:`lplr_dask.storage.reader` only ask for such blocks. Every
    chunk file touched must exist (``require_chunks``, format 2); a chunk that fails to
    decode raises :class:`~lplr_dask.errors.IntegrityError` naming it.
    """
    cpath = os.path.join(path, "codes")
    codes_arr = _open_array(cpath)
    c0, c1 = cols.start or 0, min(cols.stop, shape[1])
    r0, r1 = rows.start or 0, min(rows.stop, shape[0])
    req = require_chunks
    if spec.is_float:
        block = _read_region(cpath, codes_arr, slice(r0, r1), slice(c0, c1), require=req)
        return decode_float(block, spec.float_format, dtype)
    b = spec.bits
    if (c0 * b) % 8:
        raise ParameterError(f"column offset {c0} is not byte-aligned for {b}-bit codes")
    packed = _read_region(
        cpath, codes_arr, slice(r0, r1), slice(c0 * b // 8, packed_width(c1, b)), require=req
    )
    codes = unpack_codes(packed, b, c1 - c0)
    gran = spec.granularity
    rsl = slice(r0, r1) if gran in ("row", "group") else slice(None)
    if gran == "column":
        csl = slice(c0, c1)
    elif gran == "group":
        g = spec.group_size
        csl = slice(c0 // g, -(-c1 // g))
    else:
        csl = slice(None)
    hpath = os.path.join(path, "hi")
    hi_b = scales_from_storage(_read_region(hpath, _open_array(hpath), rsl, csl, require=req), spec)
    if spec.symmetric:
        lo_b = -hi_b
    else:
        lpath = os.path.join(path, "lo")
        lo_b = scales_from_storage(
            _read_region(lpath, _open_array(lpath), rsl, csl, require=req), spec
        )
    book = None
    if spec.stores_codebook:
        bpath = os.path.join(path, "codebook")
        book = _read_region(bpath, _open_array(bpath), slice(None), slice(None), require=req)
    return dequantize(codes, lo_b, hi_b, spec=spec, dtype=dtype, codebook=book)


_PARTIAL_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")
"""The name of a chunk file that Zarr's LocalStore is writing (``<key>.<uuid4 hex>.partial``,
renamed to ``<key>`` when complete)."""


def remove_partial_writes(path) -> list[Path]:
    """Delete the unfinished chunk writes under ``path``: files that Zarr writes under a
    temporary name and renames when complete, left behind when a worker was killed while
    writing (Dask then reruns the task, which writes the chunk again). Call it only when no
    writer is running. Returns the files removed."""
    gone = [f for f in Path(path).rglob("*.partial") if _PARTIAL_WRITE.search(f.name)]
    for f in gone:
        f.unlink(missing_ok=True)
    return gone


def bytes_on_disk(path) -> dict:
    """Sizes of the files of a compressed group, in bytes.

    Returns
    -------
    dict
        ``arrays``: chunk payloads of the code and range arrays (file sizes less the 4-byte
        CRC-32C of each chunk file of a checksummed array), to compare with the reported
        ``stored_bytes``; ``checksums``: 4 × the chunk files of checksummed arrays;
        ``metadata``: the ``zarr.json`` files.
    """
    root = Path(path)
    arrays = checksums = metadata = 0
    crc: dict[Path, bool] = {}
    for f in root.rglob("zarr.json"):
        metadata += f.stat().st_size
        try:
            doc = json.loads(f.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("node_type") == "array":
            codecs = doc.get("codecs") if isinstance(doc.get("codecs"), list) else []
            crc[f.parent] = any(isinstance(c, dict) and c.get("name") == "crc32c" for c in codecs)
    for f in root.rglob("*"):
        if not f.is_file() or f.name == "zarr.json":
            continue
        size = f.stat().st_size
        owner = next((crc[q] for q in f.parents if q in crc), False)
        if owner:
            arrays += size - CHECKSUM_BYTES
            checksums += CHECKSUM_BYTES
        else:
            arrays += size
    return {"arrays": arrays, "checksums": checksums, "metadata": metadata}
