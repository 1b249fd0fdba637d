"""File-system transactions: output paths, temporary siblings, atomic publish.

Everything lplr-dask writes (compressed groups, dense reconstructions, checkpoints) is built
under a temporary sibling of its destination and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

from .errors import OutputExistsError

__all__ = [
    "check_output_path",
    "publish",
    "scratch_dir",
    "temporary_output",
    "write_json_atomic",
]


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
