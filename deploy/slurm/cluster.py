"""Start a Dask cluster on SLURM with dask-jobqueue and keep it up until interrupted.

The scheduler runs in this process (on the login or head node that runs it); each SLURM job
runs the workers of one section of ``jobqueue.yaml``. The printed address goes into a flow
config (``cluster: {kind: address, address: tcp://HOST:8786}``) or
``lplr compress --cluster ADDRESS``.

    python deploy/slurm/cluster.py --jobs 4                      # CPU workers (lplr-cpu)
    python deploy/slurm/cluster.py --section lplr-gpu --jobs 2   # dask-cuda workers
    python deploy/slurm/cluster.py --section lplr-gpu --print-job-script   # submit nothing

Needs ``pip install dask-jobqueue`` (0.9) where this runs; the workers need lplr-dask (and the
gpu extra for ``lplr-gpu``) in the same Python environment on the compute nodes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import dask.config

DEFAULT_CONFIG = Path(__file__).with_name("jobqueue.yaml")
DEFAULT_SECTION = "lplr-cpu"


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict:
    """The ``jobqueue`` mapping of a dask config file (section name → settings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dask-jobqueue config at {path}")
    (data,) = dask.config.collect_yaml([str(path)])
    sections = (data or {}).get("jobqueue")
    if not isinstance(sections, dict) or not sections:
        raise ValueError(f"{path} has no 'jobqueue:' mapping of sections")
    return sections


def use_config(sections: dict):
    """Context manager that puts the sections into dask's config as ``jobqueue.<name>``."""
    return dask.config.set({f"jobqueue.{name}": value for name, value in sections.items()})


def build_cluster(
    section: str = DEFAULT_SECTION,
    *,
    interface: str | None = None,
    scheduler_options: dict | None = None,
):
    """A SLURMCluster from config section ``section`` (already in dask's config).

    ``scheduler_options`` are merged over the section's ``scheduler-options`` (dask-jobqueue
    itself would replace them). ``processes`` is passed explicitly so that dask-jobqueue knows
    how many workers each job runs (it groups them only then; scaling down needs it).
    """
    from dask_jobqueue import SLURMCluster

    key = f"jobqueue.{section}"
    if dask.config.get(key, None) is None:
        raise KeyError(f"no dask config section {key!r}; load jobqueue.yaml first")
    options = dict(dask.config.get(f"{key}.scheduler-options", {}) or {})
    options.update(scheduler_options or {})
    kwargs = {}
    if interface is not None:
        kwargs["interface"] = interface
    processes = dask.config.get(f"{key}.processes", None)
    if processes is not None:
        kwargs["processes"] = int(processes)
    return SLURMCluster(config_name=section, scheduler_options=options, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="dask-jobqueue YAML file")
    p.add_argument(
        "--section", default=DEFAULT_SECTION, help="jobqueue section (lplr-cpu, lplr-gpu)"
    )
    p.add_argument("--jobs", type=int, default=1, help="SLURM jobs to keep running (default 1)")
    p.add_argument(
        "--adapt-max-jobs",
        type=int,
        default=None,
        metavar="N",
        help="scale adaptively between --jobs and N jobs instead of a fixed count",
    )
    p.add_argument("--host", default=None, help="scheduler listen host/IP (default: all)")
    p.add_argument("--port", type=int, default=None, help="scheduler port (config: 8786)")
    p.add_argument("--interface", default=None, help="network interface for scheduler and workers")
    p.add_argument(
        "--address-file", default=None, help="also write the scheduler address to this file"
    )
    p.add_argument(
        "--print-job-script",
        action="store_true",
        help="print the job script that would be submitted, submit nothing, exit",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port

    # The config must stay set while the cluster lives: dask-jobqueue reads it for every job.
    with use_config(load_config(args.config)):
        cluster = build_cluster(args.section, interface=args.interface, scheduler_options=overrides)
        try:
            if args.print_job_script:
                print(cluster.job_script())
                return 0
            if args.adapt_max_jobs is not None:
                cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.adapt_max_jobs)
            else:
                cluster.scale(jobs=args.jobs)
            address = cluster.scheduler_address
            if args.address_file:
                Path(args.address_file).write_text(address + "\n")
            print(f"Dask scheduler: {address}   dashboard: {cluster.dashboard_link}", flush=True)
            print(f"flow config:    cluster: {{kind: address, address: {address}}}", flush=True)
            print("Ctrl-C (or SIGTERM) stops the cluster and cancels its SLURM jobs.", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
