"""A strict CPU stand-in for CuPy (see ../README.md): NumPy data behind an array type that,
like CuPy's, refuses implicit conversion to NumPy and refuses to mix with NumPy arrays."""

from __future__ import annotations

import operator
import sys
import types

import numpy as np


class StrictMixError(TypeError):
    """A NumPy array met a (stand-in) CuPy array where CuPy would refuse it."""


_HOST_INDEX_OK = frozenset({"take", "__getitem__"})  # CuPy accepts host index arrays here


def _unwrap(x, seen):
    if isinstance(x, ndarray):
        seen[0] = True
        return x._a
    if isinstance(x, np.ndarray):
        seen[1] = True
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, seen) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, seen) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):
        return ndarray(np.asarray(x))
    if hasattr(x, "_fields"):  # a named tuple (QRResult, ...)
        return type(x)(*(_wrap(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap(v) for v in x)
    return x


def _call(fn, args, kwargs, name):
    seen = [False, False]
    a, k = _unwrap(args, seen), _unwrap(kwargs, seen)
    if seen[0] and seen[1] and name not in _HOST_INDEX_OK:
        raise StrictMixError(f"cupy.{name}: a numpy.ndarray mixed with cupy arrays")
    return _wrap(fn(*a, **k))


class ndarray:
    """NumPy data that behaves as a CuPy array at the library's boundaries."""

    __module__ = "cupy._core.core"
    __array_priority__ = 100

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly."
        )

    def get(self, *args, **kwargs):
        return self._a.copy()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        res = _call(getattr(ufunc, method), inputs, kwargs, ufunc.__name__)
        if out is not None:
            return out[0] if isinstance(out, tuple) and len(out) == 1 else out
        return res

    def __array_function__(self, func, types_, args, kwargs):
        return _call(func, args, kwargs, func.__name__)

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    real = property(lambda self: ndarray(self._a.real))
    imag = property(lambda self: ndarray(self._a.imag))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __index__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def item(self):
        return self._a.item()

    def tolist(self):
        return self._a.tolist()

    def __repr__(self):
        return "strict_cupy." + repr(self._a)

    def __getitem__(self, key):
        return _call(operator.getitem, (self, key), {}, "__getitem__")

    def __setitem__(self, key, value):
        if isinstance(value, np.ndarray) and value.ndim > 0:
            raise StrictMixError("cupy __setitem__ with a numpy.ndarray value")
        seen = [False, False]
        self._a[_unwrap(key, seen)] = _unwrap(value, seen)

    def __getattr__(self, name):  # astype, reshape, sum, view, ... on the data
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            return _call(attr, args, kwargs, name)

        return method

    def __reduce__(self):
        return (ndarray, (self._a,))


def _binary(op):
    def forward(self, other):
        return _call(op, (self, other), {}, op.__name__)

    def reflected(self, other):
        return _call(lambda a, b: op(b, a), (self, other), {}, op.__name__)

    def inplace(self, other):
        seen = [False, False]
        o = _unwrap(other, seen)
        if seen[1]:
            raise StrictMixError(f"in-place {op.__name__} with a numpy.ndarray")
        self._a = op(self._a, o)
        return self

    return forward, reflected, inplace


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "lshift", "rshift", "matmul"):  # fmt: skip
    _f, _r, _i = _binary(getattr(operator, _name + "_" if _name in ("and", "or") else _name))
    setattr(ndarray, f"__{_name}__", _f)
    setattr(ndarray, f"__r{_name}__", _r)
    setattr(ndarray, f"__i{_name}__", _i)
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name))[0])
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__", (lambda op: lambda self: ndarray(op(self._a)))(
        getattr(operator, _name)))  # fmt: skip


def asarray(x, dtype=None, order=None):
    """A host array copied to the (stand-in) device; a device array as it is."""
    if isinstance(x, ndarray):
        return x if dtype is None else x.astype(dtype)
    return ndarray(np.array(x, dtype=dtype, copy=True))


array = asarray


def asnumpy(x):
    return x._a.copy() if isinstance(x, ndarray) else np.asarray(x)


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name):  # cupy.where, cupy.matmul, cupy.float32, ...: NumPy's, made strict
    obj = getattr(np, name)
    if not callable(obj) or isinstance(obj, type):
        return obj

    def fn(*args, **kwargs):
        return _call(obj, args, kwargs, name)

    fn.__name__ = name
    return fn


class _Runtime:
    class CUDARuntimeError(RuntimeError):
        pass

    @staticmethod
    def getDeviceCount():
        return 1


class _Device:
    def __init__(self, *args):
        pass

    def synchronize(self):
        pass


cuda = types.SimpleNamespace(runtime=_Runtime, Device=_Device)
