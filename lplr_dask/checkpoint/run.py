"""Compress a checkpoint: allocate the budget over the measured curves and write the compressed
checkpoint (:func:`finalize_checkpoint`), or all steps at once (:func:`compress_checkpoint`)."""

from __future__ import annotations

import json
import shutil
import time
import uuid
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
    estimate_tensor,
    read_curve,
    read_estimates,
    safe_name,
    tensor_dir,
    tensor_fingerprint,
)
from lplr_dask.checkpoint.plan import CheckpointPlan, TensorEntry, plan_checkpoint
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

__all__ = [
    "MEMORY_BYTES_PER_ENTRY",
    "choose_candidates",
    "compress_checkpoint",
    "curve_budgets",
    "finalize_checkpoint",
    "run_tensors",
]

MEMORY_BYTES_PER_ENTRY = 32
"""Worker memory a tensor needs on the in-memory path, per entry: the float32 tensor (4), its
dequantized copy and residual (8), the float64 partial products of the sketch and projection
and the codes (≈ 16), with room to spare. A tensor whose entries × this exceeds the smallest
worker's memory limit takes the tiled path (staged Zarr, out of core) instead."""


def curve_budgets(plan: CheckpointPlan) -> list[float]:
    """The budgets at which ``auto`` asks the planner for each tensor's low-rank points."""
    return sorted({float(b) for b in (*plan.candidate_budgets, plan.budget)})


# ---------------------------------------------------------------------------- the allocation


def _auto_curves(plan: CheckpointPlan, work_dir) -> dict:
    """{tensor: {key: point}} for ``auto``: the estimates of each tensor, or the measured point
    of an override (compressed before the allocation; its bits count against the budget)."""
    curves = {}
    for e in plan.compressed:
        tdir = tensor_dir(work_dir, e.name)
        if e.candidates:  # an override: one configuration, measured
            measured = read_curve(tdir)
            if measured.get("fingerprint") != tensor_fingerprint(e):
                measured = {"points": {}}
            key = e.candidates[0]["key"]
            if key not in measured["points"]:
                raise ParameterError(
                    f"tensor {e.name} (an override) is not compressed in work_dir {work_dir}; "
                    "run compress_tensor on it first (run_tensors does)."
                )
            p = measured["points"][key]
            curves[e.name] = {
                key: {
                    "candidate": e.candidates[0],
                    "method": p["method"],
                    "bits": 8.0 * p["stored_bytes"],
                    "estimated_error2": p["error2"],
                    "estimated_rel_error": p["rel_fro_error"],
                }
            }
            continue
        est = read_estimates(tdir)
        if est.get("fingerprint") != tensor_fingerprint(e) or not est["points"]:
            raise ParameterError(
                f"tensor {e.name} has no estimated curve in work_dir {work_dir}; run "
                "estimate_tensor on it first (run_tensors does)."
            )
        curves[e.name] = est["points"]
    return curves


def choose_candidates(plan: CheckpointPlan | Mapping, work_dir) -> tuple[dict, dict]:
    """The configuration of every compressed tensor, and what the allocation found.

    A single method (or an override): the tensor's one candidate. ``auto``: the knapsack of
    :func:`~lplr_dask.checkpoint.policy.allocate` over the estimated curves in ``work_dir``
    (bits exact, errors the planner's estimates), compared with every single method that
    fits on every tensor (per tensor its best estimated point within the budget), so that
    ``auto``'s estimated objective is never above theirs.

    The objective is scale-invariant: Σ_t n_t·ε_t², tensor t's squared relative error
    ε_t = ‖W_t − Ŵ_t‖_F / ‖W_t‖_F counted once per parameter (its squared error in units of its
    own mean square). A network with normalization layers is nearly invariant to the scale of
    many of its weights, so absolute errors of different tensors are not comparable: on
    all-MiniLM-L6-v2 the absolute objective gave the word embedding (half the parameters) the
    bits the attention and MLP weights needed (mean cosine 0.856 at 3 bits per parameter,
    0.93 with this one; README, "Checkpoints").

    Returns
    -------
    choice : dict
        ``{tensor: candidate dict}`` (``{"key", "options"}``).
    report : dict
        ``{"estimated_objective", "estimated_total_error2", "bits", "baselines": {method:
        {the same three}}}`` (``auto``; empty otherwise): the objective divided by Σ_t n_t
        (the parameter-weighted mean of ε_t²), the total absolute squared error and the
        stored bits of the choice.
    """
    if not isinstance(plan, CheckpointPlan):
        plan = CheckpointPlan.from_dict(plan)
    compressed = plan.compressed
    if plan.method != AUTO or not compressed:
        return {e.name: e.candidates[0] for e in compressed}, {}
    curves = _auto_curves(plan, work_dir)
    numel = {e.name: e.numel for e in compressed}
    data = {
        t: {k: (p["bits"], numel[t] * p["estimated_rel_error"] ** 2) for k, p in c.items()}
        for t, c in curves.items()
    }
    n_total = sum(numel.values())
    total = plan.budget * n_total
    baselines = {}
    for m in sorted({p["method"] for c in curves.values() for p in c.values()}):
        base = {}
        for e in compressed:
            pts = curves[e.name]
            if e.candidates:
                base[e.name] = next(iter(pts))
                continue
            fit = [
                (p["estimated_rel_error"], k)
                for k, p in pts.items()
                if p["method"] == m and p["bits"] <= plan.budget * e.numel
            ]
            if not fit:
                break
            base[e.name] = min(fit)[1]
        else:
            baselines[m] = base
    keys = allocate(data, total_bits=total, baselines=list(baselines.values()))

    def totals(sel):
        return {
            "estimated_objective": float(sum(data[t][k][1] for t, k in sel.items()) / n_total),
            "estimated_total_error2": float(
                sum(curves[t][k]["estimated_error2"] for t, k in sel.items())
            ),
            "bits": float(sum(data[t][k][0] for t, k in sel.items())),
        }

    report = {**totals(keys), "baselines": {m: totals(b) for m, b in baselines.items()}}
    return {t: curves[t][k]["candidate"] for t, k in keys.items()}, report


# ---------------------------------------------------------------------------- running tensors


def _estimate_task(entry: dict, work_dir: str, budgets: list, group_size: int) -> dict:
    """One Dask task: read one tensor by name and estimate its curve here (returns a summary)."""
    t0 = time.perf_counter()
    est = estimate_tensor(entry, work_dir=work_dir, budgets=budgets, group_size=group_size)
    return {"points": len(est["points"]), "seconds": time.perf_counter() - t0}


def _compress_task(entry: dict, work_dir: str, candidate: dict) -> dict:
    """One Dask task: read one tensor by name, compress it here, write its group."""
    t0 = time.perf_counter()
    curve = compress_tensor(entry, work_dir=work_dir, candidate=candidate, in_memory=True)
    p = curve["points"][candidate["key"]]
    return {"rel_fro_error": p["rel_fro_error"], "seconds": time.perf_counter() - t0}


def _client():
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return None
    return client if client.status == "running" else None


def _worker_memory(client) -> int | None:
    """The smallest memory limit of the cluster's workers in bytes (None: unlimited)."""
    if client is None:
        return None
    limits = [int(w.get("memory_limit") or 0) for w in client.scheduler_info()["workers"].values()]
    limits = [v for v in limits if v > 0]
    return min(limits) if limits else None


def _fits(entry: TensorEntry, *, threshold: int, memory: int | None) -> bool:
    if entry.nbytes > threshold:
        return False
    return memory is None or entry.numel * MEMORY_BYTES_PER_ENTRY <= memory


def _fan_out(client, fn, jobs, on_done, name):
    """Run ``fn(*args)`` for ``jobs`` [(entry, args)] as one Dask task each on the cluster's
    workers (largest first), or on a local thread pool without a cluster; ``on_done(entry,
    result)`` as each finishes. The first failure is raised once the others are done."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    jobs = sorted(jobs, key=lambda j: -j[0].numel)
    if not jobs:
        return
    if client is not None:
        from distributed import as_completed as dask_completed

        futures = {
            client.submit(
                fn, *args, key=f"lplr-{name}-{safe_name(e.name)}-{uuid.uuid4().hex[:8]}",
                pure=False,
            ): e
            for e, args in jobs
        }  # fmt: skip
        errors = []
        for fut in dask_completed(futures):
            if fut.status == "error":
                errors.append(fut)
                continue
            on_done(futures[fut], fut.result())
        if errors:
            errors[0].result()
        return
    import os

    import dask

    threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {pool.submit(fn, *args): e for e, args in jobs}
        errors = []
        for fut in as_completed(futures):
            if fut.exception() is not None:
                errors.append(fut)
                continue
            on_done(futures[fut], fut.result())
        if errors:
            errors[0].result()


def run_tensors(
    plan: CheckpointPlan,
    work_dir,
    *,
    stage_threshold_bytes: int = DEFAULT_STAGE_THRESHOLD,
    on_tensor: Callable[[dict], None] | None = None,
) -> dict:
    """Estimate (``auto``), allocate, and compress every tensor of ``plan`` once, into
    ``work_dir``.

    A tensor that fits a worker's memory (its source bytes ≤ ``stage_threshold_bytes`` and
    its entries × :data:`MEMORY_BYTES_PER_ENTRY` ≤ the smallest worker memory limit) is one
    Dask task per step, spread over the workers of the active distributed client (without
    one, a thread pool here): the task reads the tensor from its safetensors file by name,
    estimates or compresses it with the synchronous scheduler and writes its result into
    ``work_dir``; only names, options and small summaries cross the network. A larger tensor
    is staged into tiled Zarr and both steps run out of core from this process, on the
    cluster. ``auto`` runs two rounds: the curves of every tensor (overrides: their one
    compression), then :func:`choose_candidates`, then one compression per tensor.

    Parameters
    ----------
    plan : CheckpointPlan
    work_dir : str or path
    stage_threshold_bytes : int, default 256 MiB
    on_tensor : callable, optional
        ``on_tensor(event)`` after each tensor's step, with ``event`` a dict: ``step``
        (``"estimate"`` or ``"compress"``), ``name``, ``done``, ``total``, ``path``
        (``"memory"`` or ``"tiled"``), ``seconds``.

    Returns
    -------
    dict
        ``{"choice": {tensor: candidate}, "allocation": report, "seconds": {step: s}}``.
    """
    client = _client()
    memory = _worker_memory(client)
    work = str(work_dir)
    todo = plan.compressed
    fits = {e.name: _fits(e, threshold=stage_threshold_bytes, memory=memory) for e in todo}
    budgets = curve_budgets(plan)
    seconds = {}

    def step(name, jobs_mem, run_tiled):
        t0 = time.perf_counter()
        total = len(jobs_mem) + len(run_tiled)
        done = []

        def report(e, res, path):
            done.append(e.name)
            if on_tensor is not None:
                on_tensor(
                    {
                        "step": name,
                        "name": e.name,
                        "done": len(done),
                        "total": total,
                        "path": path,
                        "seconds": res.get("seconds", 0.0),
                    }
                )

        fn = _estimate_task if name == "estimate" else _compress_task
        if client is None:  # the tiled ones first: the thread pool sets a synchronous scheduler
            for e, call in run_tiled:
                t1 = time.perf_counter()
                call()
                report(e, {"seconds": time.perf_counter() - t1}, "tiled")
            _fan_out(None, fn, jobs_mem, lambda e, r: report(e, r, "memory"), name)
        else:  # the tiled ones from a driver thread, reported from this one
            import queue
            import threading

            finished: queue.Queue = queue.Queue()
            errors = []

            def driver():
                try:
                    for e, call in run_tiled:
                        t1 = time.perf_counter()
                        call()
                        finished.put((e, {"seconds": time.perf_counter() - t1}, "tiled"))
                except BaseException as exc:  # re-raised below, after the tasks
                    errors.append(exc)

            def drain():
                while True:
                    try:
                        report(*finished.get_nowait())
                    except queue.Empty:
                        return

            def done_in_memory(e, res):
                report(e, res, "memory")
                drain()

            th = threading.Thread(target=driver, name="lplr-tiled-tensors")
            th.start()
            try:
                _fan_out(client, fn, jobs_mem, done_in_memory, name)
            finally:
                th.join()
            drain()
            if errors:
                raise errors[0]
        seconds[name] = time.perf_counter() - t0

    if plan.method == AUTO:
        est_mem, est_tiled = [], []
        for e in todo:
            if e.candidates:  # an override: its one compression is its curve
                if fits[e.name]:
                    est_mem.append((e, (e.to_dict(), work, e.candidates[0])))
                else:
                    est_tiled.append((e, _tiled_compress(e, work, e.candidates[0])))
                continue
            if fits[e.name]:
                est_mem.append((e, (e.to_dict(), work, budgets, plan.group_size)))
            else:
                est_tiled.append((e, _tiled_estimate(e, work, budgets, plan.group_size)))
        overrides = [j for j in est_mem if j[0].candidates]
        est_mem = [j for j in est_mem if not j[0].candidates]
        step("estimate", est_mem, est_tiled)
        if overrides:
            step("compress", overrides, [])
    choice, allocation = choose_candidates(plan, work)
    mem, tiled = [], []
    for e in todo:
        if fits[e.name]:
            mem.append((e, (e.to_dict(), work, choice[e.name])))
        else:
            tiled.append((e, _tiled_compress(e, work, choice[e.name])))
    step("compress", mem, tiled)
    return {"choice": choice, "allocation": allocation, "seconds": seconds}


def _tiled_estimate(entry, work, budgets, group_size):
    def call():
        estimate_tensor(
            entry, work_dir=work, budgets=budgets, group_size=group_size, in_memory=False
        )

    return call


def _tiled_compress(entry, work, candidate):
    def call():
        compress_tensor(entry, work_dir=work, candidate=candidate, in_memory=False)

    return call


def finalize_checkpoint(
    plan: CheckpointPlan | Mapping,
    dst,
    *,
    work_dir,
    overwrite: bool = False,
    seconds: float | None = None,
) -> CheckpointResult:
    """Write DST from the compressions in ``work_dir`` and publish it.

    Each tensor takes the configuration of :func:`choose_candidates` (``auto``: the allocation
    over the estimated curves, which is deterministic, so it is the one :func:`run_tensors`
    compressed); its row records the real, measured error and, for ``auto``, the estimate
    (``estimated_rel_error``); the index records the allocation's estimated totals against
    every single method's (``"allocation"``). Each chosen
    group is verified chunk by chunk (:func:`lplr_dask.storage.reader.verify_compressed`) before
    it is copied; the index records the sha256 of every file written and of itself. Everything is
    written into a temporary sibling of ``dst`` that is renamed into place when complete.

    Parameters
    ----------
    plan : CheckpointPlan or dict
    dst : str or path
        The compressed checkpoint directory to create.
    work_dir : str or path
        Where :func:`run_tensors` (or :func:`compress_tensor` per tensor) compressed them.
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
    chosen, allocation = choose_candidates(plan, work_dir)
    estimates = {}
    curves = {}
    for e in plan.compressed:
        tdir = tensor_dir(work_dir, e.name)
        curve = read_curve(tdir)
        if curve.get("fingerprint") != tensor_fingerprint(e):
            curve = {"points": {}}
        key = chosen[e.name]["key"]
        if key not in curve["points"]:
            raise ParameterError(
                f"tensor {e.name}: its configuration {key} is not compressed in work_dir "
                f"{work_dir}; run compress_tensor on it first (run_tensors does)."
            )
        curves[e.name] = curve
        if plan.method == AUTO and not e.candidates:
            estimates[e.name] = read_estimates(tdir)["points"].get(key, {})
    choice = {t: c["key"] for t, c in chosen.items()}
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
                if e.name in estimates:
                    row["estimated_rel_error"] = estimates[e.name].get("estimated_rel_error")
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
            "allocation": allocation,
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
    on_tensor: Callable[[dict], None] | None = None,
) -> CheckpointResult:
    """Compress a safetensors checkpoint directory tensor by tensor.

    :func:`plan_checkpoint` (headers only, every check), then :func:`run_tensors` (``auto``:
    every tensor's estimated curve from the planner, the allocation, then exactly one
    compression per tensor; tensors that fit a worker's memory as one Dask task each on the
    active distributed client), then :func:`finalize_checkpoint`. Nothing is created under
    ``dst`` unless the whole checkpoint succeeds; validation errors are raised before any
    output exists.

    Parameters
    ----------
    src : str or path
        Hugging Face-style checkpoint directory (``model.safetensors`` or shards + index).
    dst : str or path
        The compressed checkpoint directory to create.
    budget : float
        Bits per compressed parameter over all compressed tensors (see :func:`plan_checkpoint`).
    method : str, default "auto"
        ``auto`` chooses method, rank, bits and ``nq`` quantizer kind per tensor from the
        planner's estimated error curves to minimise Σ_t n_t·ε_t², each tensor's squared
        relative error counted once per parameter (:func:`choose_candidates`); or one of
        ``lplr``, ``paper``, ``nq``, ``nq+lplr``, ``dsvd``, ``lplr-svd`` at ``budget`` on
        every tensor.
    policy : TensorPolicy, optional
    candidate_budgets : sequence of float, default (2, 3, 4)
        ``auto``: the budgets at which the planner scores the low-rank methods (with ``budget``).
    seed, group_size : int
    work_dir : str or path, optional
        Keep estimates and compressions here to reuse them for other budgets or methods
        (default: a temporary directory beside ``dst``, removed at the end).
    stage_threshold_bytes : int, default 256 MiB
        Larger tensors take the tiled path (staged Zarr, out of core); so do tensors too large
        for a worker's memory (:data:`MEMORY_BYTES_PER_ENTRY`).
    overwrite : bool, default False
    on_tensor : callable, optional
        ``on_tensor(event)`` after each tensor's step (progress; see :func:`run_tensors`).

    Returns
    -------
    CheckpointResult

    Notes
    -----
    Cost: ``auto`` reads each tensor twice (its curve, its compression) and compresses it
    once; a single method reads and compresses it once. Memory per in-memory task: about
    :data:`MEMORY_BYTES_PER_ENTRY` bytes per entry of its tensor.
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
        run_tensors(plan, work, stage_threshold_bytes=stage_threshold_bytes, on_tensor=on_tensor)
        return finalize_checkpoint(
            plan, out, work_dir=work, overwrite=overwrite, seconds=time.perf_counter() - t0
        )
