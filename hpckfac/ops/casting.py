"""Element casts with exactly one rounding, as the CUDA kernels do them.

NumPy casts float64 to ``ml_dtypes.bfloat16`` through float32, rounding twice:
a value just above a bfloat16 tie first rounds onto the tie, then to even,
and lands one bfloat16 ulp off. ``cast`` rounds float64 to float32 *to odd*
(truncate, then set the last bit if anything was cut off) before the float32 to
bfloat16 rounding; with 16 spare bits that gives the correctly rounded
bfloat16 (round to nearest, ties to even), subnormals and overflow included.
Every other cast is NumPy's own, which already rounds once.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike


def cast(values: np.ndarray, dtype: DTypeLike) -> np.ndarray:
    """``values.astype(dtype)`` with one rounding (a new array)."""
    dtype = np.dtype(dtype)
    if dtype.name == "bfloat16" and values.dtype == np.float64:
        return _float64_to_float32_odd(values).astype(dtype)
    return values.astype(dtype)


def _float64_to_float32_odd(x: np.ndarray) -> np.ndarray:
    """float64 to float32 rounded to odd."""
    with np.errstate(over="ignore"):
        nearest = x.astype(np.float32)
    back = nearest.astype(np.float64)
    inexact = (back != x) & np.isfinite(x)
    bits = nearest.view(np.uint32).copy()
    # Rounded away from zero: one step back in magnitude (sign-magnitude bits) truncates.
    bits[inexact & (np.abs(back) > np.abs(x))] -= 1
    bits[inexact] |= 1
    return bits.view(np.float32)
