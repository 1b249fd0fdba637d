"""Pieces shared by the commands of ``lplr`` (:mod:`lplr_dask.cli` and
:mod:`lplr_dask.cli.checkpoint`): cluster flags and the client they describe, progress, output,
messages for file-system errors, recovery of an interrupted publish."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys

from lplr_dask.cluster import DEVICE_SETTINGS, compute_device
from lplr_dask.errors import LPLRError

__all__ = [
    "cluster_args",
    "cluster_client",
    "emit",
    "os_error_message",
    "progress_callback",
    "quiet_project_errors",
    "recover_output",
    "show_progress",
]


_OS_ERROR_FIXES = {
    errno.EACCES: "Check the permissions of the path and of its folder, or choose another path.",
    errno.EPERM: "Check the permissions of the path and of its folder, or choose another path.",
    errno.EROFS: "The file system is mounted read-only; choose a path on a writable disk.",
    errno.ENOSPC: "The disk is full; free some space or write to another disk, then rerun. "
    "Nothing was published: an existing OUTPUT is unchanged.",
    errno.EDQUOT: "Your disk quota is used up; free some space or write to another disk, "
    "then rerun. Nothing was published: an existing OUTPUT is unchanged.",
    errno.ENOTDIR: "A part of the path is a file, not a folder; check the path.",
    errno.EISDIR: "The path is a folder where a file was expected; check the path.",
    errno.ENOENT: "Check the path: the file or folder does not exist (or was removed while "
    "lplr ran).",
    errno.EEXIST: "Something already exists there; choose another path.",
    errno.ENOTEMPTY: "The folder is not empty; choose another path.",
    errno.ENAMETOOLONG: "Choose a shorter path.",
    errno.ELOOP: "The path has a loop of symbolic links; check the path.",
    errno.EXDEV: "Keep OUTPUT on the same file system as its folder's temporary files.",
    errno.EIO: "The disk reported an input/output error; check the disk (dmesg) and rerun.",
    errno.EMFILE: "Too many open files; raise the limit (ulimit -n) and rerun.",
}


def os_error_message(exc: OSError) -> str | None:
    """One paragraph for an :class:`OSError` of the file system (a permission, a full or
    read-only disk, a path that is not a folder), or None for any other ``OSError``."""
    fix = _OS_ERROR_FIXES.get(exc.errno)
    if fix is None:
        return None
    what = exc.strerror or errno.errorcode.get(exc.errno, "error")
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    verb = (
        "cannot write"
        if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT)
        else ("cannot access")
    )
    return f"{verb} {where}: {what}. {fix}"


def recover_output(path) -> None:
    """Finish or roll back an interrupted publish of ``path`` (a note on stderr if any)."""
    from lplr_dask.storage.fs import recover_publish

    for note in recover_publish(path):
        print(f"lplr: {path}: {note}", file=sys.stderr)


def progress_callback(enabled: bool):
    """An ``on_stage`` callback that shows a progress bar per stage on stderr, or None."""
    if not enabled:
        return None

    def on_stage(stage, futures):
        from distributed.diagnostics.progressbar import progress

        print(f"{stage}:", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):
            progress(futures, notebook=False)
        print(file=sys.stderr)

    return on_stage


def device_arg(p) -> None:
    """Add ``--device`` (where A's tiles are computed) to the subparser ``p``."""
    p.add_argument(
        "--device",
        choices=DEVICE_SETTINGS,
        default="auto",
        help="where A's tiles are computed: 'gpu' copies them to the GPU as they are read "
        "(CuPy; GPU extra); 'auto' (default) is 'gpu' with --cluster cuda, else 'cpu'",
    )


def device_of(args) -> str:
    """``--device``, with ``auto`` resolved by ``--cluster``."""
    return compute_device(args.device, args.cluster)


def cluster_args(p, *, default="local", help=None, progress=True):
    """Add ``--cluster``, ``--workers``, ``--threads``, ``--memory-limit`` (and the progress
    flags) to the subparser ``p``."""
    p.add_argument(
        "--cluster",
        default=default,
        help=help
        or "'local' (a new LocalCluster, default), 'cuda' (LocalCUDACluster; GPU "
        "extra) or a scheduler ADDRESS such as tcp://127.0.0.1:8786",
    )
    p.add_argument("--workers", type=int, default=None, help="local cluster: worker processes")
    p.add_argument("--threads", type=int, default=None, help="local cluster: threads per worker")
    p.add_argument("--memory-limit", default="auto", help="local cluster: memory per worker")
    if not progress:
        return
    p.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars on stderr (default: when stderr is a terminal)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false")


class _ProjectErrorLogFilter(logging.Filter):
    """Drops a worker's "Compute Failed" log record (with its traceback) when the task
    raised an LPLRError: the error reaches this process and is printed as one paragraph."""

    def filter(self, record):
        if not isinstance(record.msg, str):
            return True
        if record.msg.startswith("Async instruction for") and "CancelledError" in (
            record.getMessage()
        ):
            return False  # the other tasks, cancelled after the error
        if not record.msg.startswith("Compute Failed"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        names = []
        stack = [LPLRError]
        while stack:
            cls = stack.pop()
            names.append(f"{cls.__name__}(")
            stack.extend(cls.__subclasses__())
        return not (len(args) > 3 and str(args[3]).startswith(tuple(names)))


def quiet_project_errors() -> None:
    """Install, in a Dask worker process, the filter that keeps a project error raised in a
    task (a damaged chunk, a missing input chunk) from being logged there with a traceback."""
    for name in ("distributed.worker", "distributed.worker.state_machine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ProjectErrorLogFilter) for f in logger.filters):
            logger.addFilter(_ProjectErrorLogFilter())


@contextlib.contextmanager
def cluster_client(args):
    """The ``distributed.Client`` that the cluster flags of :func:`cluster_args` describe
    (:func:`lplr_dask.cluster.dask_client`), with :func:`quiet_project_errors` on its workers."""
    from lplr_dask.cluster import dask_client

    with dask_client(
        args.cluster,
        n_workers=args.workers,
        threads_per_worker=args.threads,
        memory_limit=args.memory_limit,
    ) as client:
        with contextlib.suppress(Exception):  # best effort: a worker may refuse client.run
            client.run(quiet_project_errors)
        yield client


def show_progress(args) -> bool:
    """``--progress``/``--no-progress``, or whether stderr is a terminal."""
    return sys.stderr.isatty() if args.progress is None else args.progress


def emit(args, record: dict, lines: list[str]) -> None:
    """Print ``record`` as one JSON line with ``--json``, else the human ``lines``."""
    if args.json:
        print(json.dumps(record, default=float))
    else:
        print("\n".join(lines))
