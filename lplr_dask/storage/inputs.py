"""Opening and validating the input matrix as a Dask array with canonical blocks.

A Zarr input is checked before anything is computed: every chunk (or shard) of its grid must
be in the store (Zarr leaves out chunks that hold only the fill value unless written with
``write_empty_chunks``, and a deleted chunk reads as the fill value too, so a missing chunk is
refused unless ``allow_missing_chunks=True``), and every chunk that fails to decode raises
:class:`~lplr_dask.errors.DamagedInputError` naming its key, inside the Dask task that reads it.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize

from lplr_dask.errors import DamagedInputError, InputError, ParameterError

__all__ = [
    "ACCEPTED_DTYPES",
    "DEFAULT_BLOCK",
    "DIRECT_READ_BYTES",
    "InputMatrix",
    "canonical_block_shape",
    "direct_read_bytes",
    "missing_chunk_keys",
    "open_input",
]

ACCEPTED_DTYPES = ("float16", "float32", "float64")
DIRECT_READ_BYTES: int | None = None
"""Raw chunks of an input at least this large are read with ``O_DIRECT``
(:func:`direct_read_bytes`); None: this machine's physical memory."""
DEFAULT_BLOCK = 4096
_SHOW_KEYS = 5  # missing chunk keys named in an error message


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


def _balanced(total: int, limit: int) -> int:
    """The block length of ``ceil(total / limit)`` nearly equal blocks."""
    return -(-total // -(-total // limit))


def canonical_block_shape(shape, *, block_shape=None, group_size: int | None = None):
    """The block grid the computation is defined on, independent of the storage tiling.

    Results depend on this grid (summation order), never on how the input is chunked on disk
    or on the number of workers: the same seed and block shape give byte-identical codes.

    The default cuts the n rows into ``ceil(n / 4096)`` nearly equal blocks of
    ``ceil(n / ceil(n / 4096))`` rows, and the d columns likewise; with more than one column
    block the column block is rounded up to a multiple of ``lcm(8, group_size)`` (codes are
    packed in whole bytes per block, and groups never straddle two blocks), and with one it is
    d. Balanced blocks keep the padding of edge chunks on disk small (a 6000-row matrix gets
    two blocks of 3000 rows, not 4096 + 1904 rows stored as 2 × 4096). A given ``block_shape``
    is kept as given (clipped to the matrix).

    Parameters
    ----------
    shape : (int, int)
        The matrix shape (n, d).
    block_shape : (int, int), optional
        Rows and columns of a block; columns a positive multiple of 8 (and of ``group_size``).
    group_size : int, optional
        Entries per scale along the rows of R; 0 or None for none.

    Returns
    -------
    (int, int)
        Rows and columns of a block, at most ``shape``.

    Raises
    ------
    ParameterError
        If ``block_shape`` is invalid for the packing or the group size.
    """
    n, d = (int(v) for v in shape)
    if block_shape is None:
        br = _balanced(n, DEFAULT_BLOCK)
        bc = _balanced(d, DEFAULT_BLOCK)
        if bc < d:
            step = math.lcm(8, int(group_size)) if group_size else 8
            bc = -(-bc // step) * step
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
    if path.is_dir():
        # An unreadable folder raises PermissionError here, one paragraph at the command line.
        # Zarr would probe zarr.json, .zarray and .zgroup at once, and the probes whose error
        # it never collects are printed as tracebacks at exit.
        os.listdir(path)
    try:
        node = zarr.open(str(path), mode="r")
        if isinstance(node, zarr.Group):
            arrays = sorted(name for name, _ in node.arrays())
    except Exception as exc:  # zarr raises several types for "not a store" or bad JSON
        raise InputError(
            f"INPUT {path} is not a readable Zarr v3 array ({type(exc).__name__}: {exc}). "
            "Give a Zarr array path, a Zarr group containing one array, or a .npy file; if "
            "its zarr.json was damaged, restore it from a copy."
        ) from exc
    if isinstance(node, zarr.Group):
        if len(arrays) == 1:
            return _open_zarr(path / arrays[0])
        listing = ", ".join(arrays) if arrays else "none"
        raise InputError(
            f"INPUT {path} is a Zarr group with {len(arrays)} arrays ({listing}); name one, "
            f"as in {path}/{arrays[0] if arrays else 'NAME'}."
        )
    return node


def _stored_block(arr: zarr.Array) -> tuple[int, ...]:
    """The unit a read decodes at once: the shard shape of a sharded array, else its chunks."""
    return tuple(arr.shards or arr.chunks)


def _local_root(arr: zarr.Array) -> Path | None:
    """The folder of ``arr`` when it lives in a local directory store, else None."""
    store = arr.store_path.store
    root = getattr(store, "root", None)
    if root is None or not isinstance(store, zarr.storage.LocalStore):
        return None
    return Path(root) / arr.store_path.path


def _stored_keys(arr: zarr.Array) -> set[str]:
    """Every key in the store under ``arr``'s folder, relative to it (one listing)."""
    root = _local_root(arr)
    if root is not None:
        found = set()
        for folder, _dirs, files in os.walk(root):
            rel = Path(folder).relative_to(root)
            found.update((rel / f).as_posix() for f in files)
        return found
    from zarr.core.sync import sync

    store, prefix = arr.store_path.store, arr.store_path.path

    async def collect():
        return [k async for k in store.list_prefix(f"{prefix}/" if prefix else "")]

    cut = len(prefix) + 1 if prefix else 0
    return {k[cut:] for k in sync(collect())}


def missing_chunk_keys(arr: zarr.Array) -> list[str]:
    """Keys of the chunks (shards, for a sharded array) of ``arr``'s grid absent from its
    store, in grid order: Zarr reads them as the fill value.

    Parameters
    ----------
    arr : zarr.Array

    Returns
    -------
    list of str
        Store keys relative to the array (``c/0/1``); empty when every chunk is stored.
    """
    grid = [-(-s // b) for s, b in zip(arr.shape, _stored_block(arr), strict=True)]
    stored = _stored_keys(arr)
    keys = (arr.metadata.encode_chunk_key(c) for c in np.ndindex(*grid))
    return [k for k in keys if k not in stored]


def _refuse_missing(arr: zarr.Array, missing: list[str], where: str) -> None:
    total = math.prod(-(-s // b) for s, b in zip(arr.shape, _stored_block(arr), strict=True))
    shown = ", ".join(missing[:_SHOW_KEYS]) + (", ..." if len(missing) > _SHOW_KEYS else "")
    raise DamagedInputError(
        f"INPUT {where} is missing {len(missing)} of its {total} chunks ({shown}): Zarr would "
        f"read them as the fill value {arr.fill_value}, so the result would silently describe "
        "another matrix. Restore them, or pass --allow-missing-chunks "
        f"(allow_missing_chunks=True) to read them as the fill value {arr.fill_value} — zarr "
        "leaves out chunks that are all fill value unless written with write_empty_chunks."
    )


def direct_read_bytes() -> int:
    """The input size from which raw chunks are read with ``O_DIRECT``, past the page cache:
    :data:`DIRECT_READ_BYTES`, by default the physical memory. An input that large cannot
    stay in the page cache from one pass to the next (each sequential pass evicts what the
    next needs first), so caching it only costs a copy per chunk and evicts everything
    else. Measured here on 64 MiB chunks from a cold cache: 2.0 GB/s and 10 ms of CPU per
    chunk direct, 1.1 GB/s and 23 ms buffered (one reader)."""
    if DIRECT_READ_BYTES is not None:
        return int(DIRECT_READ_BYTES)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _plain_chunks(arr: zarr.Array) -> bool:
    """True when every stored chunk of ``arr`` is its values as raw C-order bytes in this
    host's byte order (a Zarr v3 array whose only codec is ``bytes``: no compression, no
    checksum, no sharding, no transpose), so that a chunk file can be read straight into an
    array."""
    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or arr.shards is not None:
        return False
    codecs = tuple(getattr(md, "codecs", ()))
    if len(codecs) != 1 or not isinstance(codecs[0], zarr.codecs.BytesCodec):
        return False
    endian = codecs[0].endian
    return np.dtype(arr.dtype).itemsize == 1 or endian is None or endian.value == sys.byteorder


class _CheckedZarrReader:
    """Picklable reader of a Zarr array for :func:`dask.array.from_array`, one stored chunk
    (or shard) per call: a chunk that cannot be read or decoded raises
    :class:`~lplr_dask.errors.DamagedInputError` naming its key, and, unless
    ``allow_missing``, so does a chunk of a local store that disappeared after the input was
    checked.

    Chunks of a local store kept as raw bytes (:func:`_plain_chunks`) are read straight into
    the block, and their file size checked (a truncated or padded file is damaged); with
    ``O_DIRECT`` for inputs larger than memory (:func:`direct_read_bytes`). Zarr's own read
    path copies each chunk twice more: profiled here on a cold sketch pass of 64 chunks of
    64 MiB, it took 0.155 s per chunk against 0.026 s for the direct read, beside the tile's
    0.12 s GEMM (0.086 s against 0.048 s from the page cache). Everything else
    (compressed or sharded chunks, a missing chunk read as the fill value, other stores) goes
    through Zarr.
    """

    def __init__(self, arr: zarr.Array, where: str, *, allow_missing: bool):
        self.arr = arr
        self.where = where
        self.allow_missing = allow_missing
        self.block = _stored_block(arr)
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)
        root = _local_root(arr)
        self.root = str(root) if root is not None else None
        self.plain = self.root is not None and _plain_chunks(arr)
        self.direct = self.plain and arr.nbytes >= direct_read_bytes()

    def _key(self, index) -> str | None:
        try:
            coords = tuple((s.start or 0) // b for s, b in zip(index, self.block, strict=True))
        except (TypeError, AttributeError, ValueError):
            return None
        return self.arr.metadata.encode_chunk_key(coords)

    def __getitem__(self, index):
        key = self._key(index)
        if key is not None and self.root is not None and not self.allow_missing:
            if not os.path.exists(os.path.join(self.root, key)):
                raise DamagedInputError(
                    f"INPUT {self.where}: chunk {key} disappeared after the input was checked "
                    "(something changed the input during the run). Restore it and rerun, or "
                    "pass --allow-missing-chunks (allow_missing_chunks=True) to read missing "
                    "chunks as the fill value."
                )
        if self.plain and key is not None:
            block = self._read_plain(key, index)
            if block is not None:
                return block
        try:
            return self.arr[index]
        except MemoryError:
            raise
        except Exception as exc:
            what = f"chunk {key}" if key is not None else f"the chunks of {index}"
            if key is not None and self.root is not None:
                what += f" ({os.path.join(self.root, key)})"
            raise DamagedInputError(
                f"INPUT {self.where}: {what} cannot be decoded ({type(exc).__name__}: {exc}). "
                "The file is damaged (truncated, corrupt or failing its checksum); restore "
                "it from a copy or rewrite the input."
            ) from None

    def _read_plain(self, key: str, index):
        """The block ``index`` (one whole stored chunk, clipped at the edges) read from its raw
        chunk file; None when the index is not one chunk or the file is absent (Zarr then
        reads the fill value or refuses, as for any store)."""
        starts = [s.start or 0 for s in index]
        if any(st % b for st, b in zip(starts, self.block, strict=True)):
            return None
        stops = [min(st + b, n) for st, b, n in zip(starts, self.block, self.shape, strict=True)]
        if any(
            (s.stop if s.stop is not None else n) != stop
            for s, stop, n in zip(index, stops, self.shape, strict=True)
        ):
            return None
        path = os.path.join(self.root, key)
        nbytes = math.prod(self.block) * self.dtype.itemsize
        try:
            raw, got = _read_file(path, nbytes, direct=self.direct)
        except FileNotFoundError:
            return None
        if got != nbytes:
            raise DamagedInputError(
                f"INPUT {self.where}: chunk {key} ({path}) cannot be decoded: it holds "
                f"{'fewer' if got < nbytes else 'more'} bytes than the {nbytes} of an "
                f"uncompressed {self.block} {self.dtype} chunk. The file is damaged (truncated "
                "or overwritten); restore it from a copy or rewrite the input."
            )
        out = raw[:nbytes].view(self.dtype).reshape(self.block)
        if tuple(stops) == tuple(st + b for st, b in zip(starts, self.block, strict=True)):
            return out
        return np.ascontiguousarray(
            out[tuple(slice(0, stop - st) for st, stop in zip(starts, stops, strict=True))]
        )


_PAGE = 4096  # O_DIRECT needs the buffer, the offset and the length aligned to the block size


def _read_file(path: str, nbytes: int, *, direct: bool) -> tuple[np.ndarray, int]:
    """The first ``nbytes`` of the file at ``path`` in a fresh page-aligned uint8 buffer, and
    the file's length up to ``nbytes`` + 1 (a longer file reads as ``nbytes`` + 1 or more).

    ``direct`` reads with ``O_DIRECT``: the disk writes straight into the buffer, with no
    copy through the page cache and nothing evicted from it; where the file system refuses
    it, the read is buffered. Raises FileNotFoundError for an absent file."""
    size = -(-(nbytes + 1) // _PAGE) * _PAGE  # one byte more than a whole chunk: shows excess
    base = np.empty(size + _PAGE, dtype=np.uint8)
    shift = (-base.ctypes.data) % _PAGE
    buf = base[shift : shift + size]
    view = memoryview(buf)
    flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not direct or isinstance(exc, FileNotFoundError):
            raise
        return _read_file(path, nbytes, direct=False)
    got = 0
    try:
        while got < size and (n := os.readv(fd, [view[got:]])):
            got += n
    except OSError:
        if not direct:
            raise
        return _read_file(path, nbytes, direct=False)
    finally:
        os.close(fd)
    return buf, got


def _read_zarr(arr: zarr.Array, where: str, *, allow_missing: bool) -> da.Array:
    reader = _CheckedZarrReader(arr, where, allow_missing=allow_missing)
    store = arr.store_path.store
    name = "lplr-input-" + tokenize(
        str(store), arr.store_path.path, arr.metadata.to_dict(), allow_missing
    )
    return da.from_array(
        reader, chunks=reader.block, name=name, meta=np.empty((0, 0), reader.dtype)
    )


def open_input(
    source,
    *,
    block_shape=None,
    group_size: int | None = None,
    allow_missing_chunks: bool = False,
) -> InputMatrix:
    """Open ``source`` (a path to a Zarr array or group, a ``.npy`` file, a ``zarr.Array``,
    a NumPy or Dask array) and check that it is a 2-D floating-point matrix.

    Parameters
    ----------
    source : str, path, zarr.Array, numpy.ndarray or dask.array.Array
    block_shape : (int, int), optional
        The canonical block grid (see :func:`canonical_block_shape`).
    group_size : int, optional
        The group size of the compression, for the default grid.
    allow_missing_chunks : bool, default False
        Read chunks missing from a Zarr store as the array's fill value instead of refusing
        the input.

    Raises
    ------
    InputError
        Missing path, not Zarr/.npy (or a damaged ``zarr.json``), not 2-D, or a dtype other
        than float16/32/64.
    DamagedInputError
        A chunk of a Zarr input is missing (without ``allow_missing_chunks``); raised when the
        data is computed, a chunk that cannot be decoded.
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
        where = str(path) if path is not None else str(arr.store_path)
        if not allow_missing_chunks:
            missing = missing_chunk_keys(arr)
            if missing:
                _refuse_missing(arr, missing, where)
        # Read in the store's own chunks (each stored chunk decoded once), then rechunk.
        data = _read_zarr(arr, where, allow_missing=allow_missing_chunks)
    else:
        data = da.from_array(arr, chunks=block)
    compute = np.float64 if dtype == np.float64 else np.float32
    if data.dtype != compute:
        data = data.astype(compute)
    data = data.rechunk(block, method="tasks")  # no-op when already on the canonical grid
    return InputMatrix(
        data=data, source_dtype=dtype.name, path=str(path) if path else None, block_shape=block
    )
