"""Digest of the stored codes for a fixed set of configurations: a refactoring check.

Compresses one seeded 1500 × 900 matrix (a decaying spectrum plus noise, stored in 500 × 300
chunks) with every method and option family, and prints, per configuration, a SHA-256 prefix of
every stored chunk file (names and bytes; ``zarr.json`` excluded, since it records the version
and timings), the relative error and the bits per entry as JSON. Run it before and after a
change that must not change the codes, and compare the two outputs::

    python benchmarks/codes_digest.py > before.json
    ... change ...
    python benchmarks/codes_digest.py > after.json && diff before.json after.json
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import dask
import numpy as np
import zarr

from lplr_dask import compress

CASES = {
    "lplr": dict(rank=24, bits_left=4, bits_right=4),
    "lplr-stoch": dict(rank=24, bits_left=3, bits_right=5, rounding="stochastic"),
    "lplr-16": dict(rank=16, bits_left=16, bits_right=8),
    "paper": dict(method="paper", rank=20),
    "nq": dict(method="nq", bits_matrix=3),
    "nq-g0": dict(method="nq", bits_matrix=4, group_size=0),
    "nq+lplr": dict(method="nq+lplr", rank=8, bits_matrix=2),
    "dsvd": dict(method="dsvd", rank=12),
    "lplr-svd": dict(method="lplr-svd", rank=12, n_oversamples=5),
    "power": dict(rank=16, n_power_iter=1),
    "budget": dict(method="lplr", budget=1.5),
    "auto": dict(method="auto", budget=2.0),
    "blocks": dict(rank=24, block_shape=(512, 256)),
}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != "zarr.json":
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def make_matrix(n: int = 1500, d: int = 900, k: int = 60) -> np.ndarray:
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((n, k)))[0]
    v = np.linalg.qr(rng.standard_normal((d, k)))[0]
    a = (u * (0.9 ** np.arange(k) * 50)) @ v.T + 0.01 * rng.standard_normal((n, d))
    return a.astype(np.float32)


def main() -> None:
    work = Path(tempfile.mkdtemp())
    a = make_matrix()
    z = zarr.create_array(
        str(work / "A.zarr"),
        shape=a.shape,
        chunks=(500, 300),
        dtype="f4",
        config={"write_empty_chunks": True},
    )
    z[:] = a
    out = {}
    with dask.config.set(scheduler="threads"):
        for name, kw in CASES.items():
            r = compress(str(work / "A.zarr"), str(work / f"{name}.zarr"), seed=3, **kw)
            out[name] = (
                digest(work / f"{name}.zarr"),
                round(r.rel_fro_error, 10),
                r.bits_per_entry,
            )
    print(json.dumps(out, indent=0))


if __name__ == "__main__":
    main()
