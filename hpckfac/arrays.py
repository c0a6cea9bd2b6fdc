"""Which array library holds an array: NumPy in host memory, CuPy on a GPU.

The pipeline allocates every buffer with the namespace (``xp``) of the arrays
it is given, so one code path serves host and device. This module answers the
few questions that code needs:

- ``namespace(x)``: the array module of ``x`` (``numpy``, ``cupy``, or a
  registered kind);
- ``ops_backend(x)``: the module implementing ``hpckfac.ops`` for ``x``
  (None for NumPy, whose reference implementation lives in ``hpckfac.ops``);
- ``to_host(x)`` / ``from_host(a, xp)``: the explicit copies between the two,
  used only where data must leave the device (checkpoints, logs);
- ``constant(host, xp, key, owner)``: a host array needed on the device at
  every step (index tables), uploaded once per key and device.

CuPy is imported only when a CuPy array arrives. ``register`` adds another
kind of array; the test suite uses it for a stand-in device array that
refuses implicit conversion to host memory.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import numpy as np


@dataclass(frozen=True)
class ArrayKind:
    """One array library: how to recognise its arrays and work with them."""

    name: str
    accepts: Callable[[Any], bool]
    namespace: Callable[[], Any]
    ops: Callable[[], Any]
    to_host: Callable[[Any], np.ndarray]


def is_cupy(x: Any) -> bool:
    """Whether ``x`` is a CuPy array (without importing CuPy)."""
    return type(x).__module__.startswith("cupy")


def _cupy():
    import cupy

    return cupy


def _cuda_ops():
    from hpckfac.ops import cuda

    return cuda


_KINDS: list[ArrayKind] = [
    ArrayKind("cupy", is_cupy, _cupy, _cuda_ops, lambda x: x.get()),
]


def register(kind: ArrayKind) -> None:
    """Make arrays accepted by ``kind`` work everywhere (tried before the built-in kinds)."""
    _KINDS.insert(0, kind)


def kind_of(x: Any) -> ArrayKind | None:
    """The registered kind of ``x``; None for NumPy arrays and anything else."""
    if isinstance(x, np.ndarray):
        return None
    return next((k for k in _KINDS if k.accepts(x)), None)


def namespace(x: Any) -> Any:
    """The array module of ``x``: ``numpy`` for host arrays, ``cupy`` for CuPy arrays."""
    kind = kind_of(x)
    return np if kind is None else kind.namespace()


def is_device(x: Any) -> bool:
    """Whether ``x`` lives outside host memory (a CuPy array or a registered kind)."""
    return kind_of(x) is not None


def ops_backend(x: Any) -> Any:
    """The module implementing ``hpckfac.ops`` for arrays like ``x``; None for NumPy."""
    kind = kind_of(x)
    return None if kind is None else kind.ops()


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a device array (NumPy arrays and scalars are returned as arrays, not copied)."""
    kind = kind_of(x)
    return np.asarray(x) if kind is None else kind.to_host(x)


def from_host(a: Any, xp: Any) -> Any:
    """``a`` (host data) as an array of namespace ``xp`` (a copy to the device, or ``a`` itself)."""
    return np.asarray(a) if xp is np else xp.asarray(a)


_constants: dict[tuple, Any] = {}
# The owners (by id) of each upload made for owners: it is dropped when the last is collected.
_owners: dict[tuple, set[int]] = {}


def constant(host: np.ndarray, xp: Any, key: Hashable, owner: object | None = None) -> Any:
    """``host`` as an ``xp`` array, uploaded once per ``key`` (which must identify ``host``'s
    contents) and device: an upload from host memory waits for everything queued on the
    device, so arrays needed at every step are not uploaded at every step. Without ``owner``
    the upload is kept for the process's lifetime (a few small tables); with one, it is shared
    by every owner of the same key and freed once they are all collected (a convolution's
    index, as large as its packed factor: a sweep over model sizes would otherwise pile them up
    on the device)."""
    if xp is np:
        return host
    cache_key = (key, xp.__name__, xp.cuda.runtime.getDevice() if hasattr(xp, "cuda") else None)
    upload = _constants.get(cache_key)
    if upload is None:
        upload = xp.asarray(host)
    if owner is not None and id(owner) not in _owners.get(cache_key, ()):
        _owners.setdefault(cache_key, set()).add(id(owner))
        weakref.finalize(owner, _release, cache_key, id(owner)).atexit = False
    # Stored after the owner is noted, from the local reference: a collection at any allocation
    # above may have released the last earlier owner, and with it the table's entry.
    _constants[cache_key] = upload
    return upload


def _release(cache_key: tuple, owner: int) -> None:
    """An owner of ``constant``'s upload ``cache_key`` was collected: the upload goes with its last."""
    owners = _owners.get(cache_key, set())
    owners.discard(owner)
    if not owners:
        _owners.pop(cache_key, None)
        _constants.pop(cache_key, None)
