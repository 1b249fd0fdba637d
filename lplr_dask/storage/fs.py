"""File-system transactions: output paths, temporary siblings, atomic publish, recovery.

Everything lplr-dask writes (compressed groups, dense reconstructions, checkpoints) is built
under a temporary name and moved into place by :func:`publish` only when complete.

Overwrite rules (:func:`check_output_path`): an existing OUTPUT is replaced only with
``overwrite=True`` and only when lplr-dask wrote it (:func:`lplr_output_kind`); never ``/``, the
home directory, the working directory or one of its parents, a symbolic link or an input.

Publishing (:func:`publish`) keeps, at every instant, either the old or the new OUTPUT under
its name. On Linux the complete new tree is first renamed to a hidden sibling
``.NAME.lplr-swap-HOST-PID-HEX`` and then exchanged with OUTPUT in one
``renameat2(RENAME_EXCHANGE)`` call; the old tree, now under the swap name, is deleted
afterwards. Where the exchange is not available (another OS, an old kernel, a file system
without it) a journal ``.NAME.lplr-publish.json`` naming the old and new trees is written
first, then OUTPUT is renamed to ``.NAME.lplr-old-HEX`` and the new tree to OUTPUT (for an
instant OUTPUT is absent then, and the journal says how to finish). :func:`recover_publish`
finishes or rolls back a publish that a killed process left half done; :func:`check_output_path`
calls it, so every writer recovers before it starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

from lplr_dask.errors import ForeignOutputError, OutputExistsError

__all__ = [
    "OUTPUT_KINDS",
    "USE_RENAME_EXCHANGE",
    "check_output_path",
    "describe_path",
    "exchange_paths",
    "lplr_output_kind",
    "owned_sibling",
    "publish",
    "recover_publish",
    "scratch_dir",
    "temporary_output",
    "write_json_atomic",
]

#: What :func:`lplr_output_kind` recognises: kind → how to recognise it.
OUTPUT_KINDS = {
    "compressed": 'zarr.json attributes["lplr_dask"]["format"] == "lplr-dask"',
    "dense": 'zarr.json attributes["lplr_dask"]["format"] == "lplr-dask-dense"',
    "checkpoint": 'lplr_checkpoint.json with "format": "lplr-dask-checkpoint"',
    "restored": 'lplr_restored.json with "format": "lplr-dask-restored"',
}

#: Set to False to publish with the journal even where ``renameat2`` exists (tests use it).
USE_RENAME_EXCHANGE = True

_ZARR_FORMATS = {"lplr-dask": "compressed", "lplr-dask-dense": "dense"}
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_JOURNAL_FORMAT = "lplr-dask-publish"
_STALE_JOURNAL_SECONDS = 600.0
_STALE_TEMP_SECONDS = 60.0


# ----------------------------------------------------------------------- recognising outputs


def _read_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def lplr_output_kind(path: str | os.PathLike) -> str | None:
    """What lplr-dask output ``path`` is, or None when lplr-dask did not write it.

    Parameters
    ----------
    path : str or path-like
        A candidate OUTPUT. A symbolic link is never an output (None), whatever it points to.

    Returns
    -------
    str or None
        ``"compressed"`` (a group of ``lplr compress``), ``"dense"`` (a ``decompress`` DEST),
        ``"checkpoint"`` (a compressed checkpoint), ``"restored"`` (a restored checkpoint), or
        None (absent, a file, a link, or anything else: a user's folder, a foreign Zarr store,
        an unreadable marker). See :data:`OUTPUT_KINDS`.
    """
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return None
    zj = _read_json(p / "zarr.json") if (p / "zarr.json").is_file() else None
    if isinstance(zj, dict):
        attrs = zj.get("attributes")
        meta = attrs.get("lplr_dask") if isinstance(attrs, dict) else None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if isinstance(fmt, str) and fmt in _ZARR_FORMATS:
            return _ZARR_FORMATS[fmt]
    for name, fmt, kind in (
        ("lplr_checkpoint.json", "lplr-dask-checkpoint", "checkpoint"),
        ("lplr_restored.json", "lplr-dask-restored", "restored"),
    ):
        if (p / name).is_file() and not (p / name).is_symlink():
            marker = _read_json(p / name)
            if isinstance(marker, dict) and marker.get("format") == fmt:
                return kind
    return None


def describe_path(path: str | os.PathLike, *, max_entries: int = 6) -> str:
    """A short description of what is at ``path``, for error messages.

    Examples: ``"an ordinary folder holding 3 entries: a.txt, b/, c.npy"``, ``"a file of
    1,024 bytes"``, ``"a symbolic link to /data/x"``, ``"a Zarr store that lplr-dask did not
    write, holding 2 entries: zarr.json, c/"``.
    """
    p = Path(path)
    if p.is_symlink():
        return f"a symbolic link to {os.readlink(p)}"
    if p.is_file():
        return f"a file of {p.stat().st_size:,} bytes"
    if not p.is_dir():
        return "something that is neither a file nor a folder" if p.exists() else "nothing"
    try:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
    except OSError as exc:
        return f"a folder that cannot be listed ({exc.strerror})"
    names = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries]
    if not names:
        return "an empty folder"
    what = (
        "a Zarr store that lplr-dask did not write"
        if "zarr.json" in names
        else ("an ordinary folder")
    )
    shown = ", ".join(names[:max_entries])
    more = f" and {len(names) - max_entries} more" if len(names) > max_entries else ""
    return f"{what}, holding {len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}{more}"


def _protected(out: Path) -> str | None:
    """Why ``out`` (absolute, parent resolved) must never be replaced, or None."""
    resolved = out.resolve()
    if resolved == Path(resolved.anchor):
        return "the root of the file system"
    homes = {Path.home()}
    if os.environ.get("HOME"):
        homes.add(Path(os.environ["HOME"]))
    for home in homes:
        with contextlib.suppress(OSError, RuntimeError):
            home = home.resolve()
            if resolved == home:
                return "your home directory"
            if resolved in home.parents:
                return f"a parent of your home directory {home}"
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        if resolved == cwd:
            return "the current working directory"
        if resolved in cwd.parents:
            return f"a parent of the current working directory {cwd}"
    return None


def check_output_path(output: str | os.PathLike, *, overwrite: bool, inputs=()) -> Path:
    """Check that OUTPUT may be written, and return it as an absolute path.

    Recovers a publish of OUTPUT that a killed process left half done
    (:func:`recover_publish`) first.

    Parameters
    ----------
    output : str or path-like
        The path to write.
    overwrite : bool
        Whether an existing OUTPUT may be replaced; it is replaced only when lplr-dask wrote it
        (:func:`lplr_output_kind`).
    inputs : iterable of paths, optional
        Paths that are read: OUTPUT may not be one of them, inside one or hold one.

    Returns
    -------
    pathlib.Path
        OUTPUT, absolute, with its parent folder resolved (its last component is not
        followed, so a symbolic link is refused rather than written through).

    Raises
    ------
    OutputExistsError
        OUTPUT exists and ``overwrite`` is False, overlaps an input, or its folder is missing
        or not writable.
    ForeignOutputError
        ``overwrite=True`` for a path that lplr-dask did not write, a symbolic link, ``/``,
        the home directory, the working directory or one of its parents.
    """
    raw = Path(os.path.abspath(os.fspath(output)))
    parent = raw.parent
    if parent.exists() and not parent.is_dir():
        raise OutputExistsError(
            f"Cannot write OUTPUT {output}: {parent} is {describe_path(parent)}, not a folder. "
            "Choose an OUTPUT inside an existing folder."
        )
    if not parent.is_dir():
        raise OutputExistsError(
            f"The folder {parent} for OUTPUT {output} does not exist; create it first "
            f"(mkdir -p {parent}) or choose another OUTPUT."
        )
    out = parent.resolve() / raw.name if raw.name else parent.resolve()
    recover_publish(out)
    why = _protected(out)
    if why is not None and (overwrite or os.path.lexists(out)):
        raise ForeignOutputError(
            f"OUTPUT {output} is {why} ({out}); lplr-dask never replaces it, even with "
            "--overwrite. Give the path of a new folder inside it, such as "
            f"{out / 'result.zarr'}."
        )
    if out.is_symlink():
        raise (ForeignOutputError if overwrite else OutputExistsError)(
            f"OUTPUT {output} is a symbolic link to {os.readlink(out)}; lplr-dask does not write "
            "through or replace links. Give the link's target, or another path, as OUTPUT."
        )
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputExistsError(
                f"OUTPUT {output} overlaps INPUT {src}: writing there could destroy the input. "
                "Choose an OUTPUT outside the input's folder."
            )
    if os.path.lexists(out):
        ours = lplr_output_kind(out) is not None
        if ours and not overwrite:
            raise OutputExistsError(
                f"OUTPUT {output} already exists. Pass --overwrite (overwrite=True) to replace "
                "it once the new result is complete, or choose another path."
            )
        if not ours:
            raise (ForeignOutputError if overwrite else OutputExistsError)(
                f"OUTPUT {output} already exists and lplr-dask did not write it: it is "
                f"{describe_path(out)}. lplr-dask replaces only its own results (a compressed "
                "group, a decompressed array, a compressed or restored checkpoint), even with "
                "--overwrite, so it was left untouched. Choose a new path, or move or delete it "
                "yourself if it is no longer needed."
            )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(
            f"Cannot write OUTPUT {output}: the folder {parent} is not writable by this user. "
            "Check the folder's permissions or choose another OUTPUT."
        )
    return out


# ------------------------------------------------------------------------- temporary trees


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owned_sibling(output: Path, role: str) -> Path:
    """``.NAME.lplr-ROLE-HOST-PID-HEX`` beside ``output``: a hidden sibling that
    :func:`recover_publish` may remove once the process that made it is gone."""
    tag = f"{role}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return output.parent / f".{output.name}.lplr-{tag}"


@contextlib.contextmanager
def temporary_output(output: Path):
    """A fresh temporary directory beside ``output``; removed if the block fails."""
    output = Path(output)
    tmp = owned_sibling(output, "tmp")
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
    output = Path(output)
    tmp = owned_sibling(output, "work")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON so that ``path`` is either absent/old or complete (rename)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, default=float))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ publishing


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the call or the flag is unsupported."""
    if not USE_RENAME_EXCHANGE or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns
    -------
    bool
        True if swapped; False where the exchange is not available (another OS, an old
        kernel or C library, a file system without it, or ``USE_RENAME_EXCHANGE = False``):
        nothing was changed then.
    """
    return _renameat2(Path(a), Path(b), _RENAME_EXCHANGE)


def _journal(output: Path) -> Path:
    return output.parent / f".{output.name}.lplr-publish.json"


def _old_name(output: Path) -> Path:
    return output.parent / f".{output.name}.lplr-old-{uuid.uuid4().hex[:12]}"


def publish(tmp: Path, output: Path) -> None:
    """Move a complete ``tmp`` into place as ``output``, replacing an older ``output``.

    At every instant either the old or the new ``output`` is in place under its name (see the
    module's description); a kill at any point is repaired by :func:`recover_publish`.

    Parameters
    ----------
    tmp : path
        The complete new tree, on the same file system as ``output``.
    output : path
        Where it goes. An existing ``output`` must be an lplr-dask output.

    Raises
    ------
    ForeignOutputError
        ``output`` exists (it appeared after :func:`check_output_path`) and lplr-dask did not
        write it; it is left untouched.
    """
    tmp, output = Path(tmp), Path(output)
    if not os.path.lexists(output):
        if not _renameat2(tmp, output, _RENAME_NOREPLACE):
            os.rename(tmp, output)
        return
    if output.is_symlink() or lplr_output_kind(output) is None:
        raise ForeignOutputError(
            f"{output} appeared while lplr-dask was writing and lplr-dask did not write it (it "
            f"is {describe_path(output)}); it was left untouched and nothing was published. "
            "Choose another path, or move it away and rerun."
        )
    swap = owned_sibling(output, "swap")
    os.rename(tmp, swap)
    try:
        swapped = exchange_paths(swap, output)
    except BaseException:
        os.rename(swap, tmp)
        raise
    if swapped:
        shutil.rmtree(swap, ignore_errors=True)  # the old tree
        return
    old = _old_name(output)
    journal = _journal(output)
    write_json_atomic(
        journal,
        {
            "format": _JOURNAL_FORMAT,
            "output": output.name,
            "old": old.name,
            "new": swap.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        },
    )
    os.rename(output, old)
    try:
        os.rename(swap, output)
    except BaseException:
        os.rename(old, output)
        os.rename(swap, tmp)
        journal.unlink(missing_ok=True)
        raise
    journal.unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _journal_live(journal: Path, info: dict) -> bool:
    """Whether the process that wrote ``journal`` may still be publishing."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return _pid_alive(info["pid"])
    try:
        age = time.time() - journal.stat().st_mtime
    except OSError:
        return False
    return age < _STALE_JOURNAL_SECONDS


def recover_publish(output: str | os.PathLike) -> list[str]:
    """Finish or roll back a publish of ``output`` that a killed process left half done.

    With a journal ``.NAME.lplr-publish.json`` (fallback mode) whose process is gone: if
    ``output`` is missing, the new tree (complete: it is journaled only when complete) or
    else the old one is renamed to ``output``; then the other one and the journal are
    removed. Without a journal: the swap folders ``.NAME.lplr-swap-HOST-PID-*`` (the old
    tree after an exchange, or an unpublished new one) and temporary trees
    ``.NAME.lplr-tmp-HOST-PID-*`` and ``.NAME.lplr-work-HOST-PID-*`` of processes of this host
    that are gone are removed, and old trees ``.NAME.lplr-old-*`` are removed when ``output``
    is in place, or the newest is renamed back to ``output`` when it is missing. A resumable
    job's work folder (``.NAME.lplr-work-KEY``) is never touched. Cheap when there is nothing
    to do (one listing of the parent folder); never raises for an unreadable folder.

    Parameters
    ----------
    output : str or path-like

    Returns
    -------
    list of str
        What was done, one sentence each (empty when nothing was needed).
    """
    output = Path(os.path.abspath(os.fspath(output)))
    parent, name = output.parent, output.name
    if not name:
        return []
    prefix = f".{name}.lplr-"
    try:
        siblings = [e.name for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    if not siblings:
        return []
    done: list[str] = []
    journal = _journal(output)
    if journal.name in siblings:
        info = _read_json(journal)
        if isinstance(info, dict) and info.get("format") == _JOURNAL_FORMAT:
            if _journal_live(journal, info):
                return []
            old = parent / str(info.get("old", ""))
            new = parent / str(info.get("new", ""))
            safe = all(p.parent == parent and p.name.startswith(prefix) for p in (old, new))
            if safe and not os.path.lexists(output):
                if new.is_dir():
                    os.rename(new, output)
                    done.append(f"completed an interrupted publish: moved {new.name} to {name}")
                elif old.is_dir():
                    os.rename(old, output)
                    done.append(f"rolled back an interrupted publish: moved {old.name} to {name}")
            if safe:
                for p in (old, new):
                    if p.is_dir() and os.path.lexists(output):
                        shutil.rmtree(p, ignore_errors=True)
                        done.append(f"removed {p.name}, left by an interrupted publish")
        journal.unlink(missing_ok=True)
        siblings = [s for s in os.listdir(parent) if s.startswith(prefix)]
    owned_re = re.compile(re.escape(prefix) + r"(swap|tmp|work)-([0-9a-f]{8})-(\d+)-[0-9a-f]+$")
    host = _host_tag()
    for s in sorted(siblings):
        m = owned_re.match(s)
        if not m or m.group(2) != host or _pid_alive(int(m.group(3))):
            continue
        if m.group(1) == "swap" and not os.path.lexists(output):
            continue  # keep it: it may be the only copy (OUTPUT was removed by hand)
        shutil.rmtree(parent / s, ignore_errors=True)
        what = "publish" if m.group(1) == "swap" else "writer"
        done.append(f"removed {s}, left by an interrupted {what}")
    stale = time.time() - _STALE_TEMP_SECONDS
    for s in siblings:
        if s.startswith(journal.name + ".tmp-"):
            with contextlib.suppress(OSError):
                if (parent / s).stat().st_mtime < stale:
                    (parent / s).unlink()
                    done.append(f"removed {s}, left by an interrupted publish")
    old_re = re.compile(re.escape(prefix) + r"old-[0-9a-f]+$")
    olds = [parent / s for s in siblings if old_re.match(s) and (parent / s).is_dir()]
    if olds and not os.path.lexists(output):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, output)
        olds.remove(newest)
        done.append(f"restored {name} from {newest.name}, left by an interrupted publish")
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, left by an interrupted publish")
    return done
