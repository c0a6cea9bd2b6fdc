"""A training loop as scripts write it, at P ranks against one process accumulating the same
micro-batches, in float64: two micro-batches per rank and step, channels_last inputs to strided,
grouped and dilated convolutions with BatchNorm, statistics from part of each micro-batch, factor
and inverse intervals that do not divide each other, schedules for lr and damping, the KL clip,
and a validation forward under no_grad after every backward. A state_dict() taken mid-run at P
ranks resumes on one process, and one taken on one process resumes at P ranks, on the same
trajectory."""
import copy

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner

MICRO, PER_RANK, STEPS, SAVED_AT = 5, 2, 6, 3
OPTIONS = dict(lr=lambda k: 0.05 * (k + 1) / 3, damping=lambda k: 1e-2 / (k + 1), factor_decay=0.8,
               factor_update_interval=3, inverse_update_interval=2, kl_clip=1e-3, statistics_fraction=0.6)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.Tanh(),
                         nn.Conv2d(4, 6, 1), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 16, 8), nn.LayerNorm(8),
                         nn.Tanh(), nn.Linear(8, 3)).double()


def global_batches(ranks):
    """Every step's global batch, the same on every rank."""
    gen = torch.Generator().manual_seed(5)
    size = ranks * PER_RANK * MICRO
    return [(torch.randn(size, 3, 8, 8, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (size,), generator=gen)) for _ in range(STEPS)]


def train(comm, ranks, steps, resume=None):
    """The parameters after ``steps`` on ``comm`` (one process takes every rank's micro-batches),
    from the start or from ``resume`` (model, optimizer and preconditioner states); and the states
    after step SAVED_AT."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    micro = ranks * PER_RANK // comm.size
    precond = KFACPreconditioner(model, comm=comm, accumulation_steps=micro, **OPTIONS)
    first = 0
    if resume is not None:
        # torch's SGD.load_state_dict keeps the given momentum tensors and updates them in place.
        resume = copy.deepcopy(resume)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        precond.load_state_dict(resume["kfac"])
        first = precond.steps
    saved = None
    for step, (x, y) in enumerate(global_batches(ranks)[:steps]):
        if step < first:
            continue
        mine = slice(comm.rank * micro * MICRO, (comm.rank + 1) * micro * MICRO)
        xs, ys = x[mine].split(MICRO), y[mine].split(MICRO)
        optimizer.zero_grad()
        for xb, yb in zip(xs, ys):
            xb = xb.contiguous(memory_format=torch.channels_last)
            (nn.functional.cross_entropy(model(xb), yb) / micro).backward()
            with torch.no_grad():
                model(xb)
        precond.step()
        optimizer.step()
        if precond.steps == SAVED_AT:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "optimizer": {"state": {k: {n: v.clone() for n, v in s.items()}
                                             for k, s in optimizer.state_dict()["state"].items()},
                                   "param_groups": optimizer.state_dict()["param_groups"]},
                     "kfac": precond.state_dict()}
    precond.remove_hooks()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy(), saved


@pytest.mark.mpi
def test_a_run_resumed_at_another_rank_count_stays_on_the_trajectory(comm):
    one = Communicator(MPI.COMM_SELF)
    ranks = comm.size
    want, saved_alone = train(one, ranks, STEPS)
    got, saved_here = train(comm, ranks, STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    # BatchNorm's running statistics are each rank's own: the trajectory does not read them.
    resumed_alone, _ = train(one, ranks, STEPS, resume=saved_here)
    np.testing.assert_allclose(resumed_alone, want, rtol=1e-10, atol=1e-13)
    resumed_here, _ = train(comm, ranks, STEPS, resume=saved_alone)
    np.testing.assert_allclose(resumed_here, want, rtol=1e-10, atol=1e-13)
    # On the process that saved it, the resumed run is the uninterrupted one bit for bit.
    again, _ = train(one, ranks, STEPS, resume=saved_alone)
    assert np.array_equal(again, want)
