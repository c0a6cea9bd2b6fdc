"""Array backends: which array library holds a buffer and how MPI reaches its memory.

A collective asks ``backend_for(buffer)`` once, then works only through the
backend: ``xp`` for scratch arrays, ``stage_in``/``stage_out`` around the MPI
calls, ``add`` for the reductions done in our own code, ``synchronize`` before
MPI reads memory that our own code just wrote, ``result`` to hand a new array
back in the caller's library. The host backend below hands NumPy memory to MPI
directly. The device backend for CuPy arrays (``hpckfac.comm.device``: passed
straight to a CUDA-aware MPI, or staged through pinned host buffers) is
installed the first time a CuPy array arrives; other backends register
themselves with ``register_backend``, and every algorithm runs unchanged.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from hpckfac.arrays import is_cupy


class Backend(Protocol):
    """What the collectives need from an array library."""

    name: str
    xp: Any  # the array module (numpy, cupy) used for scratch buffers
    # MPI reads and writes device memory directly. Such a backend also needs ``staged``, a backend
    # of the same arrays staged through host memory: MPI's float16 sum, a Python user op that reads
    # host memory, goes through it (``Communicator``'s reductions by ``algorithm="mpi"``).
    device_memory: bool

    def accepts(self, array: Any) -> bool:
        """Whether ``array`` belongs to this backend."""

    def stage_in(self, array: Any) -> Any:
        """A contiguous 1-D array holding ``array``'s values that MPI can read and write."""

    def stage_out(self, work: Any, array: Any) -> None:
        """Write the collective's result in ``work`` back into ``array``."""

    def add(self, dst: Any, src: Any) -> None:
        """``dst += src`` element-wise, in ``dst``'s dtype."""

    def synchronize(self) -> None:
        """Wait until work our code queued on ``xp`` arrays has finished (MPI is about to read them)."""

    def result(self, work: Any) -> Any:
        """A new collective result ``work`` (in ``xp``) as an array of the backend's library."""


class HostBackend:
    """NumPy arrays in host memory: MPI reads and writes them in place."""

    name = "numpy"
    xp = np
    device_memory = False

    def accepts(self, array: Any) -> bool:
        """Whether ``array`` is a NumPy array."""
        return isinstance(array, np.ndarray)

    def stage_in(self, array: np.ndarray) -> np.ndarray:
        """A flat view of a contiguous ``array`` (no copy), else a contiguous copy, so that
        MPI sees one contiguous block."""
        array = np.asarray(array)  # a subclass (np.matrix) may keep two axes under reshape(-1)
        return array.reshape(-1) if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(-1)

    def stage_out(self, work: np.ndarray, array: np.ndarray) -> None:
        """Copy ``work`` into ``array`` unless it is ``array``'s own memory (a staged view)."""
        if not np.shares_memory(work, array):
            array[...] = work.reshape(array.shape)

    def add(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst += src`` in place (a sum past the dtype's range is inf, without NumPy's warning:
        the callers refuse or pass on non-finite results with their own)."""
        with np.errstate(over="ignore", invalid="ignore"):
            np.add(dst, src, out=dst)

    def synchronize(self) -> None:
        """Nothing to wait for: NumPy's work is done when its call returns."""

    def result(self, work: np.ndarray) -> np.ndarray:
        """``work`` itself, already a NumPy array."""
        return work


_BACKENDS: list[Backend] = [HostBackend()]


def register_backend(backend: Backend) -> None:
    """Make ``backend`` available to every collective (tried before the host backend)."""
    _BACKENDS.insert(0, backend)


def backend_for(array: Any) -> Backend:
    """The backend owning ``array``; TypeError naming its type if none does."""
    for backend in _BACKENDS:
        if backend.accepts(array):
            return backend
    if is_cupy(array):
        from hpckfac.comm.device import install_device_backend

        return install_device_backend()
    raise TypeError(f"unsupported buffer type {type(array).__module__}.{type(array).__qualname__}: "
                    f"collectives take {', '.join(b.name for b in _BACKENDS)} arrays")
