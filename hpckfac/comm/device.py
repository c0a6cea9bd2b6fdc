"""CuPy device buffers for the collectives (``hpckfac.comm.backend`` seam).

Two ways for MPI to reach GPU memory:

- **CUDA-aware MPI** (``cuda_aware_mpi()``): device arrays go to MPI as they
  are (mpi4py reads ``__cuda_array_interface__``); scratch buffers live on the
  GPU and the ring's reductions run there (``DeviceBackend``).
- otherwise **pinned host staging** (``StagedDeviceBackend``): the buffer is
  copied once into page-locked host memory reused across steps, the
  collective runs on the host copy, and the result is copied back.

MPI does not know CuPy's streams, so every hand-over to MPI first waits for
the current stream (``stage_in``, ``add`` and ``synchronize`` do). MPI's
float16 sum is a Python user op reading host memory, so float16 reductions by
MPI itself always go through the staged backend (``DeviceBackend.staged``).
The Communicator installs the backend that fits this MPI
(``install_device_backend``) when the first CuPy array arrives.
"""
from __future__ import annotations

import ctypes
import importlib
import os
from functools import lru_cache
from typing import Any

import numpy as np

from hpckfac.arrays import is_cupy
from hpckfac.comm.backend import register_backend

# "1"/"0" forces CUDA-aware MPI on/off (e.g. an MPI that is CUDA-aware but
# cannot be asked, or to compare the two paths).
CUDA_AWARE_ENV = "HPCKFAC_CUDA_AWARE_MPI"


def _loaded_mpi_libraries() -> list[str]:
    """Paths of the MPI shared libraries mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libmpi" in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)


@lru_cache(maxsize=1)
def cuda_aware_mpi() -> bool:
    """Whether MPI accepts CUDA device buffers: ``$HPCKFAC_CUDA_AWARE_MPI`` if set,
    else ``MPIX_Query_cuda_support()`` of the loaded MPI library (Open MPI,
    MPICH >= 4), else False."""
    forced = os.environ.get(CUDA_AWARE_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"{CUDA_AWARE_ENV}: expected 0 or 1, got {forced!r}")
        return forced == "1"
    importlib.import_module("mpi4py.MPI")  # loads the MPI library

    for path in _loaded_mpi_libraries():
        query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        if query is not None:
            query.restype = ctypes.c_int
            return bool(query())
    return False


def _is_view_of(work: Any, array: Any) -> bool:
    # stage_in returns either a flat view of the array (same first address) or a fresh copy,
    # which cannot start at the address of a live array: one pointer comparison tells them apart.
    return work.data.ptr == array.data.ptr


class DeviceBackend:
    """CuPy arrays handed to a CUDA-aware MPI directly; reductions on the GPU."""

    name = "cupy"
    device_memory = True

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self.staged = StagedDeviceBackend()

    def accepts(self, array: Any) -> bool:
        """Whether ``array`` is a CuPy array."""
        return is_cupy(array)

    def stage_in(self, array: Any) -> Any:
        """A flat view of a contiguous ``array`` (else a contiguous copy), once the current
        stream has finished writing it: MPI reads device memory outside the stream."""
        work = array.reshape(-1) if array.flags.c_contiguous else self.xp.ascontiguousarray(array).reshape(-1)
        self.xp.cuda.get_current_stream().synchronize()
        return work

    def stage_out(self, work: Any, array: Any) -> None:
        """Copy ``work`` into ``array`` unless it is a view of ``array``."""
        if not _is_view_of(work, array):
            array[...] = work.reshape(array.shape)

    def add(self, dst: Any, src: Any) -> None:
        """``dst += src`` on the GPU, finished before returning: the ring sends ``dst`` in its
        next step."""
        self.xp.add(dst, src, out=dst)
        self.synchronize()

    def synchronize(self) -> None:
        """Wait for the current CuPy stream."""
        self.xp.cuda.get_current_stream().synchronize()

    def result(self, work: Any) -> Any:
        """``work`` itself, already a CuPy array."""
        return work


class StagedDeviceBackend:
    """CuPy arrays staged through pinned host buffers for an MPI without CUDA support.

    One page-locked buffer per dtype, grown on demand and reused by every
    collective; the collective itself runs on the host copy (``xp`` is NumPy).
    """

    name = "cupy-staged"
    xp = np
    device_memory = False

    def __init__(self) -> None:
        import cupy

        self._cupy = cupy
        self._pinned: dict[np.dtype, tuple[Any, np.ndarray]] = {}

    def accepts(self, array: Any) -> bool:
        """Whether ``array`` is a CuPy array."""
        return is_cupy(array)

    def host_buffer(self, dtype: Any, length: int) -> np.ndarray:
        """A pinned host array of ``length`` elements of ``dtype`` (reused across calls)."""
        dtype = np.dtype(dtype)
        memory, view = self._pinned.get(dtype, (None, np.empty(0, dtype)))
        if view.size < length:
            memory = self._cupy.cuda.alloc_pinned_memory(max(length, 2 * view.size) * dtype.itemsize)
            view = np.frombuffer(memory, dtype=dtype)
            self._pinned[dtype] = (memory, view)
        return view[:length]

    def stage_in(self, array: Any) -> np.ndarray:
        """``array``'s values in the pinned host buffer of its dtype (a synchronous copy)."""
        host = self.host_buffer(array.dtype, array.size)
        self._cupy.ascontiguousarray(array).reshape(-1).get(out=host)
        return host

    def stage_out(self, work: np.ndarray, array: Any) -> None:
        """Copy the host result ``work`` back into the device ``array``."""
        array[...] = self._cupy.asarray(work).reshape(array.shape)

    def add(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst += src`` on the host copies (past the dtype's range inf, without NumPy's warning,
        as on the host backend)."""
        with np.errstate(over="ignore", invalid="ignore"):
            np.add(dst, src, out=dst)

    def synchronize(self) -> None:
        """Nothing to wait for: our own reductions run on the host copy."""

    def result(self, work: np.ndarray) -> Any:
        """The host result ``work`` copied to a new CuPy array."""
        return self._cupy.asarray(work)


_installed: list[Any] = []


def install_device_backend() -> Any:
    """Register the device backend that fits this MPI with the collectives (once) and return it."""
    if not _installed:
        backend = DeviceBackend() if cuda_aware_mpi() else StagedDeviceBackend()
        register_backend(backend)
        _installed.append(backend)
    return _installed[0]
