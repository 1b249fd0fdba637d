"""What do the per-chunk checksums of format 2 cost? compress and decompress with and without.

One process, one ``distributed.LocalCluster`` (default 2 workers × 1 thread), one Zarr matrix
(default 8192 × 8192 float32 from :func:`lplr_dask.datasets.low_rank_plus_noise`, 4096² chunks):

    compress lplr     ``lplr_dask.compress(A, method="lplr", rank=128)`` (bits 8/8)
    compress nq       ``lplr_dask.compress(A, method="nq", bits_matrix=4)`` (group-wise ranges)
    decompress        ``storage.reader.decompress`` of the lplr output: every factor chunk read
                      (and, with checksums, CRC-checked) and the dense n × d array written

each timed with the ``crc32c`` codec on every array (the format) and without it
(``storage.format.CHECKSUM_CODECS = False``, a switch for this benchmark only, read where the
arrays are created and opened: in this driver process; the array metadata carries the codec to
the workers). After one untimed warm-up compression, the two variants run interleaved (their
order alternating), ``--repeat`` rounds (default 3), and the table keeps the best (smallest)
wall time of each with the ratio with/without. Outputs are removed before each run (not
timed). The matrix is read from the page cache (it was just written).

Timings are wall-clock on a shared machine: compare the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Workdir, print_table, write_matrix


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=8192, help="rows of A")
    p.add_argument("--d", type=int, default=8192, help="columns of A")
    p.add_argument("--chunk", type=int, default=4096, help="chunk (and block) size of A")
    p.add_argument("--rank", type=int, default=128, help="rank of the lplr compression")
    p.add_argument("--bits-matrix", type=int, default=4, help="bits per entry of nq")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is kept")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--workdir", default="bench-checksums-work")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args(argv)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    from distributed import Client, LocalCluster

    import lplr_dask.storage.format as storage
    from lplr_dask import compress
    from lplr_dask.storage.reader import decompress

    work = Workdir(args.workdir, args.keep)
    block = (args.chunk, args.chunk)
    try:
        with (
            LocalCluster(
                n_workers=args.workers,
                threads_per_worker=args.threads,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            Client(cluster),
        ):
            src = work.path / "A.zarr"
            work.entries.append(src)
            gen = write_matrix(src, args.n, args.d, chunk=args.chunk)
            print(f"generated {args.n}×{args.d} float32 in {gen:.1f} s", file=sys.stderr)
            ops = {
                "compress lplr": lambda out: compress(
                    src, out, method="lplr", rank=args.rank, block_shape=block
                ),
                "compress nq": lambda out: compress(
                    src, out, method="nq", bits_matrix=args.bits_matrix, block_shape=block
                ),
            }
            best: dict[tuple[str, bool], float] = {}
            on_disk: dict[bool, dict] = {}
            warm = work.path / "warmup.zarr"  # worker imports, first-touch memory: untimed
            ops["compress lplr"](warm)
            shutil.rmtree(warm, ignore_errors=True)
            for r in range(args.repeat):
                for checks in (True, False) if r % 2 == 0 else (False, True):
                    storage.CHECKSUM_CODECS = checks
                    tag = "crc" if checks else "plain"
                    lplr_out = work.path / f"lplr-{tag}.zarr"
                    for op, fn in ops.items():
                        out = lplr_out if op == "compress lplr" else work.path / f"nq-{tag}.zarr"
                        shutil.rmtree(out, ignore_errors=True)
                        work.entries.append(out)
                        s = _timed(lambda fn=fn, out=out: fn(out))
                        best[op, checks] = min(s, best.get((op, checks), float("inf")))
                        print(
                            f"round {r}: {op:14} checksums={checks!s:5} {s:7.2f} s", file=sys.stderr
                        )
                    on_disk[checks] = storage.bytes_on_disk(lplr_out)
                    dest = work.path / f"dense-{tag}.zarr"
                    shutil.rmtree(dest, ignore_errors=True)
                    work.entries.append(dest)
                    s = _timed(lambda out=lplr_out, dest=dest: decompress(out, dest))
                    best["decompress", checks] = min(s, best.get(("decompress", checks), 1e300))
                    print(
                        f"round {r}: {'decompress':14} checksums={checks!s:5} {s:7.2f} s",
                        file=sys.stderr,
                    )
            storage.CHECKSUM_CODECS = True
    finally:
        storage.CHECKSUM_CODECS = True
        work.cleanup()
    rows = [
        [
            op,
            f"{best[op, True]:.2f}",
            f"{best[op, False]:.2f}",
            f"{best[op, True] / best[op, False]:.3f}",
        ]
        for op in ("compress lplr", "compress nq", "decompress")
    ]
    title = (
        f"{args.n}×{args.d} float32, {args.chunk}² chunks, lplr rank {args.rank}, "
        f"nq {args.bits_matrix} bits; {args.workers} workers × {args.threads} threads; "
        f"best of {args.repeat}"
    )
    print_table(title, ["operation", "crc32c (s)", "no checksum (s)", "ratio"], rows)
    crc = on_disk[True]
    print(
        f"lplr output: {crc['arrays']:,} bytes of codes and scales, {crc['checksums']:,} bytes "
        f"of checksums, {crc['metadata']:,} bytes of metadata"
    )
    print(
        json.dumps(
            {
                "shape": [args.n, args.d],
                "best_seconds": {
                    f"{op}|{'crc32c' if c else 'none'}": s for (op, c), s in best.items()
                },
                "ratios": {r[0]: float(r[3]) for r in rows},
                "lplr_bytes_on_disk": crc,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
