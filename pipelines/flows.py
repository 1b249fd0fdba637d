"""Prefect flows that run lplr-dask compressions on a Dask cluster.

``compress-matrix``
    One matrix. Its task runs are the stages of :class:`lplr_dask.core.job.CompressionJob`
    (open-and-validate, plan, quantize-matrix, sketch, basis, project, verify, publish), so
    the Prefect UI shows each stage's duration; a rerun after a crash resumes from the last
    finished stage (``resume=True``, the default).
``compress-matrices``
    A batch from a YAML configuration (``configs/``): a list, a glob or a Zarr group of
    matrices, one ``compress-matrix`` subflow each, on one cluster.

Every run publishes artifacts: a result table, a markdown report (Dask dashboard link, stage
timings) and a progress bar updated as tiles complete.

The flows are thin: the computation is in :mod:`lplr_dask`. Tasks run in the flow process and
submit Dask graphs through a ``distributed.Client``; no Prefect task runs on a Dask worker, so
a cluster of single-threaded workers (LocalCUDACluster on one GPU) cannot deadlock, and Dask
workers never start Prefect servers of their own.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE

from lplr_dask.core.job import STAGES, CompressionJob
from lplr_dask.core.params import CompressionOptions
from lplr_dask.errors import LPLRError
from pipelines.config import ClusterConfig, FlowConfig, expand, load_config

__all__ = ["IO_RETRY", "BatchFailed", "compress_matrices", "compress_matrix"]


class BatchFailed(RuntimeError):
    """Some matrices of a batch failed (the others were compressed)."""


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O hiccups and lost workers, not a user's mistake (it would fail again)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return not isinstance(exc, LPLRError)


IO_RETRY = dict(retries=2, retry_delay_seconds=3, retry_condition_fn=_retry_unless_user_error)
"""Task options for I/O (open, publish, generate, plan, finalize): two retries, none for a
user's mistake."""


class _Progress:
    """A progress artifact advanced as the tiles of each stage complete."""

    def __init__(self, job: CompressionJob, key: str):
        self.job = job
        self.id = create_progress_artifact(0.0, key=key, description="starting")

    def update(self, description: str, fraction_of_stage: float = 0.0) -> None:
        stages = self.job.stages
        stage = self.job.current_stage
        done = sum(1 for s in stages if s in self.job.records)
        i = stages.index(stage) if stage in stages else done
        pct = 100.0 * min(1.0, (i + fraction_of_stage) / len(stages))
        update_progress_artifact(self.id, pct, description=description)

    def on_stage(self, substage: str, futures) -> None:
        from distributed import as_completed

        total, done, last = len(futures), 0, 0.0
        for _ in as_completed(futures):
            done += 1
            now = time.monotonic()
            if now - last >= 1.0 or done == total:
                last = now
                self.update(
                    f"{self.job.current_stage} ({substage}): {done}/{total} tasks", done / total
                )


@task(name="open-and-validate", cache_policy=NONE, **IO_RETRY)
def open_job(
    source: str,
    output: str,
    compression: CompressionOptions,
    *,
    overwrite: bool,
    resume: bool,
    verify: bool,
    allow_missing_chunks: bool,
    device: str = "cpu",
) -> CompressionJob:
    """Open the input, check OUTPUT and the parameters, and take the job's work directory."""
    logger = get_run_logger()
    job = CompressionJob.create(
        source,
        output,
        compression,
        overwrite=overwrite,
        resume=resume,
        verify=verify,
        allow_missing_chunks=allow_missing_chunks,
        device=device,
    )
    done = job.open()
    logger.info(
        "%s: %s×%s %s, job key %s, stages %s, tiles on the %s",
        source,
        *job.matrix.shape,
        job.matrix.source_dtype,
        job.key[:16],
        ", ".join(job.stages),
        device.upper(),
    )
    if done:
        logger.info("resuming: stages %s were finished by an earlier run", ", ".join(done))
    return job


@task(cache_policy=NONE)
def run_stage(job: CompressionJob, stage: str) -> dict:
    """One stage of the job (a no-op when an earlier run finished it)."""
    logger = get_run_logger()
    reused = stage in job.records
    rec = job.run_stage(stage)
    if reused:
        logger.info("%s: reused from an earlier run (took %.2f s there)", stage, rec.seconds)
    else:
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in rec.substages.items())
        logger.info("%s: %.2f s%s", stage, rec.seconds, f" ({parts})" if parts else "")
    return {"stage": stage, "seconds": rec.seconds, "reused": rec.reused}


def _result_row(r: dict) -> dict:
    n, d = r["shape"]
    itemsize = {"float16": 2, "float32": 4, "float64": 8}.get(r["source_dtype"], 4)
    bits = "/".join(
        str(r[k]) for k in ("bits_left", "bits_right", "bits_matrix") if r.get(k) is not None
    )
    return {
        "output": r["output"],
        "shape": f"{n}×{d}",
        "method": r["method"],
        "rank": r["rank"] if r["rank"] is not None else "-",
        "bits (B/B'/B_nq)": bits,
        "bits_per_entry": round(r["bits_per_entry"], 4),
        "rel_fro_error": round(r["rel_fro_error"], 6),
        "passes": r.get("passes", 2),
        "error": "estimated" if r.get("error_is_estimate") else "exact",
        "seconds": round(r["seconds"], 2),
        "throughput_MB_per_s": round(n * d * itemsize / 1e6 / max(r["seconds"], 1e-9), 1),
        "reused_stages": ", ".join(r.get("reused_stages") or []) or "-",
    }


def _report(job: CompressionJob, result: dict, stage_rows: list[dict], dashboard: str) -> str:
    lines = [
        f"# {job.matrix.path or 'array'} → {result['output']}",
        "",
        f"Dask dashboard: [{dashboard}]({dashboard})" if dashboard else "Dask dashboard: none",
        "",
        f"**{result['method']}**, rank {result['rank']}, "
        f"{result['bits_per_entry']:.4f} bits per entry, relative Frobenius error "
        f"{result['rel_fro_error']:.6f}, {result['stored_bytes']:,} bytes stored, "
        f"{result['seconds']:.2f} s.",
        "",
        "| stage | seconds | reused |",
        "|---|---:|---|",
        *(
            f"| {r['stage']} | {r['seconds']:.2f} | {'yes' if r['reused'] else ''} |"
            for r in stage_rows
        ),
        "",
        "Engine sub-stages: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in result["stage_seconds"].items()),
        "",
        f"Job key `{job.key[:16]}`; work directory `{job.work_dir}` (removed on success).",
    ]
    if result.get("error_method"):  # passes=1: how the error was obtained
        lines += ["", f"Error ({result['passes']} pass): {result['error_method']}"]
    verify = job.records.get("verify")
    if verify and "independent_rel_fro_error" in verify.values:
        lines.append(
            f"Independent check: {verify.values['independent_rel_fro_error']:.6f} "
            "(blockwise pass over A and the stored codes)."
        )
    return "\n".join(lines)


@flow(name="compress-matrix")
def compress_matrix(
    source: str,
    output: str,
    compression: CompressionOptions = CompressionOptions(budget=1.0),  # noqa: B008
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008
    overwrite: bool = False,
    resume: bool = True,
    verify: bool = False,
    allow_missing_chunks: bool = False,
) -> dict:
    """Compress one matrix (Zarr array or .npy) into OUTPUT with lplr-dask.

    Parameters
    ----------
    source, output : str
        INPUT and OUTPUT of ``lplr compress``.
    compression : CompressionOptions, default ``CompressionOptions(budget=1.0)``
        method, rank or budget, bits, seed, ... (:class:`lplr_dask.CompressionOptions`; with
        a budget and no method, ``auto``).
    cluster : ClusterConfig
        A new local cluster (default), a LocalCUDACluster, or a scheduler address; and where
        the tiles are computed (``device``: the GPU on a LocalCUDACluster).
    overwrite : bool, default False
    resume : bool, default True
        Reuse the stages an earlier crashed run finished (same input and parameters).
    verify : bool, default False
        Also check the error by an independent pass over A before publishing.
    allow_missing_chunks : bool, default False
        Read chunks missing from a Zarr INPUT as its fill value instead of refusing it.

    Returns
    -------
    dict
        :meth:`lplr_dask.CompressionResult.to_dict`.
    """
    logger = get_run_logger()
    job = open_job(
        source,
        output,
        compression,
        overwrite=overwrite,
        resume=resume,
        verify=verify,
        allow_missing_chunks=allow_missing_chunks,
        device=cluster.compute_device,
    )
    progress = _Progress(job, key="lplr-progress")
    job.engine.on_stage = progress.on_stage
    stage_rows = []
    try:
        with cluster.client() as client:
            dashboard = client.dashboard_link or ""
            logger.info("Dask cluster %s, dashboard %s", client.scheduler.address, dashboard)
            for stage in STAGES:
                if stage not in job.stages:  # re-read: the plan decides the low-rank stages
                    continue
                opts = IO_RETRY if stage == "publish" else {"retries": 1, "retry_delay_seconds": 3}
                job.current_stage = stage
                progress.update(f"{stage}: started")
                stage_rows.append(run_stage.with_options(name=stage, **opts)(job, stage))
    except BaseException:
        job.close(failed=True)  # keeps the finished stages when resume=True
        raise
    update_progress_artifact(progress.id, 100.0, description="published")
    result = job.result.to_dict()
    create_table_artifact(
        [_result_row(result)],
        key="lplr-result",
        description=f"Compression of {source}",
    )
    create_markdown_artifact(
        _report(job, result, stage_rows, dashboard),
        key="lplr-report",
        description=f"Report for {output}",
    )
    logger.info(
        "%s: rank %s, %.4f bits per entry, error %.6f, %.2f s",
        result["method"],
        result["rank"],
        result["bits_per_entry"],
        result["rel_fro_error"],
        result["seconds"],
    )
    return result


@task(name="generate-inputs", cache_policy=NONE, **IO_RETRY)
def generate_inputs(config: FlowConfig) -> list[str]:
    """Write the configured synthetic matrices that are missing (demo configurations)."""
    written = [p for p in map(expand, config.inputs.paths) if config.generate.ensure(p)]
    if written:
        get_run_logger().info("generated %s", ", ".join(written))
    return written


@flow(name="compress-matrices")
def compress_matrices(config_path: str | None = None, config: FlowConfig | None = None) -> list:
    """Compress every matrix a configuration names, one ``compress-matrix`` subflow each.

    Parameters
    ----------
    config_path : str, optional
        A YAML file (see ``configs/``), validated on load.
    config : FlowConfig, optional
        The configuration itself, instead of ``config_path``.

    Returns
    -------
    list of dict
        One result per matrix. Every matrix is attempted; the flow fails at the end if any
        failed, naming them.
    """
    logger = get_run_logger()
    if (config is None) == (config_path is None):
        raise LPLRError("compress-matrices needs config_path or config (one of them).")
    cfg = config if config is not None else load_config(config_path)
    results, failed = [], []
    with cfg.cluster.client() as client:
        if cfg.generate is not None:
            generate_inputs(cfg)
        pairs = cfg.jobs()
        Path(expand(cfg.output_dir)).mkdir(parents=True, exist_ok=True)
        logger.info("%d matri%s to compress", len(pairs), "x" if len(pairs) == 1 else "ces")
        here = ClusterConfig(
            kind="address", address=client.scheduler.address, device=cfg.cluster.compute_device
        )
        for source, output in pairs:
            state = compress_matrix(
                source,
                output,
                compression=cfg.compression,
                cluster=here,
                overwrite=cfg.overwrite,
                resume=cfg.resume,
                verify=cfg.verify,
                allow_missing_chunks=cfg.allow_missing_chunks,
                return_state=True,
            )
            if state.is_completed():
                results.append(state.result())
            else:
                failed.append(f"{source} ({state.message})")
    if len(pairs) > 1:
        create_table_artifact(
            [_result_row(r) for r in results],
            key="lplr-batch",
            description=f"{cfg.name}: {len(results)} of {len(pairs)} compressed",
        )
    if failed:
        raise BatchFailed(
            f"{len(failed)} of {len(pairs)} matrices failed: {'; '.join(failed)}. See their "
            "compress-matrix flow runs; rerun this flow to resume them."
        )
    return results
