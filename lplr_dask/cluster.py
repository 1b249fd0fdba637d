"""Cluster set-up: one code path for a local cluster, a local CUDA cluster or an address."""

from __future__ import annotations

import contextlib
import os

import dask

from lplr_dask.errors import ParameterError

__all__ = [
    "DEVICE_SETTINGS",
    "KEEP_MALLOC_DEFAULTS",
    "NANNY_KEEP_MALLOC_ENV",
    "READ_AHEAD_THREADS",
    "compute_device",
    "dask_client",
]


READ_AHEAD_THREADS = 1
"""Threads per local worker beyond one per core it gets: a task that reads a tile of A from
disk waits on I/O, and with one thread per core the tile's GEMM could only start once the read
was done. One more thread lets a worker read the next tile while it multiplies this one, so a
pass runs at the disk's bandwidth whenever the GEMMs are faster than the reads (measured:
``benchmarks/out_of_core_disk.py``). BLAS stays at one thread per task (the codes do not depend
on the thread count); memory grows by one tile (64 MiB at 4096²) per worker."""


KEEP_MALLOC_DEFAULTS = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
"""Local workers keep glibc's own malloc thresholds. Dask's nannies set
``MALLOC_TRIM_THRESHOLD_=65536`` to hand freed memory back to the OS sooner, and setting it
also fixes glibc's mmap threshold at 128 KiB, so every array above that is mapped and unmapped
anew: measured here, the planner's curve of one 1536 × 384 weight took 8.5–10.5 s in a worker
against 3.3–4.5 s in the driver, and 8.9–9.5 s in the driver with the variable set (no other
difference). Large arrays (above glibc's dynamic threshold, at most 32 MiB) are still mapped and
returned at once."""

NANNY_KEEP_MALLOC_ENV = {
    "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": '{"MALLOC_TRIM_THRESHOLD_": None}'
}
"""The same for workers started outside this process (``dask worker``, ``dask cuda worker``,
the SLURM and Kubernetes recipes in deploy/): this environment variable, set where the worker
command runs, merges into Dask's ``distributed.nanny.pre-spawn-environ`` and unsets only
``MALLOC_TRIM_THRESHOLD_`` (the nannies still set ``OMP_NUM_THREADS=1`` and the like)."""


DEVICE_SETTINGS = ("auto", "cpu", "gpu")
"""Where A's tiles are computed, as the CLI's ``--device`` and a flow's ``cluster.device``
take it (``auto``: see :func:`compute_device`)."""


def compute_device(device: str, cluster: str) -> str:
    """The ``device`` of :func:`lplr_dask.compress` for a ``device`` setting (``"auto"``,
    ``"cpu"``, ``"gpu"``) on ``cluster`` (as :func:`dask_client` takes it): ``"auto"`` is the
    GPU on a LocalCUDACluster (``"cuda"``) and the CPU elsewhere (a scheduler address may have
    either kind of worker: say ``"gpu"`` for ``dask cuda worker`` processes)."""
    if device not in DEVICE_SETTINGS:
        raise ParameterError(
            f"device={device!r} is unknown; use one of {', '.join(DEVICE_SETTINGS)}."
        )
    if device != "auto":
        return device
    return "gpu" if cluster == "cuda" else "cpu"


def _default_workers() -> tuple[int, int]:
    """(worker processes, threads per worker) of the default local cluster: 2 workers sharing
    the cores (1 on a one-core machine), each with one thread per core plus
    :data:`READ_AHEAD_THREADS`."""
    cores = os.cpu_count() or 1
    workers = 2 if cores >= 2 else 1
    return workers, max(1, cores // workers) + READ_AHEAD_THREADS


@contextlib.contextmanager
def dask_client(
    cluster: str = "local",
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = "auto",
    dashboard_address: str | None = "127.0.0.1:0",
    host: str = "127.0.0.1",
):
    """A ``distributed.Client`` for ``cluster``, closed (with its cluster) on exit.

    Parameters
    ----------
    cluster : str, default "local"
        ``"local"``: a new ``LocalCluster`` of worker processes on this machine (the embedded
        default). ``"cuda"``: a ``dask_cuda.LocalCUDACluster``, one worker per GPU (needs the
        ``gpu`` extra). Anything else is taken as the address of a running scheduler, such as
        ``tcp://127.0.0.1:8786``.
    n_workers, threads_per_worker : int, optional
        For ``"local"``: default 2 workers sharing the cores, each with one thread per core
        plus :data:`READ_AHEAD_THREADS` (on 2 cores: 2 workers × 2 threads), so that reading
        a tile overlaps the GEMM of another.
    memory_limit : str or int, default "auto"
        Per-worker memory limit for local clusters (``"1GiB"``, bytes, or ``"auto"``).
    dashboard_address : str, optional
        Where the Dask dashboard listens: by default a free port on the loopback interface
        only (``"127.0.0.1:0"``), so its pages (worker addresses, local folders) are not
        served to the network; ``":8787"`` listens on every interface, ``None``: no dashboard.
    host : str, default "127.0.0.1"
        The interface the scheduler, nannies and workers of a local cluster listen on. Give
        ``"0.0.0.0"`` or a host name only to let other machines connect.
    """
    from distributed import Client, LocalCluster

    if cluster == "local":
        dw, dt = _default_workers()
        with dask.config.set(KEEP_MALLOC_DEFAULTS):  # read when the nannies are made
            lc = LocalCluster(
                n_workers=n_workers or dw,
                threads_per_worker=threads_per_worker or dt,
                memory_limit=memory_limit,
                processes=True,
                dashboard_address=dashboard_address,
                host=host,
            )
        with lc, Client(lc) as client:
            yield client
    elif cluster == "cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:  # also raised by dask_cuda on machines without CUDA libraries
            raise ParameterError(
                f"--cluster cuda needs dask-cuda and a CUDA device ({exc}). Install the GPU "
                "extra (pip install 'lplr-dask[gpu]') on a machine with NVIDIA GPUs, or use "
                "--cluster local."
            ) from exc
        kwargs = {} if memory_limit in (None, "auto") else {"memory_limit": memory_limit}
        with dask.config.set(KEEP_MALLOC_DEFAULTS):
            lc = LocalCUDACluster(host=host, dashboard_address=dashboard_address, **kwargs)
        with lc, Client(lc) as client:
            yield client
    else:
        address = cluster if "://" in cluster else f"tcp://{cluster}"
        try:
            client = Client(address, timeout="10s")
        except OSError as exc:
            raise ParameterError(
                f"Cannot reach a Dask scheduler at {address} ({exc}). Start one with "
                "`dask scheduler` and workers with `dask worker ADDRESS`, or use --cluster local."
            ) from exc
        with client:
            yield client
