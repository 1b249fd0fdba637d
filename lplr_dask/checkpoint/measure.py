"""Measure one tensor's candidates with the real engine into a work directory (its
rate–distortion curve), staging large tensors into tiled Zarr first."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lplr_dask.checkpoint.plan import TensorEntry
from lplr_dask.checkpoint.policy import (
    Candidate,
)
from lplr_dask.checkpoint.safetensors_io import SLAB_BYTES
from lplr_dask.errors import (
    InputError,
    ParameterError,
)
from lplr_dask.storage.fs import (
    write_json_atomic,
)

__all__ = ["compress_tensor", "read_curve", "safe_name", "tensor_dir", "tensor_fingerprint"]


DEFAULT_STAGE_THRESHOLD = 256 * 2**20


def safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or safe.startswith(".") or not safe or len(safe) > 200:
        safe = f"{safe.lstrip('.')[:200]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def tensor_dir(work_dir, name: str) -> Path:
    return Path(work_dir) / "tensors" / safe_name(name)


def _compute_dtype(dtype: str):
    return np.float64 if dtype == "F64" else np.float16 if dtype == "F16" else np.float32


def _stage(entry: TensorEntry, tdir: Path, *, threshold: int):
    """The tensor as a NumPy array (small) or a tiled Zarr array staged slab by slab (large),
    with its squared Frobenius norm (float64). Every chunk of the staged array is written."""
    from safetensors import SafetensorError

    try:
        return _stage_tensor(entry, tdir, threshold=threshold)
    except (SafetensorError, FileNotFoundError) as exc:
        raise InputError(
            f"{entry.file}: tensor {entry.name!r} cannot be read ({exc}); the file was changed, "
            "removed or damaged after the plan read its header. Copy it again and rerun."
        ) from exc


def _stage_tensor(entry: TensorEntry, tdir: Path, *, threshold: int):
    from safetensors import safe_open

    n, d = entry.shape
    dt = _compute_dtype(entry.dtype)
    with safe_open(entry.file, framework="np") as f:
        sl = f.get_slice(entry.name)
        if entry.nbytes <= threshold:
            a = np.ascontiguousarray(sl[:]).astype(dt)
            norm2 = float(np.sum(np.square(a, dtype=np.float64)))
            return a, norm2
        import zarr

        rows = max(1, SLAB_BYTES // max(1, d * np.dtype(dt).itemsize))
        path = tdir / "staged.zarr"
        if path.exists():
            shutil.rmtree(path)
        z = zarr.create_array(
            str(path),
            shape=(n, d),
            chunks=(min(rows, n), min(d, 4096)),
            dtype=dt,
            fill_value=0,
            config={"write_empty_chunks": True},  # an all-zero slab is a chunk, not a hole
        )
        norm2 = 0.0
        for r0 in range(0, n, rows):
            slab = np.asarray(sl[r0 : min(n, r0 + rows)]).astype(dt)
            norm2 += float(np.sum(np.square(slab, dtype=np.float64)))
            z[r0 : r0 + slab.shape[0]] = slab
        return str(path), norm2


def read_curve(tdir: Path) -> dict:
    """The measurements kept in a work directory; a damaged or foreign ``curve.json`` counts
    as none (the candidates are measured again)."""
    p = tdir / "curve.json"
    try:
        curve = json.loads(p.read_bytes().decode("utf-8")) if p.is_file() else None
    except (OSError, ValueError):
        curve = None
    if not isinstance(curve, dict) or not isinstance(curve.get("points"), dict):
        return {"points": {}}
    return curve


def tensor_fingerprint(entry: TensorEntry) -> str:
    """What a measurement depends on besides the candidate: the source file, the seed and the
    engine's version."""
    from lplr_dask._version import __version__

    st = Path(entry.file).stat()
    return f"{entry.file}:{st.st_size}:{st.st_mtime_ns}:seed={entry.seed}:lplr-dask={__version__}"


def compress_tensor(
    entry: TensorEntry | Mapping,
    *,
    work_dir,
    stage_threshold_bytes: int = DEFAULT_STAGE_THRESHOLD,
) -> dict:
    """Measure one tensor's candidates with :func:`lplr_dask.compress` into ``work_dir``.

    Each candidate's group goes to ``WORK/tensors/NAME/KEY.zarr`` and its measurement (stored
    bytes, relative and absolute squared error, rank, bits) into ``WORK/tensors/NAME/curve.json``.
    Candidates already measured there (for the same source file, unchanged, and the same seed)
    are skipped, so the same work directory serves several budgets and methods. Compression
    runs on the active Dask scheduler, with the plan's seed.

    Parameters
    ----------
    entry : TensorEntry or dict
        One entry of :class:`CheckpointPlan` with ``action == "compress"``.
    work_dir : str or path
    stage_threshold_bytes : int, default 256 MiB
        Tensors larger than this are staged into tiled Zarr slab by slab and compressed out of
        core; smaller ones from memory.

    Returns
    -------
    dict
        The tensor's curve: ``{"name", "shape", "dtype", "norm2", "points": {key: {...}}}``.
    """
    from lplr_dask.core.compress import compress

    if not isinstance(entry, TensorEntry):
        entry = TensorEntry(**entry)
    if entry.action != "compress":
        raise ParameterError(f"tensor {entry.name} is planned as passthrough; nothing to compress.")
    if (
        isinstance(stage_threshold_bytes, bool)
        or not isinstance(stage_threshold_bytes, int)
        or (stage_threshold_bytes < 0)
    ):
        raise ParameterError(
            f"stage_threshold_bytes={stage_threshold_bytes!r} must be a non-negative integer "
            "(0 stages every tensor into Zarr)."
        )
    tdir = tensor_dir(work_dir, entry.name)
    tdir.mkdir(parents=True, exist_ok=True)
    curve = read_curve(tdir)
    fingerprint = tensor_fingerprint(entry)
    if curve.get("fingerprint") != fingerprint:
        curve = {"points": {}, "fingerprint": fingerprint}  # another source or seed: re-measure
    todo = [Candidate.from_dict(c) for c in entry.candidates if c["key"] not in curve["points"]]
    if todo or "norm2" not in curve:
        source, norm2 = _stage(entry, tdir, threshold=stage_threshold_bytes)
        curve.update(name=entry.name, shape=entry.shape, dtype=entry.dtype, norm2=norm2)
        for cand in todo:
            t0 = time.perf_counter()
            res = compress(
                source, tdir / f"{cand.key}.zarr", cand.options, seed=entry.seed, overwrite=True
            )
            curve["points"][cand.key] = {
                "options": cand.options.to_dict(),
                "method": res.method,
                "rank": res.rank,
                "bits_left": res.bits_left,
                "bits_right": res.bits_right,
                "bits_matrix": res.bits_matrix,
                "group_size": res.group_size,
                "stored_bytes": res.stored_bytes,
                "bits_per_entry": res.bits_per_entry,
                "rel_fro_error": res.rel_fro_error,
                "error2": res.rel_fro_error**2 * norm2,
                "seconds": time.perf_counter() - t0,
            }
            write_json_atomic(tdir / "curve.json", curve)
        if isinstance(source, str):
            shutil.rmtree(source, ignore_errors=True)
    return curve
