"""Compression as a sequence of persisted, resumable stages.

:func:`lplr_dask.compress` runs a :class:`CompressionJob` from start to end. Orchestrators
(the Prefect flows in ``pipelines/``) run its stages one by one, as separate task runs:

=================  ==============================================================  ===========
stage              what it does                                                    passes
=================  ==============================================================  ===========
plan               resolve the configuration (the planner, with a budget or        0 (+1)
                   max_error; its sketch is then the sketch stage's, no pass, and
                   its orthonormal basis the basis stage's, no QR)
quantize-matrix    ``nq``, ``nq+lplr``: Q(A) written, ‖A‖² and ‖A − Q(A)‖²         1
sketch             Y = A·S (+ power iterations) and ‖A‖²                           1 (+2/iter)
basis              orthonormal basis, rotation, quantized L written; L̂, G stored   0 (+1)
project            R = G⁺L̂ᵀA per column panel, re-quantized and written (G, G⁺   1
                   read on the workers: no m × m matrix in the task graph)
verify             exact error from the stored statistics, bytes on disk checked,  0 (+1)
                   optionally an independent blockwise pass (``verify=True``)
publish            metadata written, renamed into place, work directory removed    0
=================  ==============================================================  ===========

With ``passes=1`` (:mod:`lplr_dask.core.single_pass`; methods ``lplr`` and ``paper``) A is
read once: ``sketch`` computes Y = A·S, ‖A‖², the co-range sketch W = Ψ·A and the test
sketch Γ·A in its one pass; ``basis`` also reduces Ψ·L̂ and Γ·L̂ (no pass over A);
``project`` solves R = (Ψ·L̂)⁺·W per column panel of W (no pass over A); ``verify`` reports
the estimated error (``error_is_estimate``), and with ``verify=True`` measures the exact
error by one more pass and reports both.

Every stage writes what later stages need (Y, L̂, G, the statistics) under a work directory
beside OUTPUT, then a small JSON record marking it done. With ``resume=True`` the work
directory is named after a key that hashes the input's fingerprint (its Zarr metadata and the
size and modification time of every chunk file) and every parameter; it survives a crash,
and a rerun with the same input and parameters skips the stages already recorded. Stages
are deterministic (seeded streams keyed by block, fixed reduction trees, intermediates
stored in their own dtype and reloaded with their own chunks), so a resumed run writes the
same bytes as an uninterrupted one. A stage that fails part-way is simply rerun: the codes
it wrote are rewritten whole-chunk by whole-chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from dask.array.utils import meta_from_array
from dask.base import tokenize

from lplr_dask._version import __version__
from lplr_dask.core.engine import (
    StageCallback,
    Stages,
    gram,
    left_multiply,
    like_blocks,
    on_device,
    on_host,
    project_and_quantize,
    quantize_left,
    right_multiply,
    sketch_matrix,
    sketch_with_norms,
)
from lplr_dask.core.methods import (
    ROTATED_METHODS,
    check_finite_input,
    npy_array,
    orthonormal_row_chunks,
    orthonormalize,
    quantize_matrix,
    residual_array,
    rotation_array,
    times,
)
from lplr_dask.core.params import CompressionConfig, CompressionOptions, CompressionResult
from lplr_dask.core.single_pass import (
    CORANGE_NNZ,
    ERROR_TEST_ROWS,
    SKETCH_CONFIG,
    check_corange_size,
    corange_size,
    error_estimate_note,
    single_pass_sketch,
    sketch_left,
    solve_and_quantize,
    stored_estimate,
)
from lplr_dask.errors import (
    JobBusyError,
    LPLRError,
    OutputExistsError,
    VerificationError,
)
from lplr_dask.kernels.linalg import gram_pinv, top_eigenvectors
from lplr_dask.kernels.random import STREAM_LPLR_SVD_MIX, block_generator
from lplr_dask.kernels.xp import to_numpy
from lplr_dask.storage.format import (
    FORMAT_VERSION,
    bytes_on_disk,
    create_factor,
    read_metadata,
    remove_partial_writes,
    write_metadata,
)
from lplr_dask.storage.fs import check_output_path, owned_sibling, publish, write_json_atomic
from lplr_dask.storage.inputs import InputMatrix, missing_chunk_keys, open_input

__all__ = ["STAGES", "CompressionJob", "JobBusyError", "StageRecord", "VerificationError"]

STAGES = ("plan", "quantize-matrix", "sketch", "basis", "project", "verify", "publish")


@dataclass
class StageRecord:
    """One finished stage: its wall-clock seconds, the engine's sub-stage timings, whether it
    was reused from an earlier run, and the small values later stages need."""

    name: str
    seconds: float
    substages: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    reused: bool = False


def input_fingerprint(matrix: InputMatrix) -> str:
    """A cheap identity of the input: for a file or Zarr store, its metadata and the size and
    modification time of every file (like ``make``); for an in-memory array, Dask's token."""
    if matrix.path is None:
        return "token:" + tokenize(matrix.data)
    root = Path(matrix.path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        rel = f.name if f == root else f.relative_to(root)
        h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if f.name in ("zarr.json", ".zarray"):
            h.update(f.read_bytes())
    return "files:" + h.hexdigest()


def _store(x: da.Array, path: Path, stages: Stages, name: str) -> dict:
    """Write a row- or column-blocked intermediate to Zarr in its own dtype; return how to
    reload it with the same chunks (so later stages compute exactly the same values)."""
    z = zarr.create_array(
        str(path),
        shape=x.shape,
        chunks=tuple(max(c) for c in x.chunks),
        dtype=x.dtype,
        compressors=None,
        overwrite=True,
    )
    # dask's annotations do not list zarr arrays among store targets
    store = da.store(on_host(x), z, lock=False, compute=False)  # type: ignore[arg-type]
    stages.compute(name, store)
    return {"path": path.name, "chunks": [list(c) for c in x.chunks]}


def _load(work: Path, ref: dict, meta) -> da.Array:
    """An intermediate stored by :func:`_store`, with blocks of the library of ``meta`` (the
    input's: CuPy blocks go back to the GPU)."""
    z = zarr.open_array(str(work / ref["path"]), mode="r")
    return like_blocks(da.from_zarr(z, chunks=tuple(tuple(c) for c in ref["chunks"])), meta)


def _relative(err2: float, norm2: float) -> float:
    return float(np.sqrt(max(err2, 0.0) / norm2)) if norm2 > 0 else 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CompressionJob:
    """One compression, split into the persisted stages listed in :data:`STAGES`.

    Create it with :meth:`create` (validates everything that can be checked without reading
    A), then call :meth:`run_stage` for each name in :attr:`stages`, or :meth:`run` for all.
    ``result`` holds the :class:`~lplr_dask.core.params.CompressionResult` once ``publish`` is done.

    Attributes
    ----------
    key : str
        SHA-256 of the input fingerprint, every parameter, the block grid and the versions.
    work_dir : pathlib.Path
        Where intermediates and stage records live until ``publish`` removes it.
    stages : tuple of str
        The stages this method needs, in order.
    records : dict of str to StageRecord
        The stages finished so far (this run or, resumed, an earlier one).
    """

    def __init__(
        self,
        matrix,
        output,
        options: CompressionOptions,
        *,
        overwrite,
        resume,
        verify,
        on_stage,
        allow_missing_chunks=False,
    ):
        self.matrix = matrix
        self.allow_missing_chunks = allow_missing_chunks
        self.overwrite = overwrite
        self.output = output
        self.options = options
        self.resume = resume
        self.verify = verify
        self.engine = Stages(on_stage)
        self.current_stage: str | None = None
        self.result: CompressionResult | None = None
        self._t0 = time.perf_counter()
        ident = {
            "input": input_fingerprint(matrix),
            "shape": list(matrix.shape),
            "block_shape": list(matrix.block_shape),
            "options": options.to_dict(),
            "allow_missing_chunks": bool(allow_missing_chunks),
            "lplr_dask": __version__,
            "format_version": FORMAT_VERSION,
            # the single-pass Ψ: a work directory sketched with another Ψ is not resumed
            "corange": f"sparse-sign-{CORANGE_NNZ}",
        }
        self.key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        if resume:  # found again by the rerun; never removed by recover_publish
            self.work_dir = output.parent / f".{output.name}.lplr-work-{self.key[:16]}"
        else:  # tagged with host and pid: recover_publish removes it once this process is gone
            self.work_dir = owned_sibling(output, "tmp")
        self.records: dict[str, StageRecord] = {}
        self._cfg: CompressionConfig | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        source,
        output,
        options: CompressionOptions,
        *,
        overwrite: bool = False,
        resume: bool = False,
        verify: bool = False,
        on_stage: StageCallback | None = None,
        allow_missing_chunks: bool = False,
        device: str = "cpu",
    ) -> CompressionJob:
        """Open the input, check OUTPUT and the options against the matrix (no pass over A)
        and prepare the job.

        Parameters are those of :func:`lplr_dask.compress`, with ``options`` already a
        :class:`~lplr_dask.core.params.CompressionOptions`, plus:

        resume : bool, default False
            Keep the work directory if a stage fails, and reuse the stages that an earlier run
            with the same input fingerprint and options finished.
        verify : bool, default False
            In the ``verify`` stage, also measure the error by an independent blockwise pass
            over A and the stored codes (one more pass) and require agreement.
        allow_missing_chunks : bool, default False
            Read chunks missing from a Zarr INPUT as its fill value instead of refusing it
            (:class:`~lplr_dask.errors.DamagedInputError`); part of the job key.
        device : {"cpu", "gpu"}, default "cpu"
            Where A's tiles are computed on (:func:`lplr_dask.core.engine.on_device`).
        """
        matrix = open_input(
            source,
            block_shape=options.block_shape,
            group_size=options.group_size or None,
            allow_missing_chunks=allow_missing_chunks,
        )
        matrix = replace(matrix, data=on_device(matrix.data, device))
        out = check_output_path(
            output, overwrite=overwrite, inputs=[matrix.path] if matrix.path else ()
        )
        if options.budget is None and options.max_error is None:  # fail now, before a pass
            options.resolve(matrix.shape, block_shape=matrix.block_shape)
        if options.passes == 1 and options.rank is not None:  # (a rank: checked by options)
            check_corange_size(options.corange_size, options.rank, matrix.shape[0])
        return cls(
            matrix,
            out,
            options,
            overwrite=overwrite,
            resume=resume,
            verify=verify,
            on_stage=on_stage,
            allow_missing_chunks=allow_missing_chunks,
        )

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this job runs, in order (known for sure once ``plan`` is done: a budget
        search may give ``nq+lplr`` rank 0)."""
        method = self.options.method if self._cfg is None else self._cfg.method
        low_rank = method != "nq" if self._cfg is None else bool(self._cfg.rank)
        skip = set()
        if method not in ("nq", "nq+lplr", "auto"):
            skip.add("quantize-matrix")
        if not low_rank:
            skip.update({"sketch", "basis", "project"})
        return tuple(s for s in STAGES if s not in skip)

    @property
    def config(self) -> CompressionConfig:
        if self._cfg is None:
            raise RuntimeError("the plan stage has not run yet")
        return self._cfg

    @property
    def _meta(self):
        """The input's meta array: intermediates are read back into its array library."""
        return meta_from_array(self.matrix.data)

    @property
    def out_tmp(self) -> Path:
        """The result being assembled; renamed to OUTPUT by ``publish``."""
        return self.work_dir / "out"

    # ------------------------------------------------------------------ driving

    def run(self) -> CompressionResult:
        """Run (or resume) every stage; the work directory is removed on success and, without
        ``resume``, on failure."""
        self.open()
        try:
            for name in STAGES:
                if name in self.stages:  # re-read: the plan decides the low-rank stages
                    self.run_stage(name)
                if name == "verify" and self._step_up():  # max_error missed: once more
                    for again in STAGES[1 : STAGES.index("verify") + 1]:
                        if again in self.stages:
                            self.run_stage(again)
        except BaseException:
            self.close(failed=True)
            raise
        assert self.result is not None  # set by the publish stage
        return self.result

    def open(self) -> list[str]:
        """Create or reopen the work directory and take its lock; return the stages already
        done (reused on resume)."""
        self.work_dir.mkdir(exist_ok=True)
        (self.work_dir / "stages").mkdir(exist_ok=True)
        self._lock()
        done = []
        for name in self.stages:
            rec = self.work_dir / "stages" / f"{name}.json"
            if rec.is_file():
                data = json.loads(rec.read_text())
                self.records[name] = StageRecord(**{**data, "reused": True})
                done.append(name)
        if "plan" in self.records:
            cfg = CompressionConfig.from_dict(self.records["plan"].values["config"])
            if self.records["plan"].values.get("passes") == 1:
                self._single_pass(cfg)
            if cfg.block_shape is None:  # a plan record of an earlier version
                cfg = replace(cfg, block_shape=tuple(self.matrix.block_shape))
            self._cfg = cfg
        return done

    def close(self, *, failed: bool) -> None:
        """Release the lock; remove the work directory unless a failed run may resume."""
        if failed and self.resume:
            (self.work_dir / "lock").unlink(missing_ok=True)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def _lock(self) -> None:
        lock = self.work_dir / "lock"
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        if lock.is_file():
            try:
                other = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                other = {}
            if (
                other.get("host") == me["host"]
                and other.get("pid") != me["pid"]
                and _pid_alive(int(other.get("pid", -1)))
            ):
                raise JobBusyError(
                    f"Process {other['pid']} is already compressing into {self.output} (lock "
                    f"{lock}). Wait for it to finish, or stop it; a crashed run's lock is "
                    "taken over automatically."
                )
        write_json_atomic(lock, me)

    def run_stage(self, name: str) -> StageRecord:
        """Run one stage, unless a record says it is done; return its record."""
        if name not in self.stages:
            raise ValueError(f"stage {name!r} is not part of this job; its stages: {self.stages}")
        if name in self.records:
            return self.records[name]
        for prior in self.stages[: self.stages.index(name)]:
            if prior not in self.records:
                raise RuntimeError(f"stage {name!r} needs {prior!r} first")
        self.current_stage = name
        before = dict(self.engine.seconds)
        t0 = time.perf_counter()
        values = getattr(self, "_stage_" + name.replace("-", "_"))() or {}
        sub = {
            k: round(v - before.get(k, 0.0), 4)
            for k, v in self.engine.seconds.items()
            if v != before.get(k, 0.0)
        }
        rec = StageRecord(name, round(time.perf_counter() - t0, 4), sub, values)
        self.records[name] = rec
        if name != "publish":
            write_json_atomic(self.work_dir / "stages" / f"{name}.json", _record_dict(rec))
        self.current_stage = None
        return rec

    # ------------------------------------------------------------------ stages

    def _operand(self) -> da.Array:
        """The matrix the low-rank stages factor: A, or the residual A − Q(A)."""
        a = self.matrix.data
        cfg = self.config
        if cfg.matrix is None:
            return a
        v = self.records["quantize-matrix"].values
        lo = np.load(self.work_dir / "matrix-lo.npy") if v["ranges"] else None
        hi = np.load(self.work_dir / "matrix-hi.npy") if v["ranges"] else None
        return residual_array(a, cfg.matrix, seed=cfg.seed, lo=lo, hi=hi)

    def _stage_plan(self) -> dict:
        search: list = []
        extra: dict = {}
        opts = self.options
        if opts.budget is None and opts.max_error is None:
            cfg = opts.resolve(self.matrix.shape, block_shape=self.matrix.block_shape)
        else:
            from lplr_dask.core.planner import plan

            pl = plan(self.matrix, opts, stages=self.engine)
            if opts.budget is not None:
                point = pl.best(opts.budget)
            else:
                assert opts.max_error is not None
                point = pl.cheapest(opts.max_error)
            cfg, search = point.config, pl.table()
            extra = {
                "plan": {
                    "method": point.method,
                    "quantizers": point.quantizers,
                    "estimated_rel_error": point.estimated_rel_error,
                    "candidates": len(pl.curve),
                    "pruned": len(pl.pruned),
                    "sketch_rank": pl.sketch_rank,
                    "sample_columns": pl.sample_columns,
                    "plan_passes": pl.passes,
                    "capped": pl.capped,
                },
                "frontier": [p.to_dict() for p in pl.frontier()],
            }
            # max_passes=1 chose the one-pass mode of a low-rank method (nq reads A once anyway)
            if point.passes == 1 and opts.passes != 1 and cfg.method in ("lplr", "paper"):
                self._single_pass(cfg)
                extra["passes"] = 1
            handed = pl.sketch_for(cfg) if self.options.passes != 1 else None
            if handed is not None:  # the sketch stage takes it: no second sketch pass
                extra["sketch"] = self._handed_sketch(cfg, *handed)
        self._cfg = cfg
        zarr.open_group(str(self.out_tmp), mode="w")
        return {"config": cfg.to_dict(), "budget_search": search, **extra}

    def _handed_sketch(self, cfg: CompressionConfig, y, norm2: float, q, x) -> dict:
        """Store what the planner hands over for the sketch stage's record: the rotated basis
        X = Q·H it scored (the basis stage then neither orthonormalizes nor rotates), else its
        orthonormal basis Q (the basis stage skips its QR), each n × k in the row blocks
        this job's own ``orthonormalize`` would give (the dither and the writes of L follow
        the row blocks); or, for ``paper`` (which quantizes Y itself) or without a basis,
        the sketch Y."""
        for name, basis in (("X", x), ("Q", q)):
            if basis is not None and cfg.method != "paper":
                k = basis.shape[1]
                chunks = orthonormal_row_chunks(self.matrix.data.chunks[0], k)
                basis = basis.rechunk((chunks, (k,)))
                ref = _store(basis, self.work_dir / f"{name}.zarr", self.engine, "plan")
                return {"norm2": norm2, name: ref, "from_plan": True}
        ref = _store(y, self.work_dir / "Y.zarr", self.engine, "plan")
        return {"norm2": norm2, "Y": ref, "from_plan": True}

    def _single_pass(self, cfg: CompressionConfig) -> None:
        """Run the planner's choice with ``passes=1`` (it chose it under ``max_passes=1``)."""
        self.planned_budget = self.options.budget  # the result still reports it
        rank = cfg.low_rank()[0]
        self.options = replace(
            self.options,
            method=cfg.method,  # "auto" chose it
            passes=1,
            budget=None,
            max_error=None,
            rank=rank,
            corange_size=None,
        )
        check_corange_size(None, rank, self.matrix.shape[0])

    def _step_up(self) -> bool:
        """``max_error``: when the exact error of the run misses E, take once the cheapest
        frontier point with more bits whose estimate, scaled by the run's error over its
        estimate, meets E (else the next one) and rerun the stages after ``plan``."""
        plan_v = self.records["plan"].values
        info = plan_v.get("plan")
        if self.options.max_error is None or not info or info.get("stepped_up"):
            return False
        rel = self.records["verify"].values["rel_fro_error"]
        if rel <= self.options.max_error:
            return False
        bits = self.config.bits_per_entry(self.matrix.shape)
        ratio = rel / info["estimated_rel_error"] if info["estimated_rel_error"] > 0 else 1.0
        ups = [p for p in plan_v["frontier"] if p["bits_per_entry"] > bits]
        meets = [p for p in ups if p["estimated_rel_error"] * ratio <= self.options.max_error]
        nxt = (meets or ups or [None])[0]
        if nxt is None:
            return False
        cfg = CompressionConfig.from_dict(nxt["config"])
        info.update(
            stepped_up=True,
            first_rel_fro_error=rel,
            first_bits_per_entry=bits,
            method=nxt["method"],
            estimated_rel_error=nxt["estimated_rel_error"],
        )
        plan_v["config"] = cfg.to_dict()
        plan_v.pop("sketch", None)
        write_json_atomic(
            self.work_dir / "stages" / "plan.json", _record_dict(self.records["plan"])
        )
        for name in [k for k in self.records if k != "plan"]:
            del self.records[name]
            (self.work_dir / "stages" / f"{name}.json").unlink(missing_ok=True)
        self._cfg = cfg
        zarr.open_group(str(self.out_tmp), mode="w")
        return True

    def _stage_quantize_matrix(self) -> dict:
        cfg = self.config
        source = self.matrix.path or "array"
        norm2, err2, lo, hi = quantize_matrix(
            self.matrix.data, cfg.matrix, self.out_tmp, self.engine, cfg.seed, source
        )
        if lo is not None:
            np.save(self.work_dir / "matrix-lo.npy", to_numpy(lo))
            np.save(self.work_dir / "matrix-hi.npy", to_numpy(hi))
        return {"norm2": norm2, "err2": err2, "ranges": lo is not None}

    def _stage_sketch(self) -> dict:
        if self.options.passes == 1:
            return self._sketch_single_pass()
        handed = self.records["plan"].values.get("sketch")
        if handed is not None:  # the planner's sketch or basis, cut to this rank: no pass
            return dict(handed)
        cfg, stages = self.config, self.engine
        rank, _, _ = cfg.low_rank()
        a = self._operand()
        k = rank + cfg.n_oversamples
        if cfg.method in ("dsvd", "lplr-svd"):
            k = min(rank + max(cfg.n_oversamples, 10), min(a.shape))
        s = sketch_matrix(
            a.shape[1],
            k,
            seed=cfg.seed,
            row_chunks=a.chunks[1],
            dtype=a.dtype,
            meta=meta_from_array(a),
        )
        (ext,) = stages.persist("sketch", sketch_with_norms(a, s))
        y, norm2 = ext[:, :k], float(ext[:, -1].sum().compute())
        check_finite_input(norm2, a, self.matrix.path or "array", stages)
        for _ in range(cfg.n_power_iter):
            q = orthonormalize(y)
            (z,) = stages.persist("power-iteration", orthonormalize(left_multiply(a, q).T))
            (y,) = stages.persist("power-iteration", right_multiply(a, z))
        return {"norm2": norm2, "Y": _store(y, self.work_dir / "Y.zarr", stages, "sketch")}

    def _stage_basis(self) -> dict:
        cfg, stages, work = self.config, self.engine, self.work_dir
        rank, left, _ = cfg.low_rank()
        a = self._operand()
        sketched = self.records["sketch"].values
        coef: Any = None
        q: Any = None  # the orthonormal basis, when this stage loads or makes one
        mode, given = "lstsq", None
        if cfg.method == "paper":
            # Algorithm 1: L = Q(A·S), no orthonormalization
            basis = _load(work, sketched["Y"], self._meta)
        elif "X" in sketched:  # the planner's rotated basis, stored by the plan stage
            basis, stage = _load(work, sketched["X"], self._meta), "load-basis"
        else:
            # The planner's orthonormal basis, stored by the plan stage; else a QR of Y here.
            qr_pending = "Q" not in sketched
            q = _load(work, sketched["Y"] if qr_pending else sketched["Q"], self._meta)
            if qr_pending:
                q = orthonormalize(q)
            basis = q
            if cfg.method in ("dsvd", "lplr-svd") or cfg.n_oversamples:
                if qr_pending:  # read twice: B = QᵀA, then Q·U
                    (q,) = stages.persist("orthonormalize", q)
                    qr_pending = False
                # One pass: B = QᵀA (k × d, kept on the workers), B·Bᵀ, top eigenvectors.
                (b,) = stages.persist("truncate", left_multiply(a, q))
                (bbt,) = stages.compute("truncate", gram(b.T))
                u, w = top_eigenvectors(to_numpy(bbt), rank)
                if cfg.method == "dsvd":
                    coef, mode, given = u.T, "given", b  # R = Σ_k V_kᵀ = U_bᵀ B
                elif cfg.method == "lplr-svd":
                    # Z = U_k Σ_k Ω with Ω a k × k Gaussian (entries N(0, 1/k)), as the paper.
                    sig = np.sqrt(np.maximum(w, 0.0))
                    mix = block_generator(cfg.seed, STREAM_LPLR_SVD_MIX).standard_normal(
                        (rank, rank)
                    ) / np.sqrt(rank)
                    u = u @ (sig[:, None] * mix)
                np.save(work / "transform.npy", u)  # read on the workers: not in the graph
                basis = times(q, npy_array(work / "transform.npy"))
            if cfg.method in ROTATED_METHODS:
                basis = times(basis, rotation_array(cfg.seed, rank))
            stage = "orthonormalize" if qr_pending else "rotate"
        if cfg.method != "paper":
            # Read two or three times (ranges, codebook, L̂): computed (with the QR when this
            # stage makes it) or read once, kept on the workers in place of Q.
            (basis,) = stages.persist(stage, basis)
            q = None  # Q (when persisted) is no longer needed on the workers
        n = a.shape[0]
        lwriter = create_factor(self.out_tmp, "L", (n, rank), left, (a.chunksize[0], rank))
        lhat, g = quantize_left(basis, left, lwriter, seed=cfg.seed, dtype=a.dtype, stages=stages)
        if mode == "lstsq":
            coef = gram_pinv(g)
        np.save(work / "gram.npy", g)
        np.save(work / "coef.npy", coef)
        values = {"mode": mode, "Lhat": _store(lhat, work / "Lhat.zarr", stages, "quantize-basis")}
        if self.options.passes == 1:  # Ψ·L̂ and Γ·L̂ (small; no pass over A)
            self._sketch_left_single_pass(lhat)
        if given is not None:
            values["given"] = _store(given, work / "given.zarr", stages, "truncate")
        return values

    def _stage_project(self) -> dict:
        if self.options.passes == 1:
            return self._project_single_pass()
        cfg, work = self.config, self.work_dir
        rank, _, right = cfg.low_rank()
        v = self.records["basis"].values
        a = self._operand()
        rwriter = create_factor(
            self.out_tmp, "R", (rank, a.shape[1]), right, (rank, a.chunksize[1])
        )
        rp, rgr = project_and_quantize(
            a,
            _load(work, v["Lhat"], self._meta),
            npy_array(work / "gram.npy"),  # G and G⁺ (m × m) are read on the workers:
            right,  # no m × m matrix in the graph
            rwriter,
            seed=cfg.seed,
            stages=self.engine,
            coef=npy_array(work / "coef.npy"),
            mode=v["mode"],
            given=_load(work, v["given"], self._meta) if "given" in v else None,
        )
        return {"rp": rp, "rgr": rgr}

    # ------------------------------------------------------------------ single pass

    def _sketch_single_pass(self) -> dict:
        """Y = A·S, ‖A‖², W = Ψ·A and T = Γ·A in one pass over A (:mod:`.single_pass`)."""
        cfg, stages, work = self.config, self.engine, self.work_dir
        rank, _, _ = cfg.low_rank()
        a = self._operand()
        rows = corange_size(rank, a.shape[0], self.options.corange_size)
        sk = single_pass_sketch(a, rank, seed=cfg.seed, corange_rows=rows)
        with dask.config.set(SKETCH_CONFIG):
            ext, w, t = stages.persist("sketch", sk.ext, sk.w, sk.t)
        y, norm2 = ext[:, :rank], float(ext[:, -1].sum().compute())
        check_finite_input(norm2, a, self.matrix.path or "array", stages)
        return {
            "norm2": norm2,
            "corange_size": rows,
            "test_rows": ERROR_TEST_ROWS,
            "Y": _store(y, work / "Y.zarr", stages, "sketch"),
            "W": _store(w, work / "W.zarr", stages, "sketch"),
            "T": _store(t, work / "T.zarr", stages, "sketch"),
        }

    def _sketch_left_single_pass(self, lhat: da.Array) -> None:
        v = self.records["sketch"].values
        rows = (v["corange_size"], v["test_rows"])
        (pl,) = self.engine.compute("sketch-basis", sketch_left(lhat, rows, seed=self.config.seed))
        pl = to_numpy(pl)
        np.save(self.work_dir / "psi-lhat.npy", pl[: rows[0]])
        np.save(self.work_dir / "gamma-lhat.npy", pl[rows[0] :])

    def _project_single_pass(self) -> dict:
        """R = (Ψ·L̂)⁺·W per panel, quantized and written; no pass over A."""
        cfg, work = self.config, self.work_dir
        rank, _, right = cfg.low_rank()
        v = self.records["sketch"].values
        d, panel = self.matrix.shape[1], self.matrix.data.chunksize[1]
        rwriter = create_factor(self.out_tmp, "R", (rank, d), right, (rank, panel))
        est_err2 = solve_and_quantize(
            _load(work, v["W"], self._meta),
            _load(work, v["T"], self._meta),
            npy_array(work / "psi-lhat.npy"),  # Ψ·L̂ and Γ·L̂ are read on the workers:
            npy_array(work / "gamma-lhat.npy"),  # no ℓ × m matrix in the graph
            right,
            rwriter,
            seed=cfg.seed,
            stages=self.engine,
        )
        return {"est_err2": est_err2}

    def _verify_single_pass(self) -> dict:
        """The estimate, checked against the codes on disk (no pass over A); with
        ``verify``, the exact error by a second pass too."""
        from lplr_dask.storage.reader import open_compressed, relative_error

        norm2 = self.records["sketch"].values["norm2"]
        est = _relative(self.records["project"].values["est_err2"], norm2)
        on_disk = _check_stored_bytes(self.out_tmp, self.config.nbytes(self.matrix.shape))
        values = {
            "rel_fro_error": est,
            "estimated_rel_fro_error": est,
            "error_is_estimate": True,
            "bytes_on_disk": on_disk,
        }
        # The reader opens the group through its metadata; publish rewrites it.
        write_metadata(self.out_tmp, self._metadata(self._make_result(est, values)))
        cm = open_compressed(self.out_tmp)
        again = _relative(
            stored_estimate(
                _load(self.work_dir, self.records["sketch"].values["T"], self._meta),
                cm.factor("L", self.matrix.data.dtype),
                cm.factor("R", np.float64),
                seed=self.config.seed,
                stages=self.engine,
            ),
            norm2,
        )
        # The same float64 sums of the same dequantized values, up to the order of the
        # float32 products Γ·L̂: they agree to ~1e-7 of ‖A‖.
        if abs(again - est) > 1e-4 * est + 1e-6:
            raise VerificationError(
                f"The single-pass error estimate recomputed from the stored codes is {again:.6g} "
                f"but the projection stage computed {est:.6g}: the written codes do not match "
                "the computation. Report this as a bug; the result was not published."
            )
        if self.verify:
            exact = relative_error(self.matrix.data, self.out_tmp)
            values.update(
                rel_fro_error=exact, independent_rel_fro_error=exact, error_is_estimate=False
            )
        return values

    def _stage_verify(self) -> dict:
        if self.options.passes == 1:
            return self._verify_single_pass()
        cfg = self.config
        r = {k: rec.values for k, rec in self.records.items()}
        if cfg.matrix is None:
            norm2 = r["sketch"]["norm2"]
            err2 = norm2 - 2 * r["project"]["rp"] + r["project"]["rgr"]
        else:
            norm2, err2 = r["quantize-matrix"]["norm2"], r["quantize-matrix"]["err2"]
            if cfg.rank:  # nq+lplr: the low-rank stages factored the residual
                res2 = r["sketch"]["norm2"]
                err2 = res2 - 2 * r["project"]["rp"] + r["project"]["rgr"]
        rel = _relative(err2, norm2)
        on_disk = _check_stored_bytes(self.out_tmp, cfg.nbytes(self.matrix.shape))
        values = {"rel_fro_error": rel, "bytes_on_disk": on_disk}
        if self.verify:
            from lplr_dask.storage.reader import relative_error

            # The reader opens the group through its metadata; publish rewrites it with the
            # final timings.
            write_metadata(self.out_tmp, self._metadata(self._make_result(rel)))
            check = relative_error(self.matrix.data, self.out_tmp)
            values["independent_rel_fro_error"] = check
            # Both are float64 sums of float32 products: they agree to ~1e-4 relative.
            if abs(check - rel) > 1e-3 * max(rel, check) + 1e-6:
                raise VerificationError(
                    f"The independent error check gives {check:.6g} but the stored statistics "
                    f"give {rel:.6g}: the written codes do not match the computation. Report "
                    "this as a bug; the result was not published."
                )
        return values

    def _stage_publish(self) -> dict:
        rel = self.records["verify"].values["rel_fro_error"]
        self.result = self._make_result(rel)
        if not (self.out_tmp / "zarr.json").is_file():
            # A run killed inside publish, after its result left the work directory: the
            # result is OUTPUT now (recover_publish put it there) or it is gone.
            if _job_key_of(self.output) == self.key:
                self.close(failed=False)
                return {"output": str(self.output), "published_by_earlier_run": True}
            raise VerificationError(
                f"The work directory {self.work_dir} of this resumed job no longer holds its "
                f"result (a run was killed while publishing it), and OUTPUT {self.output} is "
                "not that result. Delete the work directory and rerun the job."
            )
        write_metadata(self.out_tmp, self._metadata(self.result))
        if self.output.exists() and not self.overwrite:
            raise OutputExistsError(
                f"OUTPUT {self.output} appeared while the job ran; it was left untouched. Pass "
                "overwrite=True (--overwrite) to replace it, or choose another path."
            )
        publish(self.out_tmp, self.output)
        self.close(failed=False)
        return {"output": str(self.output)}

    # ------------------------------------------------------------------ results

    def _make_result(self, rel: float, checked: dict | None = None) -> CompressionResult:
        """The result with error ``rel``; ``checked``: the verify stage's values (its record's
        by default), which say whether ``rel`` is a single-pass estimate."""
        cfg, shape = self.config, self.matrix.shape
        if checked is None:
            checked = self.records["verify"].values if "verify" in self.records else {}
        single = self.options.passes == 1
        substages: dict[str, float] = {}
        for rec in self.records.values():
            for k, v in rec.substages.items():
                substages[k] = round(substages.get(k, 0.0) + v, 4)
        return CompressionResult(
            output=str(self.output),
            shape=(int(shape[0]), int(shape[1])),
            source_dtype=self.matrix.source_dtype,
            method=cfg.method,
            rank=cfg.rank,
            bits_left=cfg.left.bits if cfg.left else None,
            bits_right=cfg.right.bits if cfg.right else None,
            bits_matrix=cfg.matrix.bits if cfg.matrix else None,
            group_size=self.options.group_size or None,
            rel_fro_error=rel,
            bits_per_entry=cfg.bits_per_entry(shape),
            stored_bytes=cfg.nbytes(shape),
            seconds=time.perf_counter() - self._t0,
            seed=cfg.seed,
            n_oversamples=cfg.n_oversamples,
            n_power_iter=cfg.n_power_iter,
            stage_seconds=substages,
            budget=getattr(self, "planned_budget", self.options.budget),
            budget_search=self.records["plan"].values["budget_search"],
            plan=self.records["plan"].values.get("plan", {}),
            reused_stages=[k for k, rec in self.records.items() if rec.reused],
            passes=self._method_passes(cfg),
            error_is_estimate=bool(checked.get("error_is_estimate", False)),
            estimated_rel_fro_error=checked.get("estimated_rel_fro_error"),
            error_method=(
                None
                if not single
                else error_estimate_note()
                if checked.get("error_is_estimate", True)
                else "exact: an independent pass over A and the stored codes (verify); "
                "estimated_rel_fro_error is the single-pass estimate"
            ),
        )

    def _method_passes(self, cfg: CompressionConfig) -> int:
        """Passes over A of the configuration run (the planner's own are ``plan_passes``),
        as :func:`~lplr_dask.core.planner.family_passes` counts them."""
        from lplr_dask.core.planner import family_passes

        return family_passes(
            cfg.method,
            cfg.n_power_iter,
            single_pass=self.options.passes == 1,
            n_oversamples=cfg.n_oversamples,
        )

    def _metadata(self, result: CompressionResult) -> dict:
        cfg = self.config
        meta = result.to_dict()
        meta.pop("output")
        meta.update(
            lplr_dask_version=__version__,
            block_shape=list(self.matrix.block_shape),
            factors={
                name: spec.to_dict()
                for name, spec in (("L", cfg.left), ("R", cfg.right), ("Q", cfg.matrix))
                if spec is not None
            },
            source=self.matrix.path,
            job_key=self.key,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        return meta


def _job_key_of(path: Path) -> str | None:
    """The job key recorded in a published group's (checked) metadata, if any."""
    try:
        return read_metadata(path).get("job_key")
    except LPLRError:  # absent, foreign or damaged: not this job's result
        return None


def _missing_chunks(root: Path) -> list[str]:
    """``FACTOR/ARRAY/KEY`` of every chunk of the arrays under ``root`` absent from disk."""
    missing = []
    group = zarr.open_group(str(root), mode="r")
    for fname, factor in sorted(group.groups()):
        for aname, arr in sorted(factor.arrays()):
            missing += [f"{fname}/{aname}/{k}" for k in missing_chunk_keys(arr)]
    return missing


def _check_stored_bytes(root: Path, expected: int) -> int:
    """The chunk payloads under ``root`` must take exactly the ``expected`` bytes that the
    bit accounting reports (every chunk written, edge chunks padded, no compressor); returns
    them. The unfinished writes of killed workers are removed first (their tasks were rerun;
    seen in test_killed_worker_during_projection_same_codes, which had failed on 2048 bytes of
    one)."""
    remove_partial_writes(root)
    on_disk = bytes_on_disk(root)["arrays"]
    if on_disk < expected:
        missing = _missing_chunks(root)
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise VerificationError(
            f"The codes and ranges written under {root} take {on_disk} bytes, fewer than the "
            f"{expected} the configuration stores: {len(missing) or 'some'} chunks are missing"
            f"{f' ({shown})' if missing else ' or short'}. Rerun the job (with resume, from the "
            "failed stage)."
        )
    if on_disk > expected:
        raise VerificationError(
            f"The codes and ranges written under {root} take {on_disk} bytes, more than the "
            f"{expected} the bit accounting reports: bits_per_entry would understate the "
            "bytes on disk. Report this as a bug; the result was not published."
        )
    return on_disk


def _record_dict(rec: StageRecord) -> dict:
    return {
        "name": rec.name,
        "seconds": rec.seconds,
        "substages": rec.substages,
        "values": rec.values,
    }
