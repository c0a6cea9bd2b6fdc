"""Supported dtypes, their MPI datatypes, and a half-precision sum MPI lacks."""
from __future__ import annotations

import numpy as np
from numpy.typing import DTypeLike
from mpi4py import MPI

# float16 travels as opaque 16-bit words: MPI has no half-precision type whose
# SUM every implementation supports, so sums of float16 use a user op (``sum_op``).
_MPI_TYPES = {np.dtype(np.float64): MPI.DOUBLE, np.dtype(np.float32): MPI.FLOAT,
              np.dtype(np.float16): MPI.UINT16_T}
# Small integers naming each dtype in agreement checks (0 means "no dtype").
DTYPE_CODES = {dtype: code for code, dtype in enumerate(_MPI_TYPES, start=1)}

_half_sum: MPI.Op | None = None


def check_dtype(dtype: DTypeLike) -> np.dtype:
    """``dtype`` as a NumPy dtype if collectives support it, else TypeError naming it."""
    dtype = np.dtype(dtype)
    if dtype not in _MPI_TYPES:
        raise TypeError(f"unsupported dtype {dtype}: collectives take float64, float32 or float16")
    return dtype


def mpi_type(dtype: np.dtype) -> MPI.Datatype:
    """The MPI datatype that carries ``dtype``."""
    return _MPI_TYPES[np.dtype(dtype)]


def _add_half(inbuf, inoutbuf, datatype) -> None:
    # MPI user-op signature: inoutbuf <- inbuf (+) inoutbuf, element-wise.
    src = np.frombuffer(inbuf, dtype=np.float16)
    dst = np.frombuffer(inoutbuf, dtype=np.float16)
    # A sum past 65504 is inf, as in any float16 sum: the callers refuse or pass on non-finite
    # results with their own warning, so NumPy's overflow warning would only add noise.
    with np.errstate(over="ignore", invalid="ignore"):
        np.add(dst, src, out=dst)


def sum_op(dtype: np.dtype) -> MPI.Op:
    """The MPI reduction op that sums ``dtype`` (a user op for float16)."""
    global _half_sum
    if np.dtype(dtype) != np.float16:
        return MPI.SUM
    if _half_sum is None:
        _half_sum = MPI.Op.Create(_add_half, commute=True)
    return _half_sum
