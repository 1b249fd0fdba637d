"""Shared helpers of the benchmark scripts (not a benchmark itself).

- :func:`write_matrix`: a seeded low-rank-plus-noise float32 matrix written to a Zarr v3 array
  tile by tile, one Dask task per tile (a task generates its tile and writes it; nothing else
  is held), so generation needs one tile of memory per worker thread.
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

import numpy as np

MiB = 2**20
GiB = 2**30

# Random streams of the generator, keyed (seed, stream, block coordinates): no global RNG.
_STREAM_U, _STREAM_V, _STREAM_NOISE = 101, 102, 103


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


def signal_weights(true_rank: int, decay: float) -> np.ndarray:
    """Column weights w_k = decay**k, normalized so that the signal entries have variance 1."""
    w = decay ** np.arange(true_rank, dtype=np.float64)
    return (w / np.sqrt(np.sum(w * w))).astype(np.float32)


def make_tile(i, j, rows, cols, *, true_rank, decay, noise, seed):
    """Tile (i, j) of A = U·diag(w)·Vᵀ + noise·N, U, V, N standard normal.

    The rows of U in row block i come from (seed, i), those of V in column block j from
    (seed, j), N's tile from (seed, i, j): any tile can be made alone, in any order, anywhere.
    """
    w = signal_weights(true_rank, decay)
    u = _rng(seed, _STREAM_U, i).standard_normal((rows, true_rank), dtype=np.float32)
    v = _rng(seed, _STREAM_V, j).standard_normal((cols, true_rank), dtype=np.float32)
    tile = _rng(seed, _STREAM_NOISE, i, j).standard_normal((rows, cols), dtype=np.float32)
    tile *= np.float32(noise)
    tile += (u * w) @ v.T
    return tile


def _write_tile(path, i, j, r0, r1, c0, c1, kw):
    import zarr

    tile = make_tile(i, j, r1 - r0, c1 - c0, **kw)
    zarr.open_array(path, mode="r+")[r0:r1, c0:c1] = tile
    return float(np.sum(tile.astype(np.float64) ** 2))


def write_matrix(
    path, n, d, *, chunk=4096, true_rank=64, decay=0.95, noise=0.1, seed=0, compressor="none"
):
    """Write the n × d float32 test matrix to a Zarr v3 array at ``path``, tile by tile.

    Runs one task per (chunk × chunk) tile on the active Dask scheduler. Returns
    (seconds, ‖A‖_F²). ``compressor``: ``"none"`` (raw bytes) or ``"default"`` (Zarr's).
    """
    import dask
    import zarr

    kw = {} if compressor == "default" else {"compressors": None}
    zarr.create_array(
        str(path),
        shape=(n, d),
        chunks=(chunk, chunk),
        dtype="float32",
        zarr_format=3,
        fill_value=0.0,
        overwrite=True,
        **kw,
    )
    opts = dict(true_rank=true_rank, decay=decay, noise=noise, seed=seed)
    tasks = []
    for i, r0 in enumerate(range(0, n, chunk)):
        for j, c0 in enumerate(range(0, d, chunk)):
            r1, c1 = min(r0 + chunk, n), min(c0 + chunk, d)
            tasks.append(dask.delayed(_write_tile)(str(path), i, j, r0, r1, c0, c1, opts))
    t0 = time.perf_counter()
    sums = dask.compute(*tasks)
    return time.perf_counter() - t0, float(sum(sums))


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
