"""The default local cluster (:func:`lplr_dask.cluster.dask_client`): a thread per worker beyond
its cores, so that reading a tile overlaps the GEMM of another, and codes that do not depend
on it."""

from __future__ import annotations

import os

import dask
import pytest
from conftest import group_digest, write_zarr

from lplr_dask import compress
from lplr_dask.cluster import READ_AHEAD_THREADS, dask_client

BLOCK = (256, 128)  # 5 × 6 blocks of the 1200 × 700 matrix: several tasks per worker at once


@pytest.fixture(scope="module")
def default_client():
    with dask_client("local", memory_limit="1GiB") as client:
        yield client


def test_default_workers_have_a_thread_beyond_their_cores(default_client):
    nthreads = default_client.nthreads()
    cores = os.cpu_count() or 1
    assert len(nthreads) == (2 if cores >= 2 else 1)
    per_worker = max(1, cores // len(nthreads)) + READ_AHEAD_THREADS
    assert set(nthreads.values()) == {per_worker}
    assert per_worker >= 2  # a read and a GEMM at once in every worker


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # two passes: sketch and projection reductions, lloyd codebooks
        dict(passes=1),  # one pass: Y, W and the test sketch from the same tile tasks
    ],
)
def test_default_cluster_gives_the_same_codes_as_one_thread(tmp_path, decaying, default_client, kw):
    """Several tasks per worker process at once (one BLAS thread each) change no code: the
    same bytes as every task run in turn in this process (the synchronous scheduler, which
    the stages run on even with a client open)."""
    src = write_zarr(tmp_path / "A.zarr", decaying, (300, 256))
    opts = dict(rank=16, bits_left=4, bits_right=3, block_shape=BLOCK, seed=5, **kw)
    with default_client.as_current():
        on_cluster = compress(src, tmp_path / "cluster.zarr", **opts)
    with dask.config.set(scheduler="sync"):
        in_turn = compress(src, tmp_path / "sync.zarr", **opts)
    a, b = group_digest(tmp_path / "cluster.zarr"), group_digest(tmp_path / "sync.zarr")
    assert len(a) > 4
    assert a == b
    assert on_cluster.rel_fro_error == in_turn.rel_fro_error
