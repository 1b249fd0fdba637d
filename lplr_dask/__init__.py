"""lplr-dask: out-of-core low-rank, low-precision matrix compression on Dask over Zarr.

The public API::

    compress(source, output, *, rank=..., budget=..., method="lplr", ...) -> CompressionResult
    CompressionJob.create(source, output, ..., resume=True)   # the same, stage by stage
    compress_checkpoint(src, dst, *, budget, method="auto") / restore_checkpoint(dst, out)
    lplr_dask.reader.open_compressed(path) -> CompressedMatrix  # L, R, reconstruction, matvec
    lplr_dask.reader.relative_error(source, path) -> float      # independent blockwise check
    QuantizerSpec                                 # the quantizer of one factor
"""

from ._version import __version__
from .api import compress
from .checkpoint import compress_checkpoint, restore_checkpoint
from .errors import (
    ConfigError,
    InputError,
    LPLRError,
    NonFiniteInputError,
    OutputExistsError,
    ParameterError,
    StorageFormatError,
)
from .job import CompressionJob
from .params import METHODS, CompressionResult
from .quantize import QuantizerSpec

__all__ = [
    "METHODS",
    "CompressionJob",
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
