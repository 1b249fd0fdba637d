"""The error hierarchy of lplr-dask.

Every error a user can cause derives from :class:`LPLRError` (itself a ``ValueError``), so
the command line can print the message alone, without a traceback, and library callers can
catch one type. Messages state the offending value and the fix.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InputError",
    "LPLRError",
    "NonFiniteInputError",
    "OutputExistsError",
    "ParameterError",
    "StorageFormatError",
]


class LPLRError(ValueError):
    """Base class of every error caused by the caller's input or parameters."""


class ParameterError(LPLRError):
    """A parameter is out of range or two parameters contradict each other."""


class ConfigError(ParameterError):
    """A flow configuration (YAML) has an unknown key, a wrong type or a bad value."""


class InputError(LPLRError):
    """The input matrix is missing, unreadable, of the wrong shape or of the wrong dtype."""


class NonFiniteInputError(InputError):
    """The input holds NaN or Inf; the message names the first tile where it was found."""


class OutputExistsError(LPLRError):
    """The output path exists (or overlaps the input) and overwriting was not asked for."""


class StorageFormatError(LPLRError):
    """A path is not a compressed lplr-dask group, or its format version is unknown."""
