"""MPI communication for hpckfac: ring allreduce with tensor fusion,
ReduceScatterV / AllGatherV, broadcast, and agreement checks that turn
mismatched calls into an error on every rank (see docs/comm.md)."""
from hpckfac.comm.communicator import Communicator
from hpckfac.comm.errors import CollectiveMismatchError

__all__ = ["CollectiveMismatchError", "Communicator"]
