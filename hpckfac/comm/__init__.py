"""MPI communication for hpckfac: ring allreduce with tensor fusion,
ReduceScatterV / AllGatherV, broadcast, and agreement checks that turn
mismatched calls into an error on every rank (see docs/comm.md).

Importing it in a job of several ranks installs the abort-on-error hook
(``hpckfac.comm.abort``), so that an exception raised before the first
Communicator (while a script loads its data, say) ends the job too.
"""
from hpckfac.comm.abort import install_abort_on_error
from hpckfac.comm.communicator import Communicator, world_communicator
from hpckfac.comm.errors import CollectiveMismatchError

# A bad HPCKFAC_ABORT_ON_ERROR is named in a warning (once) and taken as 1; nothing raises here.
install_abort_on_error()

__all__ = ["CollectiveMismatchError", "Communicator", "world_communicator"]
