"""Readers of compressed groups: factors as Dask arrays, lazy reconstruction, matvec, checks."""

from __future__ import annotations

import os
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .fs import check_output_path, publish, temporary_output
from .inputs import open_input
from .quantize import QuantizerSpec
from .storage import read_factor_block, read_metadata

__all__ = ["CompressedMatrix", "decompress", "open_compressed", "relative_error"]


class CompressedMatrix:
    """A compressed group opened for reading; nothing is loaded until asked.

    Attributes
    ----------
    path : str
    meta : dict
        The group's ``lplr_dask`` attributes (shape, method, rank, bits, metrics, ...).
    shape : (int, int)
    """

    def __init__(self, path):
        self.path = str(path)
        self.meta = read_metadata(path)
        self.shape = tuple(self.meta["shape"])

    def __repr__(self):
        m = self.meta
        return (
            f"CompressedMatrix({self.path!r}, shape={self.shape}, method={m['method']!r}, "
            f"rank={m['rank']}, bits_per_entry={m['bits_per_entry']:.4f})"
        )

    def has(self, name: str) -> bool:
        return name in self.meta["factors"]

    def factor(self, name: str, dtype=np.float32) -> da.Array:
        """Dequantized factor ``"L"`` (n × m), ``"R"`` (m × d) or ``"Q"`` (n × d), lazily,
        one Dask block per stored chunk."""
        if not self.has(name):
            raise KeyError(f"{self.path} has no factor {name!r} (method {self.meta['method']}).")
        fpath = os.path.join(self.path, name)
        group = zarr.open_group(fpath, mode="r")
        spec = QuantizerSpec.from_dict(group.attrs["quantizer"])
        shape = tuple(group.attrs["shape"])
        codes = zarr.open_array(os.path.join(fpath, "codes"), mode="r")
        crow = codes.chunks[0]
        ccol = codes.chunks[1] if spec.is_float else codes.chunks[1] * 8 // spec.bits
        ccol = min(ccol, shape[1])
        rows = _chunks(shape[0], crow)
        cols = _chunks(shape[1], ccol)
        name_ = f"lplr-factor-{name}-" + tokenize(
            fpath, os.path.getmtime(os.path.join(fpath, "zarr.json")), dtype
        )
        r_b, c_b = np.cumsum((0, *rows)), np.cumsum((0, *cols))
        dsk = {
            (name_, i, j): (
                read_factor_block,
                fpath,
                spec,
                shape,
                slice(int(r_b[i]), int(r_b[i + 1])),
                slice(int(c_b[j]), int(c_b[j + 1])),
                dtype,
            )
            for i in range(len(rows))
            for j in range(len(cols))
        }
        graph = HighLevelGraph.from_collections(name_, dsk, dependencies=())
        return da.Array(graph, name_, chunks=(rows, cols), dtype=dtype)

    @property
    def L(self) -> da.Array:
        return self.factor("L")

    @property
    def R(self) -> da.Array:
        return self.factor("R")

    def to_dask(self, dtype=np.float32) -> da.Array:
        """The reconstruction L·R (+ Q(A)) as a lazy n × d Dask array, computed tile by tile.

        Tiles follow L's row blocks and R's column panels; A is never formed as a whole.
        """
        parts = []
        if self.has("L"):
            parts.append(da.matmul(self.factor("L", dtype), self.factor("R", dtype)))
        if self.has("Q"):
            q = self.factor("Q", dtype)
            parts = [p.rechunk(q.chunks) for p in parts]
            parts.append(q)
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def matvec(self, x) -> np.ndarray:
        """``A x ≈ L (R x)`` (+ Q(A) x) for a vector or an d × k block ``x``, never forming A.

        Cost: one read of R and of L (and of Q for ``nq`` methods); memory O((n + d)·k).
        """
        x = np.asarray(x)
        vec = x.ndim == 1
        if x.shape[0] != self.shape[1]:
            raise ValueError(f"x has {x.shape[0]} rows; this matrix has {self.shape[1]} columns.")
        x2 = x.reshape(self.shape[1], -1)
        out = None
        if self.has("L"):
            rx = da.matmul(self.R, x2.astype(np.float32)).compute()
            out = da.matmul(self.L, rx).compute()
        if self.has("Q"):
            qx = da.matmul(self.factor("Q"), x2.astype(np.float32)).compute()
            out = qx if out is None else out + qx
        return out.ravel() if vec else out


def _chunks(total: int, size: int) -> tuple[int, ...]:
    full, rest = divmod(total, size)
    return (size,) * full + ((rest,) if rest else ())


def open_compressed(path) -> CompressedMatrix:
    """Open a compressed group written by :func:`lplr_dask.compress`."""
    return CompressedMatrix(path)


def relative_error(source, compressed, *, block_shape=None) -> float:
    """‖A − Â‖_F / ‖A‖_F by an independent blockwise pass over A and the stored factors.

    Unlike the error :func:`~lplr_dask.compress` reports (derived from LᵀA and LᵀL), this
    reconstructs every tile from disk and compares it with A: one pass over A.
    """
    cm = compressed if isinstance(compressed, CompressedMatrix) else CompressedMatrix(compressed)
    a = open_input(source, block_shape=block_shape).data
    if a.shape != cm.shape:
        raise ValueError(f"INPUT has shape {a.shape} but the compressed matrix has {cm.shape}.")
    ahat = cm.to_dask(dtype=a.dtype).rechunk(a.chunks)
    a64 = a.astype(np.float64)
    num, den = da.compute(((a64 - ahat.astype(np.float64)) ** 2).sum(), (a64 * a64).sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def decompress(compressed, dest, *, overwrite: bool = False, chunks=None) -> str:
    """Write the reconstruction as a dense float32 Zarr array at ``dest``, tile by tile."""
    cm = compressed if isinstance(compressed, CompressedMatrix) else CompressedMatrix(compressed)
    out = check_output_path(dest, overwrite=overwrite, inputs=[cm.path])
    arr = cm.to_dask()
    if chunks is not None:
        arr = arr.rechunk(chunks)
    with temporary_output(out) as tmp:
        arr.to_zarr(str(tmp), overwrite=True)
        publish(tmp, Path(out))
    return str(out)
