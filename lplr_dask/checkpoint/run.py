"""Compress a checkpoint: allocate the budget over the measured curves and write the compressed
checkpoint (:func:`finalize_checkpoint`), or all steps at once (:func:`compress_checkpoint`)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lplr_dask.checkpoint.index import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    PASSTHROUGH_FILE,
    check_relative,
    file_checksums,
    index_sha256,
    inside,
)
from lplr_dask.checkpoint.measure import (
    DEFAULT_STAGE_THRESHOLD,
    compress_tensor,
    read_curve,
    safe_name,
    tensor_dir,
    tensor_fingerprint,
)
from lplr_dask.checkpoint.plan import CheckpointPlan, plan_checkpoint
from lplr_dask.checkpoint.policy import (
    AUTO,
    DEFAULT_CANDIDATE_BUDGETS,
    TensorPolicy,
    allocate,
)
from lplr_dask.checkpoint.report import CheckpointResult
from lplr_dask.checkpoint.safetensors_io import Header, copy_raw, read_header, write_safetensors
from lplr_dask.errors import (
    IntegrityError,
    ParameterError,
    StorageFormatError,
)
from lplr_dask.storage.fs import (
    check_output_path,
    publish,
    scratch_dir,
    temporary_output,
)

__all__ = ["compress_checkpoint", "finalize_checkpoint"]


def _choose(plan: CheckpointPlan, curves: dict) -> dict[str, str]:
    compressed = plan.compressed
    if not compressed:
        return {}
    data = {
        e.name: {
            k: (8.0 * p["stored_bytes"], p["error2"])
            for k, p in curves[e.name]["points"].items()
            if k in {c["key"] for c in e.candidates}
        }
        for e in compressed
    }
    if plan.method != AUTO:
        return {e.name: e.candidates[0]["key"] for e in compressed}
    total = plan.budget * sum(e.numel for e in compressed)
    baselines = []
    for m in ("nq", "lplr", "paper", "nq+lplr"):
        base = {}
        for e in compressed:
            base[e.name] = e.baselines.get(m) or (
                e.candidates[0]["key"] if len(e.candidates) == 1 else None
            )
        if all(base.values()):
            baselines.append(base)
    return allocate(data, total_bits=total, baselines=baselines)


def finalize_checkpoint(
    plan: CheckpointPlan | Mapping,
    dst,
    *,
    work_dir,
    overwrite: bool = False,
    seconds: float | None = None,
) -> CheckpointResult:
    """Choose each tensor's configuration, write DST and publish it.

    For ``auto`` the measured curves are allocated by :func:`lplr_dask.checkpoint.policy.allocate`
    under ``plan.budget``; for a single method each tensor takes its one candidate. Each chosen
    group is verified chunk by chunk (:func:`lplr_dask.storage.reader.verify_compressed`) before
    it is copied; the index records the sha256 of every file written and of itself. Everything is
    written into a temporary sibling of ``dst`` that is renamed into place when complete.

    Parameters
    ----------
    plan : CheckpointPlan or dict
    dst : str or path
        The compressed checkpoint directory to create.
    work_dir : str or path
        Where :func:`compress_tensor` measured every compressed tensor.
    overwrite : bool, default False
    seconds : float, optional
        Elapsed time to record (default: time spent here).

    Returns
    -------
    CheckpointResult
    """
    from lplr_dask.storage.reader import verify_compressed

    t0 = time.perf_counter()
    if not isinstance(plan, CheckpointPlan):
        plan = CheckpointPlan.from_dict(plan)
    out = check_output_path(dst, overwrite=overwrite, inputs=[plan.source])
    curves = {}
    for e in plan.compressed:
        curve = read_curve(tensor_dir(work_dir, e.name))
        if curve.get("fingerprint") != tensor_fingerprint(e):
            curve = {"points": {}}
        missing = [c["key"] for c in e.candidates if c["key"] not in curve["points"]]
        if missing:
            raise ParameterError(
                f"tensor {e.name} has unmeasured candidates ({', '.join(missing[:3])}) in "
                f"work_dir {work_dir}; run compress_tensor on it first."
            )
        curves[e.name] = curve
    choice = _choose(plan, curves)
    rows = []
    src_dir = Path(plan.source)
    with temporary_output(out) as tmp:
        (tmp / "tensors").mkdir()
        passthrough = []
        headers: dict[str, Header] = {}
        for e in plan.entries:
            row = {
                "name": e.name,
                "shape": list(e.shape),
                "dtype": e.dtype,
                "shard": e.shard,
                "numel": e.numel,
            }
            if e.action == "compress":
                key = choice[e.name]
                p = curves[e.name]["points"][key]
                group = f"tensors/{safe_name(e.name)}.zarr"
                measured = tensor_dir(work_dir, e.name) / f"{key}.zarr"
                if not (measured / "zarr.json").is_file():
                    raise StorageFormatError(
                        f"work_dir {work_dir} lists {key} for {e.name} but its group {measured} "
                        "is missing; delete that tensor's folder and run compress_tensor again."
                    )
                try:  # never seal a damaged measurement into the checkpoint
                    verify_compressed(measured)
                except StorageFormatError as exc:
                    raise IntegrityError(
                        f"the measurement of {e.name} in work_dir is damaged ({exc}). Delete "
                        f"{measured.parent} and rerun; it will be measured again."
                    ) from exc
                shutil.copytree(measured, tmp / group)
                row.update(
                    storage="compressed",
                    group=group,
                    candidate=key,
                    **{
                        k: p[k]
                        for k in (
                            "method",
                            "rank",
                            "bits_left",
                            "bits_right",
                            "bits_matrix",
                            "group_size",
                            "stored_bytes",
                            "bits_per_entry",
                            "rel_fro_error",
                            "error2",
                        )
                    },
                )
            else:
                row.update(storage="passthrough", file=PASSTHROUGH_FILE, reason=e.reason)
                if e.file not in headers:
                    headers[e.file] = read_header(Path(e.file))
                info = headers[e.file]
                off = info.tensors[e.name]["data_offsets"]
                passthrough.append(
                    (
                        e.name,
                        e.dtype,
                        e.shape,
                        copy_raw(Path(e.file), info.data_start + off[0], off[1] - off[0]),
                    )
                )
            rows.append(row)
        if passthrough:
            write_safetensors(tmp / PASSTHROUGH_FILE, passthrough)
        for i, rel in enumerate(plan.extra_files):
            check_relative(rel, where=f"plan.extra_files[{i}]")
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            inside(tmp, rel, where=f"plan.extra_files[{i}]")
            shutil.copy2(src_dir / rel, target)
        comp = [r for r in rows if r["storage"] == "compressed"]
        c_params = sum(r["numel"] for r in comp)
        t_params = sum(r["numel"] for r in rows)
        c_bits = sum(8 * r["stored_bytes"] for r in comp)
        p_bits = sum(
            8 * r["numel"] * DTYPES[r["dtype"]][0] for r in rows if r["storage"] != "compressed"
        )
        result = CheckpointResult(
            output=str(out),
            method=plan.method,
            budget=plan.budget,
            bits_per_parameter=c_bits / c_params if c_params else 0.0,
            overall_bits_per_parameter=(c_bits + p_bits) / t_params if t_params else 0.0,
            compressed_parameters=c_params,
            total_parameters=t_params,
            total_error2=float(sum(r["error2"] for r in comp)),
            seconds=seconds if seconds is not None else time.perf_counter() - t0,
            tensors=rows,
        )
        index = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source": plan.source,
            "sharded": plan.sharded,
            "index_metadata": plan.index_metadata,
            "shard_metadata": plan.shard_metadata,
            "files": list(plan.extra_files),
            "plan": {k: v for k, v in plan.to_dict().items() if k != "entries"},
            "summary": {k: v for k, v in result.to_dict().items() if k != "tensors"},
            "tensors": rows,
        }
        index["checksums"] = file_checksums(
            tmp,
            [PASSTHROUGH_FILE] * bool(passthrough) + list(plan.extra_files),
            [r["group"] for r in comp],
        )
        index["index_sha256"] = index_sha256(index)
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
        publish(tmp, out)
    return result


def compress_checkpoint(
    src,
    dst,
    *,
    budget: float,
    method: str = AUTO,
    policy: TensorPolicy | None = None,
    candidate_budgets: Sequence[float] = DEFAULT_CANDIDATE_BUDGETS,
    seed: int = 0,
    group_size: int = 128,
    work_dir=None,
    stage_threshold_bytes: int = DEFAULT_STAGE_THRESHOLD,
    overwrite: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
) -> CheckpointResult:
    """Compress a safetensors checkpoint directory tensor by tensor.

    :func:`plan_checkpoint`, then :func:`compress_tensor` on every compressed tensor, then
    :func:`finalize_checkpoint`. Nothing is created under ``dst`` unless the whole checkpoint
    succeeds; validation errors are raised before any output exists.

    Parameters
    ----------
    src : str or path
        Hugging Face-style checkpoint directory (``model.safetensors`` or shards + index).
    dst : str or path
        The compressed checkpoint directory to create.
    budget : float
        Bits per compressed parameter over all compressed tensors (see :func:`plan_checkpoint`).
    method : str, default "auto"
        ``auto`` chooses method, rank and bits per tensor from measured error curves to
        minimise the total squared error; or one of ``lplr``, ``paper``, ``nq``, ``nq+lplr``,
        ``dsvd``, ``lplr-svd`` at ``budget`` on every tensor.
    policy : TensorPolicy, optional
    candidate_budgets : sequence of float, default (2, 3, 4)
    seed, group_size : int
    work_dir : str or path, optional
        Keep measurements here to reuse them for other budgets or methods (default: a temporary
        directory beside ``dst``, removed at the end).
    stage_threshold_bytes : int, default 256 MiB
    overwrite : bool, default False
    on_tensor : callable, optional
        ``on_tensor(name, i, n)`` before each compressed tensor (progress).

    Returns
    -------
    CheckpointResult
    """
    t0 = time.perf_counter()
    out = check_output_path(dst, overwrite=overwrite, inputs=[src] if Path(src).exists() else ())
    plan = plan_checkpoint(
        src,
        budget=budget,
        method=method,
        policy=policy,
        candidate_budgets=candidate_budgets,
        seed=seed,
        group_size=group_size,
    )
    with scratch_dir(out, work_dir) as work:
        todo = plan.compressed
        for i, e in enumerate(todo):
            if on_tensor is not None:
                on_tensor(e.name, i, len(todo))
            compress_tensor(e, work_dir=work, stage_threshold_bytes=stage_threshold_bytes)
        return finalize_checkpoint(
            plan, out, work_dir=work, overwrite=overwrite, seconds=time.perf_counter() - t0
        )
