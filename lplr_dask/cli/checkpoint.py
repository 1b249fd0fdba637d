"""``lplr checkpoint compress|restore|info``: whole safetensors checkpoints.

:func:`add_parser` registers the ``checkpoint`` command on the subparsers of
:func:`lplr_dask.cli.build_parser`. Errors a user can cause are :class:`~lplr_dask.errors.LPLRError`
subclasses, which :func:`lplr_dask.cli.main` prints as one paragraph with exit status 2.
``--json`` prints one JSON object as the last line of stdout.
"""

from __future__ import annotations

import contextlib
import sys

from lplr_dask.cli.common import cluster_args as cli_cluster_args
from lplr_dask.cli.common import cluster_client as cli_client
from lplr_dask.cli.common import emit, recover_output
from lplr_dask.errors import ParameterError

__all__ = ["add_parser", "parse_override"]

_INT_KEYS = ("rank", "bits_left", "bits_right", "bits_matrix", "group_size")


def parse_override(text: str) -> tuple[str, object]:
    """``PATTERN=skip`` or ``PATTERN=method:nq,bits_matrix:4`` → (pattern, spec)."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern or not spec:
        raise ParameterError(
            f"--override {text!r} must be PATTERN=skip or PATTERN=KEY:VALUE[,KEY:VALUE...], "
            "e.g. 'encoder.*.query.weight=method:nq,bits_matrix:4'."
        )
    if spec == "skip":
        return pattern, "skip"
    out: dict[str, object] = {}
    for part in spec.split(","):
        key, colon, value = part.partition(":")
        key = key.strip().replace("-", "_")
        if not colon or not value:
            raise ParameterError(
                f"--override {text!r}: {part!r} is not KEY:VALUE (such as bits_matrix:4)."
            )
        try:
            out[key] = (
                int(value) if key in _INT_KEYS else float(value) if key == "budget" else value
            )
        except ValueError as exc:
            raise ParameterError(
                f"--override {text!r}: {key} needs a number, got {value!r}."
            ) from exc
    return pattern, out


@contextlib.contextmanager
def _scheduler(args):
    """The threaded scheduler (``--cluster threads``, default) or a distributed client."""
    if args.cluster == "threads":
        import dask

        with dask.config.set(scheduler="threads"):
            yield
        return
    with cli_client(args):
        yield


def _summary(s: dict, tensors) -> list[str]:
    from lplr_dask.checkpoint import mean_rel_error2

    return [
        f"{s['method']} at budget {s['budget']:g}: {s['bits_per_parameter']:.4f} bits per "
        f"compressed parameter ({s['compressed_parameters']:,} of {s['total_parameters']:,}); "
        f"{s['overall_bits_per_parameter']:.4f} bits per parameter overall",
        f"  relative error per parameter (RMS) {mean_rel_error2(tensors) ** 0.5:.4f}; total "
        f"squared error {s['total_error2']:.6g}; {s['seconds']:.1f} s",
    ]


def cmd_compress(args) -> int:
    from lplr_dask.checkpoint import compress_checkpoint, plan_checkpoint
    from lplr_dask.checkpoint.policy import TensorPolicy
    from lplr_dask.storage.fs import check_output_path

    policy = TensorPolicy(
        min_size=args.min_size,
        include=tuple(args.include or ()),
        exclude=tuple(args.exclude or ()),
        compress_embeddings=not args.no_embeddings,
        overrides=dict(parse_override(o) for o in args.override or ()),
    )
    # Validate everything (paths, index, shapes, dtypes, budget) before any work starts.
    check_output_path(args.dst, overwrite=args.overwrite, inputs=[args.src])
    kw = dict(
        budget=args.budget,
        method=args.method,
        policy=policy,
        candidate_budgets=tuple(args.candidate_budgets or (2.0, 3.0, 4.0)),
        seed=args.seed,
        group_size=args.group_size,
    )
    plan_checkpoint(args.src, **kw)

    def progress(event):
        if not args.json:
            print(
                f"[{event['step']} {event['done']}/{event['total']}] {event['name']} "
                f"({event['path']}, {event['seconds']:.2f} s)",
                file=sys.stderr,
                flush=True,
            )

    with _scheduler(args):
        res = compress_checkpoint(
            args.src,
            args.dst,
            work_dir=args.work_dir,
            stage_threshold_bytes=int(args.stage_threshold_mib * 2**20),
            overwrite=args.overwrite,
            on_tensor=progress,
            **kw,
        )
    record = res.to_dict()
    lines = [res.table(), "", *_summary(record, res.tensors), f"  written to {res.output}"]
    emit(args, record, lines)
    return 0


def cmd_restore(args) -> int:
    import time

    from lplr_dask.checkpoint import restore_checkpoint
    from lplr_dask.checkpoint.index import index_is_checked

    recover_output(args.dst)
    t0 = time.perf_counter()
    with _scheduler(args):
        out = restore_checkpoint(args.dst, args.out, overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    checked = index_is_checked(args.dst)
    emit(
        args,
        {"output": out, "seconds": seconds, "checked": checked},
        [
            f"restored a safetensors checkpoint to {out} in {seconds:.1f} s",
            *([] if checked else [_UNCHECKED.format(dst=args.dst)]),
        ],
    )
    return 0


_UNCHECKED = (
    "  note: {dst} was written by an older lplr-dask (checkpoint format version 1) without "
    "checksums: its files were not checked. Recompress it to get checked storage."
)


def cmd_info(args) -> int:
    from lplr_dask.checkpoint import checkpoint_info, tensor_table

    recover_output(args.dst)
    info = checkpoint_info(args.dst)
    emit(
        args,
        info,
        [
            tensor_table(info["tensors"]),
            "",
            *_summary(info["summary"], info["tensors"]),
            f"  files copied: {', '.join(info['files']) or 'none'}",
            "  integrity: every file matches the sha256 recorded in the index"
            if info["checked"]
            else _UNCHECKED.format(dst=args.dst),
        ],
    )
    return 0


def _cluster_args(p):
    cli_cluster_args(
        p,
        default="threads",
        help="'threads' (a thread pool in this process, default), 'local' (a LocalCluster of "
        "worker processes: one task per tensor spread over them), 'cuda' (tensors are still "
        "compressed on the CPU, one thread per GPU worker: prefer 'local'), or a scheduler "
        "ADDRESS",
        progress=False,
    )


def add_parser(sub) -> None:
    """Register ``checkpoint`` and its subcommands on ``sub`` (argparse subparsers)."""
    from lplr_dask.checkpoint.policy import CHECKPOINT_METHODS

    ck = sub.add_parser("checkpoint", help="compress or restore a safetensors model checkpoint")
    ck_sub = ck.add_subparsers(dest="checkpoint_command", required=True)

    p = ck_sub.add_parser(
        "compress",
        help="compress a Hugging Face-style safetensors checkpoint directory",
        description="Compress every 2-D weight of a safetensors checkpoint (sharded or not); "
        "other tensors and files are copied unchanged.",
    )
    p.add_argument("src", help="checkpoint directory (model.safetensors or shards + index)")
    p.add_argument("dst", help="new compressed checkpoint directory")
    p.add_argument(
        "--budget",
        type=float,
        required=True,
        metavar="BITS_PER_PARAMETER",
        help="bits per compressed parameter over all compressed tensors",
    )
    p.add_argument(
        "--method",
        default="auto",
        choices=CHECKPOINT_METHODS,
        help="auto (default): method, rank, bits and quantizer kind per tensor, chosen to "
        "minimise the relative error per parameter within --budget; or one method for all",
    )
    p.add_argument(
        "--candidate-budgets",
        type=float,
        nargs="+",
        metavar="B",
        help="auto: budgets at which the planner scores the low-rank methods for each "
        "tensor's curve, besides --budget (default 2 3 4)",
    )
    p.add_argument("--include", action="append", metavar="PATTERN", help="glob or re:REGEX")
    p.add_argument("--exclude", action="append", metavar="PATTERN", help="glob or re:REGEX")
    p.add_argument("--min-size", type=int, default=4096, help="smallest tensor compressed")
    p.add_argument(
        "--no-embeddings", action="store_true", help="pass embedding tables through unchanged"
    )
    p.add_argument(
        "--override",
        action="append",
        metavar="PATTERN=SPEC",
        help="per-tensor setting: PATTERN=skip or PATTERN=method:nq,bits_matrix:4 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument(
        "--work-dir", help="keep estimates and compressions here to reuse them (default: temporary)"
    )
    p.add_argument(
        "--stage-threshold-mib",
        type=float,
        default=256,
        help="tensors larger than this (or than a worker's memory allows) are staged into "
        "tiled Zarr and compressed out of core; smaller ones run as one Dask task each",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    _cluster_args(p)
    p.set_defaults(func=cmd_compress)

    p = ck_sub.add_parser("restore", help="write a standard safetensors checkpoint back")
    p.add_argument("dst", help="compressed checkpoint directory")
    p.add_argument("out", help="new checkpoint directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    _cluster_args(p)
    p.set_defaults(func=cmd_restore)

    p = ck_sub.add_parser("info", help="describe a compressed checkpoint")
    p.add_argument("dst")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
