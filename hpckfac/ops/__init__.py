"""Numerical core of K-FAC on arrays: packing, factor accumulation, running
averages and damped inversion.

Every entry point validates its arguments (``hpckfac.ops.checks``) and then
dispatches on the array type (``hpckfac.arrays``): NumPy arrays go to the CPU
reference modules (``packing``, ``factors``, ``batchnorm``, ``average``, ``inverse``),
CuPy arrays to ``hpckfac.ops.cuda``, which implements functions of the same names and
signatures as the CPU modules (``packing.pack_sym``, ``packing.unpack_sym``,
``factors.accumulate_factor``, ``batchnorm.batchnorm_fisher``, ``average.ema_update``,
``inverse.damped_inverse``),
receives validated arguments and returns arrays of its own type. CuPy is
imported only when a CuPy array arrives.
See docs/numerics.md for layouts, precisions and the inversion fallbacks.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
from numpy.typing import DTypeLike

from hpckfac import arrays
from hpckfac.checks import check_real
from hpckfac.log import get_logger
from hpckfac.ops import average, batchnorm, checks, factors, inverse, packing
from hpckfac.ops.inverse import CHOLESKY, EIGEN, JITTER
from hpckfac.ops.packing import packed_offsets as _packed_offsets
from hpckfac.ops.packing import packed_size as _packed_size

__all__ = [
    "CHOLESKY", "JITTER", "EIGEN", "InverseResult",
    "packed_size", "packed_offsets", "pack_sym", "unpack_sym",
    "accumulate_factor", "batchnorm_fisher", "ema_update", "damped_inverse",
    "inversion_counters", "reset_inversion_counters",
]

# A NumPy array on the CPU path, a CuPy array on the CUDA path.
ArrayLike = Any

_log = get_logger("hpckfac.ops")
_STATUS_NAMES = {CHOLESKY: "cholesky", JITTER: "jitter", EIGEN: "eigen"}
_counters = dict.fromkeys(_STATUS_NAMES.values(), 0)


def _backend(x):
    """Module implementing the operations for arrays like ``x`` (None: the CPU reference)."""
    return None if x is None else arrays.ops_backend(x)


def packed_size(n: int) -> int:
    """``n*(n+1)//2``: elements in the packed upper triangle of an ``n x n`` matrix."""
    return _packed_size(checks.check_sizes([n], "n")[0])


def packed_offsets(sizes: Sequence[int]) -> np.ndarray:
    """int64 array of ``len(sizes)+1`` entries: where each matrix starts in a packed
    buffer, ``offsets[m] = sum_{k<m} sizes[k]*(sizes[k]+1)//2``; the last entry is the
    buffer length."""
    return _packed_offsets(checks.check_sizes(sizes))


def pack_sym(mats: Sequence[ArrayLike], dtype: DTypeLike | None = None, out: ArrayLike | None = None) -> ArrayLike:
    """Pack the upper triangles of square symmetric ``mats`` into one 1-D buffer.

    Matrix ``m`` occupies ``out[offsets[m]:offsets[m+1]]`` (``packed_offsets``) in
    the order of ``M[np.triu_indices(n)]``: ``(0,0),(0,1)..(0,n-1),(1,1)..(n-1,n-1)``.
    The lower triangles are not read. The buffer has dtype ``dtype`` (default: the
    common dtype of ``mats``, float64 for an empty list); with ``out`` (1-D, of the
    packed length) it is written there and ``dtype``, if given, must match it.
    """
    mats = list(mats)
    sizes = [checks.check_square(mat, f"mats[{i}]") for i, mat in enumerate(mats)]
    total = int(_packed_offsets(sizes)[-1])
    if out is not None:
        if getattr(out, "ndim", None) != 1 or out.shape[0] != total:
            raise ValueError(f"out: expected a 1-D array of length {total}, got shape {getattr(out, 'shape', None)}")
        if dtype is not None and np.dtype(dtype) != out.dtype:
            raise ValueError(f"dtype: {np.dtype(dtype)} differs from out.dtype {out.dtype}")
        dtype = out.dtype
    elif dtype is None:
        dtype = np.result_type(*[m.dtype for m in mats]) if mats else np.float64
    backend = _backend(out if out is not None else (mats[0] if mats else None))
    return (backend or packing).pack_sym(mats, sizes, np.dtype(dtype), out)


def unpack_sym(buffer: ArrayLike, sizes: Sequence[int], dtype: DTypeLike | None = None) -> list[ArrayLike]:
    """Symmetric ``(n, n)`` matrices, one per entry of ``sizes``, from a buffer laid
    out as ``pack_sym`` writes it; dtype ``dtype`` (default ``buffer.dtype``)."""
    sizes = checks.check_sizes(sizes)
    total = int(_packed_offsets(sizes)[-1])
    if getattr(buffer, "ndim", None) != 1 or buffer.shape[0] != total:
        raise ValueError(f"buffer: expected a 1-D array of length {total}, got shape {getattr(buffer, 'shape', None)}")
    dtype = buffer.dtype if dtype is None else np.dtype(dtype)
    return (_backend(buffer) or packing).unpack_sym(buffer, sizes, dtype)


def accumulate_factor(
    x: ArrayLike, scale: float = 1.0, *, packed: bool = False, out: ArrayLike | None = None,
    decay: float | None = None,
) -> ArrayLike:
    """``scale * x.T @ x`` for ``x`` of shape (rows, d), accumulated in float32.

    ``x`` may be float64, float32, float16 or ``ml_dtypes.bfloat16``; half
    inputs are upcast to float32 before the product. The result is float32
    (float64 for float64 ``x``), dense ``(d, d)`` or, with ``packed``, the
    ``packed_size(d)`` upper triangle in ``pack_sym`` order. With ``out`` (that
    dtype and shape) the result is written there and ``out`` returned; with
    ``decay`` as well, ``out <- decay*out + (1-decay)*scale*x.T@x`` and a
    non-finite product raises ValueError leaving ``out`` untouched.
    """
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x: expected a 2-D (rows, d) array, got shape {getattr(x, 'shape', None)}")
    checks.check_float(x, "x")
    scale = check_real(scale, "scale")
    d = int(x.shape[1])
    shape = (_packed_size(d),) if packed else (d, d)
    if decay is not None:
        decay = checks.check_decay(decay)
        if out is None:
            raise ValueError("out: decay needs out holding the running average")
    if out is not None:
        want = checks.accumulation_dtype(x.dtype)
        if tuple(out.shape) != shape or out.dtype != want:
            raise ValueError(f"out: expected shape {shape} and dtype {want}, got {tuple(out.shape)} {out.dtype}")
    return (_backend(x) or factors).accumulate_factor(x, scale, bool(packed), out, decay)


def batchnorm_fisher(x: ArrayLike, g: ArrayLike, eps: float, scale: float = 1.0, *, out: ArrayLike) -> ArrayLike:
    """Add BatchNorm's unit-wise Fisher of ``(γ_c, β_c)`` to ``out`` and return it.

    ``x`` (the layer input) and ``g`` (the per-example loss gradients of the
    output) are ``(N, C, T)`` arrays (example, channel, positions; any strides,
    float64/float32/float16/bfloat16). Example ``n``'s gradient of channel
    ``c`` is ``u = (Σ_t g x̂, Σ_t g)`` with ``x̂`` the input normalised by the
    batch mean and biased variance, ``eps`` inside the square root, as
    BatchNorm does in training; ``out`` (1-D, ``3*C``, float32 or float64)
    receives ``scale * Σ_n u uᵀ`` packed ``(00, 01, 11)`` channel after channel;
    nothing is added when there are no examples or no positions. The CPU
    reference computes in ``x``'s accumulation dtype; the CUDA kernels sum in
    float64 (docs/gpu.md).
    """
    for arr, name in ((x, "x"), (g, "g")):
        if getattr(arr, "ndim", None) != 3:
            raise ValueError(f"{name}: expected a 3-D (N, C, T) array, got shape {getattr(arr, 'shape', None)}")
        checks.check_float(arr, name)
    if tuple(g.shape) != tuple(x.shape):
        raise ValueError(f"g: shape {tuple(g.shape)} differs from x's {tuple(x.shape)}")
    eps = check_real(eps, "eps", above=0.0)
    scale = check_real(scale, "scale")
    size = 3 * int(x.shape[1])
    if getattr(out, "ndim", None) != 1 or out.shape[0] != size or out.dtype not in (np.float32, np.float64):
        raise ValueError(f"out: expected a 1-D float32 or float64 array of length {size}, "
                         f"got {getattr(out, 'shape', None)} {getattr(out, 'dtype', None)}")
    if not x.shape[0] * x.shape[2]:
        return out  # no moments to normalise by, nothing to add
    return (_backend(x) or batchnorm).batchnorm_fisher(x, g, eps, scale, out)


def ema_update(running: ArrayLike, new: ArrayLike, decay: float, *, first: bool = False,
               finite: bool | None = None) -> bool:
    """``running <- decay*running + (1-decay)*new`` in place; ``first``: ``running <- new``.

    ``decay`` (0 <= decay < 1) weighs the old value. If ``new`` holds NaN or
    Inf, or values beyond the range of ``running``'s dtype, nothing is written
    and False is returned (the caller logs or counts);
    True otherwise. ``finite`` is the caller's own verdict on ``new`` when it
    has one (e.g. many arrays checked with one device read), so that the
    check is not repeated; None checks here.
    """
    decay = checks.check_decay(decay)
    if tuple(getattr(new, "shape", ())) != tuple(running.shape):
        raise ValueError(f"new: shape {getattr(new, 'shape', None)} differs from running {running.shape}")
    if finite is False:
        return False
    return (_backend(running) or average).ema_update(running, new, decay, bool(first), finite is None)


class InverseResult(NamedTuple):
    """Result of ``damped_inverse``."""

    inverse: ArrayLike  # (batch, n, n), float32 (float64 for float64 input)
    status: ArrayLike   # (batch,) int8: CHOLESKY, JITTER or EIGEN per matrix


def damped_inverse(mats: ArrayLike, damping: float | ArrayLike, overwrite_mats: bool = False) -> InverseResult:
    """Inverses of ``mats[i] + damping[i]*I`` for a (batch, n, n) stack of SPD-ish matrices.

    ``damping`` is a scalar or a (batch,) array, finite and >= 0. Each matrix is
    symmetrised and Cholesky-factorised; failures are retried with growing
    jitter, then inverted by a clipped eigendecomposition (``status`` says which
    path each took; see hpckfac.ops.inverse and docs/numerics.md). The result is
    always finite; fallbacks are counted (``inversion_counters``) and logged as a
    warning. Non-finite input raises ValueError naming the batch indices.
    With ``overwrite_mats`` the CPU path forms the damped matrices in ``mats`` itself (its
    contents are then undefined): a caller that no longer needs them saves their copy.
    """
    batch, _ = checks.check_square_batch(mats)
    if not (arrays.is_device(damping) or np.ndim(damping) == 0):
        damping = np.asarray(damping)
    damping = checks.check_damping(damping, batch)
    backend = _backend(mats)
    inv, status = (backend or inverse).damped_inverse(mats, damping, overwrite_mats)
    _record(arrays.to_host(status))
    return InverseResult(inv, status)


def _record(status: np.ndarray) -> None:
    """Count each matrix's path and warn about fallbacks."""
    counts = np.bincount(status, minlength=len(_STATUS_NAMES))
    for code, name in _STATUS_NAMES.items():
        _counters[name] += int(counts[code])
    paths = [f"{counts[code]} of {status.size} matrices {what} (indices {_indices(status == code)})"
             for code, what in ((JITTER, "needed jitter"), (EIGEN, "took the eigen fallback")) if counts[code]]
    if paths:
        _log.warning("damped_inverse: %s", ", ".join(paths))


def _indices(mask: np.ndarray, shown: int = 8) -> str:
    """The first ``shown`` indices where ``mask`` holds, then how many more: a batch of
    thousands of small matrices (unit-wise blocks) must not print thousands of numbers."""
    where = np.flatnonzero(mask)
    head = ", ".join(str(i) for i in where[:shown])
    return f"[{head}, ... {where.size - shown} more]" if where.size > shown else f"[{head}]"


def inversion_counters() -> dict[str, int]:
    """Matrices inverted by each path since import (or the last reset):
    ``{"cholesky": ..., "jitter": ..., "eigen": ...}``."""
    return dict(_counters)


def reset_inversion_counters() -> None:
    """Set every inversion counter back to 0."""
    for name in _counters:
        _counters[name] = 0
