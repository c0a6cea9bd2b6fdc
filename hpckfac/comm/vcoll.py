"""ReduceScatterV and AllGatherV with per-rank counts, on MPI's own collectives."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from hpckfac.comm.backend import Backend


def check_counts(counts: Sequence[int], size: int) -> np.ndarray:
    """``counts`` as int64, one non-negative integer per rank; ValueError otherwise."""
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size != size:
        raise ValueError(f"counts must hold one entry per rank ({size}), got {list(np.ravel(arr))}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError(f"counts must be non-negative integers, got {arr.tolist()}")
    return arr.astype(np.int64)


def displacements(counts: np.ndarray) -> np.ndarray:
    """Offset of each rank's segment in the whole buffer."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def reduce_scatter_v(mpi: MPI.Comm, send: Any, counts: np.ndarray, datatype: MPI.Datatype,
                     op: MPI.Op, backend: Backend, mean: bool) -> Any:
    """Sum ``send`` (contiguous, length ``counts.sum()``) over ranks; this rank's segment."""
    rank, size = mpi.Get_rank(), mpi.Get_size()
    out = backend.xp.empty(int(counts[rank]), dtype=send.dtype)
    mpi.Reduce_scatter([send, datatype], [out, datatype], recvcounts=counts.tolist(), op=op)
    if mean and size > 1:
        out /= size
    return out


def allgather_v(mpi: MPI.Comm, segment: Any, counts: np.ndarray, datatype: MPI.Datatype,
                backend: Backend) -> Any:
    """Concatenate every rank's ``segment`` (length ``counts[rank]``) on every rank."""
    out = backend.xp.empty(int(counts.sum()), dtype=segment.dtype)
    mpi.Allgatherv([segment, datatype], [out, (counts.tolist(), displacements(counts).tolist()), datatype])
    return out
