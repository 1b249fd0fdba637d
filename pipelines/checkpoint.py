"""Prefect flow ``compress-checkpoint``: a safetensors checkpoint, tensor by tensor.

The plan (headers only, every check) is one task; each compressed tensor is one
``compress-tensor`` task run, submitted to a thread pool so that several tensors' Dask graphs
run on the cluster at once; ``finalize`` chooses each tensor's configuration (``auto``: the
knapsack over the measured error curves), writes the compressed checkpoint and publishes it.
Artifacts: the per-tensor table, a summary, and a progress bar advanced per tensor.

The computation is in :mod:`lplr_dask.checkpoint`; tasks run in the flow process and submit
Dask graphs through a ``distributed.Client`` (see :mod:`pipelines.flows`).
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task, unmapped
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
    compress_tensor,
    finalize_checkpoint,
    plan_checkpoint,
    tensor_rows,
)
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


@task(name="compress-tensor", cache_policy=NONE, retries=1, retry_delay_seconds=3)
def tensor_task(entry: dict, work_dir: str, progress_id, counter: list, total: int) -> dict:
    t0 = time.perf_counter()
    curve = compress_tensor(entry, work_dir=work_dir)
    counter.append(entry["name"])  # list.append is atomic under the GIL
    update_progress_artifact(
        progress_id,
        100.0 * len(counter) / max(total, 1),
        description=f"{len(counter)}/{total} tensors measured",
    )
    get_run_logger().info(
        "%s %s: %d candidates in %.2f s",
        entry["name"],
        "×".join(map(str, entry["shape"])),
        len(curve["points"]),
        time.perf_counter() - t0,
    )
    return {"name": entry["name"], "candidates": len(curve["points"])}


@task(name="finalize", cache_policy=NONE, **IO_RETRY)
def finalize_task(plan: CheckpointPlan, dst: str, work_dir: str, overwrite: bool, seconds: float):
    return finalize_checkpoint(plan, dst, work_dir=work_dir, overwrite=overwrite, seconds=seconds)


@flow(name="compress-checkpoint", task_runner=ThreadPoolTaskRunner(max_workers=4))
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
) -> dict:
    """Compress a Hugging Face-style safetensors checkpoint directory into DST.

    Parameters
    ----------
    src, dst : str
        Source checkpoint directory and the compressed checkpoint to create.
    budget : float, default 4.0
        Bits per compressed parameter, over all compressed tensors together.
    method : str, default "auto"
        ``auto`` (per-tensor method, rank and bits from measured error curves) or one of
        ``lplr``, ``paper``, ``nq``, ``nq+lplr``, ``dsvd``, ``lplr-svd``.
    policy : dict, optional
        :class:`lplr_dask.checkpoint.TensorPolicy` fields (which tensors, overrides).
    seed, group_size : int
    cluster : ClusterConfig
    work_dir : str, optional
        Keep the per-tensor measurements here (reused by later runs at other budgets); by
        default a temporary directory beside DST, removed at the end.
    overwrite : bool, default False

    Returns
    -------
    dict
        :meth:`lplr_dask.checkpoint.CheckpointResult.to_dict`.
    """
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = check_output_path(dst, overwrite=overwrite, inputs=[src])
    plan = plan_task(src, budget, method, policy or {}, seed, group_size)
    entries = [e.to_dict() for e in plan.compressed]
    progress = create_progress_artifact(0.0, key="lplr-checkpoint-progress", description="plan")
    with scratch_dir(out, work_dir) as work, cluster.client() as client:
        logger.info("Dask dashboard %s", client.dashboard_link)
        done: list[str] = []
        futures = tensor_task.map(
            entries, unmapped(str(work)), unmapped(progress), unmapped(done), unmapped(len(entries))
        )
        futures.result()  # raises the first failure
        result = finalize_task(plan, str(out), str(work), overwrite, time.perf_counter() - t0)
    create_table_artifact(
        tensor_rows(result.tensors), key="lplr-checkpoint-tensors", description=f"{src} → {dst}"
    )
    create_markdown_artifact(
        f"# {src} → {dst}\n\n"
        f"**{result.method}** at {result.budget} bits per compressed parameter: "
        f"{result.bits_per_parameter:.4f} measured over {result.compressed_parameters:,} "
        f"compressed parameters ({result.overall_bits_per_parameter:.3f} over all "
        f"{result.total_parameters:,}); total squared error {result.total_error2:.4g}; "
        f"{result.seconds:.1f} s.\n\n" + result.table(),
        key="lplr-checkpoint-report",
    )
    update_progress_artifact(progress, 100.0, description="published")
    return result.to_dict()
