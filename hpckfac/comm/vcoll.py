"""ReduceScatterV and AllGatherV with per-rank counts: MPI's own collectives
(``algorithm="mpi"``) or the two phases of hpckfac's ring (``"ring"``)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from hpckfac.comm import ring
from hpckfac.comm.backend import Backend


def check_counts(counts: Sequence[int], size: int) -> np.ndarray:
    """``counts`` as int64, one non-negative integer per rank, their sum below 2**63;
    ValueError otherwise."""
    arr = np.asarray(counts)
    if arr.ndim != 1 or arr.size != size:
        raise ValueError(f"counts must hold one entry per rank ({size}), got {list(np.ravel(arr))}")
    if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0):
        raise ValueError(f"counts must be non-negative integers, got {arr.tolist()}")
    # Summed in Python: in int64 a larger total wraps and can pass for a buffer's length.
    total = sum(arr.tolist())
    if total >= 2**63:
        raise ValueError(f"counts sum to {total}, more elements than an array can hold")
    return arr.astype(np.int64)


def bounds(counts: np.ndarray) -> list[int]:
    """Segment boundaries: rank ``r`` owns ``[bounds[r], bounds[r+1])``."""
    return [0] + np.cumsum(counts).tolist()


def reduce_scatter_v(mpi: MPI.Comm, send: Any, counts: np.ndarray, datatype: MPI.Datatype,
                     op: MPI.Op, backend: Backend, mean: bool, algorithm: str, out: Any = None) -> Any:
    """Sum ``send`` (contiguous, length ``counts.sum()``) over ranks; this rank's
    segment in ``out`` (contiguous, ``counts[rank]`` elements of ``backend.xp``), or in a
    new array when None (``send`` is left unchanged)."""
    rank, size = mpi.Get_rank(), mpi.Get_size()
    if algorithm == "ring":
        work = backend.xp.array(send, copy=True)  # the ring sums in place
        backend.synchronize()
        mine = ring.reduce_scatter(mpi, work, bounds(counts), datatype, backend, shift=0)
        if out is None:
            out = mine.copy()
        else:
            out[...] = mine
    else:
        if out is None:
            out = backend.xp.empty(int(counts[rank]), dtype=send.dtype)
        mpi.Reduce_scatter([send, datatype], [out, datatype], recvcounts=counts.tolist(), op=op)
    if mean and size > 1:
        out /= size
    return out


def allgather_v(mpi: MPI.Comm, segment: Any, counts: np.ndarray, datatype: MPI.Datatype,
                backend: Backend, algorithm: str, out: Any = None) -> Any:
    """Concatenate every rank's ``segment`` (length ``counts[rank]``) on every rank, in
    ``out`` (contiguous, ``counts.sum()`` elements of ``backend.xp``), or in a new array
    when None."""
    if out is None:
        out = backend.xp.empty(int(counts.sum()), dtype=segment.dtype)
    if algorithm == "ring":
        edges = bounds(counts)
        out[edges[mpi.Get_rank()]:edges[mpi.Get_rank() + 1]] = segment
        backend.synchronize()
        ring.allgather(mpi, out, edges, datatype, shift=0)
    else:
        mpi.Allgatherv([segment, datatype], [out, (counts.tolist(), bounds(counts)[:-1]), datatype])
    return out
