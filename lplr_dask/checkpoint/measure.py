"""One tensor of a checkpoint: its estimated rate–distortion curve, and its one compression.

Two steps per compressed tensor, each runnable inside one Dask task (the tensor is read there,
from its safetensors file by name, so no data travels in a task graph):

1. :func:`estimate_tensor`: the tensor's curve from the planner: every candidate configuration
   (method, rank, bit widths) with its exact stored bits and its estimated error. No
   compression is run. ``nq`` points are exact (group-wise scales make the error a sum over
   groups, measured in one pass); low-rank points are the planner's estimates on a seeded
   column sample. Kept in ``WORK/tensors/NAME/estimates.json``.
2. :func:`compress_tensor`: the one compression of the configuration the allocation chose,
   by :func:`lplr_dask.compress` (the same storage format, checksums and exact bytes), into
   ``WORK/tensors/NAME/KEY.zarr``, its measured error into ``WORK/tensors/NAME/curve.json``.

A tensor that fits a worker's memory is read whole and both steps run in the calling thread
with Dask's synchronous scheduler (:func:`local_scheduler`): inside a Dask task, no graph is
submitted to the cluster. A larger one is staged into tiled Zarr row slab by row slab
(``staged.zarr``, kept until its compression is done) and both steps run out of core on the
active scheduler, from the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lplr_dask.checkpoint.plan import TensorEntry
from lplr_dask.checkpoint.policy import Candidate
from lplr_dask.checkpoint.safetensors_io import SLAB_BYTES, numpy_dtype
from lplr_dask.core.params import CompressionConfig, CompressionOptions
from lplr_dask.errors import InputError, ParameterError
from lplr_dask.storage.fs import write_json_atomic

__all__ = [
    "CURVE_VERSION",
    "DEFAULT_STAGE_THRESHOLD",
    "CurvePoint",
    "compress_tensor",
    "estimate_tensor",
    "local_scheduler",
    "planner_curve",
    "read_curve",
    "read_estimates",
    "safe_name",
    "tensor_dir",
    "tensor_fingerprint",
]


DEFAULT_STAGE_THRESHOLD = 256 * 2**20

CURVE_VERSION = "planner-b4-r4-k3"
"""Names the estimator behind :func:`planner_curve`; estimates made by another are redone."""

NQ_CURVE_BITS = tuple(range(1, 9))

NQ_CURVE_KINDS = {None: NQ_CURVE_BITS, "clipped": (1, 2), "sign": (1,)}
"""Quantizer kinds of a curve's ``nq`` points, with their widths, when the options name
none: the default (``lloyd``), ``clipped`` (uniform levels with a zero point on the
MSE-optimal range per group) at 1–2 bits and ``sign`` (sign × the group's mean |x|, the
MSE-optimal symmetric 1-bit code) at 1 bit, so that the allocation picks the kind per tensor
by its error at its bits. On MiniLM at 2 bits per parameter the allocation stores the word
embedding (half the parameters) as ``sign`` codes (relative error 0.60 against 0.77 for a
1-bit ``lloyd`` codebook, whose levels are 0 and one sign) and spends the bits saved on
the attention and MLP weights; ``clipped`` is chosen for 2-bit tensors, ``normal`` (NF levels)
never. ``clipped``'s range search costs 2.5× ``lloyd``'s quantization, so the points of the
kinds beyond the options' own are scored on :data:`NQ_KIND_ROWS` rows only."""

NQ_KIND_ROWS = 384
"""Rows (a seeded sample) on which the ``nq`` points of the kinds beyond the options' own
are scored: a ratio estimate, exact per row (each group is one row's 128 entries). 384 keeps
MiniLM's attention weights whole and cuts the 1536-row MLP weights and the embedding."""

NQ_SAMPLE_ROWS = 4096
"""In memory, ``nq`` points of a taller tensor are scored on this many of its rows (a seeded
sample; group-wise scales keep each row's groups whole, so the error of the sample is the
run's on those rows): an embedding of 30522 rows cost 2 s of its 4 s curve otherwise."""

CURVE_RANK_DIVISOR = 4
"""Low-rank points are scored up to rank min(n, d) / 4 (the planner's ``max_rank``): the
sketch, and the time to score it, grow with the rank. On a 4096 × 11008 weight at 4 bits per
entry and B = B′ = 4 the uncapped rank is about 3000, a sketch of 73 % of the smaller side that
costs more than the compression; the low-rank methods win at low ranks (decaying spectra)."""

STANDIN_LOW_RANK = (("lplr", 4, 4), ("nq+lplr", 4, 4))
"""The low-rank candidates asked of the planner: (method, B, B′) at every curve budget, B and
B′ fixed so that it scores one (B, B′) pair per budget."""

MIN_RESIDUAL_BITS = 2
"""``nq+lplr`` points of a curve quantize A with B_nq = ⌊b⌋ − 1 bits at each budget b, and at
least this many: after 1-bit codes the residual keeps most of A (MiniLM's word embedding:
``nq+lplr`` at 2 bits per entry 0.74–0.76 relative error against 0.37 for ``nq`` at 2.1), such
points were never chosen, and their residual, sketch and QR were a third of the curve's cost."""


def safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if safe != name or safe.startswith(".") or not safe or len(safe) > 200:
        safe = f"{safe.lstrip('.')[:200]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return safe


def tensor_dir(work_dir, name: str) -> Path:
    return Path(work_dir) / "tensors" / safe_name(name)


def _compute_dtype(dtype: str):
    return np.float64 if dtype == "F64" else np.float16 if dtype == "F16" else np.float32


# ---------------------------------------------------------------------- running in one task

_LOCAL = threading.Lock()
_LOCAL_STATE: dict = {"depth": 0, "ctx": None}


@contextlib.contextmanager
def local_scheduler():
    """Run every Dask computation of this block in the calling thread (``scheduler="sync"``).

    Inside a Dask task this keeps a whole compression on that worker: no graph goes to the
    cluster (:class:`lplr_dask.core.engine.Stages` then ignores the distributed client).
    ``dask.config`` is process-wide, so concurrent users in one process share one setting,
    entered by the first and restored by the last.
    """
    import dask

    with _LOCAL:
        if _LOCAL_STATE["depth"] == 0:
            ctx = dask.config.set(scheduler="sync")
            ctx.__enter__()
            _LOCAL_STATE["ctx"] = ctx
        _LOCAL_STATE["depth"] += 1
    try:
        yield
    finally:
        with _LOCAL:
            _LOCAL_STATE["depth"] -= 1
            if _LOCAL_STATE["depth"] == 0:
                _LOCAL_STATE.pop("ctx").__exit__(None, None, None)


# ---------------------------------------------------------------------- reading and staging


def _read_error(entry: TensorEntry, exc: Exception) -> InputError:
    return InputError(
        f"{entry.file}: tensor {entry.name!r} cannot be read ({exc}); the file was changed, "
        "removed or damaged after the plan read its header. Copy it again and rerun."
    )


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """The whole tensor as a NumPy array of its compute dtype (float32 for bfloat16)."""
    from safetensors import SafetensorError, safe_open

    numpy_dtype(entry.dtype)  # registers bfloat16 with NumPy (ml_dtypes) in this process

    try:
        with safe_open(entry.file, framework="np") as f:
            return np.ascontiguousarray(f.get_slice(entry.name)[:]).astype(
                _compute_dtype(entry.dtype), copy=False
            )
    except (SafetensorError, FileNotFoundError) as exc:
        raise _read_error(entry, exc) from exc


def _stage(entry: TensorEntry, tdir: Path) -> str:
    """The tensor staged into a tiled Zarr array slab by slab (every chunk written), reused
    when an earlier run staged the same source completely."""
    from safetensors import SafetensorError, safe_open

    numpy_dtype(entry.dtype)  # registers bfloat16 with NumPy (ml_dtypes) in this process
    path = tdir / "staged.zarr"
    marker = tdir / "staged.json"
    fingerprint = tensor_fingerprint(entry)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()).get("fingerprint") == fingerprint and path.is_dir():
            return str(path)
    import zarr

    marker.unlink(missing_ok=True)
    n, d = entry.shape
    dt = _compute_dtype(entry.dtype)
    rows = max(1, SLAB_BYTES // max(1, d * np.dtype(dt).itemsize))
    if path.exists():
        shutil.rmtree(path)
    try:
        with safe_open(entry.file, framework="np") as f:
            sl = f.get_slice(entry.name)
            z = zarr.create_array(
                str(path),
                shape=(n, d),
                chunks=(min(rows, n), min(d, 4096)),
                dtype=dt,
                fill_value=0,
                config={"write_empty_chunks": True},  # an all-zero slab is a chunk, not a hole
            )
            for r0 in range(0, n, rows):
                z[r0 : min(n, r0 + rows)] = np.asarray(sl[r0 : min(n, r0 + rows)]).astype(dt)
    except (SafetensorError, FileNotFoundError) as exc:
        raise _read_error(entry, exc) from exc
    write_json_atomic(marker, {"fingerprint": fingerprint})
    return str(path)


def _unstage(tdir: Path) -> None:
    (tdir / "staged.json").unlink(missing_ok=True)
    shutil.rmtree(tdir / "staged.zarr", ignore_errors=True)


def _source(entry: TensorEntry, tdir: Path, *, in_memory: bool):
    return read_tensor(entry) if in_memory else _stage(entry, tdir)


def _norm2(matrix) -> float:
    """‖A‖² in float64 (one pass; free for an array in memory)."""
    import dask.array as da

    a = matrix.data
    return float(da.einsum("ij,ij->", a, a, dtype=np.float64).compute())


def tensor_fingerprint(entry: TensorEntry) -> str:
    """What a measurement depends on besides the candidate: the source file, the seed and the
    engine's version."""
    from lplr_dask._version import __version__

    st = Path(entry.file).stat()
    return f"{entry.file}:{st.st_size}:{st.st_mtime_ns}:seed={entry.seed}:lplr-dask={__version__}"


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_bytes().decode("utf-8")) if p.is_file() else None
    except (OSError, ValueError):
        d = None
    if not isinstance(d, dict) or not isinstance(d.get("points"), dict):
        return {"points": {}}
    return d


def read_curve(tdir: Path) -> dict:
    """The compressions measured in a work directory; a damaged or foreign ``curve.json``
    counts as none (they are compressed again)."""
    return _read_json(tdir / "curve.json")


def read_estimates(tdir: Path) -> dict:
    """The estimated curve kept in a work directory (``{"points": {}}`` if none or damaged)."""
    return _read_json(tdir / "estimates.json")


# ---------------------------------------------------------------------- the estimated curve


@dataclass(frozen=True)
class CurvePoint:
    """One candidate of a tensor's rate–distortion curve (the planner's ``Point``)."""

    config: CompressionConfig
    bits_per_entry: float
    estimated_rel_error: float
    method: str
    passes: int = 2


def _nq_sums(a, *, specs, codebooks, seed, block_info=None):
    """[‖A_b‖², ‖A_b − Q_s(A_b)‖² for each spec s] of one block, float64."""
    from lplr_dask.core.methods import nq_residual
    from lplr_dask.kernels.xp import array_namespace, to_numpy

    xp = array_namespace(a)
    out = [xp.einsum("ij,ij->", a, a, dtype=np.float64)]
    for spec, book in zip(specs, codebooks, strict=True):
        r = nq_residual(
            a, spec=spec, lo=None, hi=None, seed=seed, codebook=book, block_info=block_info
        )
        out.append(xp.einsum("ij,ij->", r, r, dtype=np.float64))
    return to_numpy(xp.stack(out)).reshape(1, len(out))


def _sample_groups(d: int, *, group: int, sample_cols: int, seed: int) -> np.ndarray:
    """Sorted column indices of whole scale groups chosen by a seeded generator (all when d
    is small); a partial last group, when chosen, stays last, so groups keep their bounds."""
    if d <= sample_cols:
        return np.arange(d)
    n_groups = -(-d // group)
    take = min(n_groups, max(1, sample_cols // group))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(98,)))
    chosen = np.sort(rng.choice(n_groups, size=take, replace=False))
    return np.concatenate([np.arange(g * group, min((g + 1) * group, d)) for g in chosen])


def _nq_points(
    matrix, options: CompressionOptions, *, sample_cols: int, array=None
) -> list[CurvePoint]:
    """``nq`` at 1–8 bits, scored on a seeded sample of whole scale groups (``sample_cols``
    columns; exact when that is every column): group-wise scales make each group's error its
    own, so the sample's error is the run's on those columns, and one pass over the sample
    scores every bit width. A ``lloyd`` codebook is fitted on A as the run fits it (its seeded
    sample of blocks). Other granularities: none (their ranges span blocks). With ``array``
    (the matrix in memory) computed here with NumPy, without Dask graphs, on at most
    :data:`NQ_SAMPLE_ROWS` seeded rows of those columns."""
    from lplr_dask.core.engine import Stages, fit_codebook, fit_codebook_in_memory

    configs: list = []
    extra: list = []  # scored on NQ_KIND_ROWS rows: the kinds beyond the options' own
    kinds = NQ_CURVE_KINDS if options.quantizer is None else {options.quantizer: NQ_CURVE_BITS}
    for kind, bits in ((k, b) for k, widths in kinds.items() for b in widths):
        try:
            cfg = replace(
                options, method="nq", budget=None, rank=None, bits_matrix=bits, quantizer=kind
            ).resolve(matrix.shape, block_shape=matrix.block_shape)
        except ParameterError:
            continue
        if cfg.matrix.is_float or cfg.matrix.granularity != "group" or cfg in configs:
            continue
        configs.append(cfg)
        extra.append(kind != options.quantizer)
    if not configs:
        return []
    a = matrix.data
    specs = [c.matrix for c in configs]
    cols = _sample_groups(
        a.shape[1], group=specs[0].group_size, sample_cols=sample_cols, seed=options.seed
    )
    stages = Stages()
    if array is not None:  # fitted as the real run fits it (quantize_matrix)
        books = [
            fit_codebook_in_memory(array, a.chunks, spec, sample_seed=options.seed)
            for spec in specs
        ]
        sub = array if len(cols) == array.shape[1] else array[:, cols]
        if sub.shape[0] > NQ_SAMPLE_ROWS:
            sub = sub[_seeded_rows(sub.shape[0], NQ_SAMPLE_ROWS, options.seed, 97)]
    else:
        books = [
            fit_codebook(a, spec, stages, "curve-nq-codebook", sample_seed=options.seed)
            for spec in specs
        ]
        sub = a if len(cols) == a.shape[1] else a[:, cols].rechunk({1: -1})

    def sums_of(which, rows):
        """[‖sample‖², ‖sample − Q(sample)‖² per config of ``which``] on ``rows`` of ``sub``."""
        sp, bk = [specs[i] for i in which], [books[i] for i in which]
        x = sub if rows is None else sub[rows]
        if array is not None:
            n, s = x.shape
            info = {0: {"chunk-location": (0, 0), "array-location": [(0, n), (0, s)]}}
            return _nq_sums(x, specs=sp, codebooks=bk, seed=options.seed, block_info=info)[0]
        part = x.map_blocks(
            _nq_sums,
            specs=sp,
            codebooks=bk,
            seed=options.seed,
            chunks=((1,) * x.numblocks[0], (len(sp) + 1,) * x.numblocks[1]),
            dtype=np.float64,
            meta=np.empty((0, 0)),
        )
        (part,) = stages.compute("curve-nq", part)
        return np.asarray(part).reshape(x.numblocks[0], x.numblocks[1], -1).sum(axis=(0, 1))

    errors = np.zeros(len(configs))
    for flag in (False, True):
        which = [i for i, e in enumerate(extra) if e == flag]
        if not which:
            continue
        rows = None
        if flag and sub.shape[0] > NQ_KIND_ROWS:
            rows = _seeded_rows(sub.shape[0], NQ_KIND_ROWS, options.seed, 96)
        sums = sums_of(which, rows)
        if sums[0] > 0:
            errors[which] = np.sqrt(sums[1:] / sums[0])
    return [
        CurvePoint(c, c.bits_per_entry(matrix.shape), float(e), "nq", 1)  # nq reads A once
        for c, e in zip(configs, errors, strict=True)
    ]


def _seeded_rows(n: int, k: int, seed: int, key: int) -> np.ndarray:
    """k of n row numbers, sorted, drawn by a generator of its own from the seed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key,)))
    return np.sort(rng.choice(n, size=k, replace=False))


def planner_curve(
    matrix,
    options: CompressionOptions,
    *,
    budgets: Sequence[float],
    sample_cols: int = 2048,
    array: np.ndarray | None = None,
) -> list:
    """Every candidate the planner scores on ``matrix`` at ``budgets`` (the tensor's curve).

    The one place where the checkpoint path asks the planner. ``nq`` at 1–8 bits is scored
    here on a seeded sample of whole scale groups (exact on it; one pass over the sample);
    the low-rank points come from :func:`lplr_dask.core.planner.plan` with ``budgets`` (one
    sketch per call, every budget), for ``lplr`` and ``nq+lplr`` with B = B′ = 4
    (:data:`STANDIN_LOW_RANK`; B_nq from :data:`MIN_RESIDUAL_BITS`) and ranks up to
    min(n, d) / :data:`CURVE_RANK_DIVISOR`: a cheap subset while the planner's full ``auto``
    search costs more per tensor than the compression. Widening it to every family and bit
    width is
    ``plan(matrix, replace(options, method="auto", budget=max(budgets)), budgets=budgets)``.
    With ``array`` (the matrix in memory) the same points come from
    :func:`lplr_dask.core.planner.curve_in_memory`: NumPy in this thread, no Dask graph.
    At B = B′ = 4 both keep the default kinds of L and R (the planner weighs others at 1–3
    bits only); the tensor's kind is chosen among the ``nq`` points.

    Returns
    -------
    list of CurvePoint
    """
    from lplr_dask.core.planner import curve_in_memory, plan

    points = _nq_points(matrix, options, sample_cols=sample_cols, array=array)
    budgets = sorted({float(x) for x in budgets})
    cap = max(1, min(matrix.shape) // CURVE_RANK_DIVISOR)
    asks = []
    for method, bl, br in STANDIN_LOW_RANK:
        bms = [None]
        if method == "nq+lplr":
            bms = sorted({max(MIN_RESIDUAL_BITS, int(b) - 1) for b in budgets})
        asks += [(method, bl, br, bm) for bm in bms]
    low_rank = []  # the planner's Points
    for method, bl, br, bm in asks:
        opts = replace(
            options, method=method, budget=max(budgets), rank=None, bits_left=bl,
            bits_right=br, bits_matrix=bm, max_rank=cap,
        )  # fmt: skip
        if array is not None:
            low_rank += curve_in_memory(
                matrix, array, opts, budgets=budgets, sample_cols=sample_cols
            )
            continue
        for group in (budgets, *([b] for b in budgets)):  # all at once; one by one if refused
            try:
                low_rank += plan(matrix, opts, budgets=group, sample_cols=sample_cols).curve
            except ParameterError:  # some budget does not fit this method on this shape
                continue
            if group is budgets:
                break
    return points + [
        CurvePoint(p.config, p.bits_per_entry, p.estimated_rel_error, p.method, p.passes)
        for p in low_rank
    ]


def _curve_id(budgets, group_size) -> str:
    return f"{CURVE_VERSION}:budgets={sorted(float(b) for b in budgets)}:g={group_size}"


def estimate_tensor(
    entry: TensorEntry | Mapping,
    *,
    work_dir,
    budgets: Sequence[float],
    group_size: int = 128,
    in_memory: bool = True,
) -> dict:
    """The estimated rate–distortion curve of one tensor, kept in ``work_dir``.

    Parameters
    ----------
    entry : TensorEntry or dict
        An entry of :class:`~lplr_dask.checkpoint.plan.CheckpointPlan` to compress.
    work_dir : str or path
    budgets : sequence of float
        Bits per entry at which the low-rank methods are scored (the plan's candidate budgets
        and its budget); ``nq`` is scored at 1–8 bits.
    group_size : int, default 128
    in_memory : bool, default True
        Read the tensor whole and estimate in this thread with the synchronous scheduler (one
        Dask task); False: stage it into tiled Zarr and estimate on the active scheduler.

    Returns
    -------
    dict
        ``{"name", "shape", "numel", "norm2", "fingerprint", "curve_id", "seconds",
        "points": {key: {"candidate", "method", "rank", "bits_left", "bits_right",
        "bits_matrix", "bits", "bits_per_entry", "estimated_rel_error",
        "estimated_error2"}}}`` with ``bits`` = 8 × the exact stored bytes.

    Notes
    -----
    Memory: the tensor in its compute dtype (float32 for bfloat16) plus the planner's sketch
    (n × the largest rank) in memory; out of core, one tile per worker thread. Passes over
    the tensor: one for ``nq``, one sketch per low-rank call of the stand-in.
    """
    from lplr_dask.storage.inputs import open_input

    entry = entry if isinstance(entry, TensorEntry) else TensorEntry(**entry)
    tdir = tensor_dir(work_dir, entry.name)
    tdir.mkdir(parents=True, exist_ok=True)
    fingerprint, curve_id = tensor_fingerprint(entry), _curve_id(budgets, group_size)
    est = read_estimates(tdir)
    if est.get("fingerprint") == fingerprint and est.get("curve_id") == curve_id:
        return est
    t0 = time.perf_counter()
    options = CompressionOptions(method="nq", group_size=group_size, seed=entry.seed)
    with local_scheduler() if in_memory else contextlib.nullcontext():
        source = _source(entry, tdir, in_memory=in_memory)
        matrix = open_input(source, group_size=group_size)
        if in_memory:  # NumPy in this thread: no Dask graphs for a small tensor
            array = np.asarray(source, dtype=matrix.data.dtype)
            norm2 = float(np.einsum("ij,ij->", array, array, dtype=np.float64))
            curve = planner_curve(matrix, options, budgets=budgets, array=array)
        else:
            norm2 = _norm2(matrix)
            curve = planner_curve(matrix, options, budgets=budgets)
    shape = tuple(entry.shape)
    points = {}
    for p in curve:
        cand = Candidate.from_config(p.config, shape)
        if cand is None or cand.key in points:
            continue
        points[cand.key] = {
            "candidate": cand.to_dict(),
            "method": p.method,
            "rank": p.config.rank,
            "bits_left": p.config.left.bits if p.config.left else None,
            "bits_right": p.config.right.bits if p.config.right else None,
            "bits_matrix": p.config.matrix.bits if p.config.matrix else None,
            "bits": 8 * p.config.nbytes(shape),
            "bits_per_entry": p.config.bits_per_entry(shape),
            "estimated_rel_error": p.estimated_rel_error,
            "estimated_error2": p.estimated_rel_error**2 * norm2,
        }
    est = {
        "name": entry.name,
        "shape": list(shape),
        "numel": entry.numel,
        "norm2": norm2,
        "fingerprint": fingerprint,
        "curve_id": curve_id,
        "seconds": time.perf_counter() - t0,
        "points": points,
    }
    write_json_atomic(tdir / "estimates.json", est)
    return est


# ---------------------------------------------------------------------- the one compression


def compress_tensor(
    entry: TensorEntry | Mapping,
    *,
    work_dir,
    candidate: Candidate | Mapping | None = None,
    stage_threshold_bytes: int = DEFAULT_STAGE_THRESHOLD,
    in_memory: bool | None = None,
    keep_staged: bool = False,
) -> dict:
    """Compress one tensor with one configuration into ``work_dir`` (the real engine).

    The group goes to ``WORK/tensors/NAME/KEY.zarr`` and its measurement (stored bytes,
    relative and absolute squared error, rank, bits) into ``WORK/tensors/NAME/curve.json``. A
    configuration already compressed there (same source file, unchanged, and seed) is kept.

    Parameters
    ----------
    entry : TensorEntry or dict
        One entry of :class:`CheckpointPlan` with ``action == "compress"``.
    work_dir : str or path
    candidate : Candidate or dict, optional
        The configuration (``auto``: the allocation's choice). Default: every candidate of the
        entry (a single method or an override has exactly one).
    stage_threshold_bytes : int, default 256 MiB
        Tensors larger than this are staged into tiled Zarr slab by slab and compressed out of
        core on the active scheduler; smaller ones from memory, in this thread.
    in_memory : bool, optional
        Decide the path explicitly (the checkpoint runner does, from the workers' memory).
    keep_staged : bool, default False
        Keep the staged Zarr copy for another call.

    Returns
    -------
    dict
        The tensor's measured points: ``{"name", "shape", "dtype", "norm2", "points": {key:
        {...}}}``.
    """
    from lplr_dask.core.compress import compress

    if not isinstance(entry, TensorEntry):
        entry = TensorEntry(**entry)
    if entry.action != "compress":
        raise ParameterError(f"tensor {entry.name} is planned as passthrough; nothing to compress.")
    if (
        isinstance(stage_threshold_bytes, bool)
        or not isinstance(stage_threshold_bytes, int)
        or (stage_threshold_bytes < 0)
    ):
        raise ParameterError(
            f"stage_threshold_bytes={stage_threshold_bytes!r} must be a non-negative integer "
            "(0 stages every tensor into Zarr)."
        )
    if candidate is None:
        if not entry.candidates:
            raise ParameterError(
                f"tensor {entry.name} is planned for auto: give the candidate the allocation "
                "chose (lplr_dask.checkpoint.run.choose_candidates), or run compress_checkpoint."
            )
        todo = [Candidate.from_dict(c) for c in entry.candidates]
    else:
        todo = [candidate if isinstance(candidate, Candidate) else Candidate.from_dict(candidate)]
    if in_memory is None:
        in_memory = entry.nbytes <= stage_threshold_bytes
    tdir = tensor_dir(work_dir, entry.name)
    tdir.mkdir(parents=True, exist_ok=True)
    curve = read_curve(tdir)
    fingerprint = tensor_fingerprint(entry)
    if curve.get("fingerprint") != fingerprint:
        curve = {"points": {}, "fingerprint": fingerprint}  # another source or seed: redo
    todo = [
        c
        for c in todo
        if c.key not in curve["points"] or not (tdir / f"{c.key}.zarr" / "zarr.json").is_file()
    ]
    if todo or "norm2" not in curve:
        with local_scheduler() if in_memory else contextlib.nullcontext():
            source = _source(entry, tdir, in_memory=in_memory)
            if isinstance(source, np.ndarray):
                norm2 = float(np.einsum("ij,ij->", source, source, dtype=np.float64))
            else:
                from lplr_dask.storage.inputs import open_input

                norm2 = _norm2(open_input(source))
            curve.update(name=entry.name, shape=entry.shape, dtype=entry.dtype, norm2=norm2)
            for cand in todo:
                t0 = time.perf_counter()
                res = compress(
                    source, tdir / f"{cand.key}.zarr", cand.options, seed=entry.seed,
                    overwrite=True,
                )  # fmt: skip
                curve["points"][cand.key] = {
                    "options": cand.options.to_dict(),
                    "method": res.method,
                    "rank": res.rank,
                    "bits_left": res.bits_left,
                    "bits_right": res.bits_right,
                    "bits_matrix": res.bits_matrix,
                    "group_size": res.group_size,
                    "stored_bytes": res.stored_bytes,
                    "bits_per_entry": res.bits_per_entry,
                    "rel_fro_error": res.rel_fro_error,
                    "error2": res.rel_fro_error**2 * norm2,
                    "seconds": time.perf_counter() - t0,
                    "path": "memory" if in_memory else "tiled",
                }
                write_json_atomic(tdir / "curve.json", curve)
    if not in_memory and not keep_staged:
        _unstage(tdir)
    return curve
