"""Out-of-core check: compress a matrix several times larger than the workers' memory.

Default: A is 32768 × 32768 float32 (2^30 entries, 4 GiB on disk, 4096 × 4096 uncompressed Zarr
v3 chunks), compressed with ``lplr_dask.compress(rank=128, bits 8/8)`` on a
``distributed.LocalCluster`` of 2 worker processes × 1 thread with ``memory_limit="1GiB"``
each (Dask's defaults: spill to disk at 60–70 %, pause at 80 %, the nanny kills the worker
at 95 % = 973 MiB).

Steps and what is printed:

1. Generation. A seeded low-rank-plus-noise matrix is written tile by tile, one task per tile
   (each task makes its tile from the seed and writes it: at most one tile in flight per
   worker thread), on a separate LocalCluster with the same worker settings, timed on its own.
2. Compression on a fresh cluster, inside ``client.get_task_stream()``, with a watchdog
   (``--timeout``). Meanwhile a background thread samples the RSS of every process of the run
   every 0.2 s with psutil: the driver (with LocalCluster the scheduler and both nannies live in
   this process too), each worker process (PIDs from ``client.run(os.getpid)``) and any other
   child. The scheduler's view of each worker (heartbeat ``memory``, ``managed_bytes``, spilled
   bytes, ``status``) is polled every 0.5 s.

Tables:

- ``result``: wall seconds (generation, compression), ``rel_fro_error`` (exact, computed by
  compress from LᵀA and LᵀL), bits per entry; with ``--verify`` also the independent error of
  ``lplr_dask.relative_error`` (one more pass over A).
- ``processes``: per process, the sampled peak RSS during compression, the kernel's peak
  (VmHWM, reset when compression starts, so it catches spikes between samples) and the RSS at the
  end; for workers also the nanny's view (the psutil RSS of the PID the nanny supervises, which is
  what it compares with the 95 % limit) and the worker's own heartbeat peak.
- ``peak RSS by stage``: the sampled peak of each process within each compress stage (stage
  boundaries are the ``on_stage`` callbacks), next to compress's ``stage_seconds``.
- ``workers``: PID/address before and after (a change means a restart), spill to disk (bytes
  and count of keys written, from each worker's ``SpillBuffer.cumulative_metrics``, bytes still
  on disk from ``SpillBuffer.spilled_total``, and the scheduler's cumulative ``disk-write``
  metrics, which survive a restart), and peak managed memory.
- ``events and logs``: scheduler events (``remove-worker``, ``worker-restart-memory``,
  pauses) and log lines of the scheduler, nannies and workers matching restart/kill, memory
  warnings, spilling and pausing.
- ``tasks``: per task prefix, count and compute seconds (max is the longest single task).
- ``results held``: per worker and task-key prefix, the peak count and bytes of results the
  worker held (in memory or spilled), from 0.5 s polls of the scheduler. ``from-zarr`` rows
  are tiles of A (64 MiB each at 4096²): more than a couple per worker thread means tiles
  are waiting for a second consumer, i.e. the pass is not streaming.
- ``# ... peak``: for each worker, when its sampled RSS peaked, in which stage, and which
  tasks (prefixes) it was computing then.

The last line is all of this as one JSON object. Timings are wall-clock on a shared 2-core
machine (other processes compete for the CPU): treat them as indicative. The 4 GiB input stays in
the OS page cache between generation and compression (24 GiB RAM), so the reads are not disk
bound; the out-of-core property tested is the *workers'* memory, not the disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections import defaultdict

import cloudpickle
from distributed import Client, LocalCluster, get_task_stream
from distributed.utils import key_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from _common import (
    GiB,
    MiB,
    RssSampler,
    Workdir,
    dir_bytes,
    fmt_mib,
    print_table,
    reset_hwm,
    vm_hwm,
    write_matrix,
)

cloudpickle.register_pickle_by_value(_common)

LOG_PATTERNS = {
    "restart/kill": re.compile(
        r"restart|kill|terminat|exceeded \d+% memory|died|remove.worker", re.I
    ),
    "memory warning": re.compile(r"memory use is high|unmanaged memory|memory budget", re.I),
    "spilling": re.compile(r"spilling|spill to disk", re.I),
    "paused": re.compile(r"paus", re.I),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n", type=int, default=32768, help="rows of A")
    p.add_argument("--d", type=int, default=32768, help="columns of A")
    p.add_argument("--chunk", type=int, default=4096, help="Zarr chunk (square) of A")
    p.add_argument("--method", default="lplr", choices=["lplr", "paper", "nq", "nq+lplr"])
    p.add_argument("--bits-matrix", type=int, default=4, help="nq, nq+lplr: bits of Q(A)")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--bits-left", type=int, default=8)
    p.add_argument("--bits-right", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--memory-limit", default="1GiB", help="per worker")
    p.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    p.add_argument(
        "--timeout",
        type=float,
        default=480.0,
        help="abort compression after this many seconds and report where it was",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="also run lplr_dask.relative_error (one more pass over A)",
    )
    p.add_argument("--true-rank", type=int, default=64, help="rank of the signal in A")
    p.add_argument("--noise", type=float, default=0.1, help="fraction of ‖A‖_F that is noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/lplr-bench")
    p.add_argument("--keep", action="store_true", help="keep the workdir (and the 4 GiB input)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- remote probes


def _spill_stats(dask_worker):
    """Run on a worker: its spill-to-disk counters and memory settings."""
    data = dask_worker.data
    cm = getattr(data, "cumulative_metrics", {})
    total = getattr(data, "spilled_total", None)
    return {
        "pid": os.getpid(),
        "spill_buffer": type(data).__name__,
        "disk_write_count": int(cm.get(("disk-write", "count"), 0)),
        "disk_write_bytes": int(cm.get(("disk-write", "bytes"), 0)),
        "disk_read_count": int(cm.get(("disk-read", "count"), 0)),
        "disk_read_bytes": int(cm.get(("disk-read", "bytes"), 0)),
        "on_disk_now_bytes": int(total.disk) if total is not None else None,
        "keys_in_memory": len(getattr(data, "fast", data)),
        "keys_on_disk": len(getattr(data, "slow", ())),
        "memory_limit": dask_worker.memory_manager.memory_limit,
        "vm_hwm": _common.vm_hwm(os.getpid()),
    }


def _nanny_view(dask_worker):
    """Run on a nanny: the PID it supervises and that process's RSS (its kill criterion)."""
    import psutil

    nanny = dask_worker
    proc = getattr(nanny.process, "process", None)
    pid = getattr(proc, "pid", None)
    rss = None
    if pid is not None:
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    mm = nanny.memory_manager
    return {
        "nanny_pid": os.getpid(),
        "worker_pid": pid,
        "worker_rss": rss,
        "memory_limit": mm.memory_limit,
        "terminate_fraction": mm.memory_terminate_fraction,
    }


def _held_by_prefix(dask_scheduler):
    """Run on the scheduler: per worker, {key prefix: (count, bytes)} of the results it holds
    (in memory or spilled: the scheduler does not tell them apart)."""
    out = {}
    for addr, ws in dask_scheduler.workers.items():
        agg: dict = {}
        for ts in ws.has_what:
            count, nbytes = agg.get(ts.prefix.name, (0, 0))
            agg[ts.prefix.name] = (count + 1, nbytes + ts.nbytes)
        out[addr] = agg
    return out


def _scheduler_metrics(dask_scheduler):
    out = defaultdict(float)
    for key, value in dask_scheduler.cumulative_worker_metrics.items():
        if isinstance(key, tuple) and len(key) >= 2 and key[-2] in ("disk-write", "disk-read"):
            out[f"{key[-2]}-{key[-1]}"] += value
    return dict(out)


# ----------------------------------------------------------------------------- observers


class SchedulerView(threading.Thread):
    """Polls ``client.scheduler_info()``: each worker's heartbeat memory, managed and spilled
    bytes, and status; keeps the peaks and the times a worker was seen paused. Also polls the
    results each worker holds by key prefix (``held``: peak count and bytes per prefix)."""

    def __init__(self, client, interval=0.5):
        super().__init__(daemon=True, name="scheduler-view")
        self.client = client
        self.interval = interval
        self.peak = defaultdict(lambda: defaultdict(int))
        self.paused = defaultdict(list)
        self.held = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))  # count, bytes, t
        self.errors = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                info = self.client.scheduler_info(n_workers=-1)
                for addr, w in info["workers"].items():
                    m = w.get("metrics", {})
                    pk = self.peak[addr]
                    pk["process"] = max(pk["process"], int(m.get("memory", 0)))
                    pk["managed"] = max(pk["managed"], int(m.get("managed_bytes", 0)))
                    sp = m.get("spilled_bytes", {}).get("disk", 0)
                    pk["spilled_disk"] = max(pk["spilled_disk"], int(sp))
                    if w.get("status") == "paused":
                        self.paused[addr].append(time.time())
                now = time.time()
                for addr, agg in self.client.run_on_scheduler(_held_by_prefix).items():
                    for prefix, (count, nbytes) in agg.items():
                        pk = self.held[addr][prefix]
                        pk[0] = max(pk[0], count)
                        if nbytes > pk[1]:
                            pk[1], pk[2] = nbytes, now
            except Exception:
                self.errors += 1
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join(timeout=10)


class LogCapture(logging.Handler):
    """Keeps WARNING+ records of this process (scheduler and nannies with LocalCluster)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        try:
            self.lines.append(f"{record.name} - {record.levelname} - {record.getMessage()}")
        except Exception:
            pass


def _collect_log_lines(client, capture: LogCapture) -> list[str]:
    lines = list(capture.lines)
    for getter in (
        lambda: {"scheduler": client.get_scheduler_logs()},
        client.get_worker_logs,
        lambda: client.get_worker_logs(nanny=True),
    ):
        try:
            for logs in getter().values():
                lines.extend(msg for _, msg in logs)
        except Exception as exc:
            lines.append(f"(could not read logs: {exc!r})")
    seen, out = set(), []
    for line in lines:
        key = re.sub(r"^\S+ \S+ - ", "", line)  # drop the timestamp so duplicates collapse
        if key not in seen:
            seen.add(key)
            out.append(line)
    return out


def _scan_events(client) -> dict:
    """Scheduler events that mean a worker left, restarted, failed or paused."""
    found = defaultdict(list)
    try:
        events = client.get_events()
    except Exception as exc:
        return {"error": [repr(exc)]}
    for topic, items in events.items():
        for ts, msg in items:
            action = msg.get("action", "") if isinstance(msg, dict) else ""
            text = f"{topic} {msg}".lower()
            if (
                "restart" in topic
                or "fail" in topic
                or action
                in ("remove-worker", "restart-workers", "closing-worker", "worker-ttl-timed-out")
            ):
                found["restart/kill/remove"].append((ts, topic, str(msg)[:300]))
            elif action == "worker-status-change" and "paused" in text:
                found["paused"].append((ts, topic, str(msg)[:300]))
    return found


# ----------------------------------------------------------------------------- main


def _safe(fn, default):
    try:
        return fn()
    except Exception as exc:
        print(f"# (diagnostic call failed: {exc!r})")
        return default


def _other_role(cmdline: str) -> str:
    if "resource_tracker" in cmdline:
        return "mp-resource-tracker (multiprocessing helper)"
    return f"other child: {cmdline[:50]}"


def _start_cluster(args, scratch):
    cluster = LocalCluster(
        n_workers=args.workers,
        threads_per_worker=args.threads,
        memory_limit=args.memory_limit,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        local_directory=str(scratch),
    )
    return cluster, Client(cluster)


def _roles(client) -> dict[int, str]:
    roles: dict[int, str] = {}
    sched = client.run_on_scheduler(os.getpid)
    nannies = client.run(os.getpid, nanny=True)
    workers = client.run(os.getpid)
    roles[os.getpid()] = "driver (client)"
    names = ["driver (client)"]
    if sched == os.getpid():
        names.append("scheduler")
    if set(nannies.values()) == {os.getpid()}:
        names.append(f"{len(nannies)} nannies")
    roles[os.getpid()] = " + ".join(names)
    if sched != os.getpid():
        roles[sched] = "scheduler"
    for addr, pid in nannies.items():
        if pid != os.getpid():
            roles[pid] = f"nanny of {addr}"
    for addr, pid in workers.items():
        roles[pid] = f"worker {addr}"
    return roles


def generate(args, wd, a_path) -> dict:
    cluster, client = _start_cluster(args, wd / "dask-scratch-gen")
    sampler = RssSampler(args.interval)
    sampler.start()
    try:
        roles = _roles(client)
        gen_s = write_matrix(
            a_path,
            args.n,
            args.d,
            chunk=args.chunk,
            true_rank=args.true_rank,
            noise=args.noise,
            seed=args.seed,
        )
        pids_after = set(client.run(os.getpid).values())
    finally:
        sampler.stop()
        client.close()
        cluster.close()
    worker_pids = [p for p, r in roles.items() if r.startswith("worker")]
    return {
        "seconds": gen_s,
        "disk_bytes": dir_bytes(a_path),
        "peak_rss": {
            roles.get(p) or _other_role(sampler.cmdline.get(p, "?")): v
            for p, v in sampler.peak.items()
        },
        "workers_restarted": not set(worker_pids) <= pids_after,
    }


def main(argv=None) -> int:
    from lplr_dask import compress
    from lplr_dask.storage.reader import relative_error  # not re-exported by lplr_dask (0.1.0)

    args = parse_args(argv)
    n, d, m = args.n, args.d, args.rank
    wd = Workdir(args.workdir, args.keep)
    a_path, out_path = wd / "A.zarr", wd / "out.zarr"
    scratch = wd / "dask-scratch"
    capture = LogCapture()
    logging.getLogger("distributed").addHandler(capture)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(capture)
    record: dict = {
        "benchmark": "out_of_core",
        "n": n,
        "d": d,
        "rank": m,
        "chunk": args.chunk,
        "n_workers": args.workers,
        "threads": args.threads,
        "memory_limit": args.memory_limit,
    }
    cluster = client = sampler = sview = None
    status = "ok"
    try:
        print(
            f"# A: {n} × {d} float32 = {n * d * 4 / GiB:.2f} GiB, chunks {args.chunk}², "
            f"rank {m}; {args.workers} workers × {args.threads} thread, memory_limit="
            f"{args.memory_limit} each; workdir {wd.path}",
            flush=True,
        )
        gen = generate(args, wd, a_path)
        print(
            f"# generated A in {gen['seconds']:.1f} s ({gen['disk_bytes'] / GiB:.2f} GiB on "
            f"disk); peak RSS during generation: "
            + ", ".join(f"{k}: {fmt_mib(v)} MiB" for k, v in gen["peak_rss"].items()),
            flush=True,
        )
        record["generate"] = {
            "seconds": round(gen["seconds"], 2),
            "disk_bytes": gen["disk_bytes"],
            "workers_restarted": gen["workers_restarted"],
            "peak_rss_mib": {k: round(v / MiB) for k, v in gen["peak_rss"].items()},
        }

        cluster, client = _start_cluster(args, scratch)
        roles = _roles(client)
        workers_before = client.run(os.getpid)
        nanny_before = client.run(_nanny_view, nanny=True)
        hwm_reset = all(reset_hwm(pid) for pid in roles)
        sampler = RssSampler(args.interval)
        sview = SchedulerView(client)
        sampler.start()
        sview.start()

        outcome: dict = {}

        def on_stage(name, futures):
            sampler.mark(name)

        def run_compress():
            try:
                sizes = (
                    {"bits_matrix": args.bits_matrix}
                    if args.method == "nq"
                    else {"rank": m, "bits_left": args.bits_left, "bits_right": args.bits_right}
                )
                if args.method == "nq+lplr":
                    sizes["bits_matrix"] = args.bits_matrix
                outcome["result"] = compress(
                    str(a_path),
                    str(out_path),
                    method=args.method,
                    **sizes,
                    overwrite=True,
                    on_stage=on_stage,
                )
            except BaseException as exc:  # reported below
                outcome["error"] = exc
                outcome["traceback"] = traceback.format_exc()

        with get_task_stream(client) as ts:
            t_start = time.time()
            sampler.mark("(open + build graph)")
            worker = threading.Thread(target=run_compress, daemon=True, name="compress")
            worker.start()
            worker.join(args.timeout)
            t_end = time.time()
            if worker.is_alive():
                status = "timeout"
                print(f"# TIMEOUT: compress still running after {args.timeout:.0f} s", flush=True)
                processing = client.processing()
                print(
                    "# tasks processing per worker:",
                    {w: [key_split(k) for k in v][:5] for w, v in processing.items()},
                )
        sview.stop()
        sampler.stop()
        res = outcome.get("result")
        if "error" in outcome:
            status = "error"
            print("# compress raised:\n" + outcome["traceback"], flush=True)
        compress_wall = t_end - t_start

        # ------------------------------------------------------------------ after-the-fact
        # Also after a timeout or an error: the cluster is still up, and these are the clues.
        workers_after = _safe(lambda: client.run(os.getpid), {})
        nanny_after = _safe(lambda: client.run(_nanny_view, nanny=True), {})
        spill = _safe(lambda: client.run(_spill_stats), {})
        sched_metrics = _safe(lambda: client.run_on_scheduler(_scheduler_metrics), {})
        for pid, role in _safe(lambda: _roles(client), {}).items():
            roles.setdefault(pid, role + " (new)")
        events = _scan_events(client)
        log_lines = _collect_log_lines(client, capture)
        stream = ts.data

        verify = None
        if args.verify and res is not None:
            t0 = time.time()
            try:
                verify = {
                    "rel_fro_error": relative_error(str(a_path), str(out_path)),
                    "seconds": time.time() - t0,
                }
            except Exception as exc:
                verify = {"error": repr(exc), "seconds": time.time() - t0}

        # ------------------------------------------------------------------ result table
        rows = [
            ["generate seconds", f"{gen['seconds']:.1f}"],
            ["compress wall seconds (driver clock)", f"{compress_wall:.1f}"],
            ["status", status],
        ]
        if res is not None:
            rows += [
                ["CompressionResult.seconds", f"{res.seconds:.1f}"],
                ["rel_fro_error (compress, exact from LᵀA, LᵀL)", f"{res.rel_fro_error:.6f}"],
                ["bits_per_entry", f"{res.bits_per_entry:.4f}"],
                ["stored MiB", f"{res.stored_bytes / MiB:.1f}"],
            ]
        if verify is not None:
            rows.append(
                [
                    "relative_error (independent pass)",
                    f"{verify['rel_fro_error']:.6f} ({verify['seconds']:.1f} s)"
                    if "rel_fro_error" in verify
                    else verify["error"],
                ]
            )
        print_table("result", ["figure", "value"], rows)

        # ------------------------------------------------------------------ processes
        worker_pid_by_addr = {a: p for a, p in workers_before.items()}
        heartbeat_by_addr = sview.peak
        proc_rows = []
        proc_record = {}
        for pid in sorted(sampler.peak, key=lambda p: (p != os.getpid(), p)):
            role = roles.get(pid) or _other_role(sampler.cmdline.get(pid, "?"))
            addr = next((a for a, p in worker_pid_by_addr.items() if p == pid), None)
            peak = sampler.peak_between(pid, t_start, t_end + 1) or 0
            hwm = vm_hwm(pid)
            if addr is not None and addr in spill:
                hwm = spill[addr]["vm_hwm"]
            end = next((rss for t, p, rss in reversed(sampler.samples) if p == pid), None)
            nanny = next((v for v in nanny_after.values() if v["worker_pid"] == pid), None)
            hb = heartbeat_by_addr.get(addr, {}).get("process") if addr else None
            proc_rows.append(
                [
                    role,
                    pid,
                    fmt_mib(peak),
                    fmt_mib(hwm) if hwm_reset else "-",
                    fmt_mib(end),
                    fmt_mib(nanny["worker_rss"]) if nanny else "",
                    fmt_mib(hb),
                ]
            )
            proc_record[f"{role} [{pid}]"] = {
                "peak_rss_mib": round(peak / MiB),
                "vm_hwm_mib": round(hwm / MiB) if hwm else None,
                "end_rss_mib": round(end / MiB) if end else None,
                "heartbeat_peak_mib": round(hb / MiB) if hb else None,
            }
        kill_frac = next(iter(nanny_before.values()))["terminate_fraction"]
        print_table(
            f"processes during compression (RSS MiB; sampled every {args.interval} s; "
            f"the nanny kills a worker above {kill_frac:.0%} of {args.memory_limit})",
            [
                "process",
                "pid",
                "peak sampled",
                "peak VmHWM",
                "end",
                "nanny view (end)",
                "worker heartbeat peak",
            ],
            proc_rows,
        )
        record["processes"] = proc_record
        record["vm_hwm_reset"] = hwm_reset

        # ------------------------------------------------------------------ stages
        marks = [(t, name) for t, name in sampler.marks]
        windows = []
        for k, (t, name) in enumerate(marks):
            t_next = marks[k + 1][0] if k + 1 < len(marks) else t_end
            if windows and windows[-1][0] == name:
                windows[-1][2] = t_next
            else:
                windows.append([name, t, t_next])
        pids = sorted(sampler.peak, key=lambda p: (p != os.getpid(), p))

        def short(pid):
            role = roles.get(pid) or _other_role(sampler.cmdline.get(pid, "?"))
            return f"{role.split(' ')[0]}[{pid}]"

        stage_secs = res.stage_seconds if res is not None else {}
        stage_rows, stage_record = [], {}
        for name, t0, t1 in windows:
            peaks = [sampler.peak_between(p, t0, t1) for p in pids]
            stage_rows.append(
                [
                    name,
                    f"{t1 - t0:.1f}",
                    f"{stage_secs[name]:.1f}" if name in stage_secs else "",
                    *(fmt_mib(v) for v in peaks),
                ]
            )
            stage_record[name] = {
                "window_s": round(t1 - t0, 2),
                "peak_rss_mib": [round(v / MiB) if v else None for v in peaks],
            }
        print_table(
            "peak RSS (MiB) by compress stage; window = from this stage's submission to the next",
            ["stage", "window s", "stage_seconds", *(short(p) for p in pids)],
            stage_rows,
        )
        record["stages"] = stage_record
        record["stage_seconds"] = stage_secs

        # ------------------------------------------------------------------ workers
        w_rows, w_record = [], {}
        for addr, pid0 in workers_before.items():
            pid1 = workers_after.get(addr)
            sp = spill.get(addr, {})
            sv = sview.peak.get(addr, {})
            restarted = pid1 != pid0
            w_rows.append(
                [
                    addr,
                    f"{pid0} -> {pid1}",
                    "YES" if restarted else "no",
                    fmt_mib(sp.get("disk_write_bytes")),
                    sp.get("disk_write_count", "-"),
                    fmt_mib(sp.get("disk_read_bytes")),
                    sp.get("disk_read_count", "-"),
                    fmt_mib(sp.get("on_disk_now_bytes")),
                    fmt_mib(sv.get("managed")),
                    fmt_mib(sv.get("spilled_disk")),
                    len(sview.paused.get(addr, [])),
                ]
            )
            w_record[addr] = {
                "pid_before": pid0,
                "pid_after": pid1,
                "restarted": restarted,
                **{k: v for k, v in sp.items() if k != "pid"},
                "heartbeat_peak_managed_bytes": sv.get("managed"),
                "heartbeat_peak_spilled_bytes": sv.get("spilled_disk"),
                "paused_polls": len(sview.paused.get(addr, [])),
            }
        missing = set(workers_after) - set(workers_before)
        print_table(
            "workers (spill MiB; count = keys written to / read from disk)",
            [
                "worker",
                "pid before -> after",
                "restarted",
                "spilled MiB",
                "spill count",
                "unspilled MiB",
                "unspill count",
                "on disk at end",
                "peak managed MiB",
                "peak spilled (heartbeat)",
                "polls paused",
            ],
            w_rows,
        )
        if missing:
            print(f"# new workers after compression: {sorted(missing)}")
        print(f"# scheduler cumulative spill metrics (survive restarts): {sched_metrics or 'none'}")
        record["workers"] = w_record
        record["scheduler_spill_metrics"] = sched_metrics
        record["nanny_view_after"] = {a: v for a, v in nanny_after.items()}

        # ------------------------------------------------------------------ events and logs
        matched = {
            k: [line for line in log_lines if pat.search(line)] for k, pat in LOG_PATTERNS.items()
        }
        ev_rows = [[f"event: {k}", len(v), (v[0][2][:90] if v else "")] for k, v in events.items()]
        ev_rows += [[f"log: {k}", len(v), (v[0][-90:] if v else "")] for k, v in matched.items()]
        warn_lines = [line for line in log_lines if "WARNING" in line or "ERROR" in line]
        ev_rows.append(
            [
                "log: all WARNING/ERROR lines",
                len(warn_lines),
                warn_lines[0][-90:] if warn_lines else "",
            ]
        )
        print_table(
            "events and logs (scheduler, nannies, workers)", ["what", "count", "first"], ev_rows
        )
        for line in warn_lines[:15]:
            print(f"  | {line[:220]}")
        record["events"] = {k: len(v) for k, v in events.items()}
        record["log_matches"] = {k: len(v) for k, v in matched.items()}
        record["warnings"] = warn_lines[:20]
        record["any_worker_restarted"] = any(v["restarted"] for v in w_record.values()) or bool(
            events.get("restart/kill/remove")
        )

        # ------------------------------------------------------------------ tasks
        by_prefix = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
        for rec in stream:
            prefix = key_split(rec["key"])
            agg = by_prefix[prefix]
            agg[0] += 1
            for ss in rec.get("startstops", ()):
                dt = ss["stop"] - ss["start"]
                if ss["action"] == "compute":
                    agg[1] += dt
                    agg[2] = max(agg[2], dt)
                elif ss["action"] in ("disk-read", "disk-write"):
                    agg[3] += dt
        t_rows = [
            [k, v[0], f"{v[1]:.1f}", f"{v[2]:.2f}", f"{v[3]:.2f}"]
            for k, v in sorted(by_prefix.items(), key=lambda kv: -kv[1][1])
        ]
        print_table(
            "tasks by prefix (task stream)",
            ["prefix", "count", "compute s", "max task s", "spill I/O s"],
            t_rows,
        )
        record["tasks"] = {
            k: {"count": v[0], "compute_s": round(v[1], 2), "max_s": round(v[2], 2)}
            for k, v in by_prefix.items()
        }

        h_rows, h_record = [], {}
        for addr in sorted(sview.held):
            for prefix, (count, nbytes, t_pk) in sorted(
                sview.held[addr].items(), key=lambda kv: -kv[1][1]
            ):
                if nbytes < MiB:
                    continue
                stage = next((name for name, t0, t1 in windows if t0 <= t_pk < t1), "?")
                h_rows.append([addr, prefix, count, fmt_mib(nbytes), stage])
                h_record.setdefault(addr, {})[prefix] = {
                    "peak_count": count,
                    "peak_mib": round(nbytes / MiB),
                    "stage": stage,
                }
        print_table(
            "results held by each worker, by key prefix (in memory or spilled; peaks "
            "of 0.5 s polls, >= 1 MiB)",
            ["worker", "prefix", "peak count", "peak MiB", "stage at peak"],
            h_rows,
        )
        record["held_by_prefix"] = h_record

        at_peak = {}
        for addr, pid in workers_before.items():
            t_pk, rss = sampler.argmax(pid)
            slack = args.interval
            running = sorted(
                {
                    key_split(rec["key"])
                    for rec in stream
                    if rec.get("worker") == addr
                    for ss in rec.get("startstops", ())
                    if ss["action"] == "compute"
                    and ss["start"] - slack <= t_pk <= ss["stop"] + slack
                }
            )
            stage = next((name for name, t0, t1 in windows if t0 <= t_pk < t1), "?")
            at_peak[addr] = {
                "rss_mib": round(rss / MiB),
                "t_from_start_s": round(t_pk - t_start, 1),
                "stage": stage,
                "tasks": running,
            }
            print(
                f"# {addr} peak {rss / MiB:.0f} MiB at t={t_pk - t_start:.1f} s, stage "
                f"{stage!r}, running: {', '.join(running) or '(none recorded)'}"
            )
        record["at_worker_peak"] = at_peak

        record.update(status=status, compress_wall_s=round(compress_wall, 2))
        if res is not None:
            record.update(
                compress_seconds=round(res.seconds, 2),
                rel_fro_error=res.rel_fro_error,
                bits_per_entry=res.bits_per_entry,
            )
        if verify is not None:
            record["verify"] = verify
        if "error" in outcome:
            record["error"] = repr(outcome["error"])
        print(json.dumps(record, default=str))
        return 0 if status == "ok" else 1
    finally:
        for th in (sview, sampler):
            if th is not None and th.is_alive():
                th.stop()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        wd.cleanup()


if __name__ == "__main__":
    sys.exit(main())
