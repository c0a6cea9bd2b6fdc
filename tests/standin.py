"""A stand-in device array, so that the GPU code path of the pipeline runs (and
fails loudly) on machines without a GPU.

``DeviceArray`` wraps a NumPy array the way a CuPy array wraps device memory:
``np.asarray``/``np.array`` of it raise TypeError (as CuPy does), NumPy's
functions refuse it, and every explicit read back to the host (``get``,
``float``, ``bool``, ``item``, ``tolist``) is counted in ``HOST_READS``, every
array an operation produces in ``OPERATIONS``, every
upload of host data (``xp.asarray`` of a host array, list or scalar, host
arrays assigned into a device array) in ``UPLOADS``: on a GPU both wait for
the device's queue.
``xp`` is its array namespace (NumPy's functions on the wrapped arrays);
``installed()`` registers it with ``hpckfac.arrays`` (kernels: the NumPy
reference) and with the collectives (staged through host copies, like an MPI
without CUDA support), so a K-FAC step runs end to end on it.
"""
from __future__ import annotations

import contextlib
import operator
import types

import numpy as np

from hpckfac import arrays
from hpckfac.comm import backend as comm_backend
from hpckfac.ops import average, batchnorm, factors, inverse, packing

HOST_READS = {"count": 0}
UPLOADS = {"count": 0}
# Arrays produced on the "device" (results of operations and views): on a GPU each operation
# is a kernel launch or at least a CuPy call, ~10-20 us of host time.
OPERATIONS = {"count": 0}


def _unwrap(x):
    if isinstance(x, DeviceArray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        OPERATIONS["count"] += 1
        return DeviceArray(x)
    if isinstance(x, np.generic):  # device reductions give 0-d arrays, as CuPy's do
        OPERATIONS["count"] += 1
        return DeviceArray(np.asarray(x))
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap(v) for v in x)
    return x


def _read(value):
    HOST_READS["count"] += 1
    return value


class DeviceArray:
    """A NumPy array behind a wall: only explicit, counted reads reach the host."""

    __slots__ = ("_a",)
    __array_ufunc__ = None  # NumPy defers to our operators instead of converting

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("implicit conversion of a device array to host memory is not allowed; use .get()")

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a device array; use the array's own namespace")

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self._a.shape}, dtype={self._a.dtype})"

    # metadata (free: it lives on the host for CuPy too)
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DeviceArray(self._a.T))
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.__array_interface__["data"][0]))

    def __len__(self) -> int:
        return len(self._a)

    # explicit, counted reads
    def get(self) -> np.ndarray:
        return _read(self._a.copy())

    def __float__(self) -> float:
        return _read(float(self._a))

    def __int__(self) -> int:
        return _read(int(self._a))

    def __bool__(self) -> bool:
        return _read(bool(self._a))

    def item(self):
        return _read(self._a.item())

    def tolist(self):
        return _read(self._a.tolist())

    def __iter__(self):
        raise TypeError("iterating over a device array reads it element by element; use .get()")

    # indexing and methods stay on the "device"
    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value) -> None:
        if isinstance(value, (np.ndarray, list, tuple)):
            UPLOADS["count"] += 1
        self._a[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name: str):
        if name.startswith("__"):  # no __array_interface__, __array_struct__, __dlpack__: NumPy must not see in
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
        return _wrap(attr)


def _binary(op):
    return lambda self, other: _wrap(op(self._a, _unwrap(other)))


def _reflected(op):
    return lambda self, other: _wrap(op(_unwrap(other), self._a))


def _inplace(op):
    def method(self, other):
        self._a = op(self._a, _unwrap(other))
        return self
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor"):
    _op = getattr(operator, _name + "_") if _name in ("and", "or") else getattr(operator, _name)
    setattr(DeviceArray, f"__{_name}__", _binary(_op))
    setattr(DeviceArray, f"__r{_name}__", _reflected(_op))
    setattr(DeviceArray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(DeviceArray, f"__{_name}__", _binary(getattr(operator, _name)))
DeviceArray.__neg__ = lambda self: DeviceArray(-self._a)
DeviceArray.__invert__ = lambda self: DeviceArray(~self._a)
DeviceArray.__abs__ = lambda self: DeviceArray(abs(self._a))
DeviceArray.__hash__ = None


# Namespace functions that copy host data to the device when given any.
_UPLOADING = ("asarray", "array", "ascontiguousarray")


class _Namespace:
    """NumPy's functions taking and returning DeviceArrays (what ``cupy`` is to CuPy arrays)."""

    def __init__(self, module, name: str) -> None:
        self._module, self.__name__ = module, name

    def __getattr__(self, name: str):
        attr = getattr(self._module, name)
        if name in _UPLOADING:
            def upload(a, *args, **kwargs):
                if not isinstance(a, DeviceArray):
                    UPLOADS["count"] += 1
                return _wrap(attr(_unwrap(a), *_unwrap(args), **_unwrap(kwargs)))
            return upload
        if isinstance(attr, types.ModuleType):
            return _Namespace(attr, f"{self.__name__}.{name}")
        if isinstance(attr, type) or not callable(attr):
            return attr
        return lambda *args, **kwargs: _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))


xp = _Namespace(np, "standin")


def _kernels(module, name):
    impl = getattr(module, name)
    return lambda *args: _wrap(impl(*_unwrap(args)))


# The "kernels" of the stand-in device: the CPU reference on the wrapped arrays.
ops_backend = types.SimpleNamespace(
    pack_sym=_kernels(packing, "pack_sym"), unpack_sym=_kernels(packing, "unpack_sym"),
    accumulate_factor=_kernels(factors, "accumulate_factor"), ema_update=_kernels(average, "ema_update"),
    batchnorm_fisher=_kernels(batchnorm, "batchnorm_fisher"),
    damped_inverse=_kernels(inverse, "damped_inverse"))


class StagedBackend:
    """Collectives on host copies of DeviceArrays (an MPI without CUDA support)."""

    name = "standin-staged"
    xp = np
    device_memory = False

    def accepts(self, array) -> bool:
        return isinstance(array, DeviceArray)

    def stage_in(self, array: DeviceArray) -> np.ndarray:
        return np.array(array._a, copy=True).reshape(-1)  # staging, as pinned buffers do: not a stray read

    def stage_out(self, work: np.ndarray, array: DeviceArray) -> None:
        array._a[...] = work.reshape(array.shape)

    def add(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.add(dst, src, out=dst)

    def synchronize(self) -> None:
        pass

    def result(self, work: np.ndarray) -> DeviceArray:
        return DeviceArray(work)


KIND = arrays.ArrayKind("standin", lambda x: isinstance(x, DeviceArray), lambda: xp, lambda: ops_backend,
                        lambda x: x.get())


@contextlib.contextmanager
def installed():
    """Within the block, DeviceArrays work in ``hpckfac.arrays``, ``hpckfac.ops`` and the collectives."""
    staged = StagedBackend()
    arrays.register(KIND)
    comm_backend.register_backend(staged)
    try:
        yield
    finally:
        arrays._KINDS.remove(KIND)
        comm_backend._BACKENDS.remove(staged)


def to_device(a) -> DeviceArray:
    """A DeviceArray holding ``a`` (shares its memory, as DLPack does)."""
    return DeviceArray(a)
