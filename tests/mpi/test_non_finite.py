"""A NaN on one rank only: every rank refuses the step's statistics alike, keeps the same finite
K-FAC state, and continues (through a checkpoint too) as the run that never saw that batch; float16
statistics whose sum over the ranks overflows are refused alike, with hpckfac's warning alone."""
import io
import warnings

import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner

OPTIONS = dict(lr=0.05, damping=3e-3, factor_decay=0.7, inverse_update_interval=1, kl_clip=1e-2)


def _setup(comm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt, KFACPreconditioner(model, comm=comm, **OPTIONS)


def _step(model, opt, precond, x) -> bool:
    """One step of the loop the docs describe without a GradScaler: the optimizer step is
    skipped when ``.grad`` is not finite (identical on every rank after ``step()``)."""
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    precond.step()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
    if finite:
        opt.step()
    return finite


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _tensors(state):
    return [t for block in state["blocks"].values() for t in [block["factors"], *block["inverses"]]]


@pytest.mark.mpi
def test_a_nan_on_one_rank_leaves_the_same_state_everywhere_and_resumes_bit_for_bit(comm):
    gen = torch.Generator().manual_seed(40 + comm.rank)
    batches = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    bad = batches[2].clone()
    if comm.rank == comm.size - 1:
        bad[1, 3] = float("nan")  # one example of one rank: NaN activations, statistics and gradients
    model, opt, precond = _setup(comm)
    assert _step(model, opt, precond, batches[0]) and _step(model, opt, precond, batches[1])
    before = precond.state_dict()
    assert not _step(model, opt, precond, bad)  # skipped on every rank alike
    after = precond.state_dict()
    for x, y in zip(_tensors(before), _tensors(after)):
        assert torch.equal(x, y) and torch.isfinite(y).all()
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kfac": after}, checkpoint)
    for x in batches[3:]:
        assert _step(model, opt, precond, x)
    continued = _flat(model)

    checkpoint.seek(0)
    saved = torch.load(checkpoint, weights_only=True)
    model, opt, precond = _setup(comm)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    precond.load_state_dict(saved["kfac"])
    for x in batches[3:]:
        assert _step(model, opt, precond, x)
    assert torch.equal(_flat(model), continued)

    model, opt, precond = _setup(comm)
    for x in batches[:2] + batches[3:]:
        assert _step(model, opt, precond, x)
    assert torch.equal(_flat(model), continued)  # the run that never saw the bad batch
    assert all(torch.equal(continued, other) for other in comm.allgather_object(continued))


@pytest.mark.mpi
def test_float16_statistics_are_refused_when_their_sum_over_the_ranks_overflows(comm, caplog):
    """Every rank's A[0, 0] is 40000, finite in float16; the ReduceScatterV sums before it divides,
    so from 2 ranks on the sum passes 65504 and every rank refuses the statistics (one process keeps
    them), with hpckfac's warning and no NumPy overflow warning from the float16 sum."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    precond = KFACPreconditioner(model, comm=comm, factor_dtype="float16", kl_clip=None)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(comm.rank))
    x[:, 0] = 200.0
    (1e-6 * model(x).sum()).backward()  # small gradients: only the statistics overflow
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="hpckfac"):
        warnings.simplefilter("error")
        precond.step()
    factors = precond.state_dict()["blocks"][""]["factors"]
    if comm.size == 1:
        assert factors[0] == 40000.0
    else:
        assert factors is None
        assert comm.rank != precond.engine.owners[0] or "non-finite statistics refused" in caplog.text
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
