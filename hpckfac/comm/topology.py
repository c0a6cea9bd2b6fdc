"""Where a rank runs: its rank among the ranks of its node, the CPUs it may use, and the GPUs
it sees."""
from __future__ import annotations

import os

from mpi4py import MPI


def cpu_set() -> frozenset[int]:
    """The CPUs this process may run on: the set the launcher (or a container) bound it to, all
    of the machine's where the system cannot say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


def node_placement(mpi: MPI.Comm) -> tuple[int, int, list[frozenset[int]]]:
    """This rank's index among the ranks sharing its node, their number, and each one's CPU
    set (``cpu_set``), in node rank order.

    Taken from an ``MPI_COMM_TYPE_SHARED`` split rather than launcher variables,
    so it is right under mpirun, srun and PBS alike.
    """
    shared = mpi.Split_type(MPI.COMM_TYPE_SHARED, key=mpi.Get_rank())
    try:
        return shared.Get_rank(), shared.Get_size(), [frozenset(s) for s in shared.allgather(sorted(cpu_set()))]
    finally:
        shared.Free()


def visible_gpu_count() -> int:
    """Number of CUDA devices this process may use (0 without CUDA).

    Asks the CUDA runtime for a device count only, which creates no context;
    CUDA_VISIBLE_DEVICES is honoured by the runtime itself.
    """
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    # ImportError without CuPy; CuPy's CUDARuntimeError (or a missing driver
    # library) when CUDA is unusable here. Either way: no GPU for this rank.
    except Exception:
        pass
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:
        return 0
