"""Shared fixtures: real Zarr stores on disk, matrices with a known spectrum, a real cluster."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import zarr


def known_spectrum(n, d, singular_values, *, noise=0.0, seed=0, dtype=np.float32):
    """A = U diag(s) Vᵀ (+ noise) with exactly orthonormal U, V: its spectrum is known."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u = np.linalg.qr(rng.standard_normal((n, k)))[0]
    v = np.linalg.qr(rng.standard_normal((d, k)))[0]
    a = (u * np.asarray(singular_values)) @ v.T
    if noise:
        a = a + noise * rng.standard_normal((n, d))
    return a.astype(dtype)


def write_zarr(path, a, chunks):
    z = zarr.create_array(str(path), shape=a.shape, chunks=chunks, dtype=a.dtype)
    z[:] = a
    return str(path)


def group_digest(path) -> dict:
    """SHA-256 of every chunk file of a compressed group (the codes and ranges), by name."""
    root = Path(path)
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != "zarr.json"
    }


def tree_digest(path) -> dict:
    """Every entry under ``path`` (or ``path`` itself), links not followed: the SHA-256 of a
    file, ``link:TARGET`` of a symbolic link, ``dir`` of a folder; to assert that nothing a
    user had was changed."""
    root = Path(path)
    if root.is_symlink():
        return {".": "link:" + os.readlink(root)}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return dict(sorted(out.items()))


@contextlib.contextmanager
def large_graphs(threshold: str):
    """Dask's "Sending large graph" warnings (messages) raised inside the block, with its
    threshold lowered to ``threshold`` (such as "20kB"): a matrix embedded in a task graph
    that should have been built or read on a worker shows up here."""
    import warnings

    import dask

    found: list[str] = []
    with (
        dask.config.set({"distributed.admin.large-graph-warning-threshold": threshold}),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        yield found
    found += [str(w.message) for w in caught if "Sending large graph" in str(w.message)]


@pytest.fixture(scope="session")
def decaying():
    """1200 × 700 float32, s_i = 0.8^i for i < 40, plus 0.1% noise."""
    s = 0.8 ** np.arange(40)
    return known_spectrum(1200, 700, s * 100, noise=1e-3, seed=1)


@pytest.fixture
def decaying_zarr(tmp_path, decaying):
    return write_zarr(tmp_path / "A.zarr", decaying, (300, 256))


@pytest.fixture(scope="session")
def cluster():
    """A real LocalCluster of two single-threaded worker processes on 127.0.0.1."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit="2GiB",
    ) as lc:
        yield lc


@pytest.fixture
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c
