"""Argument validation shared by every backend of ``hpckfac.ops``.

The public entry points in ``hpckfac.ops`` call these before dispatching, so a
backend (CPU here, CUDA in ``hpckfac.ops.cuda``) receives arguments that are
already known to be well formed. Only shapes, dtypes and scalars are checked;
data-dependent checks (finiteness of array contents) belong to the backends.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Sequence

import numpy as np
from numpy.typing import DTypeLike

from hpckfac.checks import check_real

# Input dtypes a factor may be accumulated from, by name so that ml_dtypes'
# bfloat16 and a CuPy array's dtype compare alike.
FACTOR_INPUT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def accumulation_dtype(dtype: DTypeLike) -> np.dtype:
    """float64 for float64 input, float32 for every narrower float."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def check_sizes(sizes: Sequence[int], name: str = "sizes") -> list[int]:
    """Matrix orders of a packed buffer: non-negative integers (ValueError naming ``name``)."""
    try:
        values = [operator_index(n) for n in sizes]
    except TypeError as exc:
        raise ValueError(f"{name}: expected non-negative integers, got {sizes!r}") from exc
    if any(n < 0 for n in values):
        raise ValueError(f"{name}: matrix orders must be non-negative, got {values}")
    return values


def operator_index(n: Any) -> int:
    """``int(n)`` for genuine integers (NumPy integers included), TypeError otherwise."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{n!r} is not an integer")
    return int(n)


def check_square(mat: Any, name: str) -> int:
    """Order of a 2-D square array ``mat``; ValueError naming ``name`` otherwise."""
    if getattr(mat, "ndim", None) != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"{name}: expected a square 2-D array, got shape {getattr(mat, 'shape', None)}")
    return int(mat.shape[0])


def check_square_batch(mats: Any, name: str = "mats") -> tuple[int, int]:
    """(batch, n) of a (batch, n, n) array of floats."""
    if getattr(mats, "ndim", None) != 3 or mats.shape[1] != mats.shape[2]:
        raise ValueError(f"{name}: expected a (batch, n, n) array, got shape {getattr(mats, 'shape', None)}")
    check_float(mats, name)
    return int(mats.shape[0]), int(mats.shape[1])


def check_float(arr: Any, name: str) -> None:
    """TypeError naming ``name`` unless ``arr`` holds one of FACTOR_INPUT_DTYPES."""
    if not _factor_input(arr.dtype):
        raise TypeError(f"{name}: dtype {arr.dtype} not supported, expected one of {FACTOR_INPUT_DTYPES}")


@functools.lru_cache(maxsize=64)
def _factor_input(dtype: Any) -> bool:
    """Whether ``dtype`` is one of FACTOR_INPUT_DTYPES, answered once per dtype: a dtype's
    ``name`` is built anew at every read, which the hooks would pay twice per layer and step."""
    return np.dtype(dtype).name in FACTOR_INPUT_DTYPES


def check_decay(decay: Any) -> float:
    """Running-average weight of the old value: 0 <= decay < 1."""
    return check_real(decay, "decay", at_least=0.0, below=1.0)


def check_damping(damping: Any, batch: int) -> Any:
    """Scalar damping as float, or a (batch,) array; finite and >= 0 either way."""
    if getattr(damping, "ndim", 0) == 0:
        return check_real(damping.item() if hasattr(damping, "item") else damping, "damping", at_least=0.0)
    if damping.ndim != 1 or damping.shape[0] != batch:
        raise ValueError(f"damping: expected a scalar or shape ({batch},), got shape {damping.shape}")
    # Both comparisons are False for NaN, so NaN, inf and negatives all fail here.
    if not bool(((damping >= 0) & (damping < math.inf)).all()):
        raise ValueError("damping: every entry must be finite and >= 0")
    return damping
