"""Prefect flow ``compress-checkpoint``: a safetensors checkpoint, tensor by tensor.

The plan (headers only, every check) is one task; ``compress-tensors`` runs
:func:`lplr_dask.checkpoint.run_tensors` on the cluster: one Dask task per tensor that fits a
worker (``auto``: its estimated curve, then, after the allocation, its one compression), the
tiled path for larger ones; ``finalize`` writes the compressed checkpoint and publishes it.
Artifacts: the per-tensor table, a summary, and a progress bar advanced per tensor and step.

The computation is in :mod:`lplr_dask.checkpoint`; tasks run in the flow process and submit
work through a ``distributed.Client`` (see :mod:`pipelines.flows`).
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from lplr_dask.checkpoint import (
    CheckpointPlan,
    TensorPolicy,
    finalize_checkpoint,
    plan_checkpoint,
    run_tensors,
    tensor_rows,
)
from lplr_dask.checkpoint.measure import DEFAULT_STAGE_THRESHOLD
from lplr_dask.storage.fs import check_output_path, scratch_dir
from pipelines.config import ClusterConfig

from .flows import IO_RETRY

__all__ = ["compress_checkpoint_flow"]


@task(name="plan-checkpoint", cache_policy=NONE, **IO_RETRY)
def plan_task(src: str, budget: float, method: str, policy: dict, seed: int, group_size: int):
    plan = plan_checkpoint(
        src,
        budget=budget,
        method=method,
        policy=TensorPolicy.from_dict(policy) if policy else None,
        seed=seed,
        group_size=group_size,
    )
    get_run_logger().info(
        "%s: %d tensors, %d to compress (%s), budget %s bits per compressed parameter",
        src,
        len(plan.entries),
        len(plan.compressed),
        method,
        budget,
    )
    return plan


@task(name="compress-tensors", cache_policy=NONE, retries=1, retry_delay_seconds=3)
def tensors_task(plan: CheckpointPlan, work_dir: str, progress_id, stage_threshold_bytes: int):
    logger = get_run_logger()
    steps = 2 if plan.method == "auto" else 1

    def on_tensor(event):
        part = 0 if event["step"] == "estimate" or steps == 1 else 1
        update_progress_artifact(
            progress_id,
            100.0 * (part + event["done"] / max(event["total"], 1)) / steps,
            description=f"{event['step']}: {event['done']}/{event['total']} tensors",
        )
        logger.info(
            "%s %s (%s): %.2f s [%d/%d]",
            event["step"],
            event["name"],
            event["path"],
            event["seconds"],
            event["done"],
            event["total"],
        )

    out = run_tensors(
        plan, work_dir, stage_threshold_bytes=stage_threshold_bytes, on_tensor=on_tensor
    )
    return {"allocation": out["allocation"], "seconds": out["seconds"]}


@task(name="finalize", cache_policy=NONE, **IO_RETRY)
def finalize_task(plan: CheckpointPlan, dst: str, work_dir: str, overwrite: bool, seconds: float):
    return finalize_checkpoint(plan, dst, work_dir=work_dir, overwrite=overwrite, seconds=seconds)


@flow(name="compress-checkpoint", task_runner=ThreadPoolTaskRunner(max_workers=2))
def compress_checkpoint_flow(
    src: str,
    dst: str,
    budget: float = 4.0,
    method: str = "auto",
    policy: dict | None = None,
    seed: int = 0,
    group_size: int = 128,
    cluster: ClusterConfig = ClusterConfig(),  # noqa: B008
    work_dir: str | None = None,
    overwrite: bool = False,
    stage_threshold_bytes: int = DEFAULT_STAGE_THRESHOLD,
) -> dict:
    """Compress a Hugging Face-style safetensors checkpoint directory into DST.

    Parameters
    ----------
    src, dst : str
        Source checkpoint directory and the compressed checkpoint to create.
    budget : float, default 4.0
        Bits per compressed parameter, over all compressed tensors together.
    method : str, default "auto"
        ``auto`` (per-tensor method, rank and bits from the planner's estimated curves, then
        one compression per tensor) or one of
        ``lplr``, ``paper``, ``nq``, ``nq+lplr``, ``dsvd``, ``lplr-svd``.
    policy : dict, optional
        :class:`lplr_dask.checkpoint.TensorPolicy` fields (which tensors, overrides).
    seed, group_size : int
    cluster : ClusterConfig
    work_dir : str, optional
        Keep the per-tensor estimates and compressions here (reused by later runs); by
        default a temporary directory beside DST, removed at the end.
    overwrite : bool, default False
    stage_threshold_bytes : int, default 256 MiB
        Larger tensors (and those too large for a worker's memory) take the tiled path.

    Returns
    -------
    dict
        :meth:`lplr_dask.checkpoint.CheckpointResult.to_dict`.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = check_output_path(dst, overwrite=overwrite, inputs=[src])
    plan = plan_task(src, budget, method, policy or {}, seed, group_size)
    progress = create_progress_artifact(0.0, key="lplr-checkpoint-progress", description="plan")
    with scratch_dir(out, work_dir) as work, cluster.client() as client:
        logger.info("Dask dashboard %s", client.dashboard_link)
        tensors_task(plan, str(work), progress, stage_threshold_bytes)
        result = finalize_task(plan, str(out), str(work), overwrite, time.perf_counter() - t0)
    create_table_artifact(
        tensor_rows(result.tensors), key="lplr-checkpoint-tensors", description=f"{src} → {dst}"
    )
    create_markdown_artifact(
        f"# {src} → {dst}\n\n"
        f"**{result.method}** at {result.budget} bits per compressed parameter: "
        f"{result.bits_per_parameter:.4f} measured over {result.compressed_parameters:,} "
        f"compressed parameters ({result.overall_bits_per_parameter:.3f} over all "
        f"{result.total_parameters:,}); relative error per parameter (RMS) "
        f"{result.mean_rel_error2**0.5:.4f}; total squared error {result.total_error2:.4g}; "
        f"{result.seconds:.1f} s.\n\n" + result.table(),
        key="lplr-checkpoint-report",
    )
    update_progress_artifact(progress, 100.0, description="published")
    return result.to_dict()
