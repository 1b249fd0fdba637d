"""Restore a compressed checkpoint into standard safetensors shards (:func:`restore_checkpoint`)."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lplr_dask.checkpoint.index import (
    DTYPES,
    HF_INDEX,
    INDEX_NAME,
    PASSTHROUGH_FILE,
    inside,
    read_index,
)
from lplr_dask.checkpoint.safetensors_io import (
    SLAB_BYTES,
    copy_raw,
    numpy_dtype,
    read_header,
    write_safetensors,
)
from lplr_dask.errors import (
    InputError,
    IntegrityError,
)
from lplr_dask.storage.fs import (
    check_output_path,
    publish,
    temporary_output,
)

__all__ = ["RESTORED_MARKER", "restore_checkpoint"]


RESTORED_MARKER = "lplr_restored.json"
"""Written by :func:`restore_checkpoint` into OUT so that a later ``--overwrite`` recognises it."""


RESTORED_FORMAT = "lplr-dask-restored"


def _reconstruct_writer(cm, dtype: str, shape):
    """A writer that streams the reconstruction of an opened compressed tensor
    (:class:`~lplr_dask.storage.reader.CompressedMatrix`), row slab by row slab, cast to the source
    dtype (float32 reconstruction; bfloat16 rounds to nearest even)."""

    def write(fh):
        lazy = cm.to_dask(dtype=np.float64 if dtype == "F64" else np.float32)
        n, d = shape
        rows = max(1, SLAB_BYTES // (8 * d))
        target = numpy_dtype(dtype).newbyteorder("<")
        for r0 in range(0, n, rows):
            block = np.asarray(lazy[r0 : min(n, r0 + rows)].compute())
            fh.write(np.ascontiguousarray(block.astype(target)).tobytes())

    return write


def restore_checkpoint(dst, out, *, overwrite: bool = False) -> str:
    """Write a standard safetensors checkpoint from a compressed checkpoint.

    The source's layout is kept: the same shard files (``model-0000i-of-0000N.safetensors`` and
    ``model.safetensors.index.json``, or one ``model.safetensors``) with the original names,
    shapes, dtypes and file metadata; passthrough tensors are bit-identical, compressed ones
    are their reconstructions cast to the source dtype. The non-weight files are copied back,
    and a marker ``lplr_restored.json`` (format ``lplr-dask-restored``, the source DST, the
    time) records that lplr-dask wrote ``out``, so that ``overwrite=True`` may replace it later.
    Written under a temporary sibling of ``out`` and renamed into place when complete.

    Before anything is written, the index is checked (its own sha256, then the sha256 of
    every file it lists and of every file of every compressed group; a version-1 index,
    written before checksums, is read unchecked) and every path read from it is confined to
    ``dst`` (no absolute path, no ``..``, no link leading out); the compressed groups are
    read through :mod:`lplr_dask.storage.reader`, which checks them chunk by chunk.

    Parameters
    ----------
    dst : str or path
        A compressed checkpoint directory.
    out : str or path
        The checkpoint directory to create.
    overwrite : bool, default False

    Returns
    -------
    str
        The path written.

    Raises
    ------
    StorageFormatError
        ``dst`` is not a compressed checkpoint, or its index has wrong types.
    IntegrityError
        A file of ``dst`` or its index was changed after it was written, or is missing.
    UnsafePathError
        A path in the index leads outside ``dst`` (or would lead outside ``out``).
    """
    from lplr_dask.storage.reader import open_compressed

    index = read_index(dst)
    root = Path(dst)
    target = check_output_path(out, overwrite=overwrite, inputs=[root])
    pt_header = None
    if any(t["storage"] == "passthrough" for t in index["tensors"]):
        try:
            pt_header = read_header(root / PASSTHROUGH_FILE)
        except InputError as exc:
            raise IntegrityError(
                f"{root / PASSTHROUGH_FILE} of the compressed checkpoint is damaged: {exc}"
            ) from exc
    by_shard: dict[str, list] = {}
    for t in index["tensors"]:
        if t["storage"] == "compressed":
            cm = open_compressed(root / t["group"])
            if cm.shape != tuple(t["shape"]):
                raise IntegrityError(
                    f"{root / t['group']} holds a {cm.shape[0]}×{cm.shape[1]} matrix but "
                    f"{INDEX_NAME} says tensor {t['name']!r} is {t['shape']}: the group or the "
                    "index was changed after it was written. Restore it from a backup or "
                    "recompress."
                )
            writer = _reconstruct_writer(cm, t["dtype"], t["shape"])
        else:
            info = pt_header.tensors.get(t["name"])
            if info is None:
                raise IntegrityError(
                    f"{dst}: passthrough tensor {t['name']} is missing from {PASSTHROUGH_FILE}. "
                    "Restore the file from a backup or recompress."
                )
            if info["dtype"] != t["dtype"] or info["shape"] != t["shape"]:
                raise IntegrityError(
                    f"{root / PASSTHROUGH_FILE} holds tensor {t['name']!r} as {info['dtype']} "
                    f"{info['shape']} but {INDEX_NAME} says {t['dtype']} {t['shape']}: the file "
                    "or the index was changed after it was written. Restore it from a backup or "
                    "recompress."
                )
            off = info["data_offsets"]
            writer = copy_raw(pt_header.path, pt_header.data_start + off[0], off[1] - off[0])
        by_shard.setdefault(t["shard"], []).append((t["name"], t["dtype"], t["shape"], writer))
    with temporary_output(target) as tmp:
        for shard, items in by_shard.items():
            write_safetensors(tmp / shard, items, index["shard_metadata"].get(shard) or None)
        if index["sharded"]:
            total = sum(math.prod(t["shape"]) * DTYPES[t["dtype"]][0] for t in index["tensors"])
            hf = {
                "metadata": {**index["index_metadata"], "total_size": total},
                "weight_map": {t["name"]: t["shard"] for t in index["tensors"]},
            }
            (tmp / HF_INDEX).write_text(json.dumps(hf, indent=2))
        for i, rel in enumerate(index["files"]):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            inside(tmp, rel, where=f"{INDEX_NAME}: files[{i}]")
            shutil.copy2(root / rel, dest)
        marker = {
            "format": RESTORED_FORMAT,
            "source": str(root.resolve()),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / RESTORED_MARKER).write_text(json.dumps(marker, indent=1))
        publish(tmp, target)
    return str(target)
