"""The public entry point :func:`compress`."""

from __future__ import annotations

from lplr_dask.core.engine import StageCallback
from lplr_dask.core.job import CompressionJob
from lplr_dask.core.params import DEFAULT_GROUP_SIZE, CompressionResult

__all__ = ["compress"]


def compress(
    source,
    output,
    *,
    method: str = "lplr",
    rank: int | None = None,
    budget: float | None = None,
    bits_left: int | None = None,
    bits_right: int | None = None,
    bits_matrix: int | None = None,
    group_size: int | None = DEFAULT_GROUP_SIZE,
    n_oversamples: int = 0,
    n_power_iter: int | None = None,
    seed: int = 0,
    rounding: str = "nearest",
    block_shape: tuple[int, int] | None = None,
    max_rank: int = 512,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = False,
    on_stage: StageCallback | None = None,
    allow_missing_chunks: bool = False,
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
    method : {"lplr", "paper", "nq", "dsvd", "lplr-svd", "nq+lplr", "auto"}, default "lplr"
        ``lplr``: as above. ``paper``: Algorithm 1 with the reference quantizer (no QR,
        per-matrix min–max). ``nq``: A quantized directly. ``dsvd``: L = Q(U_k),
        R = Q′(Σ_k V_kᵀ) from a randomized SVD (``n_power_iter`` power iterations, 10 extra
        columns). ``lplr-svd``: the SVD-based LPLR of the paper (Z = U_k Σ_k Ω, Ω a k × k
        Gaussian). ``nq+lplr``: group-wise Q(A) plus LPLR of the residual A − Q(A).
        ``auto`` (with ``budget``): the best of ``lplr``, ``nq+lplr`` and ``nq``, each scored
        on the same column sample (one sketch pass per low-rank method more).
    rank : int, optional
        m, the inner dimension of L·R, 1 ≤ m < min(n, d). Required unless ``budget`` is given
        (or for ``nq``).
    budget : float, optional
        Bits per entry of A: choose rank and bit widths so that ``bits_per_entry <= budget``
        with the lowest error (see :func:`lplr_dask.core.search.choose_config`).
    bits_left, bits_right : int, optional
        B and B′: bits per entry of L and R, 1–8, or 16 for float16. Default 8 (the paper's).
    bits_matrix : int, optional
        Bits per entry of Q(A) for ``nq`` and ``nq+lplr``. Default 4.
    group_size : int, default 128
        Entries per scale along the rows of R (and of A for ``nq``); a multiple of 8, or 0 for
        one scale per row of R (``nq``: one scale for the matrix).
    n_oversamples : int, default 0
        Extra sketch columns; the rank-m basis is then the top-m subspace of the larger sketch
        (one more pass over A). Increase this before ``n_power_iter``.
    n_power_iter : int, optional
        Power iterations (two passes over A each). Default 0 (2 for ``dsvd``/``lplr-svd``).
    seed : int, default 0
        Seeds every random stream; the same seed and ``block_shape`` give byte-identical codes
        for any storage tiling, worker count or backend.
    rounding : {"nearest", "stochastic"}, default "nearest"
    block_shape : (int, int), optional
        The canonical block grid of the computation, and the chunk shape of the stored
        factors. Default: at most 4096 × 4096, in nearly equal blocks (see
        :func:`lplr_dask.storage.inputs.canonical_block_shape`).
    max_rank : int, default 512
        Largest rank the budget search considers.
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

    Returns
    -------
    CompressionResult
        The measured ``rel_fro_error`` (exact, from LᵀA and LᵀL, no extra pass),
        ``bits_per_entry`` = 8 · stored bytes / (n·d), where the stored bytes are the chunk
        payloads on disk (edge chunks padded; checksums and metadata aside), timings and the
        configuration.

    Notes
    -----
    Passes over A: 2 for ``lplr`` (+2 per power iteration, +1 with oversampling), +1 pass over
    a column sample and one sketch for ``budget``. Memory beyond one tile per worker thread:
    the n × (m + p) sketch and basis and the m × d_panel projection partials, on the workers.
    The driver holds only m × m matrices.

    References
    ----------
    R. Saha, V. Srivastava, M. Pilanci. Matrix Compression via Randomized Low Rank and Low
    Precision Factorization. NeurIPS 2023. arXiv:2310.11028.
    """
    job = CompressionJob.create(
        source,
        output,
        method=method,
        rank=rank,
        budget=budget,
        bits_left=bits_left,
        bits_right=bits_right,
        bits_matrix=bits_matrix,
        group_size=group_size,
        n_oversamples=n_oversamples,
        n_power_iter=n_power_iter,
        seed=seed,
        rounding=rounding,
        block_shape=block_shape,
        max_rank=max_rank,
        overwrite=overwrite,
        resume=resume,
        verify=verify,
        on_stage=on_stage,
        allow_missing_chunks=allow_missing_chunks,
    )
    return job.run()
