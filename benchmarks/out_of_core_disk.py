"""Out of core at the speed of the disk: a matrix larger than memory, every pass read cold.

Default: A is 65536 × 131072 float32 (2^33 entries, 32 GiB; 4096² uncompressed Zarr v3
chunks) on a 24 GiB, 2-core machine, so the page cache cannot hold it and every pass over A
reads the disk. A is generated once (tile by tile, ``lplr_dask.datasets.low_rank_plus_noise``:
singular values 0.95^i for i < 64 plus 10 % of ‖A‖_F in noise) into ``WORKDIR/A.zarr`` with a
marker ``A.zarr.complete.json`` and reused by later runs with the same parameters.

One run, one local cluster made by ``lplr_dask.cluster.dask_client("local")`` (the defaults of
``lplr compress``: 2 workers × 2 threads on 2 cores, one BLAS thread per task). Before every
step the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, as root). Steps:

  floor             the one-pass I/O floor: every chunk file of A read once, in grid order,
                    by ``--readers`` (4) threads in this process into a 64 MiB buffer with
                    ``O_DIRECT`` (past the page cache, as the library reads an input larger
                    than memory); measured first and again last, as the disk's speed moves.
                    Also once buffered by 2 threads (like two ``cat``s: the issue's floor).
  read pass         A read through ``lplr_dask.storage.inputs.open_input`` on the cluster
                    (the checked reader, Dask), no arithmetic.

Every step is held to passes × the fastest complete read of A in the run: the floors or the
library's read pass, whichever was fastest (here the read pass: 2 worker processes × 2
threads reading beat 4 or 8 reader threads in one process).
  two-pass          ``compress(A, rank=M)`` (sketch pass + projection pass; error exact).
  one-pass          ``compress(A, rank=M, passes=1)`` (Y = A·S, W = Ψ·A and the test sketch
                    in one pass; its error is the single-pass estimate).
  exact error       ``lplr_dask.storage.reader.relative_error`` of the one-pass output: one
                    more pass, not counted in the one-pass time.
  svd_compressed    ``dask.array.linalg.svd_compressed(da.from_zarr(A), k=M, compute=True)``
                    (n_power_iter=0, n_oversamples=10: two passes; ``compute=True`` re-reads A
                    instead of holding it; ``compute=False`` would keep every tile in memory
                    between its two uses), U, S, V persisted on the same cluster. Its error by
                    one more blockwise pass (not counted). A failure (a killed worker, an
                    out-of-memory error, the ``--timeout``) is caught and reported.

Tables:

- ``steps``: wall seconds, the floor it is held to (passes × the fastest read) and
  the ratio, the errors, bits per entry, and the peak RSS of every process during the step
  (the driver holds the client, the scheduler and the nannies; each worker is its own
  process): sampled every 0.2 s (psutil) and the kernel's high-water mark (VmHWM, reset
  before each step).
- ``where the time goes``: per step, the bytes the processes read from the disk (``/proc``
  ``read_bytes``) and the achieved GB/s, the workers' CPU seconds over (wall × cores), and the
  compute floor: the per-tile arithmetic of that step (GEMMs, float64 row norms, the sparse
  sign product) timed on an in-memory tile inside both workers at once, times the tiles, over
  the workers. A step at its I/O floor with idle CPU is
  disk-bound; one at its compute floor with the CPU saturated is GEMM-bound.
- ``goals`` (issue 12): two-pass ≤ 1.2 × 2 floors, one-pass ≤ 1.2 × 1 floor, peak RSS ≤ 2 GiB
  per process, single-pass exact error ≤ 1.25 × the two-pass error at equal rank; and the
  comparison at equal bits: the same rank and bit widths store the same codes and scales (the
  two-pass R adds its 2^B′-level codebook, as the bits per entry show).

The last line is everything as one JSON object. A small run: ``--shape 8192 16384 --workdir
/tmp/ooc-small --skip-svd``. Run it on a quiet machine: other processes take the disk and the
cores (the load average is printed at the start and the end).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    GiB,
    MiB,
    RssSampler,
    Workdir,
    fmt_mib,
    print_table,
    reset_hwm,
    vm_hwm,
    write_matrix,
)

GENERATOR = {"true_rank": 64, "decay": 0.95}
GOAL_TIME_RATIO = 1.2
GOAL_RSS = 2 * GiB
GOAL_ERROR_RATIO = 1.25


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", type=int, nargs=2, default=(65536, 131072), metavar=("N", "D"))
    p.add_argument("--chunk", type=int, default=4096, help="Zarr chunk (square) of A")
    p.add_argument("--rank", type=int, default=256)
    p.add_argument(
        "--workdir",
        default="/work/ooc-data",
        help="holds A.zarr (kept and reused) and this run's outputs (removed at the end)",
    )
    p.add_argument("--skip-svd", action="store_true", help="leave out svd_compressed")
    p.add_argument(
        "--readers", type=int, default=4, help="parallel O_DIRECT readers of the I/O floor"
    )
    p.add_argument("--workers", type=int, default=None, help="default: lplr's local cluster")
    p.add_argument("--threads", type=int, default=None, help="per worker; default: lplr's")
    p.add_argument("--memory-limit", default="auto", help="per worker, as lplr compress")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per step")
    p.add_argument(
        "--no-drop-cache",
        action="store_true",
        help="do not drop the page cache before each step (needs root); the reads may then "
        "come from memory and the floors mean nothing",
    )
    p.add_argument("--noise", type=float, default=0.1, help="fraction of ‖A‖_F that is noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the matrix


def ensure_matrix(args, path: Path) -> dict:
    """Reuse A at ``path`` if its marker names the same parameters, else generate it."""
    n, d = args.shape
    want = {
        "n": n,
        "d": d,
        "chunk": args.chunk,
        **GENERATOR,
        "noise": args.noise,
        "seed": args.seed,
    }
    marker = path.with_name(path.name + ".complete.json")
    if marker.exists():
        got = json.loads(marker.read_text())
        if {k: got.get(k) for k in want} == want:
            return {"reused": True, "generate_seconds": got.get("generate_seconds")}
        raise SystemExit(
            f"{path} holds another matrix ({got}); give another --workdir or remove it."
        )
    if path.exists():
        raise SystemExit(
            f"{path} exists without {marker.name} (an interrupted generation?); remove it and "
            "rerun."
        )
    from lplr_dask.cluster import dask_client

    print(f"# generating A ({n} × {d} float32, {n * d * 4 / GiB:.1f} GiB) ...", flush=True)
    with dask_client("local", dashboard_address=None):
        seconds = write_matrix(
            path,
            n,
            d,
            chunk=args.chunk,
            true_rank=GENERATOR["true_rank"],
            decay=GENERATOR["decay"],
            noise=args.noise,
            seed=args.seed,
        )
    marker.write_text(json.dumps({**want, "generate_seconds": seconds}))
    return {"reused": False, "generate_seconds": seconds}


def chunk_files(path: Path) -> list[str]:
    """Every chunk file of the Zarr array at ``path`` (all files but its zarr.json), in grid
    order (``c/0/2`` before ``c/0/10``: the order they were written and the library reads)."""

    def grid_order(name):
        return [int(p) if p.isdigit() else -1 for p in Path(name).relative_to(path).parts]

    return sorted(
        (
            os.path.join(root, f)
            for root, _, files in os.walk(path)
            for f in files
            if f != "zarr.json"
        ),
        key=grid_order,
    )


# ----------------------------------------------------------------------------- measuring


def drop_page_cache(enabled: bool) -> bool:
    if not enabled:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError as exc:
        print(f"# could not drop the page cache ({exc}); run as root", flush=True)
        return False
    return True


def read_floor(files: list[str], readers: int, *, direct: bool = False) -> int:
    """Read every file once, ``readers`` threads taking every readers-th file; returns bytes.
    ``direct``: with O_DIRECT (into a page-aligned buffer, past the page cache), as the
    library reads raw chunks of an input larger than memory."""
    import mmap

    totals = [0] * readers
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)

    def read(k):
        buf = mmap.mmap(-1, 64 * MiB)  # page-aligned
        for name in files[k::readers]:
            fd = os.open(name, flags)
            try:
                while got := os.readv(fd, [buf]):
                    totals[k] += got
            finally:
                os.close(fd)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(readers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(totals)


def _tree(psutil):
    me = psutil.Process(os.getpid())
    return [me, *me.children(recursive=True)]


def counters() -> dict[int, tuple[float, int]]:
    """{pid: (CPU seconds, bytes read from storage)} of this process and its descendants."""
    import psutil

    out = {}
    for p in _tree(psutil):
        try:
            cpu = p.cpu_times()
            out[p.pid] = (cpu.user + cpu.system, p.io_counters().read_bytes)
        except psutil.Error:
            continue
    return out


def _tile_kernel_seconds(tile: int, rank: int, corange: int, test_rows: int, repeat: int = 3):
    """Run on a worker: best-of-``repeat`` seconds of each step's per-tile arithmetic on an
    in-memory float32 tile, with one BLAS thread (as the library's tasks): the GEMMs, the
    float64 row sums of squares, and the single pass's sparse sign product."""
    from threadpoolctl import threadpool_limits

    from lplr_dask.core.single_pass import CORANGE_NNZ
    from lplr_dask.kernels.linalg import sparse_rows_product
    from lplr_dask.kernels.random import sparse_sign_rows

    rng = np.random.default_rng(0)
    a = rng.standard_normal((tile, tile), dtype=np.float32)
    s = rng.standard_normal((tile, rank), dtype=np.float32)
    s10 = rng.standard_normal((tile, rank + 10), dtype=np.float32)
    lt = rng.standard_normal((rank, tile), dtype=np.float32)
    gt = rng.standard_normal((test_rows, tile), dtype=np.float32)
    cols, vals = sparse_sign_rows(0, 0, tile, corange, nnz=CORANGE_NNZ)
    kernels = {
        "sketch GEMM": lambda: a @ s,
        "row norms": lambda: np.einsum("ij,ij->i", a, a, dtype=np.float64),
        "project GEMM": lambda: lt @ a,
        "sparse sign": lambda: sparse_rows_product(cols, vals, corange, a),
        "test GEMM": lambda: gt @ a,
        "svd GEMM": lambda: a @ s10,
    }
    out = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for name, fn in kernels.items():
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            out[name] = best
    return out


class Steps:
    """Runs the steps on one cluster: cache dropped before each, RSS sampled, counters read."""

    def __init__(self, args, client, roles):
        self.args = args
        self.client = client
        self.roles = roles
        self.sampler = RssSampler(args.interval)
        self.sampler.start()
        self.records: dict[str, dict] = {}

    def run(self, name: str, fn, *, passes: float = 0):
        rec: dict = {"passes": passes}
        rec["cache_dropped"] = drop_page_cache(not self.args.no_drop_cache)
        pids = list(counters())
        rec["hwm_reset"] = all(reset_hwm(p) for p in pids)
        before = counters()
        outcome: dict = {}

        def target():
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # reported below
                outcome["error"] = f"{type(exc).__name__}: {exc}"[:600]

        print(f"# {time.strftime('%H:%M:%S')} {name} ...", flush=True)
        t0 = time.time()
        self.sampler.mark(name)
        th = threading.Thread(target=target, daemon=True, name=name)
        th.start()
        th.join(self.args.timeout)
        t1 = time.time()
        rec["seconds"] = t1 - t0
        if th.is_alive():
            rec["status"] = f"did not finish within --timeout {self.args.timeout:.0f} s"
        elif "error" in outcome:
            rec["status"] = outcome["error"]
        else:
            rec["status"] = "ok"
        after = counters()
        rec["disk_read_bytes"] = sum(
            after[p][1] - before[p][1] for p in after if p in before and p != os.getpid()
        ) + (after[os.getpid()][1] - before[os.getpid()][1])
        workers = [p for p, r in self.roles.items() if r.startswith("worker")]
        rec["worker_cpu_seconds"] = sum(
            after[p][0] - before[p][0] for p in workers if p in after and p in before
        )
        rec["driver_cpu_seconds"] = after[os.getpid()][0] - before[os.getpid()][0]
        rec["peak_rss"] = {}
        for pid in sorted(self.sampler.peak):
            role = self.roles.get(pid) or _other_role(pid, self.sampler.cmdline.get(pid, "?"))
            peak = self.sampler.peak_between(pid, t0, t1 + self.args.interval)
            rec["peak_rss"][role] = {"sampled": peak, "vm_hwm": vm_hwm(pid)}
        rec["value"] = outcome.get("value")
        print(f"#   {rec['seconds']:.1f} s, {rec['status'][:200]}", flush=True)
        self.records[name] = rec
        return rec

    def stop(self):
        self.sampler.stop()


def _other_role(pid: int, cmdline: str) -> str:
    if "resource_tracker" in cmdline:
        return f"mp resource tracker ({pid})"
    return f"other ({pid}: {cmdline[:40]})"


def _roles(client) -> dict[int, str]:
    roles = {os.getpid(): "driver (client, scheduler, nannies)"}
    for k, (addr, pid) in enumerate(sorted(client.run(os.getpid).items())):
        roles[pid] = f"worker {k} ({addr.rsplit(':', 1)[-1]})"
    return roles


# ----------------------------------------------------------------------------- steps


def _read_only(block):
    return np.zeros((1, 1)) + block[:1, :1]


def read_pass(a_path: str) -> float:
    """A through the library's reader on the cluster, no arithmetic; returns a checksum."""
    import dask.array as da

    from lplr_dask.storage.inputs import open_input

    a = open_input(a_path).data
    firsts = a.map_blocks(_read_only, chunks=((1,) * a.numblocks[0], (1,) * a.numblocks[1]))
    return float(da.sum(firsts).compute())


def _residual_parts(a, u, sv):
    """[‖A_ij − U_i·(SV)_j‖², ‖A_ij‖²] of one tile (float32 GEMM, float64 sums)."""
    r = a - u @ sv
    return np.array(
        [
            [
                np.einsum("ij,ij->", r, r, dtype=np.float64),
                np.einsum("ij,ij->", a, a, dtype=np.float64),
            ]
        ]
    )


def run_svd(a_path: str, rank: int, seed: int, client) -> dict:
    import dask.array as da
    from distributed import wait

    a = da.from_zarr(a_path)
    u, s, v = da.linalg.svd_compressed(a, k=rank, compute=True, seed=seed)
    u, s, v = client.persist([u, s, v])
    wait([u, s, v])
    return {"u": u, "s": s, "v": v}


def svd_error(a_path: str, factors: dict) -> float:
    import dask.array as da

    a = da.from_zarr(a_path)
    u = factors["u"].rechunk((a.chunks[0], -1))
    sv = (factors["s"][:, None] * factors["v"]).rechunk((-1, a.chunks[1]))
    parts = da.blockwise(
        _residual_parts,
        "ij",
        a,
        "ij",
        u,
        "ik",
        sv,
        "kj",
        dtype=np.float64,
        concatenate=True,
        adjust_chunks={"i": 1, "j": 2},
    ).compute()
    num, den = parts[:, 0::2].sum(), parts[:, 1::2].sum()
    return float(np.sqrt(num / den))


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    from lplr_dask import compress
    from lplr_dask.cluster import dask_client
    from lplr_dask.core.single_pass import ERROR_TEST_ROWS, corange_size
    from lplr_dask.storage.reader import relative_error

    args = parse_args(argv)
    n, d = args.shape
    m = args.rank
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    a_path = root / "A.zarr"
    record: dict = {
        "benchmark": "out_of_core_disk",
        "shape": [n, d],
        "chunk": args.chunk,
        "rank": m,
        "load_average_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(
        f"# A: {n} × {d} float32 = {n * d * 4 / GiB:.1f} GiB in {args.chunk}² chunks; rank {m}; "
        f"memory {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.1f} GiB, "
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    record["matrix"] = ensure_matrix(args, a_path)
    files = chunk_files(a_path)
    a_bytes = sum(os.path.getsize(f) for f in files)
    record["matrix"].update(chunk_files=len(files), bytes=a_bytes)
    runs = Workdir(root / f"runs-{os.getpid()}", keep=False)
    out2, out1 = str(runs / "two-pass.zarr"), str(runs / "one-pass.zarr")
    tiles = -(-n // args.chunk) * -(-d // args.chunk)
    corange = corange_size(m, n)
    kernels_of = {
        "two-pass": ("sketch GEMM", "row norms", "project GEMM"),
        "one-pass": ("sketch GEMM", "row norms", "sparse sign", "test GEMM"),
        "svd": ("svd GEMM", "svd GEMM"),
    }
    steps = None
    t_cluster = time.perf_counter()
    try:
        with dask_client(
            "local",
            n_workers=args.workers,
            threads_per_worker=args.threads,
            memory_limit=args.memory_limit,
            dashboard_address=None,
        ) as client:
            record["cluster_start_seconds"] = time.perf_counter() - t_cluster
            nthreads = client.nthreads()
            record["cluster"] = {
                "workers": len(nthreads),
                "threads_per_worker": sorted(set(nthreads.values())),
                "memory_limit": args.memory_limit,
            }
            print(
                f"# cluster: {len(nthreads)} workers × {sorted(set(nthreads.values()))} threads "
                f"(started in {record['cluster_start_seconds']:.1f} s)",
                flush=True,
            )
            roles = _roles(client)

            # compute floors: each step's per-tile arithmetic on both workers at once
            futs = [
                client.submit(
                    _tile_kernel_seconds,
                    args.chunk,
                    m,
                    corange,
                    ERROR_TEST_ROWS,
                    pure=False,
                    workers=[addr],
                    allow_other_workers=False,
                )
                for addr in nthreads
            ]
            per_worker = client.gather(futs)
            kernels = {k: max(w[k] for w in per_worker) for k in per_worker[0]}
            compute_floor = {
                s: sum(kernels[k] for k in ks) * tiles / len(nthreads)
                for s, ks in kernels_of.items()
            }
            record["tile_kernel_seconds"] = kernels
            record["compute_floor_seconds"] = compute_floor

            steps = Steps(args, client, roles)
            fb = steps.run(
                "floor, buffered, 2 readers (not timed)", lambda: read_floor(files, 2), passes=1
            )
            f0 = steps.run(
                "floor, O_DIRECT (first)",
                lambda: read_floor(files, args.readers, direct=True),
                passes=1,
            )
            rp = steps.run("read pass (open_input)", lambda: read_pass(str(a_path)), passes=1)
            two = steps.run(
                "two-pass compress",
                lambda: compress(str(a_path), out2, rank=m, seed=args.seed, overwrite=True),
                passes=2,
            )
            one = steps.run(
                "one-pass compress (passes=1)",
                lambda: compress(
                    str(a_path), out1, rank=m, seed=args.seed, passes=1, overwrite=True
                ),
                passes=1,
            )
            exact1 = (
                steps.run(
                    "exact error of one-pass (not timed)",
                    lambda: relative_error(str(a_path), out1),
                    passes=1,
                )
                if one["status"] == "ok"
                else None
            )
            svd = svd_err = None
            if not args.skip_svd:
                svd = steps.run(
                    "svd_compressed",
                    lambda: run_svd(str(a_path), m, args.seed, client),
                    passes=2,
                )
                if svd["status"] == "ok":
                    svd_err = steps.run(
                        "error of svd_compressed (not timed)",
                        lambda: svd_error(str(a_path), svd["value"]),
                        passes=1,
                    )
                    svd["value"] = None  # release U, S, V
                else:
                    try:  # a failed or stuck svd_compressed leaves tasks and memory behind
                        client.restart()
                        roles.update(_roles(client))
                    except Exception as exc:
                        print(f"# restart after svd_compressed failed: {exc!r}")
            f1 = steps.run(
                "floor, O_DIRECT (last)",
                lambda: read_floor(files, args.readers, direct=True),
                passes=1,
            )
            steps.stop()
    finally:
        if steps is not None and steps.sampler.is_alive():
            steps.stop()
        runs.cleanup()

    record["load_average_end"] = os.getloadavg()
    # The floor is the fastest complete read of A measured in this run: the O_DIRECT readers
    # (first and last), the buffered ones, or the library's own read pass if it beat them.
    reads = [r["seconds"] for r in (f0, f1, fb, rp) if r["status"] == "ok"]
    floor = float(min(reads))
    floors = [r["seconds"] for r in (f0, f1) if r["status"] == "ok"]
    record["floor_seconds"] = floor
    record["floor_direct_seconds"] = floors
    record["floor_buffered_seconds"] = fb["seconds"]
    record["read_pass_seconds"] = rp["seconds"]
    record["floor_GBps"] = a_bytes / floor / 1e9

    # ------------------------------------------------------------------ steps table
    res2 = two["value"] if two["status"] == "ok" else None
    res1 = one["value"] if one["status"] == "ok" else None
    err1 = exact1["value"] if exact1 and exact1["status"] == "ok" else None
    est1 = None
    if res1 is not None:
        est1 = res1.estimated_rel_fro_error
        if est1 is None and res1.error_is_estimate:
            est1 = res1.rel_fro_error
    svd_e = svd_err["value"] if svd_err and svd_err["status"] == "ok" else None
    svd_bits = 32 * (n * m + m + m * d) / (n * d)
    results = {
        "two-pass compress": {
            "error": res2.rel_fro_error if res2 else None,
            "error_kind": "exact (from LᵀA, LᵀL)",
            "bits": res2.bits_per_entry if res2 else None,
        },
        "one-pass compress (passes=1)": {
            "error": err1,
            "error_kind": "exact (relative_error pass)",
            "estimate": est1,
            "bits": res1.bits_per_entry if res1 else None,
        },
        "svd_compressed": {
            "error": svd_e,
            "error_kind": "exact (blockwise pass)",
            "bits": svd_bits,
        },
    }
    roles_all = sorted({r for rec in steps.records.values() for r in rec["peak_rss"]})
    rows = []
    for name, rec in steps.records.items():
        held = rec["passes"] * floor if rec["passes"] else None
        timed = not name.endswith("(not timed)") and not name.startswith("floor")
        info = results.get(name, {})
        rows.append(
            [
                name,
                rec["status"][:40] if rec["status"] != "ok" else "ok",
                f"{rec['seconds']:.1f}",
                f"{held:.1f}" if held and timed else "",
                f"{rec['seconds'] / held:.2f}" if held and timed else "",
                f"{info['error']:.4f}" if info.get("error") is not None else "",
                f"{info['estimate']:.4f}" if info.get("estimate") is not None else "",
                f"{info['bits']:.4f}" if info.get("bits") is not None else "",
                *(
                    (
                        f"{fmt_mib(rec['peak_rss'][r]['sampled'])} / "
                        f"{fmt_mib(rec['peak_rss'][r]['vm_hwm'])}"
                    )
                    if r in rec["peak_rss"]
                    else "-"
                    for r in roles_all
                ),
            ]
        )
        rec["floor_seconds_held_to"] = held if timed else None
        rec["ratio_to_floor"] = rec["seconds"] / held if held and timed else None
        rec.update({k: v for k, v in info.items()})
    print_table(
        f"steps (floor = the fastest complete read of A, {floor:.1f} s = "
        f"{a_bytes / floor / 1e9:.2f} GB/s; each timed step is held to its passes × floor; "
        "RSS MiB sampled / VmHWM)",
        [
            "step",
            "status",
            "wall s",
            "floor s",
            "ratio",
            "rel. error",
            "estimate",
            "bits/entry",
            *(r.split(" (")[0] for r in roles_all),
        ],
        rows,
    )
    print("# processes: " + "; ".join(sorted(set(roles_all))))
    if res2 is not None:
        print("# two-pass stage_seconds:", {k: round(v, 1) for k, v in res2.stage_seconds.items()})
    if res1 is not None:
        print("# one-pass stage_seconds:", {k: round(v, 1) for k, v in res1.stage_seconds.items()})
        print(f"# one-pass error: {res1.error_method}")

    # ------------------------------------------------------------------ where the time goes
    cores = os.cpu_count() or 1
    cfloor = {
        "two-pass compress": compute_floor["two-pass"],
        "one-pass compress (passes=1)": compute_floor["one-pass"],
        "svd_compressed": compute_floor["svd"],
    }
    rows = []
    for name, rec in steps.records.items():
        gbps = rec["disk_read_bytes"] / rec["seconds"] / 1e9
        util = rec["worker_cpu_seconds"] / (rec["seconds"] * cores)
        io_floor = rec["passes"] * floor
        cf = cfloor.get(name)
        bound = ""
        if cf is not None:
            bound = "disk" if io_floor >= cf else "compute"
        rows.append(
            [
                name,
                f"{rec['seconds']:.1f}",
                f"{rec['disk_read_bytes'] / GiB:.1f}",
                f"{gbps:.2f}",
                f"{util:.0%}",
                f"{io_floor:.1f}",
                f"{cf:.1f}" if cf is not None else "",
                bound,
                f"{rec['seconds'] / max(io_floor, cf):.2f}" if cf is not None else "",
            ]
        )
        rec["disk_GBps"] = gbps
        rec["worker_cpu_utilisation"] = util
        rec["compute_floor_seconds"] = cf
    print_table(
        "where the time goes (disk GiB read by all processes; worker CPU = CPU seconds / "
        f"(wall × {cores} cores); compute floor = per-tile arithmetic timed in both workers at "
        f"once × {tiles} tiles / workers; bound = the larger floor; ratio = wall / bound)",
        [
            "step",
            "wall s",
            "disk GiB",
            "GB/s",
            "worker CPU",
            "I/O floor s",
            "compute floor s",
            "bound",
            "ratio",
        ],
        rows,
    )
    print(
        "# per-tile kernel seconds (one BLAS thread, both workers at once): "
        + ", ".join(f"{k} {v:.3f}" for k, v in kernels.items())
    )

    # ------------------------------------------------------------------ goals
    peak_all = max(
        (
            max(v["sampled"] or 0, v["vm_hwm"] or 0)
            for name in ("two-pass compress", "one-pass compress (passes=1)")
            for v in steps.records[name]["peak_rss"].values()
        ),
        default=0,
    )
    goals = []

    def goal(what, measured, target, met):
        goals.append([what, measured, target, "yes" if met else "NO"])

    if res2 is not None:
        r = two["seconds"] / (2 * floor)
        goal("two-pass time / 2 floors", f"{r:.2f}", f"≤ {GOAL_TIME_RATIO}", r <= GOAL_TIME_RATIO)
    if res1 is not None:
        r = one["seconds"] / floor
        goal("one-pass time / 1 floor", f"{r:.2f}", f"≤ {GOAL_TIME_RATIO}", r <= GOAL_TIME_RATIO)
    for name, res, rec, passes in (
        ("two-pass", res2, two, 2),
        ("one-pass", res1, one, 1),
    ):
        if res is not None:  # where the arithmetic, not the disk, is the floor
            bound = max(passes * floor, compute_floor[name])
            r = rec["seconds"] / bound
            goal(
                f"{name} time / max(I/O floor, compute floor {compute_floor[name]:.1f} s)",
                f"{r:.2f}",
                f"≤ {GOAL_TIME_RATIO}",
                r <= GOAL_TIME_RATIO,
            )
    goal(
        "peak RSS of any process (compress steps)",
        f"{peak_all / MiB:.0f} MiB",
        f"≤ {GOAL_RSS / MiB:.0f} MiB",
        peak_all <= GOAL_RSS,
    )
    if res2 is not None and err1 is not None:
        r = err1 / res2.rel_fro_error
        goal(
            "one-pass exact error / two-pass error (equal rank)",
            f"{r:.3f}",
            f"≤ {GOAL_ERROR_RATIO}",
            r <= GOAL_ERROR_RATIO,
        )
        record["error_ratio"] = r
    if res2 is not None and res1 is not None:
        same = res1.stored_bytes == res2.stored_bytes
        goals.append(
            [
                "equal bits: same rank, same bit widths",
                f"{res1.bits_per_entry:.5f} vs {res2.bits_per_entry:.5f} bits/entry",
                "same codes and scales",
                "equal" if same else f"differ by {res2.stored_bytes - res1.stored_bytes} bytes",
            ]
        )
    print_table("goals (issue 12)", ["goal", "measured", "target", "met"], goals)
    record["goals"] = goals

    for rec in steps.records.values():
        rec.pop("value", None)
    record["steps"] = steps.records
    print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
