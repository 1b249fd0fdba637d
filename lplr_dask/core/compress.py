"""The public entry point :func:`compress`."""

from __future__ import annotations

from lplr_dask.core.engine import StageCallback
from lplr_dask.core.job import CompressionJob
from lplr_dask.core.params import CompressionOptions, CompressionResult

__all__ = ["compress"]


def compress(
    source,
    output,
    options: CompressionOptions | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = False,
    allow_missing_chunks: bool = False,
    on_stage: StageCallback | None = None,
    device: str = "cpu",
    **option_fields,
) -> CompressionResult:
    """Compress a matrix into low-rank, low-precision factors A ≈ L·R stored in Zarr.

    LPLR (Saha, Srivastava & Pilanci, 2023), out of core: the sketch Y = A·S is a blocked
    reduction over A's tiles with S regenerated per tile from ``seed``; Y is orthonormalized by
    tall-skinny QR and quantized (per-column scales); the projection R = (LᵀL)⁺LᵀA is computed
    per column panel, re-quantized (group-wise scales along d) and written where it is
    computed. Neither A nor R is ever gathered. The paper's symbols: m = ``rank``,
    B = ``bits_left``, B′ = ``bits_right``.

    Parameters
    ----------
    source : str, path, zarr.Array, numpy.ndarray or dask.array.Array
        The n × d float16/32/64 matrix: a Zarr v3 array (or a group holding one), or ``.npy``.
    output : str or path
        Where the compressed Zarr group goes; written under a temporary name and renamed into
        place when complete.
    options : CompressionOptions, optional
        The method and its parameters (:class:`~lplr_dask.core.params.CompressionOptions`,
        where each is described): ``method`` (default ``"auto"`` with ``budget``,
        ``"lplr"`` otherwise), ``rank`` (m), ``budget``
        (bits per entry), ``bits_left`` (B), ``bits_right`` (B′), ``bits_matrix`` (B_nq),
        ``group_size`` (128), ``n_oversamples`` (0), ``n_power_iter``, ``seed`` (0),
        ``rounding`` (``"nearest"``), ``block_shape``, ``max_error`` (E: the fewest bits
        whose error is at most E), ``max_passes``, ``max_rank`` (no cap by default).
    **option_fields
        The same fields as keywords (``compress(a, out, rank=64, bits_left=4)``), replacing
        those of ``options``; validated once, here.
    overwrite : bool, default False
        Replace an existing ``output`` (only once the new result is complete).
    resume : bool, default False
        Keep the intermediate results of finished stages if the run fails, and reuse those of
        an earlier failed run with the same input (fingerprint) and parameters; the result is
        byte-identical to an uninterrupted run. See :mod:`lplr_dask.core.job`.
    verify : bool, default False
        Also check the reported error by an independent blockwise pass over A and the stored
        codes (one more pass) before publishing.
    on_stage : callable, optional
        ``on_stage(stage, futures)`` for progress display on a distributed cluster.
    allow_missing_chunks : bool, default False
        A chunk missing from a Zarr INPUT is refused
        (:class:`~lplr_dask.errors.DamagedInputError` naming it): Zarr would read it as the
        fill value. With True, missing chunks are read as the fill value (Zarr leaves out
        chunks that hold only the fill value unless written with ``write_empty_chunks``).
    device : {"cpu", "gpu"}, default "cpu"
        ``"gpu"``: A's tiles are copied to the GPU as they are read (CuPy), and the products,
        quantizers and codebooks run there; intermediates go through host memory to Zarr.
        Needs CuPy and a CUDA device here and on the workers (a dask-cuda cluster: one
        worker per GPU). A Dask array of CuPy blocks runs on the GPU with either value. The
        random streams are drawn on the host, so the codes are the CPU's up to GEMM rounding.

    Returns
    -------
    CompressionResult
        The measured ``rel_fro_error`` (exact, from LᵀA and LᵀL, no extra pass; with
        ``passes=1`` an estimate, ``error_is_estimate=True``, unless ``verify`` measured it),
        ``bits_per_entry`` = 8 · stored bytes / (n·d), where the stored bytes are the chunk
        payloads on disk (edge chunks padded; checksums and metadata aside), timings and the
        configuration.

    Notes
    -----
    Passes over A: 2 for ``lplr`` (+2 per power iteration, +1 with oversampling); with
    ``budget`` the planner's pass (the sketch and a column sample) replaces the sketch pass,
    and ``auto`` may choose a method with more, within ``max_passes``; 1 with ``passes=1``
    (+1 with ``verify``).
    Memory beyond one tile per worker thread: the n × (m + p) sketch and basis and the
    m × d_panel projection partials, on the workers (``passes=1``: also W, ℓ × d float64).
    The driver holds only m × m matrices (``passes=1``: ℓ × m).

    References
    ----------
    R. Saha, V. Srivastava, M. Pilanci. Matrix Compression via Randomized Low Rank and Low
    Precision Factorization. NeurIPS 2023. arXiv:2310.11028.
    """
    job = CompressionJob.create(
        source,
        output,
        CompressionOptions.of(options, **option_fields),
        overwrite=overwrite,
        resume=resume,
        verify=verify,
        on_stage=on_stage,
        allow_missing_chunks=allow_missing_chunks,
        device=device,
    )
    return job.run()
