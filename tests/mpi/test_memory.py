"""The K-FAC buffers each rank keeps, counted by ``KFACEngine.memory`` and
``KFACPreconditioner.memory``, against their sizes written out here from the layers' shapes
(docs/design.md, "Memory per rank"), at every rank count, ranks that own nothing included;
and a step that allocates no buffer of the gradients' size."""
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.layers import BatchNormBlock, LinearBlock
from hpckfac.stages.engine import KFACEngine
from hpckfac.torch import KFACPreconditioner

F32 = 4  # bytes of float32: the buffers' dtype and the state's


def linear_sizes(d_in, d_out, bias):
    """(packed statistics, gradient matrix, full inverses) elements of a Linear layer: A is
    (d_in + 1)^2 with a bias, G is d_out^2, each packed as its upper triangle."""
    d_a = d_in + bias
    return d_a * (d_a + 1) // 2 + d_out * (d_out + 1) // 2, d_out * d_a, d_a ** 2 + d_out ** 2


def batchnorm_sizes(channels):
    """A 2x2 Fisher of (gamma, beta) per channel: 3 packed, 2 gradients, 4 inverse elements each."""
    return 3 * channels, 2 * channels, 4 * channels


SETS = {
    "four": ([LinearBlock("fc1", 30, 20, bias=True), LinearBlock("fc2", 20, 10, bias=False),
              BatchNormBlock("bn", 8, 1e-5), LinearBlock("fc3", 10, 5, bias=True)],
             [linear_sizes(30, 20, True), linear_sizes(20, 10, False), batchnorm_sizes(8),
              linear_sizes(10, 5, True)]),
    "one": ([LinearBlock("fc", 12, 7, bias=True)], [linear_sizes(12, 7, True)]),
    # Equal blocks an owner inverts and preconditions as one run: its inverses stacked, each
    # block's a view of the stack, which counts once.
    "run": ([LinearBlock(f"fc{i}", 9, 7, bias=True) for i in range(5)], [linear_sizes(9, 7, True)] * 5),
}


def expected(sizes, owners, rank, ranks, inverted):
    """Bytes per kind on ``rank`` from the blocks' element counts and owners."""
    stats, grads, invs = (sum(s[k] for s in sizes) for k in range(3))
    mine = [s for s, o in zip(sizes, owners) if o == rank]
    own_stats, own_grads, own_invs = (sum(s[k] for s in mine) for k in range(3))
    owners_with_blocks = len(set(owners))
    return {
        # The factor step's buffer: statistics, one presence element per block, gradients; the
        # other step's: gradients.
        "send_buffers": F32 * ((stats + len(sizes) + grads) + grads),
        "received": 0 if ranks == 1 else F32 * (own_stats + len(mine) + own_grads),
        "running_factors": F32 * own_stats,
        "inverses": F32 * own_invs if inverted else 0,
        # Every gradient and a (mantissa, exponent) pair per owner of blocks.
        "gathered": F32 * (grads + 2 * owners_with_blocks),
        "results": 0 if ranks == 1 else F32 * (own_grads + 2 * bool(mine)),
    }


def engine_inputs(blocks, rng):
    grads = [rng.standard_normal(b.grad_shape).astype(np.float32) for b in blocks]
    stats = []
    for b in blocks:
        mats = [np.eye(n) + 0.1 * np.ones((n, n)) for count, n in b.factor_shapes for _ in range(count)]
        stats.append(np.concatenate([m[np.triu_indices(len(m))] for m in mats]).astype(np.float32))
    return grads, stats


@pytest.mark.mpi
@pytest.mark.parametrize("which", list(SETS))
def test_engine_memory_is_the_layout_written_out(comm, which):
    blocks, sizes = SETS[which]
    engine = KFACEngine(blocks, comm, factor_update_interval=1, inverse_update_interval=2)
    assert engine.memory() == expected(sizes, engine.owners, comm.rank, comm.size, inverted=False)
    grads, stats = engine_inputs(blocks, np.random.default_rng(0))
    for _ in range(3):  # inverting, then not, then inverting again: the same buffers
        engine.step(grads, stats, lr=0.1)
        assert engine.memory() == expected(sizes, engine.owners, comm.rank, comm.size, inverted=True)


@pytest.mark.mpi
def test_a_step_allocates_no_buffer_of_the_gradients_size(comm):
    """Beyond the owner's products for the KL-clip sum (its gradients' size), a step without
    statistics allocates nothing the size of the gradients: the reduce-scatter receives into
    a kept segment and the all-gather into the kept gathered buffer, scaled in place (a new
    gathered array and a copy of it, every step, before)."""
    blocks = [LinearBlock("wide", 512, 256, bias=True), LinearBlock("head", 256, 3, bias=True)]
    engine = KFACEngine(blocks, comm, factor_update_interval=100, inverse_update_interval=100)
    grads, stats = engine_inputs(blocks, np.random.default_rng(1))
    engine.step(grads, stats, lr=0.1)  # statistics and inverses
    engine.step(grads, lr=0.1)
    own = sum(b.grad_size for b, o in zip(blocks, engine.owners) if o == comm.rank)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        engine.step(grads, lr=0.1)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    # NumPy's float64 sum of float32 products casts through buffers of its own (64 KiB).
    slack = 2 ** 17
    gathered = engine.memory()["gathered"]
    assert gathered > 4 * slack
    assert peak < F32 * own + slack, (peak, own, gathered)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.mpi
def test_preconditioner_memory_adds_the_local_statistics(comm):
    """Every rank sums every block's statistics: their packed sizes in float32, beside the
    engine's kinds; the first step leaves the owners holding their inverses."""
    torch.manual_seed(0)
    model = Net()
    precond = KFACPreconditioner(model, comm=comm, lr=0.1, factor_update_interval=1, inverse_update_interval=1)
    sizes = [linear_sizes(6, 8, True), batchnorm_sizes(8), linear_sizes(8, 3, False)]
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    want = {"local_statistics": F32 * sum(s[0] for s in sizes),
            **expected(sizes, precond.engine.owners, comm.rank, comm.size, inverted=True)}
    assert precond.memory() == want


@pytest.mark.mpi
def test_bench_step_reports_each_kind_at_its_largest_rank(comm):
    """``bench step``'s ``state_bytes`` are, kind by kind, the largest over the ranks (which own
    different blocks) of what each rank's preconditioner holds, and ``state_mib`` the largest
    rank's total; each rank's from a preconditioner here over the same model and intervals,
    after a first step that inverts, as the benchmark's did."""
    import json
    import os
    import shutil
    import tempfile

    from hpckfac.bench import step

    folder = comm.mpi.bcast(tempfile.mkdtemp() if comm.rank == 0 else None, root=0)
    try:
        path = os.path.join(folder, "step.json")
        assert step.main(["--steps", "1", "--warmup", "0", "--batch", "4", "--depth", "8", "--width", "4",
                          "--configs", "kfac_1_10", "--json", path]) == 0
        torch.manual_seed(0)
        model = step.resnet(depth=8, width=4)
        precond = KFACPreconditioner(model, comm=comm, factor_update_interval=1, inverse_update_interval=10)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        ranks = comm.allgather_object(precond.memory())
        comm.barrier()  # the JSON is written
        if comm.rank == 0:
            with open(path) as fh:
                row = json.load(fh)["results"][0]
            assert row["state_bytes"] == {kind: max(rank[kind] for rank in ranks) for kind in ranks[0]}
            assert row["state_mib"] == max(sum(rank.values()) for rank in ranks) / 2**20
    finally:
        comm.barrier()  # every rank done with the folder, and none left waiting for one that failed
        if comm.rank == 0:
            shutil.rmtree(folder)
