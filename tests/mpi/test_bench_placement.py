"""``hpckfac.bench.placement.placement`` at P ranks: every rank gets the same record, one entry
per rank, a host's cores the union of its ranks' CPU sets and each rank's own torch pool."""
import os
import platform

import pytest
import torch

from hpckfac.bench.placement import placement


@pytest.mark.mpi
def test_every_rank_gets_every_ranks_host_cores_and_pool(comm):
    mpi = comm.mpi
    # A different pool per rank, so that a record in the wrong order shows.
    threads = torch.get_num_threads()
    torch.set_num_threads(1 + comm.rank % 2)
    try:
        record = placement(comm)
    finally:
        torch.set_num_threads(threads)
    assert mpi.allgather(record) == [record] * comm.size
    mine = (platform.node(), set(os.sched_getaffinity(0)))
    everyone = mpi.allgather(mine)
    assert record["hosts"] == [host for host, _ in everyone]
    for rank, (host, _) in enumerate(everyone):
        union = set().union(*(cpus for other, cpus in everyone if other == host))
        assert record["host_cpus"][rank] == len(union)
    assert record["threads_per_rank"] == [1 + r % 2 for r in range(comm.size)]
