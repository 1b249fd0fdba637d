"""lplr-dask: out-of-core low-rank, low-precision matrix compression on Dask over Zarr.

The public API::

    compress(source, output, *, rank=... | budget=..., method=..., ...) -> CompressionResult
    CompressionOptions(method=..., rank=..., ...)   # the same options as one validated object
    CompressionJob.create(source, output, options, resume=True)  # the same, stage by stage
    compress_checkpoint(src, dst, *, budget, method="auto") / restore_checkpoint(dst, out)
    lplr_dask.storage.reader.open_compressed(path) -> CompressedMatrix  # L, R, matvec
    lplr_dask.storage.reader.relative_error(source, path) -> float      # independent check
    QuantizerSpec                                 # the quantizer of one factor
"""

from lplr_dask._version import __version__
from lplr_dask.checkpoint import compress_checkpoint, restore_checkpoint
from lplr_dask.core.compress import compress
from lplr_dask.core.job import CompressionJob
from lplr_dask.core.params import METHODS, CompressionOptions, CompressionResult
from lplr_dask.errors import (
    ConfigError,
    InputError,
    LPLRError,
    NonFiniteInputError,
    OutputExistsError,
    ParameterError,
    StorageFormatError,
)
from lplr_dask.kernels.quantize import QuantizerSpec

__all__ = [
    "METHODS",
    "CompressionJob",
    "CompressionOptions",
    "CompressionResult",
    "ConfigError",
    "InputError",
    "LPLRError",
    "NonFiniteInputError",
    "OutputExistsError",
    "ParameterError",
    "QuantizerSpec",
    "StorageFormatError",
    "__version__",
    "compress",
    "compress_checkpoint",
    "restore_checkpoint",
]
