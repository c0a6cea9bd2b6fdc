"""Where a rank runs: its rank among the ranks of its node, and the GPUs it sees."""
from __future__ import annotations

from mpi4py import MPI


def node_rank_and_size(mpi: MPI.Comm) -> tuple[int, int]:
    """This rank's index among the ranks sharing its node, and their number.

    Taken from an ``MPI_COMM_TYPE_SHARED`` split rather than launcher variables,
    so it is right under mpirun, srun and PBS alike.
    """
    shared = mpi.Split_type(MPI.COMM_TYPE_SHARED, key=mpi.Get_rank())
    try:
        return shared.Get_rank(), shared.Get_size()
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
