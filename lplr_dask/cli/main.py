"""The ``lplr`` command line: compress, info, verify, decompress, error, demo, flow run,
checkpoint.

A user's mistake (an :class:`~lplr_dask.errors.LPLRError`) prints one paragraph on stderr and
exits with status 2, without a traceback. ``--json`` prints one JSON object as the last line of
stdout; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from lplr_dask._version import __version__
from lplr_dask.cli.common import (
    cluster_args,
    cluster_client,
    device_arg,
    device_of,
    emit,
    os_error_message,
    progress_callback,
    recover_output,
    show_progress,
)
from lplr_dask.core.params import METHODS, ROUNDINGS, CompressionOptions
from lplr_dask.errors import LPLRError, ParameterError
from lplr_dask.kernels.quantize import QUANTIZERS

__all__ = ["main"]


def _summary_lines(r: dict) -> list[str]:
    bits = f"B={r['bits_left']} B'={r['bits_right']}" if r.get("rank") else ""
    if r.get("bits_matrix"):
        bits = (bits + f" B_nq={r['bits_matrix']}").strip()
    kinds = (r.get("plan") or {}).get("quantizers")
    if kinds:  # what the planner chose for each factor
        bits += " (" + ", ".join(f"{k} {v}" for k, v in kinds.items()) + ")"
    if r.get("n_power_iter"):
        bits += f", {r['n_power_iter']} power iterations"
    stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stage_seconds"].items())
    label = (r.get("plan") or {}).get("method") or r["method"]  # the planner's family
    return [
        f"{label}: {r['shape'][0]}×{r['shape'][1]} → rank {r.get('rank')} {bits}",
        f"  relative Frobenius error {r['rel_fro_error']:.6f}{_error_note(r)}",
        f"  {r['bits_per_entry']:.4f} bits per entry, {r['stored_bytes']:,} bytes stored",
        f"  {r['seconds']:.2f} s ({stages})",
    ]


def _error_note(r: dict) -> str:
    """How a single-pass error was obtained (nothing for the exact two-pass statistics)."""
    if r.get("error_is_estimate"):
        return (
            " (estimated in the single pass from a test sketch; --verify measures it exactly "
            "with a second pass)"
        )
    if r.get("estimated_rel_fro_error") is not None:
        return f" (exact, verify pass; single-pass estimated {r['estimated_rel_fro_error']:.6f})"
    return ""


OPTION_FLAGS = {
    "rank": dict(type=int, metavar="M", help="m, the inner dimension of L·R"),
    "budget": dict(
        type=float,
        metavar="BITS_PER_ENTRY",
        help="choose rank and bits for the lowest error within this budget",
    ),
    "bits_left": dict(type=int, metavar="B", help="bits per entry of L (1-8, or 16)"),
    "bits_right": dict(type=int, metavar="B'", help="bits per entry of R (1-8, or 16)"),
    "bits_matrix": dict(type=int, metavar="B_NQ", help="bits per entry of Q(A): nq, nq+lplr"),
    "method": dict(
        choices=METHODS,
        help="default: auto with --budget (the best of every method within --max-passes, "
        "scored on a column sample), lplr with --rank or --max-error",
    ),
    "seed": dict(type=int),
    "group_size": dict(
        type=int,
        help="entries per scale along rows of R (nq: of A); 0 = one per row (nq: per matrix)",
    ),
    "n_oversamples": dict(type=int),
    "n_power_iter": dict(type=int, help="default 0 (2 for dsvd and lplr-svd)"),
    "rounding": dict(choices=ROUNDINGS),
    "quantizer": dict(
        choices=QUANTIZERS,
        help="the level set of every factor (default: measured per factor; paper: minmax)",
    ),
    "block_shape": dict(
        type=int,
        nargs=2,
        metavar=("ROWS", "COLS"),
        help="canonical block grid of the computation and chunk shape of the factors "
        "(default: at most 4096 4096, in nearly equal blocks)",
    ),
    "max_rank": dict(type=int, help="largest rank --budget or --max-error considers (no cap)"),
    "passes": dict(
        type=int,
        choices=(1, 2),
        help="passes over INPUT: 1 sketches range and co-range in one read (error estimated)",
    ),
    "corange_size": dict(
        type=int,
        metavar="L",
        help="--passes 1: rows of the co-range sketch, rank + 2 to n (default 4·rank + 1)",
    ),
    "max_error": dict(
        type=float,
        metavar="E",
        help="the fewest bits per entry whose relative Frobenius error is at most E (0 < E < 1)",
    ),
    "max_passes": dict(
        type=int,
        metavar="P",
        help="most passes over INPUT of the chosen method (default: unbounded up to 4 GiB, "
        "3 beyond)",
    ),
}
"""The flags of :class:`~lplr_dask.core.params.CompressionOptions`' fields; defaults and
validation come from that class (a flag not given leaves the field at its default)."""


def option_flags(p: argparse.ArgumentParser) -> None:
    """Add a flag for every field of CompressionOptions (``--rank``, ``--budget`` and
    ``--max-error`` are mutually exclusive)."""
    defaults = {f.name: f.default for f in fields(CompressionOptions)}
    assert set(OPTION_FLAGS) == set(defaults), "a CompressionOptions field has no flag"
    size = p.add_mutually_exclusive_group()
    for name, kw in OPTION_FLAGS.items():
        default = defaults[name]
        text = kw.get("help", "")
        if default is not None:
            text = f"{text} (default {default})" if text else f"default {default}"
        target = size if name in ("rank", "budget", "max_error") else p
        target.add_argument(
            "--" + name.replace("_", "-"), default=argparse.SUPPRESS, **{**kw, "help": text}
        )


def options_from(args) -> CompressionOptions:
    """The validated CompressionOptions of the flags given."""
    given = {name: getattr(args, name) for name in OPTION_FLAGS if hasattr(args, name)}
    if "block_shape" in given:
        given["block_shape"] = tuple(given["block_shape"])
    return CompressionOptions.of(None, **given)


def cmd_compress(args) -> int:
    from lplr_dask.core.compress import compress
    from lplr_dask.core.engine import on_device
    from lplr_dask.storage.fs import check_output_path
    from lplr_dask.storage.inputs import open_input

    # Fail fast, before a cluster starts, on the commonest mistakes.
    options = options_from(args)
    matrix = open_input(args.input, allow_missing_chunks=args.allow_missing_chunks)
    on_device(matrix.data, device_of(args))  # --device gpu without CuPy or a GPU
    check_output_path(
        args.output, overwrite=args.overwrite, inputs=[matrix.path] if matrix.path else ()
    )
    with cluster_client(args):
        res = compress(
            args.input,
            args.output,
            options,
            overwrite=args.overwrite,
            resume=args.resume,
            verify=args.verify,
            on_stage=progress_callback(show_progress(args)),
            allow_missing_chunks=args.allow_missing_chunks,
            device=device_of(args),
        )
    record = res.to_dict()
    emit(args, record, [*_summary_lines(record), f"  written to {res.output}"])
    return 0


def cmd_info(args) -> int:
    from lplr_dask.storage.format import bytes_on_disk
    from lplr_dask.storage.reader import NO_CHECKSUMS_NOTE, open_compressed

    recover_output(args.output)
    cm = open_compressed(args.output)
    meta = dict(cm.meta)
    meta["bytes_on_disk"] = bytes_on_disk(args.output)
    meta["checksums"] = cm.checked
    checks = (
        f"  format version {cm.format_version}: attributes checked; every chunk carries a "
        "crc32c checksum (`lplr verify` reads them all)"
        if cm.checked
        else f"  {NO_CHECKSUMS_NOTE}"
    )
    lines = [
        *_summary_lines(meta),
        f"  source dtype {meta['source_dtype']}, seed {meta['seed']}, block {meta['block_shape']}",
        *(
            f"  {name}: {spec['bits']}-bit {spec['granularity']}"
            + (f"({spec['group_size']})" if spec.get("group_size") else "")
            + (" symmetric" if spec["symmetric"] else " asymmetric")
            + (f" {spec['kind']}" if spec.get("kind") else "")
            + (f", {spec['scale_dtype']} scales" if spec.get("scale_dtype") else "")
            for name, spec in meta["factors"].items()
        ),
        f"  codes and scales on disk: {meta['bytes_on_disk']['arrays']:,} bytes "
        f"(+{meta['bytes_on_disk']['metadata']:,} bytes of metadata)",
        checks,
    ]
    emit(args, meta, lines)
    return 0


def cmd_verify(args) -> int:
    from lplr_dask.storage.reader import verify_compressed

    recover_output(args.output)
    res = verify_compressed(args.output)
    emit(args, res, [res["message"]])
    return 0


def cmd_decompress(args) -> int:
    from lplr_dask.storage.reader import decompress

    recover_output(args.output)
    with cluster_client(args):
        t0 = time.perf_counter()
        dest = decompress(args.output, args.dest, overwrite=args.overwrite)
    print(f"wrote {dest} in {time.perf_counter() - t0:.2f} s")
    return 0


def cmd_error(args) -> int:
    from lplr_dask.storage.reader import open_compressed, relative_error

    recover_output(args.output)
    cm = open_compressed(args.output)
    with cluster_client(args):
        t0 = time.perf_counter()
        err = relative_error(args.input, cm, allow_missing_chunks=args.allow_missing_chunks)
    record = {
        "rel_fro_error": err,
        "reported_rel_fro_error": cm.meta["rel_fro_error"],
        "reported_error_is_estimate": bool(cm.meta.get("error_is_estimate", False)),
        "shape": list(cm.shape),
        "seconds": time.perf_counter() - t0,
    }
    how = "estimated in one pass" if record["reported_error_is_estimate"] else "reported"
    emit(
        args,
        record,
        [
            f"relative Frobenius error {err:.6f} ({how} at compression: "
            f"{cm.meta['rel_fro_error']:.6f})"
        ],
    )
    return 0


def cmd_demo(args) -> int:
    from lplr_dask.core.compress import compress
    from lplr_dask.datasets import low_rank_plus_noise

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lplr-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n, d = args.shape
    rows = []
    try:
        with cluster_client(args):
            t0 = time.perf_counter()
            src = workdir / "A.zarr"
            if not src.exists():
                print(
                    f"generating a {n}×{d} float32 low-rank-plus-noise matrix "
                    f"({n * d / 1e6:.0f} M entries) at {src} ...",
                    file=sys.stderr,
                )
                low_rank_plus_noise(
                    src,
                    (n, d),
                    rank=args.true_rank,
                    decay=args.decay,
                    noise=args.noise,
                    seed=args.seed,
                )
            gen = time.perf_counter() - t0
            for method in ("lplr", "paper", "nq"):
                print(
                    f"compressing with {method} at {args.budget} bits per entry ...",
                    file=sys.stderr,
                )
                try:
                    res = compress(
                        src,
                        workdir / f"{method}.zarr",
                        method=method,
                        budget=args.budget,
                        seed=args.seed,
                        overwrite=True,
                        on_stage=progress_callback(show_progress(args)),
                        device=device_of(args),
                    )
                except ParameterError as exc:  # a budget too small for this method
                    rows.append({"method": method, "infeasible": str(exc)})
                else:
                    rows.append(res.to_dict())
        lines = [
            f"{n}×{d} float32 (s_i = {args.decay}^i for i < {args.true_rank}, "
            f"{args.noise:.0%} noise), "
            f"budget {args.budget} bits per entry; generated in {gen:.1f} s",
            "",
            f"{'method':8} {'rank':>5} {'B':>3} {'B′':>3} {'bits/entry':>11} "
            f"{'rel. error':>11} {'seconds':>8}",
        ]
        for r in rows:
            if "infeasible" in r:
                lines.append(f"{r['method']:8} infeasible at this budget")
                continue
            bl = r["bits_left"] or r["bits_matrix"]
            lines.append(
                f"{r['method']:8} {r['rank'] or '-':>5} {bl:>3} {r['bits_right'] or '-':>3} "
                f"{r['bits_per_entry']:>11.4f} {r['rel_fro_error']:>11.4f} {r['seconds']:>8.1f}"
            )
        emit(args, {"shape": [n, d], "budget": args.budget, "results": rows}, lines)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def cmd_flow_run(args) -> int:
    from pipelines.config import load_config

    load_config(args.config)  # a mistake in the file is reported before Prefect starts
    try:
        from pipelines.flows import BatchFailed, compress_matrices
    except ImportError as exc:
        raise ParameterError(
            f"`lplr flow run` needs Prefect ({exc}). Install the flows extra: "
            "pip install 'lplr-dask[flows]'."
        ) from exc
    try:
        results = compress_matrices(config_path=str(Path(args.config).resolve()))
    except BatchFailed as exc:
        print(f"lplr flow run: {exc}", file=sys.stderr)
        return 1
    lines = []
    for r in results:
        lines += [*_summary_lines(r), f"  written to {r['output']}"]
    emit(args, {"config": args.config, "results": results}, lines)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lplr", description="Low-rank, low-precision compression of large matrices on Dask."
    )
    parser.add_argument("--version", action="version", version=f"lplr-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="compress a Zarr matrix into packed low-bit factors L·R")
    p.add_argument("input", help="Zarr v3 array (or group holding one array) or .npy file")
    p.add_argument("output", help="new Zarr group for the compressed factors")
    option_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep finished stages if the run fails, and reuse those of an earlier failed run "
        "with the same input and parameters",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the error by an independent pass over INPUT before publishing",
    )
    p.add_argument(
        "--allow-missing-chunks",
        action="store_true",
        help="read chunks missing from a Zarr INPUT as its fill value (default: refuse them; "
        "zarr leaves out all-fill-value chunks unless written with write_empty_chunks)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    cluster_args(p)
    device_arg(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("info", help="describe a compressed group")
    p.add_argument("output")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "verify", help="read every chunk of a compressed group: checksums and attributes"
    )
    p.add_argument("output")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("decompress", help="write the reconstruction as a dense Zarr array")
    p.add_argument("output")
    p.add_argument("dest")
    p.add_argument("--overwrite", action="store_true")
    cluster_args(p)
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("error", help="independent blockwise check of ‖A − LR‖_F / ‖A‖_F")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument(
        "--allow-missing-chunks",
        action="store_true",
        help="read chunks missing from a Zarr INPUT as its fill value (as compress did)",
    )
    p.add_argument("--json", action="store_true")
    cluster_args(p)
    p.set_defaults(func=cmd_error)

    p = sub.add_parser("demo", help="generate a large low-rank-plus-noise matrix and compress it")
    p.add_argument("--shape", type=int, nargs=2, default=(16384, 16384), metavar=("N", "D"))
    p.add_argument("--true-rank", type=int, default=512)
    p.add_argument("--decay", type=float, default=0.99, help="singular values decay^i")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the data here (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json", action="store_true")
    cluster_args(p)
    device_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("flow", help="run Prefect flows (flows extra)")
    flow_sub = p.add_subparsers(dest="flow_command", required=True)
    p = flow_sub.add_parser(
        "run", help="run the compress-matrices flow on a YAML configuration (configs/)"
    )
    p.add_argument("config", help="YAML configuration, such as configs/demo.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_flow_run)

    from lplr_dask.cli.checkpoint import add_parser as add_checkpoint_parser

    add_checkpoint_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LPLRError as exc:
        print(f"lplr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        message = os_error_message(exc)
        if message is None:  # not a file-system condition: a bug, keep its traceback
            raise
        print(f"lplr {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lplr: interrupted; nothing was published.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
