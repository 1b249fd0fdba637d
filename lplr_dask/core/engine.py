"""Dask graph builders for LPLR and its baselines, and the stage-by-stage driver.

The computation is defined on a fixed grid of canonical blocks of A (see
:func:`lplr_dask.storage.inputs.canonical_block_shape`); every reduction has a fixed tree over
that grid and every random number comes from a stream keyed by the seed and block coordinates,
so the codes do not depend on the storage tiling, the number of workers or the backend.

Passes over A for ``method="lplr"`` with the defaults: two (the sketch, the projection).
``n_power_iter`` adds two per iteration, ``n_oversamples > 0`` one (the truncation).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from distributed.diagnostics.plugin import WorkerPlugin
from threadpoolctl import ThreadpoolController, threadpool_limits

from lplr_dask.errors import ParameterError
from lplr_dask.kernels.codebooks import fit_lloyd
from lplr_dask.kernels.packing import decode_float, encode_float
from lplr_dask.kernels.quantize import (
    QuantizerSpec,
    block_range,
    clip_errors,
    dequantize,
    entry_histogram,
    merge_stats,
    pick_clipped,
    quantize,
    range_stats,
    stats_ranges,
)
from lplr_dask.kernels.random import (
    STREAM_CODEBOOK_SAMPLE,
    STREAM_DITHER_LEFT,
    STREAM_DITHER_RIGHT,
    STREAM_SKETCH,
    block_generator,
    sketch_rows,
)
from lplr_dask.kernels.xp import array_namespace, asarray_like, to_numpy

__all__ = ["StageCallback", "Stages"]

StageCallback = Callable[[str, list], None]
"""Called as ``on_stage(stage_name, futures)`` when a stage has been submitted to a
distributed cluster; may block to display progress. The driver waits for the futures after."""


# ----------------------------------------------------------------------------- execution


class _OneBlasThread(WorkerPlugin):
    """Limits BLAS to one thread in a worker process, for good, on workers present and
    joining later: workers started without a nanny (``dask worker --no-nanny``) keep
    multi-threaded BLAS otherwise."""

    name = "lplr-dask-one-blas-thread"

    def setup(self, worker):
        threadpool_limits(limits=1, user_api="blas")


_CLIENTS_WITH_PLUGIN: set[str] = set()


LOCAL_SCHEDULERS = ("sync", "synchronous", "single-threaded")
"""``dask.config.set(scheduler=...)`` names that keep every stage in the calling thread, even
with a distributed client in the process (a whole compression inside one Dask task)."""


def _client():
    if dask.config.get("scheduler", None) in LOCAL_SCHEDULERS:
        return None
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return None
    if client.status != "running":
        return None
    if client.id not in _CLIENTS_WITH_PLUGIN:
        client.register_plugin(_OneBlasThread(), name=_OneBlasThread.name)
        _CLIENTS_WITH_PLUGIN.add(client.id)
    return client


@functools.cache
def _controller() -> ThreadpoolController:
    """One per process: finding the BLAS libraries reads /proc/self/maps (~1 ms a stage)."""
    return ThreadpoolController()


def one_blas_thread():
    """A context in which BLAS runs on one thread (as every block kernel does: OpenBLAS sums
    in another order with more threads, and the codes must not depend on where they were
    computed)."""
    return _controller().limit(limits=1, user_api="blas")


@dataclass
class Stages:
    """Runs stages on the active scheduler and records their wall-clock seconds.

    The block kernels run with one BLAS thread: on a local (threaded or synchronous) scheduler
    for the duration of a stage, on distributed workers for good (a worker plugin; nannies set
    ``OPENBLAS_NUM_THREADS=1`` anyway). OpenBLAS sums in another order with more threads, and
    the codes must not depend on where they were computed. Dask's threads give the parallelism.
    """

    on_stage: StageCallback | None = None
    seconds: dict = field(default_factory=dict)

    def persist(self, name: str, *collections):
        t0 = time.perf_counter()
        client = _client()
        if client is None:
            with one_blas_thread():
                out = dask.persist(*collections)
        else:
            from distributed import futures_of, wait

            out = client.persist(list(collections))
            futures = futures_of(out)
            if self.on_stage is not None:
                self.on_stage(name, futures)
            wait(futures)
            for f in futures:
                if f.status == "error":
                    f.result()  # re-raise the task's exception here
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return tuple(out)

    def compute(self, name: str, *collections):
        persisted = self.persist(name, *collections)
        t0 = time.perf_counter()
        out = dask.compute(*persisted)
        self.seconds[name] += time.perf_counter() - t0
        return out


# ----------------------------------------------------------------------------- block kernels


def _meta_like(x):
    return meta_from_array(x) if isinstance(x, da.Array) else np.empty((0, 0))


def on_host(x: da.Array) -> da.Array:
    """``x`` with NumPy blocks (CuPy blocks copied to the host, as Zarr writes need; NumPy
    blocks pass through). Applied whatever ``x``'s meta says: a meta that Dask inferred
    from a kernel can name NumPy for CuPy blocks."""
    return da.map_blocks(to_numpy, x, dtype=x.dtype, meta=np.empty((0,) * x.ndim, dtype=x.dtype))


DEVICES = ("cpu", "gpu")


def on_device(x: da.Array, device: str) -> da.Array:
    """``x`` with blocks on ``device``: ``"cpu"`` leaves it as it is (NumPy, or CuPy blocks
    the caller made), ``"gpu"`` copies NumPy blocks to the GPU as they are read (CuPy; the
    tiles' products, quantizers and codebooks then run there).

    Raises
    ------
    ParameterError
        An unknown device, or ``"gpu"`` where CuPy or a CUDA device is missing.
    """
    if device not in DEVICES:
        raise ParameterError(f"device={device!r} is unknown; use one of {', '.join(DEVICES)}.")
    if device == "cpu":
        return x
    try:
        import cupy

        meta = cupy.empty((0, 0), dtype=x.dtype)
    except Exception as exc:  # ImportError, or CUDA's errors where no device is usable
        raise ParameterError(
            f"device='gpu' needs CuPy and a CUDA device on this machine ({exc}). Install the "
            "GPU extra (pip install 'lplr-dask[gpu]') where NVIDIA GPUs are, or use "
            "device='cpu'."
        ) from exc
    return like_blocks(x, meta)


def like_blocks(x: da.Array, meta) -> da.Array:
    """``x`` with blocks of the array library of ``meta`` (``meta_from_array`` of the input):
    an intermediate read back from Zarr goes to the GPU when the input's blocks are CuPy
    arrays; ``x`` itself when the libraries already agree."""
    if type(meta_from_array(x)) is type(meta):
        return x
    return da.map_blocks(
        asarray_like,
        x,
        like=meta,
        dtype=x.dtype,
        meta=asarray_like(np.empty((0,) * x.ndim, dtype=x.dtype), meta),
    )


def _sketch_block(seed, start, stop, k, dtype, like, stream):
    return asarray_like(sketch_rows(seed, start, stop, k, dtype=dtype, stream=stream), like)


def sketch_matrix(
    d: int, k: int, *, seed: int, row_chunks, dtype, meta=None, stream: int = STREAM_SKETCH
) -> da.Array:
    """The d × k Gaussian sketch S as a Dask array; each block is regenerated from the seed.
    ``stream`` draws another Gaussian matrix the same way (``STREAM_ERROR_TEST``: Γᵀ of the
    single-pass error estimate)."""
    like = meta if meta is not None else np.empty((0, 0), dtype=dtype)
    name = "lplr-sketch-" + tokenize(
        seed, d, k, row_chunks, np.dtype(dtype).str, type(like), stream
    )
    bounds = np.cumsum((0, *row_chunks))
    dsk: dict = {
        (name, j, 0): (
            _sketch_block,
            seed,
            int(bounds[j]),
            int(bounds[j + 1]),
            k,
            dtype,
            like,
            stream,
        )
        for j in range(len(row_chunks))
    }
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(
        graph,
        name,
        chunks=(tuple(row_chunks), (k,)),
        dtype=dtype,
        meta=asarray_like(np.empty((0, 0), dtype=dtype), like),
    )


def _mm_partial(a, b):
    # GEMM in the input precision (float32 speed), partial sums kept in float64.
    xp = array_namespace(a)
    b = asarray_like(b, a).astype(a.dtype, copy=False)
    return xp.matmul(a, b).astype(np.float64)[:, None, :]


def _tmm_partial(l_block, a):
    xp = array_namespace(a)
    l_block = asarray_like(l_block, a).astype(a.dtype, copy=False)
    return xp.matmul(l_block.T, a).astype(np.float64)[:, None, :]


def right_multiply(a: da.Array, b: da.Array) -> da.Array:
    """``a @ b`` for a (n × d, blocks I × J) and b (d × k, blocks J × 1), float64 out.

    One pass over ``a``; the sum over column blocks is a fixed tree (``split_every=8``).
    """
    part = da.blockwise(
        _mm_partial,
        "ijk",
        a,
        "ij",
        b,
        "jk",
        dtype=np.float64,
        adjust_chunks={"j": 1},
        concatenate=False,
    )
    return part.sum(axis=1, split_every=8)


def left_multiply(a: da.Array, left: da.Array) -> da.Array:
    """``leftᵀ @ a`` for left (n × k, blocks I × 1): k × d, float64, one pass over ``a``."""
    part = da.blockwise(
        _tmm_partial,
        "kij",
        left,
        "ik",
        a,
        "ij",
        dtype=np.float64,
        adjust_chunks={"i": 1},
        concatenate=False,
    )
    return part.sum(axis=1, split_every=8)


def _sumsq(block):
    xp = array_namespace(block)
    return to_numpy(xp.einsum("ij,ij->", block, block, dtype=np.float64)).reshape(1, 1)


def sketch_partial(a, b):
    """One tile's share of [A·S | row ‖A_i‖²]: A_ij·S_j in A's precision and the tile's row
    sums of squares as one more column (float64), with a singleton middle axis. One consumer
    per tile of A, freed as soon as its GEMM is done (streaming); the single pass calls it
    too, so its Y is the two-pass Y bit for bit."""
    xp = array_namespace(a)
    y = xp.matmul(a, asarray_like(b, a).astype(a.dtype, copy=False)).astype(np.float64)
    sq = xp.einsum("ij,ij->i", a, a, dtype=np.float64)
    return xp.concatenate([y, sq[:, None]], axis=1)[:, None, :]


def sketch_with_norms(a: da.Array, s: da.Array) -> da.Array:
    """[A·S | row ‖A_i‖²] (n × (k + 1), float64) in one streaming pass over A."""
    k = s.shape[1]
    part = da.blockwise(
        sketch_partial,
        "ijk",
        a,
        "ij",
        s,
        "jk",
        dtype=np.float64,
        adjust_chunks={"j": 1, "k": k + 1},
        concatenate=False,
    )
    return part.sum(axis=1, split_every=8)


def tile_sumsq(a: da.Array) -> da.Array:
    """Per-block Σ a² (float64), an I × J array; NaN/Inf in a block make its entry non-finite."""
    chunks = ((1,) * a.numblocks[0], (1,) * a.numblocks[1])
    return da.map_blocks(_sumsq, a, chunks=chunks, dtype=np.float64, meta=np.empty((0, 0)))


def gram(x: da.Array) -> da.Array:
    """xᵀx (k × k, float64) for a row-blocked x."""
    return left_multiply(x, x)


def _stats_of(block, spec):
    return tuple(to_numpy(v) for v in range_stats(block, spec=spec))


def _clip_errors_of(block, spec, lo, hi):
    return to_numpy(clip_errors(block, asarray_like(lo, block), asarray_like(hi, block), spec=spec))


def _merged(parts, lengths, merge):
    out, start = [], 0
    for n in lengths:
        acc = parts[start]
        for p in parts[start + 1 : start + n]:
            acc = merge(acc, p)
        out.append(acc)
        start += n
    return out


def global_ranges(x: da.Array, spec: QuantizerSpec, stages: Stages, name: str):
    """Ranges of groups that span blocks (``tensor``, ``column`` over row blocks, ``row`` over
    column blocks): per-block partial statistics, merged on the driver in a fixed order.
    Output is float32 (values of ``spec.scale_dtype``)."""
    return global_ranges_many([x], spec, stages, name)[0]


def global_ranges_many(xs, spec: QuantizerSpec, stages: Stages, name: str) -> list:
    """:func:`global_ranges` of several arrays in one stage (``"clipped"``: two, the min–max
    ranges, then every block's per-candidate squared errors, summed, see
    :func:`lplr_dask.kernels.quantize.pick_clipped`)."""
    blocks = [x.to_delayed().ravel() for x in xs]
    lengths = [len(bs) for bs in blocks]
    parts = stages.compute(name, *[dask.delayed(_stats_of)(b, spec) for bs in blocks for b in bs])
    stats = _merged(parts, lengths, lambda a, b: merge_stats(a, b, spec=spec))
    ranges = [stats_ranges(st, spec=spec) for st in stats]
    if spec.kind != "clipped":
        return ranges
    tasks = [
        dask.delayed(_clip_errors_of)(b, spec, *r)
        for bs, r in zip(blocks, ranges, strict=True)
        for b in bs
    ]
    errors = _merged(list(stages.compute(name, *tasks)), lengths, lambda a, b: a + b)
    return [pick_clipped(r[0], r[1], e, spec=spec) for r, e in zip(ranges, errors, strict=True)]


def _histogram_of(block, spec, hi, row_step=1):
    if hi is None:
        _, hi = block_range(block, spec=spec)
    if row_step > 1:  # a sample of whole rows (whole groups of "group" and "row" scales)
        per_row = spec.granularity in ("row", "group")
        block, hi = block[::row_step], (hi[::row_step] if per_row else hi)
    return to_numpy(entry_histogram(block, asarray_like(hi, block), spec=spec))


def shared_state(
    x: da.Array,
    spec: QuantizerSpec,
    writer,
    stages: Stages,
    name: str,
    *,
    spans: bool,
    sample_seed: int | None = None,
):
    """What the blocks of a factor share, reduced over ``x`` and written once by ``writer``:
    the ranges of groups that span blocks (when ``spans``; stage ``NAME-ranges``) and the
    ``lloyd`` codebook (stage ``NAME-codebook``). Returns ``(lo, hi, codebook)``, None where
    the quantizer has none."""
    lo = hi = None
    if spans and not spec.is_float:
        lo, hi = global_ranges(x, spec, stages, f"{name}-ranges")
        writer.write_ranges(lo, hi)
    codebook = fit_codebook(x, spec, stages, f"{name}-codebook", hi, sample_seed=sample_seed)
    if codebook is not None:
        writer.write_codebook(codebook)
    return lo, hi, codebook


def fit_codebook(
    x: da.Array,
    spec: QuantizerSpec,
    stages: Stages,
    name: str,
    hi=None,
    *,
    sample_seed: int | None = None,
):
    """The ``lloyd`` codebook of ``x`` (2^bits float32 levels), or None for other kinds: the
    histogram of the entries normalized by their group's scale (``hi`` when the groups span
    blocks, else each block's own), summed over blocks in a fixed order, then Lloyd–Max on
    the driver. One more pass over ``x``; with ``sample_seed``, over a sample of about
    :data:`CODEBOOK_SAMPLE_FRACTION` of its entries instead: a seeded choice of its blocks,
    and every k-th row of those when there are few blocks (the same for any tiling of the
    input, as the blocks are the canonical grid)."""
    if spec.is_float or not spec.stores_codebook:
        return None
    blocks = list(x.to_delayed().ravel())
    row_step = 1
    if sample_seed is not None:
        chosen, row_step = codebook_sample(len(blocks), sample_seed)
        blocks = [blocks[i] for i in chosen]
    tasks = [dask.delayed(_histogram_of)(b, spec, hi, row_step) for b in blocks]
    counts = sum(stages.compute(name, *tasks))
    return fit_lloyd(counts, spec.bits)


def codebook_sample(n_blocks: int, sample_seed: int) -> tuple[np.ndarray, int]:
    """The blocks (indices in row-major order of the canonical grid) and the row step of the
    seeded sample that a ``lloyd`` codebook of Q(A) is fitted to (:func:`fit_codebook` with
    ``sample_seed``)."""
    per = round(1 / CODEBOOK_SAMPLE_FRACTION)
    take = -(-n_blocks // per)
    row_step = max(1, round(per * take / n_blocks))
    rng = block_generator(sample_seed, STREAM_CODEBOOK_SAMPLE)
    return np.sort(rng.choice(n_blocks, size=take, replace=False)), row_step


def fit_codebook_in_memory(a, chunks, spec: QuantizerSpec, *, sample_seed: int):
    """:func:`fit_codebook` of Q(A) (``sample_seed`` given, block ranges) for a matrix ``a``
    in memory whose canonical grid is ``chunks`` (Dask's ``chunks`` of its blocks), computed
    here with no graph: the same codebook."""
    if spec.is_float or not spec.stores_codebook:
        return None
    rows, cols = (np.cumsum((0, *c)) for c in chunks)
    grid = [(i, j) for i in range(len(rows) - 1) for j in range(len(cols) - 1)]
    chosen, row_step = codebook_sample(len(grid), sample_seed)
    counts = sum(
        _histogram_of(a[rows[i] : rows[i + 1], cols[j] : cols[j + 1]], spec, None, row_step)
        for i, j in (grid[c] for c in chosen)
    )
    return fit_lloyd(counts, spec.bits)


CODEBOOK_SAMPLE_FRACTION = 1 / 16
"""Share of A's entries that the ``lloyd`` codebook of Q(A) is fitted to (``nq``): a pass
over all of A would double the reads of the one-pass ``nq``."""


def local_codebook(x, spec: QuantizerSpec, hi):
    """The ``lloyd`` codebook of one block in hand (its groups' scales ``hi``), or None for
    other kinds: the budget search's scoring of R."""
    if spec.is_float or not spec.stores_codebook:
        return None
    return fit_lloyd(to_numpy(entry_histogram(x, hi, spec=spec)), spec.bits)


def encode(x, spec: QuantizerSpec, lo=None, hi=None, rng=None, codebook=None):
    """Codes of a block: integer codes, or 16-bit float patterns for ``bits == 16``."""
    if spec.is_float:
        return encode_float(x, spec.float_format)
    return quantize(x, lo, hi, spec=spec, rng=rng, codebook=codebook)


def decode(codes, spec: QuantizerSpec, lo=None, hi=None, dtype=np.float32, codebook=None):
    if spec.is_float:
        return decode_float(codes, spec.float_format, dtype)
    return dequantize(codes, lo, hi, spec=spec, dtype=dtype, codebook=codebook)


def _local_ranges(x, spec, lo, hi):
    """Ranges for this block: given (global), or computed here (group-local)."""
    if spec.is_float:
        return None, None, False
    if lo is None:
        lo, hi = block_range(x, spec=spec)
        return lo, hi, True
    return asarray_like(lo, x), asarray_like(hi, x), False


# ----------------------------------------------------------------------------- left factor


def quantize_rows_block(
    x, *, spec, lo, hi, seed, writer=None, out_dtype, codebook=None, block_info=None
):
    """Quantize one row block of a left factor (dither keyed by the block's row index), write
    its codes when a ``writer`` is given, and return its dequantized values."""
    row0 = block_info[0]["array-location"][0][0]
    i = block_info[0]["chunk-location"][0]
    rng = block_generator(seed, STREAM_DITHER_LEFT, i) if spec.rounding == "stochastic" else None
    lo_b, hi_b, local = _local_ranges(x, spec, lo, hi)
    codes = encode(x, spec, lo_b, hi_b, rng, codebook)
    if writer is not None:
        writer.write(row0, 0, codes, *((lo_b, hi_b) if local else (None, None)))
    return decode(codes, spec, lo_b, hi_b, dtype=out_dtype, codebook=codebook)


def quantize_left(x: da.Array, spec: QuantizerSpec, writer, *, seed: int, dtype, stages: Stages):
    """Quantize the row-blocked n × m left factor, writing codes; returns (L̂ persisted, G).

    Column/tensor ranges are reduced first (one small pass over x, not over A).
    """
    spans = spec.granularity in ("tensor", "column")
    lo, hi, codebook = shared_state(x, spec, writer, stages, "basis", spans=spans)
    lhat = da.map_blocks(
        quantize_rows_block,
        x,
        spec=spec,
        lo=lo,
        hi=hi,
        seed=seed,
        codebook=codebook,
        writer=writer,
        out_dtype=dtype,
        dtype=dtype,
        meta=asarray_like(np.empty((0, 0), dtype=dtype), meta_from_array(x)),
    )
    (lhat,) = stages.persist("quantize-basis", lhat)
    (g,) = stages.compute("quantize-basis", gram(lhat))
    return lhat, to_numpy(g)


# ----------------------------------------------------------------------------- right factor


def _panel_values(p, extra, coef, *, mode):
    c = asarray_like(coef, p)
    return c @ (extra if mode == "given" else p)


def _panel_finish(
    p, extra, cols, coef, gram_, *, mode, spec, lo, hi, seed, writer, col_bounds, codebook=None
):
    """Compute R_j, quantize it, write it; return [⟨R̂_j, P_j⟩, ⟨R̂_j, G R̂_j⟩]. ``cols``: the
    panel's column numbers (the first locates it among ``col_bounds``)."""
    xp = array_namespace(p)
    col0, j = panel_of(cols, col_bounds)
    r = _panel_values(p, extra, coef, mode=mode)
    rng = block_generator(seed, STREAM_DITHER_RIGHT, j) if spec.rounding == "stochastic" else None
    lo_b, hi_b, local = _local_ranges(r, spec, lo, hi)
    codes = encode(r, spec, lo_b, hi_b, rng, codebook)
    writer.write(0, col0, codes, *((lo_b, hi_b) if local else (None, None)))
    rhat = decode(codes, spec, lo_b, hi_b, dtype=np.float64, codebook=codebook)
    g = asarray_like(gram_, p)
    stats = xp.stack([xp.sum(rhat * p), xp.sum(rhat * (g @ rhat))])
    return to_numpy(stats).reshape(1, 2)


def check_one_block(x, what: str) -> None:
    """Refuse a small matrix that a panel kernel would take from the driver: it must be a
    one-block Dask array (loaded or built on a worker), or it would travel in the task graph."""
    if not isinstance(x, da.Array) or x.npartitions != 1:
        raise ParameterError(
            f"{what} must be a one-block Dask array (loaded or built on a worker, such as "
            "lplr_dask.core.methods.npy_array), so that it does not travel in the task graph; "
            f"got {type(x).__name__}."
        )


def panel_of(cols, col_bounds) -> tuple[int, int]:
    """(first column, panel index) of a column panel, from its column numbers ``cols`` (a
    block of ``da.arange``: blockwise kernels get no ``block_info``) and the panels' bounds."""
    col0 = int(to_numpy(cols[:1])[0])
    return col0, int(np.searchsorted(col_bounds, col0, side="right")) - 1


def project_and_quantize(
    a: da.Array,
    lhat: da.Array,
    g: da.Array,
    spec: QuantizerSpec,
    writer,
    *,
    seed: int,
    stages: Stages,
    coef: da.Array,
    mode: str = "lstsq",
    given: da.Array | None = None,
):
    """The projection pass: P_j = L̂ᵀA_j per column panel, R_j = coef @ P_j (``mode="lstsq"``,
    coef = G⁺) or R_j = coef @ given_j (``mode="given"``), re-quantized and written where it is
    computed. Returns (⟨R̂, P⟩, ⟨R̂, G R̂⟩) in float64 for the exact error.

    ``g`` (G = L̂ᵀL̂, m × m) and ``coef`` are one-block Dask arrays made on a worker (for
    example :func:`lplr_dask.core.methods.npy_array`): every panel's task takes them from there,
    so no m × m matrix is embedded in the graph.

    Group-wise ranges are local to a panel: one pass over A, R never leaves its panel. Ranges
    that span panels (``tensor``, ``row``) and a ``lloyd`` codebook (fitted to all of R) need
    R's float values first: they are kept on the workers (m × d float64, small next to A),
    reduced to ranges and the codebook, then quantized (still one pass over A).
    """
    check_one_block(g, "g")
    check_one_block(coef, "coef")
    p = left_multiply(a, lhat)
    extra = given if given is not None else p
    lo = hi = codebook = None
    spans = spec.granularity in ("tensor", "row")
    if not spec.is_float and (spans or spec.stores_codebook):
        # (indices x, y, z: one block each, handed whole to every panel's task)
        r_float = da.blockwise(
            _panel_values,
            "ij",
            p,
            "ij",
            extra,
            "xj",
            coef,
            "yz",
            dtype=np.float64,
            meta=meta_from_array(p, ndim=2, dtype=np.float64),
            concatenate=True,
            mode=mode,
        )
        p, r_float = stages.persist("project", p, r_float)
        extra = given if given is not None else p
        lo, hi, codebook = shared_state(r_float, spec, writer, stages, "right", spans=spans)
    cols = da.arange(p.shape[1], chunks=(p.chunks[1],))  # column numbers, made on the workers
    stats = da.blockwise(
        _panel_finish,
        "ij",
        p,
        "ij",
        extra,
        "xj",
        cols,
        "j",
        coef,
        "yz",
        g,
        "uv",
        adjust_chunks={"i": 1, "j": 2},
        dtype=np.float64,
        meta=np.empty((0, 0)),
        concatenate=True,
        mode=mode,
        spec=spec,
        lo=lo,
        hi=hi,
        seed=seed,
        writer=writer,
        col_bounds=np.cumsum((0, *p.chunks[1])),
        codebook=codebook,
    )
    (s,) = stages.compute("project" if lo is None and codebook is None else "requantize", stats)
    s = s.reshape(-1, 2).sum(axis=0)
    return float(s[0]), float(s[1])
