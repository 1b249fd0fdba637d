"""Single-pass (``passes=1``) against two-pass compression: error, estimate, bits, time.

One process, one ``distributed.LocalCluster`` (default 2 workers × 1 thread), one Zarr matrix
(default 8192 × 8192 float32 in 4096² chunks, singular values 0.99^i for i < 512 plus 5% of
‖A‖_F in noise, generated once and read from the page cache afterwards). For every rank
(default 64 and 128), at 8/8 bits with the same seed and the same quantizer in both modes
(``--quantizer``, default ``normal``):

  two-pass        ``compress(A, rank=M)``: sketch pass + projection pass; its error is exact.
  one-pass ℓ=…    ``compress(A, rank=M, passes=1)``: one pass computing Y = A·S, W = Ψ·A and
                  the test sketch Γ·A; R = (Ψ·L̂)⁺·W. Its reported error is the estimate; the
                  exact error comes from an independent pass afterwards
                  (``lplr_dask.storage.reader.relative_error``, not timed). Rows for the
                  default ℓ = 4M + 1 and for Tropp et al.'s ℓ = 2M + 1 (``--corange-factors``).

Columns: ℓ, bits per entry (stored bytes; equal rank stores the same L and R, so equal rank is
equal bits), the exact error, the estimate and estimate/exact, the ratio of the exact error to
the two-pass error at the same rank (the goal: ≤ 1.25), the theory's √(1 + M/(ℓ − M − 1))
for that ratio before quantization, and the compress wall time. The same single-pass L̂ is the
two-pass L̂ (same seed), so the ratio isolates the one-pass solve for R.

Equal bits, other ranks: the last table lists every run by bits per entry, so the single-pass
run at rank M can be compared with the two-pass run at a rank of about the same cost.

The last line is the same figures as JSON. Timings are wall clock on a shared machine; the
matrix is in the page cache, so these runs are compute-bound, not disk-bound: the single pass
does (M + q)·n·d multiply-adds and 8·n·d additions (the sparse sign Ψ) in one read against
2M·n·d multiply-adds in two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from distributed import Client, LocalCluster

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Workdir, print_table, write_matrix

from lplr_dask import compress
from lplr_dask.core.single_pass import CORANGE_FACTOR
from lplr_dask.storage.reader import relative_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", type=int, nargs=2, default=(8192, 8192), metavar=("N", "D"))
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--bits", type=int, nargs=2, default=(8, 8), metavar=("B", "B_PRIME"))
    p.add_argument(
        "--corange-factors",
        type=int,
        nargs="+",
        default=[CORANGE_FACTOR, 2],
        help="ℓ = c·M + 1 for each c (the default ℓ first)",
    )
    p.add_argument(
        "--quantizer",
        default="normal",
        help="the quantizer of every factor, the same in both modes (lloyd, the two-pass "
        "default for R, is not offered with passes=1); 'default' for each mode's default",
    )
    p.add_argument("--true-rank", type=int, default=512)
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/lplr-bench-single-pass")
    p.add_argument("--keep", action="store_true", help="keep the matrix and outputs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    n, d = args.shape
    work = Workdir(args.workdir, keep=args.keep)
    rows, runs = [], []
    try:
        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
            ) as cluster,
            Client(cluster),
        ):
            src = work / "A.zarr"
            if not src.exists():
                gen = write_matrix(
                    src,
                    n,
                    d,
                    true_rank=args.true_rank,
                    decay=args.decay,
                    noise=args.noise,
                    seed=args.seed,
                )
                print(f"# generated {n}×{d} float32 in {gen:.1f} s at {src}")
            bl, br = args.bits
            for m in args.ranks:
                kw = dict(rank=m, bits_left=bl, bits_right=br, seed=args.seed, overwrite=True)
                if args.quantizer != "default":
                    kw["quantizer"] = args.quantizer
                two = compress(src, work / f"two-{m}.zarr", **kw)
                runs.append(("two-pass", m, None, two.bits_per_entry, two.rel_fro_error))
                rows.append(
                    [f"two-pass M={m}", "-", f"{two.bits_per_entry:.4f}",
                     f"{two.rel_fro_error:.5f}", "-", "-", "1.000", "-", f"{two.seconds:.2f}"]
                )  # fmt: skip
                for c in args.corange_factors:
                    ell = min(c * m + 1, n)
                    out = work / f"one-{m}-{c}.zarr"
                    one = compress(src, out, passes=1, corange_size=ell, **kw)
                    t0 = time.perf_counter()
                    exact = relative_error(src, out)
                    check = time.perf_counter() - t0
                    theory = np.sqrt(1 + m / (ell - m - 1))
                    ratio = exact / two.rel_fro_error
                    est = one.estimated_rel_fro_error
                    runs.append(("one-pass", m, ell, one.bits_per_entry, exact))
                    rows.append(
                        [f"one-pass M={m} ℓ={c}M+1", ell, f"{one.bits_per_entry:.4f}",
                         f"{exact:.5f}", f"{est:.5f}", f"{est / exact:.3f}", f"{ratio:.3f}",
                         f"{theory:.3f}", f"{one.seconds:.2f} (+{check:.2f} exact check)"]
                    )  # fmt: skip
    finally:
        work.cleanup()
    print_table(
        f"{n}×{d} float32, s_i = {args.decay}^i (i < {args.true_rank}) + {args.noise:.0%} noise, "
        f"B/B' = {args.bits[0]}/{args.bits[1]} ({args.quantizer}), seed {args.seed}, "
        f"{args.workers} workers",
        ["run", "ℓ", "bits/entry", "exact error", "estimate", "est/exact", "vs two-pass",
         "theory", "seconds"],
        rows,
    )  # fmt: skip
    print_table(
        "Equal bits: every run by bits per entry",
        ["run", "rank", "ℓ", "bits/entry", "exact error"],
        [
            [mode, m, ell or "-", f"{b:.4f}", f"{e:.5f}"]
            for mode, m, ell, b, e in sorted(runs, key=lambda r: (r[3], r[0]))
        ],
    )
    print(
        json.dumps(
            {
                "shape": [n, d],
                "bits": list(args.bits),
                "quantizer": args.quantizer,
                "runs": [
                    dict(mode=mode, rank=m, corange_size=ell, bits_per_entry=b, rel_fro_error=e)
                    for mode, m, ell, b, e in runs
                ],
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
