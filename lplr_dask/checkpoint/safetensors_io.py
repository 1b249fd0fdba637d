"""Safetensors files: the header reader, the writer, raw byte copies, and splitting a
checkpoint into shards (for tests and benchmarks)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lplr_dask.checkpoint.index import (
    DTYPES,
    HF_INDEX,
    is_int,
)
from lplr_dask.errors import (
    InputError,
    ParameterError,
)
from lplr_dask.storage.fs import (
    check_output_path,
    publish,
    temporary_output,
)

__all__ = [
    "Header",
    "copy_raw",
    "is_pickle",
    "numpy_dtype",
    "read_header",
    "shard_checkpoint",
    "write_safetensors",
]

SLAB_BYTES = 64 * 2**20
"""Tensors are read, staged and written in row slabs of about this many bytes."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # byte offset of the data buffer in the file
    tensors: dict  # name → {"dtype", "shape", "data_offsets"}
    metadata: dict


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header (8-byte length, JSON, contiguous data)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(
            f"{path} is not a readable safetensors file ({exc}). Re-export it with "
            "safetensors.save_file or model.save_pretrained(..., safe_serialization=True)."
        ) from exc
    if not isinstance(header, dict):
        raise InputError(
            f"{path}: the safetensors header is not a JSON object; the file is corrupt. "
            "Re-export it."
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(
            f"{path}: the safetensors __metadata__ must map strings to strings; the header is "
            "corrupt. Re-export the file."
        )
    data_len = size - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict):
            raise InputError(
                f"{path}: tensor {name!r} has no dtype/shape/data_offsets record in the header; "
                "the file is corrupt. Re-export it."
            )
        dtype, shape = info.get("dtype"), info.get("shape")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InputError(
                f"{path}: tensor {name!r} has dtype {dtype!r}, which lplr-dask does not know "
                f"(known: {', '.join(DTYPES)}). Convert it to float32, float16 or bfloat16 first."
            )
        offsets = info.get("data_offsets")
        if not isinstance(shape, list) or any(not is_int(s) or s < 0 for s in shape):
            raise InputError(f"{path}: tensor {name!r} has an invalid shape {shape!r}.")
        want = math.prod(shape) * DTYPES[dtype][0]
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise InputError(
                f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; the header is "
                "corrupt. Re-export the file."
            )
        begin, end = offsets
        if end - begin != want:
            raise InputError(
                f"{path}: tensor {name!r} has shape {shape} ({dtype}, {want} bytes) but its data "
                f"holds {end - begin} bytes: the header's shape disagrees with the data. The "
                "file is corrupt; re-export it."
            )
        if end > data_len:
            raise InputError(
                f"{path}: tensor {name!r} ends at byte {end} of a {data_len}-byte data buffer: "
                "the file is truncated. Copy or download it again."
            )
    at = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != at:
            raise InputError(
                f"{path}: tensor {name!r} starts at byte {begin} of the data buffer, but the "
                f"tensors before it end at byte {at}: the data holds a gap or an overlap and the "
                "file is corrupt. Re-export it."
            )
        at = end
    if at != data_len:
        raise InputError(
            f"{path}: the tensors end at byte {at} of a {data_len}-byte data buffer; the file "
            "holds trailing bytes and is corrupt. Re-export it."
        )
    return Header(path, 8 + n, header, metadata)


def write_safetensors(path: Path, items: Sequence[tuple], metadata: Mapping | None = None):
    """Write a safetensors file streaming each tensor's bytes.

    ``items`` are ``(name, dtype, shape, write)`` with ``write(fh)`` writing exactly the
    tensor's bytes (little-endian, C order), in the order given.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape, _ in items:
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        start = fh.tell()
        for name, _, _, write in items:
            before = fh.tell()
            write(fh)
            want = header[name]["data_offsets"]
            if fh.tell() - before != want[1] - want[0]:
                raise RuntimeError(f"internal error: wrote a wrong byte count for {name}")
        if fh.tell() - start != offset:
            raise RuntimeError("internal error: safetensors data length mismatch")


def copy_raw(src: Path, start: int, nbytes: int):
    """A writer that copies ``nbytes`` from ``src`` at ``start`` in slabs (bit-identical)."""

    def write(fh):
        with open(src, "rb") as f:
            f.seek(start)
            left = nbytes
            while left:
                chunk = f.read(min(left, SLAB_BYTES))
                if not chunk:
                    raise InputError(f"{src} ended early while copying a tensor; it is truncated.")
                fh.write(chunk)
                left -= len(chunk)

    return write


def numpy_dtype(dtype: str):
    name = DTYPES[dtype][1]
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def is_pickle(p: Path) -> bool:
    return p.suffix in PICKLE_SUFFIXES and p.is_file()


def shard_checkpoint(src, out, *, n_shards: int, overwrite: bool = False) -> str:
    """Split a single-file safetensors checkpoint into ``n_shards`` shards plus an index.

    Tensors keep their order and bytes (copied raw); shards are balanced by bytes. Non-weight
    files are copied. Used by the tests and the MiniLM benchmark.

    Parameters
    ----------
    src : str or path
        A directory with ``model.safetensors`` (or the path of a ``.safetensors`` file).
    out : str or path
        The sharded checkpoint directory to create.
    n_shards : int
    overwrite : bool, default False

    Returns
    -------
    str
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ParameterError(f"n_shards={n_shards!r} must be a positive integer.")
    src = Path(src)
    file = src if src.is_file() else src / "model.safetensors"
    if not file.is_file():
        raise InputError(f"{src} has no model.safetensors to shard.")
    header = read_header(file)
    target = check_output_path(out, overwrite=overwrite, inputs=[src])
    names = sorted(header.tensors, key=lambda k: header.tensors[k]["data_offsets"][0])
    sizes = [
        header.tensors[k]["data_offsets"][1] - header.tensors[k]["data_offsets"][0] for k in names
    ]
    total = sum(sizes)
    if n_shards > len(names):
        raise ParameterError(f"n_shards={n_shards} exceeds the {len(names)} tensors of {file}.")
    groups: list[list[str]] = [[] for _ in range(n_shards)]
    acc = 0
    for k, s in zip(names, sizes, strict=True):
        i = min(n_shards - 1, int(acc * n_shards // max(total, 1)))
        groups[i].append(k)
        acc += s
    groups = [g for g in groups if g]
    n = len(groups)
    with temporary_output(target) as tmp:
        weight_map = {}
        for i, g in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            items = []
            for k in g:
                info = header.tensors[k]
                off = info["data_offsets"]
                items.append(
                    (
                        k,
                        info["dtype"],
                        info["shape"],
                        copy_raw(file, header.data_start + off[0], off[1] - off[0]),
                    )
                )
                weight_map[k] = shard
            write_safetensors(tmp / shard, items, header.metadata or None)
        (tmp / HF_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
        if src.is_dir():
            for p in sorted(src.rglob("*")):
                rel = p.relative_to(src)
                if p.is_file() and p != file and str(rel) != HF_INDEX:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, tmp / rel)
        publish(tmp, target)
    return str(target)
