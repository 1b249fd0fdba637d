"""Readers of compressed groups: factors as Dask arrays, lazy reconstruction, matvec, checks.

Opening a group checks it (:func:`lplr_dask.storage.format.check_group`): format, version, the
checksum of the attributes and a cross-check of the attributes against every array. Every read
checks that the chunks it touches exist and decode (CRC-32C); damage is an
:class:`~lplr_dask.errors.IntegrityError` naming the array and the chunk, raised on the worker
and received by the caller with the same type. :func:`verify_compressed` reads every chunk once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from lplr_dask.errors import InputError, ParameterError
from lplr_dask.kernels.xp import array_namespace, asarray_like
from lplr_dask.storage.format import check_group, create_dense, read_factor_block, verify_array
from lplr_dask.storage.fs import check_output_path, publish, recover_publish, temporary_output
from lplr_dask.storage.inputs import open_input

__all__ = [
    "NO_CHECKSUMS_NOTE",
    "CompressedMatrix",
    "decompress",
    "open_compressed",
    "relative_error",
    "verify_compressed",
]

#: What ``lplr info`` and ``lplr verify`` say about a format-1 group.
NO_CHECKSUMS_NOTE = (
    "format version 1 has no checksums: damage cannot be detected; recompress to get them"
)


class CompressedMatrix:
    """A compressed group opened for reading, checked; nothing is loaded until asked.

    Attributes
    ----------
    path : str
    meta : dict
        The group's ``lplr_dask`` attributes (shape, method, rank, bits, metrics, ...).
    shape : (int, int)
    checked : bool
        True when every chunk carries a checksum and a missing chunk is an error (format
        version 2); False for format version 1, whose damage cannot be detected.
    format_version : int
    """

    def __init__(self, path):
        self.path = str(path)
        recover_publish(self.path)  # a publish of this path killed half-way
        info = check_group(self.path)
        self.meta = info["meta"]
        self.format_version = info["format_version"]
        self.checked = info["checked"]
        self._factors = info["factors"]
        self.shape = tuple(self.meta["shape"])

    def __repr__(self):
        m = self.meta
        return (
            f"CompressedMatrix({self.path!r}, shape={self.shape}, method={m['method']!r}, "
            f"rank={m['rank']}, bits_per_entry={m.get('bits_per_entry', float('nan')):.4f})"
        )

    def has(self, name: str) -> bool:
        return name in self._factors

    def arrays(self) -> dict:
        """The stored arrays, ``{"L/codes": ArrayLayout, ...}``, as checked on open."""
        return {
            f"{name}/{part}": lay
            for name, f in self._factors.items()
            for part, lay in f["arrays"].items()
        }

    def factor(self, name: str, dtype=np.float32) -> da.Array:
        """Dequantized factor ``"L"`` (n × m), ``"R"`` (m × d) or ``"Q"`` (n × d), lazily,
        one Dask block per stored chunk.

        Raises
        ------
        ParameterError
            The group stores no such factor (``nq`` stores only ``Q``; ``lplr`` no ``Q``).
        """
        if not self.has(name):
            raise ParameterError(
                f"{self.path} has no factor {name!r} (method {self.meta['method']} stores "
                f"{', '.join(sorted(self._factors))}). Use to_dask() for the reconstruction."
            )
        f = self._factors[name]
        fpath = os.path.join(self.path, name)
        spec, shape = f["spec"], f["shape"]
        crow, ccol = f["chunks"]
        rows = _chunks(shape[0], crow)
        cols = _chunks(shape[1], ccol)
        name_ = f"lplr-factor-{name}-" + tokenize(
            fpath, os.path.getmtime(os.path.join(fpath, "zarr.json")), dtype, self.checked
        )
        r_b, c_b = np.cumsum((0, *rows)), np.cumsum((0, *cols))
        dsk = {
            (name_, i, j): (
                _read_block,
                fpath,
                spec,
                shape,
                slice(int(r_b[i]), int(r_b[i + 1])),
                slice(int(c_b[j]), int(c_b[j + 1])),
                dtype,
                self.checked,
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

        Raises
        ------
        ParameterError
            ``x`` is not a vector or matrix with ``d`` rows.
        """
        x = np.asarray(x)
        vec = x.ndim == 1
        if x.ndim not in (1, 2) or x.shape[0] != self.shape[1]:
            raise ParameterError(
                f"x has shape {x.shape}; this matrix has {self.shape[1]} columns, so x must "
                f"be a vector of length {self.shape[1]} or a {self.shape[1]} × k block."
            )
        x2 = x.reshape(self.shape[1], -1)
        out = None
        if self.has("L"):
            rx = da.matmul(self.R, x2.astype(np.float32)).compute()
            out = da.matmul(self.L, rx).compute()
        if self.has("Q"):
            qx = da.matmul(self.factor("Q"), x2.astype(np.float32)).compute()
            out = qx if out is None else out + qx
        return out.ravel() if vec else out


def _read_block(fpath, spec, shape, rows, cols, dtype, checked):
    return read_factor_block(fpath, spec, shape, rows, cols, dtype, require_chunks=checked)


def _chunks(total: int, size: int) -> tuple[int, ...]:
    full, rest = divmod(total, size)
    return (size,) * full + ((rest,) if rest else ())


def open_compressed(path) -> CompressedMatrix:
    """Open a compressed group written by :func:`lplr_dask.compress`, with every check of
    :func:`lplr_dask.storage.format.check_group`.

    Raises
    ------
    StorageFormatError
        Not an lplr-dask result, or an unknown format version.
    IntegrityError
        Damaged metadata or attributes that disagree with the arrays.
    """
    return CompressedMatrix(path)


def verify_compressed(path, *, max_workers: int | None = None) -> dict:
    """Open ``path`` with every check, then read and decode every chunk of every array once.

    Parameters
    ----------
    path : str or os.PathLike
        A compressed group.
    max_workers : int, optional
        Threads reading chunks (default: ``min(8, CPUs)``).

    Returns
    -------
    dict
        ``path``, ``format_version``, ``checked`` (False for format 1: no checksums),
        ``arrays`` and ``chunks`` (counts), ``bytes`` (decoded payload bytes) and
        ``message``, the one-line verdict.

    Raises
    ------
    IntegrityError
        The first damaged chunk (missing, failing its checksum, truncated) or metadata.
    """
    cm = CompressedMatrix(path)
    n_chunks = n_bytes = 0
    workers = max_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for label in cm.arrays():
            c, b = verify_array(os.path.join(cm.path, label), require=cm.checked, executor=pool)
            n_chunks += c
            n_bytes += b
    n_arrays = len(cm.arrays())
    if cm.checked:
        verdict = f"{cm.path}: {n_arrays} arrays, {n_chunks} chunks, checksums match"
    else:
        verdict = f"{cm.path}: {n_arrays} arrays, {n_chunks} chunks read; {NO_CHECKSUMS_NOTE}"
    return {
        "path": cm.path,
        "format_version": cm.format_version,
        "checked": cm.checked,
        "arrays": n_arrays,
        "chunks": n_chunks,
        "bytes": n_bytes,
        "message": verdict,
    }


def relative_error(
    source, compressed, *, block_shape=None, allow_missing_chunks: bool = False
) -> float:
    """‖A − Â‖_F / ‖A‖_F by an independent blockwise pass over A and the stored factors.

    Unlike the error :func:`~lplr_dask.compress` reports (derived from LᵀA and LᵀL), this
    reconstructs every tile from disk and compares it with A: one pass over A.

    Parameters
    ----------
    source : path or array
        INPUT, as for :func:`lplr_dask.compress`.
    compressed : path or CompressedMatrix
    block_shape : (int, int), optional
        Block grid of the pass (default: the canonical grid).
    allow_missing_chunks : bool, default False
        Read chunks missing from a Zarr INPUT as its fill value, as ``compress`` did with it.

    Raises
    ------
    InputError
        INPUT has another shape than the compressed matrix.
    DamagedInputError
        A chunk of INPUT is missing (without ``allow_missing_chunks``) or cannot be decoded.
    IntegrityError
        A stored chunk is missing or fails its checksum.
    """
    cm = compressed if isinstance(compressed, CompressedMatrix) else CompressedMatrix(compressed)
    a = open_input(source, block_shape=block_shape, allow_missing_chunks=allow_missing_chunks).data
    if a.shape != cm.shape:
        raise InputError(
            f"INPUT has shape {a.shape} but the compressed matrix {cm.path} has shape "
            f"{cm.shape}. Give the INPUT that was compressed into it."
        )
    # One task per tile of A: Â_ij = L_i·R_j (+ Q_ij) formed there, the float64 sums of
    # (A − Â)² and A² returned. Through to_dask() and elementwise float64 arrays this held
    # 7.5 GB in a worker and took 163 s on a 65536 × 131072 matrix at rank 256.
    args: list = [a, "ij"]
    if cm.has("L"):
        args += [cm.factor("L", a.dtype).rechunk({0: a.chunks[0], 1: -1}), "ik"]
        args += [cm.factor("R", a.dtype).rechunk({0: -1, 1: a.chunks[1]}), "kj"]
    if cm.has("Q"):
        args += [cm.factor("Q", a.dtype).rechunk(a.chunks), "ij"]
    sums = da.blockwise(
        _tile_error_sums,
        "ij",
        *args,
        adjust_chunks={"i": 1, "j": 2},
        dtype=np.float64,
        meta=np.empty((0, 0)),
        concatenate=True,
    )
    (parts,) = da.compute(sums)
    parts = np.asarray(parts)
    num, den = float(parts[:, 0::2].sum()), float(parts[:, 1::2].sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


_ERROR_STRIP = 512  # rows of a tile whose float64 residual is formed at once


def _tile_error_sums(a, *factors):
    """[Σ (A − Â)², Σ A²] (float64) of one tile, Â = L_i·R_j (+ Q_ij) in A's precision as
    :meth:`CompressedMatrix.to_dask` forms it (``factors``: L_i, R_j, then Q_ij if stored),
    the residual in float64 in strips of rows."""
    xp = array_namespace(a)
    factors = tuple(asarray_like(f, a) for f in factors)  # read on the host; A may be on a GPU
    ahat = xp.matmul(factors[0], factors[1]) if len(factors) >= 2 else None
    if len(factors) % 2:  # Q
        ahat = factors[-1] if ahat is None else ahat + factors[-1]
    num = den = 0.0
    for r in range(0, a.shape[0], _ERROR_STRIP):
        s = slice(r, r + _ERROR_STRIP)
        d = a[s].astype(np.float64) - ahat[s].astype(np.float64)
        num += float(xp.einsum("ij,ij->", d, d))
        den += float(xp.einsum("ij,ij->", a[s], a[s], dtype=np.float64))
    return np.array([[num, den]])


def decompress(compressed, dest, *, overwrite: bool = False, chunks=None) -> str:
    """Write the reconstruction as a dense float32 Zarr array at ``dest``, tile by tile.

    The array is checksummed, every chunk is written, and its attributes mark it as written by
    lplr-dask (``format: lplr-dask-dense``, ``source``, ``shape``), so ``overwrite`` may later
    replace it.
    """
    cm = compressed if isinstance(compressed, CompressedMatrix) else CompressedMatrix(compressed)
    out = check_output_path(dest, overwrite=overwrite, inputs=[cm.path])
    arr = cm.to_dask()
    if chunks is not None:
        arr = arr.rechunk(chunks)
    with temporary_output(out) as tmp:
        target = create_dense(
            tmp, arr.shape, arr.chunksize, source=Path(cm.path).resolve(), dtype=arr.dtype
        )
        da.store(arr, target, lock=False)
        publish(tmp, Path(out))
    return str(out)
