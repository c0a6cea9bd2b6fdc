"""Ring reduce-scatter, allgather and allreduce over MPI point-to-point calls.

The buffer is cut into ``size`` near-equal chunks (lengths differ by at most
one, so lengths 0, 1 and fewer elements than ranks work: some chunks are
empty). Reduce-scatter: in ``size - 1`` steps each rank sends one chunk to its
right neighbour and adds the chunk arriving from its left neighbour; afterwards
rank ``r`` holds the complete sum of chunk ``r + 1``. Allgather: ``size - 1``
more steps pass the finished chunks around. Each rank sends and receives
``2 (size-1)/size`` of the buffer in total, independent of ``size``.
With chunk bounds taken from per-rank counts (``shift=0``) the same two
phases are ReduceScatterV and AllGatherV.
"""
from __future__ import annotations

from typing import Any

from mpi4py import MPI

from hpckfac.comm.backend import Backend

# Tag of the ring's point-to-point messages. Collectives are entered in the same
# order on every rank and MPI does not reorder messages between a pair of ranks
# with one tag, so one tag suffices; it keeps clear of small user tags.
RING_TAG = 0x4B46


def chunk_bounds(length: int, parts: int) -> list[int]:
    """``parts + 1`` offsets cutting ``length`` elements into near-equal chunks.

    The first ``length % parts`` chunks hold one element more than the others.
    """
    if parts < 1 or length < 0:
        raise ValueError(f"chunk_bounds: need parts >= 1 and length >= 0, got parts={parts}, length={length}")
    base, extra = divmod(length, parts)
    return [i * base + min(i, extra) for i in range(parts + 1)]


def _chunk(flat: Any, bounds: list[int], index: int) -> Any:
    index %= len(bounds) - 1
    return flat[bounds[index]:bounds[index + 1]]


def reduce_scatter(mpi: MPI.Comm, flat: Any, bounds: list[int], datatype: MPI.Datatype,
                   backend: Backend, shift: int = 1) -> Any:
    """Sum ``flat`` over ranks chunk-wise in place; returns this rank's finished
    chunk, number ``rank + shift`` (``shift=0``: chunk ``rank``, as ReduceScatterV)."""
    rank, size = mpi.Get_rank(), mpi.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    largest = max(b - a for a, b in zip(bounds, bounds[1:]))
    scratch = backend.xp.empty(largest, dtype=flat.dtype)
    for step in range(size - 1):
        send = _chunk(flat, bounds, rank + shift - 1 - step)
        into = _chunk(flat, bounds, rank + shift - 2 - step)
        incoming = scratch[:into.size]
        mpi.Sendrecv([send, datatype], right, RING_TAG, [incoming, datatype], left, RING_TAG)
        backend.add(into, incoming)
    return _chunk(flat, bounds, rank + shift)


def allgather(mpi: MPI.Comm, flat: Any, bounds: list[int], datatype: MPI.Datatype, shift: int = 1) -> None:
    """Starting from each rank holding chunk ``rank + shift``, give every rank every chunk, in place."""
    rank, size = mpi.Get_rank(), mpi.Get_size()
    right, left = (rank + 1) % size, (rank - 1) % size
    for step in range(size - 1):
        send = _chunk(flat, bounds, rank + shift - step)
        into = _chunk(flat, bounds, rank + shift - 1 - step)
        mpi.Sendrecv([send, datatype], right, RING_TAG, [into, datatype], left, RING_TAG)


def allreduce(mpi: MPI.Comm, flat: Any, datatype: MPI.Datatype, backend: Backend,
              mean: bool = False) -> None:
    """Ring allreduce of the contiguous 1-D ``flat`` in place (sum, or mean over ranks).

    The mean is taken on each rank's finished chunk before the allgather, so
    it costs ``1/size`` of a full division and all ranks end bit-identical.
    """
    size = mpi.Get_size()
    bounds = chunk_bounds(flat.size, size)
    done = reduce_scatter(mpi, flat, bounds, datatype, backend)
    if mean and size > 1:
        done /= size
        backend.synchronize()  # the allgather sends the divided chunk
    allgather(mpi, flat, bounds, datatype)
