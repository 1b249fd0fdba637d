"""Opening and validating the input matrix as a Dask array with canonical blocks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from .errors import InputError, ParameterError

__all__ = ["ACCEPTED_DTYPES", "DEFAULT_BLOCK", "InputMatrix", "canonical_block_shape", "open_input"]

ACCEPTED_DTYPES = ("float16", "float32", "float64")
DEFAULT_BLOCK = 4096


@dataclass(frozen=True)
class InputMatrix:
    """The input as a Dask array cut into the engine's canonical blocks.

    ``data`` has the compute dtype (float32 for float16/float32 sources, float64 for float64)
    and chunks of ``block_shape``; ``path`` is the source on disk, if any.
    """

    data: da.Array
    source_dtype: str
    path: str | None
    block_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape


def canonical_block_shape(shape, *, block_shape=None, group_size: int | None = None):
    """The block grid the computation is defined on, independent of the storage tiling.

    Results depend on this grid (summation order), never on how the input is chunked on disk
    or on the number of workers: the same seed and block shape give byte-identical codes.
    The default is 4096 × 4096 (64 MiB of float32), column blocks rounded down to a multiple of
    ``group_size`` so that groups never straddle two blocks.
    """
    n, d = shape
    if block_shape is None:
        br, bc = DEFAULT_BLOCK, DEFAULT_BLOCK
        if group_size:
            bc = max(group_size, bc - bc % group_size)
    else:
        br, bc = (int(v) for v in block_shape)
        if br < 1 or bc < 8 or bc % 8:
            raise ParameterError(
                f"block_shape={tuple(block_shape)} is invalid: rows ≥ 1 and columns a positive "
                "multiple of 8 (codes are packed in whole bytes per block)."
            )
        if group_size and bc % group_size:
            raise ParameterError(
                f"block_shape columns {bc} are not a multiple of group_size={group_size}; use "
                f"{max(group_size, bc - bc % group_size)} or another multiple."
            )
    return min(br, n), min(bc, d)


def _open_zarr(path: Path):
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise InputError(
            f"INPUT {path} is not a readable Zarr v3 array ({type(exc).__name__}: {exc}). "
            "Give a Zarr array path, a Zarr group containing one array, or a .npy file."
        ) from exc
    if isinstance(node, zarr.Group):
        arrays = sorted(name for name, _ in node.arrays())
        if len(arrays) == 1:
            return node[arrays[0]]
        listing = ", ".join(arrays) if arrays else "none"
        raise InputError(
            f"INPUT {path} is a Zarr group with {len(arrays)} arrays ({listing}); name one, "
            f"as in {path}/{arrays[0] if arrays else 'NAME'}."
        )
    return node


def open_input(source, *, block_shape=None, group_size: int | None = None) -> InputMatrix:
    """Open ``source`` (a path to a Zarr array or group, a ``.npy`` file, a ``zarr.Array``,
    a NumPy or Dask array) and check that it is a 2-D floating-point matrix.

    Raises
    ------
    InputError
        Missing path, not Zarr/.npy, not 2-D, or a dtype other than float16/32/64.
    """
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"INPUT {source} does not exist. Check the path.")
        if path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                raise InputError(f"INPUT {source} is not a plain .npy array: {exc}") from exc
        else:
            arr = _open_zarr(path)
    else:
        arr = source
    shape = tuple(getattr(arr, "shape", ()))
    dtype = np.dtype(getattr(arr, "dtype", object))
    if len(shape) != 2:
        raise InputError(
            f"INPUT must be a 2-D matrix, got shape {shape}. Reshape it to (rows, columns) first."
        )
    if min(shape) < 2:
        raise InputError(
            f"INPUT has shape {shape}; a factorization needs at least 2 rows and 2 columns."
        )
    if dtype.name not in ACCEPTED_DTYPES:
        raise InputError(
            f"INPUT has dtype {dtype}; accepted dtypes are {', '.join(ACCEPTED_DTYPES)}. "
            "Convert integer or complex data to float32 first (complex: compress real and "
            "imaginary parts separately)."
        )
    block = canonical_block_shape(shape, block_shape=block_shape, group_size=group_size)
    if isinstance(arr, da.Array):
        data = arr
    elif isinstance(arr, zarr.Array):
        # Read in the store's own chunks (each stored chunk decoded once), then rechunk.
        data = da.from_zarr(arr)
    else:
        data = da.from_array(arr, chunks=block)
    compute = np.float64 if dtype == np.float64 else np.float32
    if data.dtype != compute:
        data = data.astype(compute)
    data = data.rechunk(block, method="tasks")  # no-op when already on the canonical grid
    return InputMatrix(
        data=data, source_dtype=dtype.name, path=str(path) if path else None, block_shape=block
    )
