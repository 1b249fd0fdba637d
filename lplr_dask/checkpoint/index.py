"""The index of a compressed checkpoint (``lplr_checkpoint.json``): its names, paths and
checksums, read and checked before anything else.

Format version 2 records the SHA-256 of the index's own canonical JSON (``index_sha256``) and
of every file it points to (the passthrough tensors, the copied files, every file of every
compressed tensor group). :func:`read_index` checks, in this order and before any other read
or write: the index's own checksum; its JSON types and names; that every path is a plain
relative name that stays inside the checkpoint once symbolic links are resolved; and every
file against its checksum. Version-1 indexes (written before checksums) are read with the
type and path checks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lplr_dask.errors import IntegrityError, StorageFormatError, UnsafePathError

__all__ = [
    "DTYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HF_INDEX",
    "INDEX_NAME",
    "PASSTHROUGH_FILE",
    "READABLE_VERSIONS",
    "check_relative",
    "check_shard_name",
    "file_checksums",
    "index_is_checked",
    "index_sha256",
    "inside",
    "is_int",
    "read_index",
]

INDEX_NAME = "lplr_checkpoint.json"
FORMAT_NAME = "lplr-dask-checkpoint"
FORMAT_VERSION = 2
"""Version 2 adds ``index_sha256`` and ``checksums``; version 1 indexes are read unchecked."""
READABLE_VERSIONS = (1, 2)
HF_INDEX = "model.safetensors.index.json"
PASSTHROUGH_FILE = "passthrough.safetensors"

# safetensors dtype → (itemsize, numpy dtype name or None when NumPy has no such type)
DTYPES = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}


_READ_BYTES = 1 << 24  # files are hashed in slabs of 16 MiB


def is_int(x) -> bool:
    """An int that is not a bool (JSON integers)."""
    return isinstance(x, int) and not isinstance(x, bool)


# ------------------------------------------------------------------ paths and checksums

_SHARD_RE = re.compile(r"[^/\\\x00]+\.safetensors")
_GROUP_RE = re.compile(r"tensors/[A-Za-z0-9_-][A-Za-z0-9._-]*\.zarr")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_shard_name(value, *, where: str, fix: str = "") -> str:
    """A shard name is a plain file name ending ``.safetensors``: no folder, no ``..``."""
    if (
        not isinstance(value, str)
        or not _SHARD_RE.fullmatch(value)
        or value.startswith(".")
        or "\x00" in value
    ):
        raise UnsafePathError(
            f"{where} is {value!r}, which is not a plain shard file name (NAME.safetensors, no "
            "folder, no '..', not hidden): it could read or write outside its folder. "
            + (fix or "The index was edited or crafted; restore it from a backup or recompress.")
        )
    return value


def check_relative(value, *, where: str) -> str:
    """A relative path of plain components: not absolute, no ``..``, ``.``, empty component,
    backslash or NUL. Raises :class:`UnsafePathError` naming ``where`` and the value."""
    bad = not isinstance(value, str) or not value
    if not bad:
        parts = value.split("/")
        bad = (
            value.startswith("/")
            or "\\" in value
            or "\x00" in value
            or re.match(r"^[A-Za-z]:", value) is not None
            or any(p in ("", ".", "..") for p in parts)
        )
    if bad:
        raise UnsafePathError(
            f"{where} is {value!r}, which is not a plain relative path (it is absolute, empty, "
            "or holds '..', '.', a backslash or NUL) and could lead outside its folder. The "
            "index was edited or crafted; restore it from a backup or recompress."
        )
    return value


def inside(base: Path, rel: str, *, where: str) -> Path:
    """``base / rel`` after resolving symbolic links, refused unless it stays inside ``base``."""
    root = base.resolve()
    path = (base / rel).resolve()
    if path != root and root not in path.parents:
        raise UnsafePathError(
            f"{where} is {rel!r}, and {base / rel} leads to {path}, outside {root} (through a "
            "symbolic link). lplr-dask never writes links there; remove the link and restore "
            "the real file from a backup, or recompress."
        )
    return base / rel


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_READ_BYTES):
            h.update(block)
    return h.hexdigest()


def index_sha256(index: Mapping) -> str:
    """The sha256 of the index's canonical JSON (sorted keys, no spaces), ``index_sha256``
    left out."""
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _group_files(root: Path, group: str, *, where: str) -> list[str]:
    """Every file under a compressed group, relative to it, sorted; links are refused."""
    gdir = inside(root, group, where=where)
    if gdir.is_symlink() or not gdir.is_dir():
        raise IntegrityError(
            f"{root / group} ({where}) is missing, not a folder, or a link: the checkpoint "
            "was changed after it was written. Restore it from a backup or recompress."
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(gdir):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                inside(root, str(p.relative_to(root)), where=where)
                raise IntegrityError(
                    f"{p} ({where}) is a symbolic link; lplr-dask never writes links in a "
                    "compressed group. Replace it with the real file from a backup, or recompress."
                )
        found += [str((Path(dirpath) / f).relative_to(gdir)) for f in filenames]
    return sorted(found)


def file_checksums(root: Path, files: Sequence[str], groups: Sequence[str]) -> dict:
    """sha256 of every listed file and of every file of every group, as stored in the index."""
    return {
        "files": {rel: _file_sha256(root / rel) for rel in files},
        "groups": {
            g: {f: _file_sha256(root / g / f) for f in _group_files(root, g, where=g)}
            for g in groups
        },
    }


def _changed(path, what: str) -> IntegrityError:
    return IntegrityError(
        f"{path} {what}: it was changed after it was written. Restore it from a backup or "
        "recompress the checkpoint."
    )


def _index_error(p: Path, what: str) -> StorageFormatError:
    return StorageFormatError(
        f"{p} is not a valid lplr-dask checkpoint index: {what}. It was edited or written by "
        "something else; restore it from a backup or recompress."
    )


def _validate_index(index: Mapping, p: Path) -> None:
    """Types, names and paths of a parsed index (everything restore relies on)."""
    kinds = {
        "tensors": list,
        "files": list,
        "sharded": bool,
        "index_metadata": dict,
        "shard_metadata": dict,
        "summary": dict,
        "plan": dict,
    }
    for key, kind in kinds.items():
        if not isinstance(index.get(key), kind):
            got = repr(index.get(key))[:60]
            raise _index_error(p, f"{key!r} must be a JSON {kind.__name__}, not {got}")
    names, groups, shards = set(), set(), set()
    for i, t in enumerate(index["tensors"]):
        where = f"{p.name}: tensors[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _index_error(p, f"tensors[{i}] is not a tensor record with a name")
        where = f"{p.name}: tensor {t['name']!r}"
        if t["name"] in names:
            raise _index_error(p, f"tensor {t['name']!r} is listed twice")
        names.add(t["name"])
        shape, dtype = t.get("shape"), t.get("dtype")
        if not isinstance(shape, list) or any(not is_int(s) or s < 0 for s in shape):
            raise _index_error(p, f"tensor {t['name']!r} has an invalid shape {shape!r}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _index_error(p, f"tensor {t['name']!r} has an unknown dtype {dtype!r}")
        shards.add(check_shard_name(t.get("shard"), where=f"{where} shard"))
        storage = t.get("storage")
        if storage == "compressed":
            group = t.get("group")
            if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
                raise UnsafePathError(
                    f"{where} group is {group!r}, which is not tensors/NAME.zarr (NAME of "
                    "letters, digits, '.', '_', '-'): it could lead outside the checkpoint. The "
                    "index was edited or crafted; restore it from a backup or recompress."
                )
            if group in groups:
                raise _index_error(p, f"group {group} is used by two tensors")
            groups.add(group)
            if len(shape) != 2:
                raise _index_error(p, f"compressed tensor {t['name']!r} has shape {shape}, not 2-D")
        elif storage == "passthrough":
            if t.get("file") != PASSTHROUGH_FILE:
                raise UnsafePathError(
                    f"{where} file is {t.get('file')!r}; passthrough tensors live in "
                    f"{PASSTHROUGH_FILE} only. The index was edited or crafted; restore it from "
                    "a backup or recompress."
                )
        else:
            raise _index_error(p, f"tensor {t['name']!r} has storage {storage!r}")
    for key in _SUMMARY_NUMBERS:
        if not _is_number(index["summary"].get(key)):
            raise _index_error(p, f"summary.{key} is {index['summary'].get(key)!r}, not a number")
    if not isinstance(index["summary"].get("method"), str):
        raise _index_error(p, "summary.method is not a string")
    for t in index["tensors"]:
        if t["storage"] == "compressed":
            for key in ("bits_per_entry", "rel_fro_error", "error2", "stored_bytes"):
                if not _is_number(t.get(key)):
                    raise _index_error(p, f"tensor {t['name']!r}: {key} is not a number")
    for shard, meta in index["shard_metadata"].items():
        if meta is not None and not isinstance(meta, dict):
            raise _index_error(p, f"shard_metadata[{shard!r}] is not an object")
    reserved = shards | {HF_INDEX, INDEX_NAME}
    files = index["files"]
    for i, rel in enumerate(files):
        check_relative(rel, where=f"{p.name}: files[{i}]")
        if rel.split("/")[0] in reserved:
            raise UnsafePathError(
                f"{p.name}: files[{i}] is {rel!r}, which would overwrite a restored weight file "
                "or index. The index was edited or crafted; restore it from a backup or "
                "recompress."
            )
    if len(set(files)) != len(files):
        raise _index_error(p, "'files' lists a file twice")
    folders = {"/".join(rel.split("/")[:k]) for rel in files for k in range(1, rel.count("/") + 1)}
    clash = sorted(set(files) & folders)
    if clash:
        raise _index_error(p, f"'files' lists {clash[0]!r} both as a file and as a folder")
    if index.get("format_version", 0) >= 2:
        sums = index.get("checksums")
        want_files = set(files) | (
            {PASSTHROUGH_FILE}
            if any(t["storage"] == "passthrough" for t in index["tensors"])
            else set()
        )
        ok = (
            isinstance(sums, dict)
            and isinstance(sums.get("files"), dict)
            and isinstance(sums.get("groups"), dict)
            and set(sums["files"]) == want_files
            and set(sums["groups"]) == groups
            and all(isinstance(v, str) and _SHA_RE.fullmatch(v) for v in sums["files"].values())
            and all(
                isinstance(g, dict)
                and all(isinstance(v, str) and _SHA_RE.fullmatch(v) for v in g.values())
                for g in sums["groups"].values()
            )
        )
        if not ok:
            raise _index_error(p, "its 'checksums' do not cover exactly its files and groups")
        for g, entries in sums["groups"].items():
            for rel in entries:
                check_relative(rel, where=f"{p.name}: checksums of {g}")


_SUMMARY_NUMBERS = (
    "budget",
    "bits_per_parameter",
    "overall_bits_per_parameter",
    "compressed_parameters",
    "total_parameters",
    "total_error2",
    "seconds",
)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _verify_files(root: Path, index: Mapping) -> None:
    """Confine every path of the index to ``root`` (links resolved) and, for a checked index,
    compare every file's sha256 and every group's file list with the recorded ones."""
    p = root / INDEX_NAME
    groups = [t["group"] for t in index["tensors"] if t["storage"] == "compressed"]
    has_pt = any(t["storage"] == "passthrough" for t in index["tensors"])
    files = [*([PASSTHROUGH_FILE] if has_pt else []), *index["files"]]
    for rel in files:
        path = inside(root, rel, where=f"{p.name}: file")
        if not path.is_file():
            raise IntegrityError(
                f"{path}, listed in {p}, is missing: the compressed checkpoint is incomplete. "
                "Restore the file from a backup or recompress."
            )
    listed = {g: _group_files(root, g, where=f"{p.name}: group") for g in groups}
    if index["format_version"] < 2:
        return  # written before checksums: confined, but unchecked
    sums = index["checksums"]
    for rel in files:
        if _file_sha256(root / rel) != sums["files"][rel]:
            raise _changed(root / rel, "does not match the sha256 recorded in the index")
    for g in groups:
        want = sums["groups"][g]
        missing = sorted(set(want) - set(listed[g]))
        if missing:
            raise IntegrityError(
                f"{root / g / missing[0]} is missing ({len(missing)} file(s) of group {g} "
                "missing): the compressed checkpoint was changed after it was written. Restore "
                "it from a backup or recompress the checkpoint."
            )
        extra = sorted(set(listed[g]) - set(want))
        if extra:
            raise _changed(root / g / extra[0], "was not written by lplr-dask (not in the index)")
        for rel in listed[g]:
            if _file_sha256(root / g / rel) != want[rel]:
                raise _changed(root / g / rel, "does not match the sha256 recorded in the index")


# ------------------------------------------------------------------------------- reading


def read_index(dst) -> dict:
    """Parse, check and confine a checkpoint index; every check runs before any other read.

    Version 2: the index's own sha256, then types, names and paths (confined to DST, links
    resolved), then the sha256 of the passthrough file, of every copied file and of every file
    of every compressed group. Version 1 (written before checksums): types, names and paths
    only; ``index["checked"]`` is then False.
    """
    root = Path(dst)
    p = root / INDEX_NAME
    if not p.is_file():
        raise StorageFormatError(
            f"{dst} is not a compressed checkpoint (no {INDEX_NAME}); give the DST of "
            "`lplr checkpoint compress`."
        )
    try:
        index = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise StorageFormatError(f"{p} cannot be read: {exc}") from exc
    except ValueError as exc:  # not UTF-8, truncated or not JSON
        raise IntegrityError(
            f"{p} is damaged (not valid UTF-8 JSON: {exc}): it was changed after it was "
            "written. Restore it from a backup or recompress the checkpoint."
        ) from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise StorageFormatError(f"{p} is not an lplr-dask checkpoint index.")
    version = index.get("format_version")
    if not is_int(version) or version not in READABLE_VERSIONS:
        raise StorageFormatError(
            f"{p} has format version {version!r}; this lplr-dask reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Upgrade lplr-dask or recompress."
        )
    if version >= 2 and index.get("index_sha256") != index_sha256(index):
        raise _changed(p, "does not match its own recorded sha256 (index_sha256)")
    _validate_index(index, p)
    _verify_files(root, index)
    index["checked"] = version >= 2
    return index


def index_is_checked(dst) -> bool:
    """Whether the checkpoint index at ``dst`` carries checksums (format version 2 or later).

    Cheap (reads the index only, checks nothing): for messages such as "unchecked".

    Parameters
    ----------
    dst : str or path
        A compressed checkpoint directory.

    Returns
    -------
    bool
        False for a version-1 index (written before checksums) or an unreadable one.
    """
    try:
        index = json.loads((Path(dst) / INDEX_NAME).read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "index_sha256" in index
