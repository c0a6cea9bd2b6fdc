"""A rank with a different model or different options fails on every rank, fast."""
import time

import pytest
from torch import nn

from hpckfac.comm import CollectiveMismatchError
from hpckfac.torch import KFACPreconditioner


def model(last_out):
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, last_out))


@pytest.mark.mpi
def test_mismatched_model_fails_on_every_rank(comm):
    odd = comm.rank == comm.size - 1 and comm.size > 1
    start = time.perf_counter()
    if comm.size == 1:  # nobody to disagree with
        KFACPreconditioner(model(3), comm=comm).remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError, match="'2'"):
        KFACPreconditioner(model(2 if odd else 3), comm=comm)
    assert time.perf_counter() - start < 10.0


@pytest.mark.mpi
def test_mismatched_options_fail_on_every_rank(comm):
    interval = 2 if comm.rank == comm.size - 1 and comm.size > 1 else 1
    if comm.size == 1:
        KFACPreconditioner(model(3), comm=comm, factor_update_interval=interval).remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError, match="factor_update_interval"):
        KFACPreconditioner(model(3), comm=comm, factor_update_interval=interval)
