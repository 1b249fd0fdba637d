"""The error hierarchy of lplr-dask.

Every error a user can cause, and every damaged file lplr-dask detects, derives from
:class:`LPLRError` (itself a ``ValueError``), so the command line can print the message alone,
without a traceback, and exit with status 2, and library callers can catch one type. Messages
state the offending value or file and the fix. Errors raised inside Dask tasks on a worker
reach the caller with the same type.

::

    LPLRError
    ├── ParameterError                  a parameter is out of range or contradicts another
    │   └── ConfigError                 a flow configuration (YAML) is wrong
    ├── InputError                      the input matrix is missing, unreadable, malformed
    │   ├── NonFiniteInputError         NaN or Inf in the input
    │   └── DamagedInputError           a chunk of the input is missing or corrupt
    ├── OutputExistsError               OUTPUT exists, overlaps the input, or cannot be written
    │   └── ForeignOutputError          --overwrite of something lplr-dask did not write
    ├── StorageFormatError              not an lplr-dask result, or an unknown version
    │   ├── IntegrityError              stored data damaged: checksum, missing chunk, edited
    │   │                               attributes, arrays that disagree with the metadata
    │   └── UnsafePathError             a path in stored metadata leads outside its folder
    ├── VerificationError               a written result does not check out
    └── JobBusyError                    another live process runs the same resumable job
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DamagedInputError",
    "ForeignOutputError",
    "InputError",
    "IntegrityError",
    "JobBusyError",
    "LPLRError",
    "NonFiniteInputError",
    "OutputExistsError",
    "ParameterError",
    "StorageFormatError",
    "UnsafePathError",
    "VerificationError",
]


class LPLRError(ValueError):
    """Base class of every error caused by the caller's input, parameters or damaged files."""


class ParameterError(LPLRError):
    """A parameter is out of range or two parameters contradict each other."""


class ConfigError(ParameterError):
    """A flow configuration (YAML) has an unknown key, a wrong type or a bad value."""


class InputError(LPLRError):
    """The input matrix is missing, unreadable, of the wrong shape or of the wrong dtype."""


class NonFiniteInputError(InputError):
    """The input holds NaN or Inf; the message names the first tile where it was found."""


class DamagedInputError(InputError):
    """A chunk of the input is missing from the store or cannot be decoded; the message names
    the chunk. Missing chunks are accepted only with ``allow_missing_chunks=True``."""


class OutputExistsError(LPLRError):
    """The output path exists (or overlaps the input, or cannot be written) and overwriting
    was not asked for."""


class ForeignOutputError(OutputExistsError):
    """``overwrite=True`` was asked for a path that lplr-dask did not write (a user's folder,
    the working directory, a home directory); it is never replaced."""


class StorageFormatError(LPLRError):
    """A path is not a compressed lplr-dask result, or its format version is unknown."""


class IntegrityError(StorageFormatError):
    """Stored data is damaged: a chunk fails its checksum, is missing or truncated, or the
    attributes were edited or disagree with the arrays. The message names array and chunk."""


class UnsafePathError(StorageFormatError):
    """A path read from stored metadata is absolute, climbs out with ``..`` or leads out of
    its folder through a symbolic link."""


class VerificationError(LPLRError):
    """The written result does not check out (bytes on disk, or the independent error)."""


class JobBusyError(LPLRError):
    """Another live process is running the same resumable job."""
