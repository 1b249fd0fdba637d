"""The strict stand-in's ``cupyx.scipy.sparse``: CSR matrices of (stand-in) CuPy arrays,
products with them only (SciPy underneath)."""

from __future__ import annotations

import cupy
import numpy as np
from scipy import sparse as _sparse


def _device_data(x):
    if isinstance(x, cupy.ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise cupy.StrictMixError("cupyx.scipy.sparse: a numpy.ndarray given")
    return x


class _Matrix:
    def __init__(self, m):
        self._m = m

    @property
    def T(self):
        return _Matrix(self._m.T)

    def __matmul__(self, other):
        return cupy.ndarray(np.asarray(self._m @ _device_data(other)))


def csr_matrix(arg, shape=None):
    data, indices, indptr = (_device_data(v) for v in arg)
    return _Matrix(_sparse.csr_matrix((data, indices, indptr), shape=shape))
