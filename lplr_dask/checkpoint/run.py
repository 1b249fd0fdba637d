"""Compress sharded safetensors checkpoints tensor by tensor, and restore them.

A checkpoint directory in the Hugging Face layout (``model.safetensors``, or shards
``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``; float32, float16 and
bfloat16) becomes a compressed checkpoint directory::

    DST/
      lplr_checkpoint.json      the index: every original tensor → its compressed group or its
                                passthrough location; source dtype, shape, shard, method, rank,
                                bits, measured error, bits per entry; the source shards' metadata;
                                (format version 2) the sha256 of every other file of DST
                                ("checksums") and of its own canonical JSON ("index_sha256")
      tensors/NAME.zarr         one Zarr group per compressed tensor, written by
                                :func:`lplr_dask.compress` (format ``lplr-dask``)
      passthrough.safetensors   every other tensor, bytes copied unchanged
      config.json, tokenizer files, 1_Pooling/, ...   every non-weight file, copied

:func:`restore_checkpoint` writes a standard checkpoint back (the source's shard layout, the
original names, shapes and dtypes), loadable by transformers and sentence-transformers, plus
the marker ``lplr_restored.json``.

Reading a compressed checkpoint (:func:`checkpoint_info`, :func:`restore_checkpoint`) checks
the index's own sha256, then every file against its recorded sha256, before anything else;
every path read from the index must be a plain relative path that stays inside DST once links
are resolved (:class:`~lplr_dask.errors.UnsafePathError` otherwise). Damage is an
:class:`~lplr_dask.errors.IntegrityError` naming the file. Version-1 indexes (written before
checksums) are read unchecked, and say so.

The work is split so that a flow can fan out over tensors, and :func:`compress_checkpoint` is
built from the same pieces:

1. :func:`plan_checkpoint` reads only headers, validates everything and decides per tensor
   (compress with which candidate configurations, or pass through); JSON-serialisable;
2. :func:`compress_tensor` measures one tensor's candidates with the real engine into a work
   directory (skipping those already there, so one measurement serves several budgets);
3. :func:`finalize_checkpoint` solves the allocation (``auto``), copies the chosen groups, the
   passthrough tensors and the other files into a temporary sibling of DST and publishes it.

Tensors are read lazily (``safe_open``/``get_slice``): a tensor larger than
``stage_threshold_bytes`` is staged into a tiled Zarr array row slab by row slab and compressed
out of core from there; smaller ones are compressed from memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lplr_dask.checkpoint.index import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    HF_INDEX,
    INDEX_NAME,
    PASSTHROUGH_FILE,
    check_relative,
    check_shard_name,
    file_checksums,
    index_is_checked,
    index_sha256,
    inside,
    is_int,
    read_index,
)
from lplr_dask.checkpoint.policy import (
    AUTO,
    CHECKPOINT_METHODS,
    DEFAULT_CANDIDATE_BUDGETS,
    Candidate,
    TensorPolicy,
    allocate,
    candidate_set,
    classify,
    method_candidate,
    min_bits,
    override_candidate,
)
from lplr_dask.errors import (
    InputError,
    IntegrityError,
    ParameterError,
    StorageFormatError,
)
from lplr_dask.storage.fs import (
    check_output_path,
    publish,
    scratch_dir,
    temporary_output,
    write_json_atomic,
)

__all__ = [
    "CheckpointPlan",
    "CheckpointResult",
    "TensorEntry",
    "TensorPolicy",
    "checkpoint_info",
    "compress_checkpoint",
    "compress_tensor",
    "finalize_checkpoint",
    "index_is_checked",
    "plan_checkpoint",
    "restore_checkpoint",
    "shard_checkpoint",
    "tensor_rows",
    "tensor_table",
]

RESTORED_MARKER = "lplr_restored.json"
"""Written by :func:`restore_checkpoint` into OUT so that a later ``--overwrite`` recognises it."""
RESTORED_FORMAT = "lplr-dask-restored"
DEFAULT_STAGE_THRESHOLD = 256 * 2**20
SLAB_BYTES = 64 * 2**20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ----------------------------------------------------------------------- safetensors files


@dataclass(frozen=True)
class _Header:
    path: Path
    data_start: int  # byte offset of the data buffer in the file
    tensors: dict  # name → {"dtype", "shape", "data_offsets"}
    metadata: dict


def _read_header(path: Path) -> _Header:
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
    return _Header(path, 8 + n, header, metadata)


def _write_safetensors(path: Path, items: Sequence[tuple], metadata: Mapping | None = None):
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


def _copy_raw(src: Path, start: int, nbytes: int):
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


def _numpy_dtype(dtype: str):
    name = DTYPES[dtype][1]
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# ---------------------------------------------------------------------------- the source


def _is_pickle(p: Path) -> bool:
    return p.suffix in PICKLE_SUFFIXES and p.is_file()


def _scan_source(src) -> dict:
    """Validate a checkpoint directory and read every header. No output is created.

    Returns {"dir", "files": {shard: _Header}, "weight_map": {name: shard}, "index_metadata",
    "extra_files": [relative paths]}.
    """
    root = Path(src)
    if not root.exists():
        raise InputError(f"SRC {src} does not exist. Give a checkpoint directory.")
    if root.is_file():
        raise InputError(
            f"SRC {src} is a file; give the checkpoint directory that holds it (with config.json "
            "and the tokenizer files)."
        )
    top = sorted(p for p in root.iterdir() if p.is_file())
    st_files = [p for p in top if p.suffix == ".safetensors"]
    pickles = [p.name for p in top if _is_pickle(p)]
    if not st_files:
        if pickles:
            raise InputError(
                f"SRC {src} holds only pickle-based weights ({', '.join(pickles[:3])}); lplr-dask "
                "reads safetensors only (pickles can run code when loaded). Convert once with "
                "transformers: AutoModel.from_pretrained(SRC).save_pretrained(NEW_DIR, "
                "safe_serialization=True), then compress NEW_DIR."
            )
        raise InputError(
            f"SRC {src} holds no .safetensors file; give a Hugging Face-style checkpoint "
            "directory (model.safetensors, or shards with model.safetensors.index.json)."
        )
    index_path = root / HF_INDEX
    index_metadata: dict = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
            index_metadata = dict(index.get("metadata") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(
                f"{index_path} is not a valid safetensors index (it needs a 'weight_map' of "
                f"tensor name → shard file, and an optional 'metadata' object): {exc}"
            ) from exc
        for name, shard in weight_map.items():
            if not isinstance(shard, str):
                raise InputError(
                    f"{index_path}: weight_map[{name!r}] is {shard!r}, not a shard file name. "
                    "Fix the index."
                )
            check_shard_name(
                shard,
                where=f"{index_path}: weight_map[{name!r}]",
                fix="Fix the index: shards are files beside it, named by their file name only.",
            )
        total = index_metadata.get("total_size")
        if total is not None:
            try:
                ok = not isinstance(total, bool) and int(total) == float(total)
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise InputError(
                    f"{index_path}: metadata.total_size is {total!r}, not an integer number of "
                    "bytes. Fix the index."
                )
            total = int(total)
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise InputError(
                f"{index_path} names shard file(s) that do not exist: {', '.join(missing)}. "
                "Copy the missing shards into SRC or fix the index."
            )
        unlisted = [p.name for p in st_files if p.name not in shards]
        if unlisted:
            raise InputError(
                f"SRC {src} holds safetensors file(s) the index does not reference: "
                f"{', '.join(unlisted)}. Remove them or add their tensors to {HF_INDEX}."
            )
    else:
        if len(st_files) > 1:
            raise InputError(
                f"SRC {src} holds {len(st_files)} safetensors files but no {HF_INDEX}; a sharded "
                "checkpoint needs its index. Write the index (weight_map: tensor → file) or "
                "keep one model.safetensors."
            )
        weight_map = None
        shards = [st_files[0].name]
    headers = {s: _read_header(root / s) for s in shards}
    found: dict[str, str] = {}
    for s, h in headers.items():
        for name in h.tensors:
            if name in found:
                raise InputError(
                    f"tensor {name!r} is stored twice, in {found[name]} and {s}; keep one copy."
                )
            found[name] = s
    if weight_map is not None:
        unlisted = sorted(n for n in found if n not in weight_map)
        if unlisted:
            raise InputError(
                f"shard {found[unlisted[0]]} holds tensor(s) the index does not list: "
                f"{', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}. Fix "
                f"{HF_INDEX} (its weight_map must name every tensor)."
            )
        wrong = sorted(n for n, s in weight_map.items() if found.get(n) != s)
        if wrong:
            n = wrong[0]
            where = f"it is in {found[n]}" if n in found else "no shard holds it"
            raise InputError(
                f"{HF_INDEX} lists tensor {n!r} in {weight_map[n]}, but {where} "
                f"({len(wrong)} such tensor(s)). Fix the index or restore the missing shard."
            )
        actual = sum(
            math.prod(i["shape"]) * DTYPES[i["dtype"]][0]
            for h in headers.values()
            for i in h.tensors.values()
        )
        if total is not None and total != actual:
            raise InputError(
                f"{HF_INDEX} says total_size={total} bytes but the shards' headers add up to "
                f"{actual}: the index does not describe these shards (shapes or dtypes "
                "disagree). Re-export the checkpoint or fix the index."
            )
    else:
        weight_map = dict(found)
    extra = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        hidden = rel.parts[0].startswith(".") and rel.parts[0] != ".gitattributes"
        weights = (p.suffix == ".safetensors" and len(rel.parts) == 1) or str(rel) == HF_INDEX
        if not p.is_file() or hidden or weights:
            continue
        if _is_pickle(p):
            continue  # stale pickled weights are not carried over
        if str(rel) == RESTORED_MARKER:
            continue  # the marker of an earlier restore describes that restore, not the model
        extra.append(str(rel))
    return {
        "dir": root.resolve(),
        "files": headers,
        "weight_map": weight_map,
        "index_metadata": index_metadata,
        "extra_files": extra,
        "sharded": index_path.is_file(),
    }


# ------------------------------------------------------------------------------- the plan


@dataclass
class TensorEntry:
    """The decision for one tensor of the source checkpoint (JSON-serialisable).

    ``action`` is ``"compress"`` (with its ``candidates``, measured by :func:`compress_tensor`)
    or ``"passthrough"`` (``reason`` says why).
    """

    name: str
    shape: list
    dtype: str
    shard: str
    file: str
    action: str
    reason: str
    candidates: list = field(default_factory=list)
    seed: int = 0
    baselines: dict = field(default_factory=dict)
    """For ``auto``: {method: candidate key} of each single method at the plan's budget."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckpointPlan:
    """Per-tensor decisions for compressing one checkpoint; :meth:`to_dict` is JSON."""

    source: str
    budget: float
    method: str
    seed: int
    group_size: int
    policy: dict
    candidate_budgets: list
    sharded: bool
    index_metadata: dict
    shard_metadata: dict
    extra_files: list
    entries: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["entries"] = [e.to_dict() if isinstance(e, TensorEntry) else e for e in self.entries]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> CheckpointPlan:
        d = dict(d)
        d["entries"] = [e if isinstance(e, TensorEntry) else TensorEntry(**e) for e in d["entries"]]
        return cls(**d)

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def compressed(self) -> list[TensorEntry]:
        return [e for e in self.entries if e.action == "compress"]


def _check_budget(budget):
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ParameterError(
            f"budget={budget!r} must be a positive number of bits per compressed parameter, "
            "such as 3 or 4."
        )


def plan_checkpoint(
    src,
    *,
    budget: float,
    method: str = AUTO,
    policy: TensorPolicy | None = None,
    candidate_budgets: Sequence[float] = DEFAULT_CANDIDATE_BUDGETS,
    seed: int = 0,
    group_size: int = 128,
) -> CheckpointPlan:
    """Validate a checkpoint and decide, per tensor, what to measure or pass through.

    Reads only the safetensors headers and the index.

    Parameters
    ----------
    src : str or path
        The checkpoint directory.
    budget : float
        Bits per compressed parameter, over all compressed tensors together (``auto``
        spreads them; a single method uses this budget on every tensor).
    method : {"auto", "lplr", "paper", "nq", "nq+lplr", "dsvd", "lplr-svd"}, default "auto"
    policy : TensorPolicy, optional
        Which tensors are compressed and per-tensor overrides (default ``TensorPolicy()``).
    candidate_budgets : sequence of float, default (2, 3, 4)
        ``auto`` measures ``lplr``, ``paper`` and ``nq+lplr`` at these budgets and ``budget``.
        Keep them fixed across runs that share a work directory so measurements are reused.
    seed : int, default 0
    group_size : int, default 128
        Group size of the group-wise quantizers.

    Returns
    -------
    CheckpointPlan

    Raises
    ------
    InputError
        Missing shard files, tensors missing from the index or from the shards, shapes that
        disagree with the data or the index, pickle checkpoints, unknown dtypes.
    ParameterError
        An unknown method, a bad policy, or a budget too small for the cheapest candidates.
    """
    _check_budget(budget)
    if method not in CHECKPOINT_METHODS:
        raise ParameterError(
            f"method={method!r} is unknown; use one of {', '.join(CHECKPOINT_METHODS)}."
        )
    if not candidate_budgets or any(
        isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0 for b in candidate_budgets
    ):
        raise ParameterError(
            f"candidate_budgets={candidate_budgets!r} must be positive numbers of bits per entry."
        )
    policy = policy or TensorPolicy()
    scan = _scan_source(src)
    entries = []
    need_bits = 0.0
    total_numel = 0
    for shard, header in scan["files"].items():
        for name, info in header.tensors.items():
            shape, dtype = list(info["shape"]), info["dtype"]
            ok, reason = classify(name, shape, dtype, policy)
            entry = TensorEntry(
                name=name,
                shape=shape,
                dtype=dtype,
                shard=shard,
                file=str(header.path.resolve()),
                action="compress" if ok else "passthrough",
                reason=reason,
                seed=int(seed),
            )
            if ok:
                override = policy.override_for(name)
                if isinstance(override, dict):
                    cand = override_candidate(override, shape, budget=budget, group_size=group_size)
                    cands = [cand]
                    need = 0.0
                else:
                    cands = candidate_set(
                        shape,
                        method=method,
                        budget=budget,
                        candidate_budgets=candidate_budgets,
                        group_size=group_size,
                        seed=seed,
                    )
                    need = min_bits(method, shape, group_size=group_size, seed=seed)
                    if not cands:
                        raise ParameterError(
                            f"budget={budget} bits per parameter is too small for method "
                            f"{method!r} on tensor {name} {shape[0]}×{shape[1]}: it needs at "
                            f"least {need:.4f}. Raise the budget, or use method='auto'."
                        )
                    if method == AUTO:
                        for m in ("nq", "lplr", "paper", "nq+lplr"):
                            c = method_candidate(
                                m, shape, budget=budget, group_size=group_size, seed=seed
                            )
                            if c is not None:
                                entry.baselines[m] = c.key
                entry.candidates = [c.to_dict() for c in cands]
                need_bits += need * entry.numel
                total_numel += entry.numel
            entries.append(entry)
    if total_numel and need_bits > budget * total_numel * (1 + 1e-12):
        raise ParameterError(
            f"budget={budget} bits per parameter is too small: the cheapest configurations of "
            f"the {len([e for e in entries if e.action == 'compress'])} compressed tensors need "
            f"{need_bits / total_numel:.4f} bits per parameter. Raise the budget."
        )
    return CheckpointPlan(
        source=str(scan["dir"]),
        budget=float(budget),
        method=method,
        seed=int(seed),
        group_size=int(group_size),
        policy=policy.to_dict(),
        candidate_budgets=[float(b) for b in candidate_budgets],
        sharded=scan["sharded"],
        index_metadata=scan["index_metadata"],
        shard_metadata={s: h.metadata for s, h in scan["files"].items()},
        extra_files=scan["extra_files"],
        entries=entries,
    )


# ------------------------------------------------------------------------ one tensor's work


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or safe.startswith(".") or not safe or len(safe) > 200:
        safe = f"{safe.lstrip('.')[:200]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def _tensor_dir(work_dir, name: str) -> Path:
    return Path(work_dir) / "tensors" / _safe_name(name)


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


def _read_curve(tdir: Path) -> dict:
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


def _fingerprint(entry: TensorEntry) -> str:
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
    tdir = _tensor_dir(work_dir, entry.name)
    tdir.mkdir(parents=True, exist_ok=True)
    curve = _read_curve(tdir)
    fingerprint = _fingerprint(entry)
    if curve.get("fingerprint") != fingerprint:
        curve = {"points": {}, "fingerprint": fingerprint}  # another source or seed: re-measure
    todo = [Candidate.from_dict(c) for c in entry.candidates if c["key"] not in curve["points"]]
    if todo or "norm2" not in curve:
        source, norm2 = _stage(entry, tdir, threshold=stage_threshold_bytes)
        curve.update(name=entry.name, shape=entry.shape, dtype=entry.dtype, norm2=norm2)
        for cand in todo:
            t0 = time.perf_counter()
            res = compress(
                source, tdir / f"{cand.key}.zarr", seed=entry.seed, overwrite=True, **cand.kwargs
            )
            curve["points"][cand.key] = {
                "kwargs": cand.kwargs,
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


# ------------------------------------------------------------------------------- finalize


@dataclass(frozen=True)
class CheckpointResult:
    """What :func:`compress_checkpoint` / :func:`finalize_checkpoint` wrote and measured.

    ``tensors`` is the per-tensor table: one dict per original tensor (name, shape, dtype,
    storage, and for compressed tensors method, rank, bits, bits_per_entry, rel_fro_error,
    error2 = absolute squared Frobenius error).
    """

    output: str
    method: str
    budget: float
    bits_per_parameter: float
    """8 × stored bytes of the compressed tensors / their parameters (the budget's measure)."""
    overall_bits_per_parameter: float
    """The same over every tensor, passthrough tensors at their own width."""
    compressed_parameters: int
    total_parameters: int
    total_error2: float
    seconds: float
    tensors: list

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The per-tensor table as Markdown (compressed tensors, then a passthrough count)."""
        return tensor_table(self.tensors)


BITS_COLUMN = "bits (B/B'/B_nq)"


def tensor_rows(tensors: Sequence[Mapping]) -> list[dict]:
    """One flat, display-ready dict per tensor of an index or result (every tensor; "-" where
    a field does not apply): the per-tensor table of the CLI and the flow's artifact."""
    rows = []
    for t in tensors:
        done = t["storage"] == "compressed"
        rows.append(
            {
                "tensor": t["name"],
                "shape": "×".join(map(str, t["shape"])),
                "dtype": t["dtype"],
                "storage": t["storage"],
                "method": t.get("method") or "-",
                "rank": t.get("rank") or "-",
                BITS_COLUMN: "/".join(
                    "-" if t.get(k) is None else str(t[k])
                    for k in ("bits_left", "bits_right", "bits_matrix")
                )
                if done
                else "-",
                "bits_per_entry": round(t["bits_per_entry"], 4) if done else "-",
                "rel_fro_error": round(t["rel_fro_error"], 5) if done else "-",
            }
        )
    return rows


def tensor_table(tensors: Sequence[Mapping]) -> str:
    """A Markdown table of the compressed tensors of an index or result."""
    lines = [
        "| tensor | shape | method | rank | bits (B/B′/B_nq) | bits/entry | rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    passthrough = 0
    for t, r in zip(tensors, tensor_rows(tensors), strict=True):
        if t["storage"] != "compressed":
            passthrough += 1
            continue
        bits = r[BITS_COLUMN]
        lines.append(
            f"| {r['tensor']} | {r['shape']} | {r['method']} | {r['rank']} | {bits} | "
            f"{t['bits_per_entry']:.3f} | {t['rel_fro_error']:.4f} |"
        )
    lines.append(f"\n{passthrough} tensors passed through unchanged.")
    return "\n".join(lines)


def _choose(plan: CheckpointPlan, curves: dict) -> dict[str, str]:
    compressed = plan.compressed
    if not compressed:
        return {}
    data = {
        e.name: {
            k: (8.0 * p["stored_bytes"], p["error2"])
            for k, p in curves[e.name]["points"].items()
            if k in {c["key"] for c in e.candidates}
        }
        for e in compressed
    }
    if plan.method != AUTO:
        return {e.name: e.candidates[0]["key"] for e in compressed}
    total = plan.budget * sum(e.numel for e in compressed)
    baselines = []
    for m in ("nq", "lplr", "paper", "nq+lplr"):
        base = {}
        for e in compressed:
            base[e.name] = e.baselines.get(m) or (
                e.candidates[0]["key"] if len(e.candidates) == 1 else None
            )
        if all(base.values()):
            baselines.append(base)
    return allocate(data, total_bits=total, baselines=baselines)


def finalize_checkpoint(
    plan: CheckpointPlan | Mapping,
    dst,
    *,
    work_dir,
    overwrite: bool = False,
    seconds: float | None = None,
) -> CheckpointResult:
    """Choose each tensor's configuration, write DST and publish it.

    For ``auto`` the measured curves are allocated by :func:`lplr_dask.checkpoint.policy.allocate`
    under ``plan.budget``; for a single method each tensor takes its one candidate. Each chosen
    group is verified chunk by chunk (:func:`lplr_dask.storage.reader.verify_compressed`) before
    it is copied; the index records the sha256 of every file written and of itself. Everything is
    written into a temporary sibling of ``dst`` that is renamed into place when complete.

    Parameters
    ----------
    plan : CheckpointPlan or dict
    dst : str or path
        The compressed checkpoint directory to create.
    work_dir : str or path
        Where :func:`compress_tensor` measured every compressed tensor.
    overwrite : bool, default False
    seconds : float, optional
        Elapsed time to record (default: time spent here).

    Returns
    -------
    CheckpointResult
    """
    from lplr_dask.storage.reader import verify_compressed

    t0 = time.perf_counter()
    if not isinstance(plan, CheckpointPlan):
        plan = CheckpointPlan.from_dict(plan)
    out = check_output_path(dst, overwrite=overwrite, inputs=[plan.source])
    curves = {}
    for e in plan.compressed:
        curve = _read_curve(_tensor_dir(work_dir, e.name))
        if curve.get("fingerprint") != _fingerprint(e):
            curve = {"points": {}}
        missing = [c["key"] for c in e.candidates if c["key"] not in curve["points"]]
        if missing:
            raise ParameterError(
                f"tensor {e.name} has unmeasured candidates ({', '.join(missing[:3])}) in "
                f"work_dir {work_dir}; run compress_tensor on it first."
            )
        curves[e.name] = curve
    choice = _choose(plan, curves)
    rows = []
    src_dir = Path(plan.source)
    with temporary_output(out) as tmp:
        (tmp / "tensors").mkdir()
        passthrough = []
        headers: dict[str, _Header] = {}
        for e in plan.entries:
            row = {
                "name": e.name,
                "shape": list(e.shape),
                "dtype": e.dtype,
                "shard": e.shard,
                "numel": e.numel,
            }
            if e.action == "compress":
                key = choice[e.name]
                p = curves[e.name]["points"][key]
                group = f"tensors/{_safe_name(e.name)}.zarr"
                measured = _tensor_dir(work_dir, e.name) / f"{key}.zarr"
                if not (measured / "zarr.json").is_file():
                    raise StorageFormatError(
                        f"work_dir {work_dir} lists {key} for {e.name} but its group {measured} "
                        "is missing; delete that tensor's folder and run compress_tensor again."
                    )
                try:  # never seal a damaged measurement into the checkpoint
                    verify_compressed(measured)
                except StorageFormatError as exc:
                    raise IntegrityError(
                        f"the measurement of {e.name} in work_dir is damaged ({exc}). Delete "
                        f"{measured.parent} and rerun; it will be measured again."
                    ) from exc
                shutil.copytree(measured, tmp / group)
                row.update(
                    storage="compressed",
                    group=group,
                    candidate=key,
                    **{
                        k: p[k]
                        for k in (
                            "method",
                            "rank",
                            "bits_left",
                            "bits_right",
                            "bits_matrix",
                            "group_size",
                            "stored_bytes",
                            "bits_per_entry",
                            "rel_fro_error",
                            "error2",
                        )
                    },
                )
            else:
                row.update(storage="passthrough", file=PASSTHROUGH_FILE, reason=e.reason)
                if e.file not in headers:
                    headers[e.file] = _read_header(Path(e.file))
                info = headers[e.file]
                off = info.tensors[e.name]["data_offsets"]
                passthrough.append(
                    (
                        e.name,
                        e.dtype,
                        e.shape,
                        _copy_raw(Path(e.file), info.data_start + off[0], off[1] - off[0]),
                    )
                )
            rows.append(row)
        if passthrough:
            _write_safetensors(tmp / PASSTHROUGH_FILE, passthrough)
        for i, rel in enumerate(plan.extra_files):
            check_relative(rel, where=f"plan.extra_files[{i}]")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            inside(tmp, rel, where=f"plan.extra_files[{i}]")
            shutil.copy2(src_dir / rel, target)
        comp = [r for r in rows if r["storage"] == "compressed"]
        c_params = sum(r["numel"] for r in comp)
        t_params = sum(r["numel"] for r in rows)
        c_bits = sum(8 * r["stored_bytes"] for r in comp)
        p_bits = sum(
            8 * r["numel"] * DTYPES[r["dtype"]][0] for r in rows if r["storage"] != "compressed"
        )
        result = CheckpointResult(
            output=str(out),
            method=plan.method,
            budget=plan.budget,
            bits_per_parameter=c_bits / c_params if c_params else 0.0,
            overall_bits_per_parameter=(c_bits + p_bits) / t_params if t_params else 0.0,
            compressed_parameters=c_params,
            total_parameters=t_params,
            total_error2=float(sum(r["error2"] for r in comp)),
            seconds=seconds if seconds is not None else time.perf_counter() - t0,
            tensors=rows,
        )
        index = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": plan.source,
            "sharded": plan.sharded,
            "index_metadata": plan.index_metadata,
            "shard_metadata": plan.shard_metadata,
            "files": list(plan.extra_files),
            "plan": {k: v for k, v in plan.to_dict().items() if k != "entries"},
            "summary": {k: v for k, v in result.to_dict().items() if k != "tensors"},
            "tensors": rows,
        }
        index["checksums"] = file_checksums(
            tmp,
            [PASSTHROUGH_FILE] * bool(passthrough) + list(plan.extra_files),
            [r["group"] for r in comp],
        )
        index["index_sha256"] = index_sha256(index)
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        publish(tmp, out)
    return result


# ------------------------------------------------------------------------- whole checkpoint


def compress_checkpoint(
    src,
    dst,
    *,
    budget: float,
    method: str = AUTO,
    policy: TensorPolicy | None = None,
    candidate_budgets: Sequence[float] = DEFAULT_CANDIDATE_BUDGETS,
    seed: int = 0,
    group_size: int = 128,
    work_dir=None,
    stage_threshold_bytes: int = DEFAULT_STAGE_THRESHOLD,
    overwrite: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> CheckpointResult:
    """Compress a safetensors checkpoint directory tensor by tensor.

    :func:`plan_checkpoint`, then :func:`compress_tensor` on every compressed tensor, then
    :func:`finalize_checkpoint`. Nothing is created under ``dst`` unless the whole checkpoint
    succeeds; validation errors are raised before any output exists.

    Parameters
    ----------
    src : str or path
        Hugging Face-style checkpoint directory (``model.safetensors`` or shards + index).
    dst : str or path
        The compressed checkpoint directory to create.
    budget : float
        Bits per compressed parameter over all compressed tensors (see :func:`plan_checkpoint`).
    method : str, default "auto"
        ``auto`` chooses method, rank and bits per tensor from measured error curves to
        minimise the total squared error; or one of ``lplr``, ``paper``, ``nq``, ``nq+lplr``,
        ``dsvd``, ``lplr-svd`` at ``budget`` on every tensor.
    policy : TensorPolicy, optional
    candidate_budgets : sequence of float, default (2, 3, 4)
    seed, group_size : int
    work_dir : str or path, optional
        Keep measurements here to reuse them for other budgets or methods (default: a temporary
        directory beside ``dst``, removed at the end).
    stage_threshold_bytes : int, default 256 MiB
    overwrite : bool, default False
    on_tensor : callable, optional
        ``on_tensor(name, i, n)`` before each compressed tensor (progress).

    Returns
    -------
    CheckpointResult
    """
    t0 = time.perf_counter()
    out = check_output_path(dst, overwrite=overwrite, inputs=[src] if Path(src).exists() else ())
    plan = plan_checkpoint(
        src,
        budget=budget,
        method=method,
        policy=policy,
        candidate_budgets=candidate_budgets,
        seed=seed,
        group_size=group_size,
    )
    with scratch_dir(out, work_dir) as work:
        todo = plan.compressed
        for i, e in enumerate(todo):
            if on_tensor is not None:
                on_tensor(e.name, i, len(todo))
            compress_tensor(e, work_dir=work, stage_threshold_bytes=stage_threshold_bytes)
        return finalize_checkpoint(
            plan, out, work_dir=work, overwrite=overwrite, seconds=time.perf_counter() - t0
        )


def checkpoint_info(dst) -> dict:
    """The index of a compressed checkpoint: summary, per-tensor table, files.

    The index, the passthrough file, every copied file and every compressed group's files are
    checked against their recorded sha256 first (format version 2); paths read from the index
    are confined to ``dst``.

    Returns
    -------
    dict
        ``summary`` (bits per parameter, total error, ...), ``tensors`` (one row per original
        tensor), ``files`` (copied non-weight files), the plan's settings, ``format_version``
        and ``checked`` (False for a version-1 index, written before checksums).

    Raises
    ------
    StorageFormatError
        Not a checkpoint index, an unknown version, or wrong types in the index.
    IntegrityError
        A file or the index itself was changed after it was written, or is missing.
    UnsafePathError
        A path in the index leads outside ``dst``.
    """
    index = read_index(dst)
    return {
        "path": str(Path(dst).resolve()),
        "format_version": index["format_version"],
        "checked": index["checked"],
        "summary": index["summary"],
        "plan": index["plan"],
        "files": index["files"],
        "tensors": index["tensors"],
    }


def _reconstruct_writer(cm, dtype: str, shape):
    """A writer that streams the reconstruction of an opened compressed tensor
    (:class:`~lplr_dask.storage.reader.CompressedMatrix`), row slab by row slab, cast to the source
    dtype (float32 reconstruction; bfloat16 rounds to nearest even)."""

    def write(fh):
        lazy = cm.to_dask(dtype=np.float64 if dtype == "F64" else np.float32)
        n, d = shape
        rows = max(1, SLAB_BYTES // (8 * d))
        target = _numpy_dtype(dtype).newbyteorder("<")
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
            pt_header = _read_header(root / PASSTHROUGH_FILE)
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
            writer = _copy_raw(pt_header.path, pt_header.data_start + off[0], off[1] - off[0])
        by_shard.setdefault(t["shard"], []).append((t["name"], t["dtype"], t["shape"], writer))
    with temporary_output(target) as tmp:
        for shard, items in by_shard.items():
            _write_safetensors(tmp / shard, items, index["shard_metadata"].get(shard) or None)
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


# -------------------------------------------------------------------------------- sharding


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
    header = _read_header(file)
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
                        _copy_raw(file, header.data_start + off[0], off[1] - off[0]),
                    )
                )
                weight_map[k] = shard
            _write_safetensors(tmp / shard, items, header.metadata or None)
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
