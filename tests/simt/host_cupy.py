"""``hpckfac.ops.cuda`` with its kernels emulated: the backend's own launch code (grids, blocks,
shared memory, argument lists, offset tables) runs on NumPy arrays and calls the kernels of
``tests/simt`` instead of CuPy's.

``load_backend()`` executes ``hpckfac/ops/cuda.py`` as a private module (never registered as
``hpckfac.ops.cuda``, so the rest of the test session sees no CuPy) against ``HostCupy``, a
stand-in for the part of CuPy it touches: arrays are ``DeviceArray`` (a NumPy array with
CuPy's ``.data.ptr`` and ``.get()``), every other ``cupy.<name>`` is NumPy's function with its
array results viewed as ``DeviceArray``. Arrays allocated through the stand-in start as 0xff
bytes (NaN in every float format, as the GPU tests' poisoned allocator) and sit between guard
bytes, checked after every launch, so an unwritten element or a write just past an output
fails the test.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np

import simt
from hpckfac.ops import cuda_module

GUARD = 256  # bytes on each side of an allocation


class _Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class DeviceArray(np.ndarray):
    """A NumPy array that answers ``.data.ptr`` and ``.get()`` as a CuPy array does."""

    @property
    def data(self) -> _Pointer:  # type: ignore[override]
        return _Pointer(self.ctypes.data)

    def get(self) -> np.ndarray:
        return np.array(self)


def _device(value: Any) -> Any:
    return value.view(DeviceArray) if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray) else value


def _wrap(function: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        result = function(*args, **kwargs)
        return tuple(map(_device, result)) if isinstance(result, tuple) else _device(result)
    return wrapped


class HostCupy(types.ModuleType):
    """The ``cupy`` module as ``hpckfac.ops.cuda`` sees it (see the module docstring)."""

    def __init__(self, sm_count: int) -> None:
        super().__init__("cupy")
        self.ndarray = DeviceArray
        self._guarded: list[tuple[weakref.ref, np.ndarray]] = []
        runtime = types.SimpleNamespace(cudaDevAttrMultiProcessorCount=16, getDevice=lambda: 0,
                             deviceGetAttribute=lambda attribute, device: sm_count)
        self.cuda = types.SimpleNamespace(runtime=runtime, Device=lambda *a: types.SimpleNamespace(id=0))
        self.linalg = types.SimpleNamespace(**{f: _wrap(getattr(np.linalg, f)) for f in ("cholesky", "eigh", "inv")})

    def __getattr__(self, name: str) -> Any:
        return _wrap(getattr(np, name))

    def empty(self, shape: Any, dtype: Any = np.float64) -> DeviceArray:
        """Poisoned (0xff) memory between guard bytes."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.full(count * dtype.itemsize + 2 * GUARD, 0xFF, dtype=np.uint8)
        array = raw[GUARD:GUARD + count * dtype.itemsize].view(dtype).reshape(shape).view(DeviceArray)
        self._guarded.append((weakref.ref(array), raw))
        return array

    def empty_like(self, a: np.ndarray, dtype: Any = None) -> DeviceArray:
        return self.empty(a.shape, a.dtype if dtype is None else dtype)

    def zeros(self, shape: Any, dtype: Any = np.float64) -> DeviceArray:
        out = self.empty(shape, dtype)
        out[...] = 0
        return out

    def full(self, shape: Any, value: Any, dtype: Any = None) -> DeviceArray:
        out = self.empty(shape, np.asarray(value).dtype if dtype is None else dtype)
        out[...] = value
        return out

    def asarray(self, a: Any, dtype: Any = None) -> DeviceArray:
        return np.asarray(a, dtype=dtype).view(DeviceArray)

    def ascontiguousarray(self, a: Any) -> DeviceArray:
        a = np.asarray(a)
        if a.flags.c_contiguous:
            return a.view(DeviceArray)
        out = self.empty(a.shape, a.dtype)
        out[...] = a
        return out

    def check_guards(self) -> None:
        """AssertionError if a launch wrote into the guard bytes of a live allocation."""
        live = []
        for ref, raw in self._guarded:
            if ref() is None:
                continue
            live.append((ref, raw))
            if not ((raw[:GUARD] == 0xFF).all() and (raw[-GUARD:] == 0xFF).all()):
                raise AssertionError("a kernel wrote outside an allocation (its guard bytes changed)")
        self._guarded = live


class EmulatedLoader:
    """``hpckfac.ops.cuda_module`` with kernels from the emulator on a GPU of compute capability ``arch``."""

    def __init__(self, fake: HostCupy, arch: int) -> None:
        self._fake = fake
        self.arch = arch
        self.launches: list[tuple[str, tuple, tuple, int]] = []  # (name, grid, block, shared memory)

    def __getattr__(self, name: str) -> Any:
        return getattr(cuda_module, name)

    def device_arch(self) -> int:
        return self.arch

    def function(self, file: str, name_expression: str) -> Callable:
        assert name_expression in cuda_module.name_expressions(file, self.arch), name_expression
        kernel = simt.kernel(file, name_expression)

        def launch(grid, block, args, shared_mem=0):
            self.launches.append((name_expression, tuple(grid), tuple(block), shared_mem))
            kernel(grid, block, args, shared_mem=shared_mem)
            self._fake.check_guards()
        return launch


def _upload(fake: HostCupy) -> Callable:
    def upload(host: np.ndarray) -> tuple[DeviceArray, None]:
        device = fake.empty(host.shape, host.dtype)
        device[...] = host
        return device, None
    return upload


def load_backend(arch: int = 90, sm_count: int = 2) -> types.ModuleType:
    """A private instance of ``hpckfac.ops.cuda`` running on ``HostCupy`` and the emulated kernels.

    A small ``sm_count`` keeps the grids small, so that the kernels' grid-stride loops take
    several turns; ``cupy`` is the stand-in (arrays from ``cupy.asarray``), ``cuda_module``
    records every launch in ``launches``."""
    fake = HostCupy(sm_count)
    path = Path(cuda_module.__file__).with_name("cuda.py")
    spec = importlib.util.spec_from_file_location("hpckfac_ops_cuda_emulated", path)
    module = importlib.util.module_from_spec(spec)
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupyx")}
    sys.modules.update(cupy=fake, cupyx=types.ModuleType("cupyx"))
    try:
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    module.cuda_module = EmulatedLoader(fake, arch)
    module._upload = _upload(fake)
    return module
