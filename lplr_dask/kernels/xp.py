"""Array-library helpers: one code path for NumPy and CuPy blocks.

CuPy is imported lazily and only when a CuPy array is already in hand, so this module (and
every kernel built on it) imports on machines without CUDA.
"""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np

__all__ = ["array_namespace", "asarray_like", "to_numpy"]


def array_namespace(x) -> ModuleType:
    """Return the array module (``numpy`` or ``cupy``) that owns ``x``."""
    if type(x).__module__.startswith("cupy"):
        return sys.modules["cupy"]
    return np


def asarray_like(x, like):
    """Move ``x`` (usually a small NumPy array) onto the device and library of ``like``."""
    xp = array_namespace(like)
    return xp.asarray(x)


def to_numpy(x) -> np.ndarray:
    """Return ``x`` as a NumPy array, copying from the device if it is a CuPy array."""
    if type(x).__module__.startswith("cupy"):
        return x.get()
    return np.asarray(x)
