"""Buffered against ``O_DIRECT`` reads of an input that fits in memory, side by side.

Usage (as root: it drops the page cache before every cold run)::

    python benchmarks/out_of_core_disk.py --shape 65536 32768 --workdir /tmp/oc --skip-svd
    python benchmarks/read_modes.py --input /tmp/oc/A.zarr --repeat 2

An uncompressed input smaller than the machine's memory is read through the page cache
(:func:`lplr_dask.storage.inputs.direct_read_bytes`), which keeps it for the next pass; a
larger one with ``O_DIRECT``. This runs ``compress(A, rank=M)`` (two passes) and
``compress(A, rank=M, passes=1)`` on the local cluster of ``lplr compress``, alternating the
two read modes (``DIRECT_READ_BYTES`` None or 0, set before the input is opened): from a cold
page cache, then the two-pass mode from a warm one (the input read once beforehand). Prints
each run's wall time and its stages over half a second, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lplr_dask import compress
from lplr_dask.cluster import dask_client
from lplr_dask.storage import inputs

MODES = {"buffered": None, "direct": 0}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(path: Path) -> None:
    for f in sorted(path.glob("c/**/*")):
        if f.is_file():
            f.read_bytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default="/tmp/oc/A.zarr")
    ap.add_argument("--output", default=None, help="default: beside the input")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    src = Path(args.input)
    out = args.output or str(src.parent / "read-modes-out.zarr")
    runs = []
    plan = [("cold", p, m) for p in (2, 1) for _ in range(args.repeat) for m in MODES]
    plan += [("warm", 2, m) for _ in range(args.repeat) for m in MODES]
    with dask_client("local", dashboard_address=None):
        for cache, passes, mode in plan:
            inputs.DIRECT_READ_BYTES = MODES[mode]
            if cache == "cold":
                drop_caches()
            else:
                warm(src)
            t0 = time.perf_counter()
            r = compress(str(src), out, rank=args.rank, passes=passes, overwrite=True)
            wall = time.perf_counter() - t0
            stages = {k: round(v, 1) for k, v in r.stage_seconds.items() if v > 0.5}
            runs.append(
                dict(cache=cache, passes=passes, mode=mode, seconds=wall, error=r.rel_fro_error)
            )
            print(f"{cache} passes={passes} {mode:8s} {wall:6.1f} s  {stages}", flush=True)
    inputs.DIRECT_READ_BYTES = None
    print(json.dumps({"input": str(src), "rank": args.rank, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
