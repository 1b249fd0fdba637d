"""Shared helpers of the benchmark scripts (not a benchmark itself).

- :func:`write_matrix`: the library's seeded low-rank-plus-noise test matrix, timed.
- :class:`RssSampler`: a background thread that samples the resident set size of the driver
  process and all its descendants (scheduler, nannies, workers) every ``interval`` seconds.
- :class:`Workdir`: the scratch directory, created and removed unless ``--keep``.
- :func:`print_table`: a plain fixed-width table.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

MiB = 2**20
GiB = 2**30


def write_matrix(path, n, d, *, chunk=4096, true_rank=64, decay=0.95, noise=0.1, seed=0):
    """Write the n × d float32 test matrix (:func:`lplr_dask.datasets.low_rank_plus_noise`:
    singular values ``decay**i`` for i < ``true_rank``, a fraction ``noise`` of ‖A‖_F in Gaussian
    noise) to an uncompressed Zarr v3 array, tile by tile on the active Dask scheduler.
    Returns the seconds it took."""
    from lplr_dask.datasets import low_rank_plus_noise

    t0 = time.perf_counter()
    low_rank_plus_noise(
        path, (n, d), rank=true_rank, decay=decay, noise=noise, chunks=(chunk, chunk), seed=seed
    )
    return time.perf_counter() - t0


def dir_bytes(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class Workdir:
    """The benchmark's scratch directory.

    Created if missing; on :meth:`cleanup` removed whole if this run created it, otherwise
    only the entries this run made (so ``--workdir $HOME`` never deletes anything else).
    """

    def __init__(self, path, keep: bool):
        self.path = Path(path).resolve()
        self.keep = keep
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.entries: list[Path] = []

    def __truediv__(self, name) -> Path:
        p = self.path / name
        self.entries.append(p)
        return p

    def cleanup(self) -> None:
        if self.keep:
            print(f"# kept {self.path}")
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for p in self.entries:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


class RssSampler(threading.Thread):
    """Samples RSS of this process and all its descendants every ``interval`` seconds.

    ``samples`` is a list of (unix time, pid, rss bytes); ``peak[pid]`` the largest sample;
    processes that appear later (a restarted worker) are picked up at the next tick.
    ``mark(name)`` records a named instant (e.g. a stage start) on the same clock.
    """

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.root = psutil.Process(os.getpid())
        self.samples: list[tuple[float, int, int]] = []
        self.peak: dict[int, int] = {}
        self.cmdline: dict[int, str] = {}
        self.marks: list[tuple[float, str]] = []
        self._stop_event = threading.Event()

    def mark(self, name: str) -> None:
        self.marks.append((time.time(), name))

    def _tick(self) -> None:
        ps = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        now = time.time()
        for p in procs:
            try:
                rss = p.memory_info().rss
            except ps.Error:
                continue
            self.samples.append((now, p.pid, rss))
            if rss > self.peak.get(p.pid, -1):
                self.peak[p.pid] = rss
            if p.pid not in self.cmdline:
                try:
                    self.cmdline[p.pid] = " ".join(p.cmdline())[:160]
                except ps.Error:
                    self.cmdline[p.pid] = "?"

    def run(self) -> None:
        while not self._stop_event.is_set():
            self._tick()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self._tick()

    def peak_between(self, pid: int, t0: float, t1: float) -> int | None:
        """Largest sample of ``pid`` in [t0, t1], None if there was no sample then."""
        vals = [rss for t, p, rss in self.samples if p == pid and t0 <= t <= t1]
        return max(vals) if vals else None

    def argmax(self, pid: int) -> tuple[float, int]:
        best = (0.0, -1)
        for t, p, rss in self.samples:
            if p == pid and rss > best[1]:
                best = (t, rss)
        return best


def vm_hwm(pid: int) -> int | None:
    """The kernel's peak RSS (VmHWM) of ``pid`` in bytes, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter of ``pid`` (Linux ``clear_refs`` 5)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_hwm() -> int | None:
    """Run on a worker (client.run): its own VmHWM."""
    return vm_hwm(os.getpid())


def reset_worker_hwm() -> bool:
    return reset_hwm(os.getpid())


def fmt_mib(x) -> str:
    return "-" if x is None else f"{x / MiB:.0f}"


def print_table(title: str, header, rows) -> None:
    """A plain left-aligned table (first column) / right-aligned (others)."""
    rows = [[str(c) for c in r] for r in rows]
    header = [str(h) for h in header]
    widths = [
        max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)
    ]

    def line(cells):
        return "  ".join(
            c.ljust(w) if k == 0 else c.rjust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
