"""GradScaler over ranks: one rank's overflow skips the step on every rank."""
import math

import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner
from torch_features import needs_amp_grad_scaler

pytestmark = needs_amp_grad_scaler


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and CuPy)")


@pytest.mark.mpi
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_one_ranks_overflow_skips_the_step_on_every_rank(comm, device):
    """The documented recipe (unscale_, step(), scaler.step, update) with an infinite loss on the
    last rank at step 1: the averaged gradients are non-finite everywhere, so every rank skips
    that step and halves its scale, and the weights stay finite and equal on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.PReLU()).to(device)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # The PReLU stays first-order: the overflow reaches the averaged gradients as well as the K-FAC ones.
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, lr=0.1, skip_layers=[nn.PReLU])
    for step in range(3):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 * step + comm.rank)).to(device)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if step == 1 and comm.rank == comm.size - 1:
            loss = loss * math.inf
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        precond.step()
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # skipped
            assert scaler.get_scale() == 512.0
        else:
            assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    everyone = comm.allgather_object(flat)
    assert all(torch.equal(flat, other) for other in everyone)


@pytest.mark.mpi
def test_an_overflow_in_one_ranks_first_order_gradient_alone_skips_the_step_on_every_rank(comm):
    """Only the first-order PReLU's gradient overflows, on the last rank: the K-FAC layers'
    preconditioned gradients stay finite, so only the overflow flag agreed over the ranks tells
    the other ranks' scalers to skip the step their averaged PReLU gradient would poison."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.PReLU())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, lr=0.1, skip_layers=[nn.PReLU])
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(comm.rank))
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).pow(2).mean()).backward()
    if comm.rank == comm.size - 1:
        model[3].weight.grad.fill_(math.inf)
    scaler.unscale_(opt)
    precond.step()
    assert all(torch.isfinite(p.grad).all() for p in model[:3].parameters())  # the K-FAC layers' updates
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # skipped on every rank
    assert scaler.get_scale() == 512.0


@pytest.mark.mpi
def test_the_overflow_flag_takes_mpis_allreduce(comm, monkeypatch):
    """The scaler's one-element overflow flag goes by MPI's allreduce (``log2 P`` messages), not
    the ring's ``2(P-1)``, and still skips the step on every rank when one rank overflowed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, lr=0.1)
    algorithms = []
    real = comm.allreduce
    monkeypatch.setattr(comm, "allreduce", lambda buf, **kw: algorithms.append(kw.get("algorithm", "ring"))
                        or real(buf, **kw))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(comm.rank))
    loss = model(x).pow(2).mean()
    if comm.rank == comm.size - 1:
        loss = loss * math.inf
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    precond.step()
    scaler.step(opt)
    scaler.update()
    assert algorithms == ["mpi"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 512.0


def _scaled_run(comm, batches, overflow_at):
    """The documented recipe on a small MLP, float64, with a GradScaler; at step ``overflow_at``
    the last rank's second layer gets an infinite weight gradient after a finite backward (the
    weight-gradient product overflowed while every output gradient fitted: the layers' statistics
    are finite on every rank). Returns the parameters and each step's gathered K-FAC state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, lr=0.05, factor_decay=0.8,
                                 inverse_update_interval=1)
    states = []
    for step, x in enumerate(batches):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if step == overflow_at and comm.rank == comm.size - 1:
            model[2].weight.grad[1, 3] = math.inf
        scaler.unscale_(opt)
        precond.step()
        scaler.step(opt)
        scaler.update()
        states.append(precond.state_dict()["blocks"])
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), states


@pytest.mark.mpi
def test_a_skipped_step_takes_no_statistics_on_any_rank(comm):
    """A step the scaler skips because one rank's gradient overflowed leaves every block's running
    factors and inverses as they were, on every rank, although the statistics of that step were
    finite everywhere; the next steps then give, bit for bit, the run that never saw that batch."""
    gen = torch.Generator().manual_seed(20 + comm.rank)
    batches = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(5)]
    params, states = _scaled_run(comm, batches, overflow_at=2)
    for name, block in states[2].items():
        torch.testing.assert_close(block["factors"], states[1][name]["factors"], rtol=0, atol=0)
        for after, before in zip(block["inverses"], states[1][name]["inverses"]):
            torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all(torch.isfinite(t).all() for block in states[2].values() for t in [block["factors"], *block["inverses"]])
    # The statistics were taken, and are finite: they would have moved the factors.
    assert any(not torch.equal(states[3][n]["factors"], states[2][n]["factors"]) for n in states[2])
    never_seen, _ = _scaled_run(comm, batches[:2] + batches[3:], overflow_at=None)
    assert torch.equal(params, never_seen)
    everyone = comm.allgather_object(params)
    assert all(torch.equal(params, other) for other in everyone)


@pytest.mark.mpi
def test_a_float16_sum_over_ranks_beyond_its_range_skips_the_step_on_every_rank(comm):
    """Each rank's gradient fits float16 (at two ranks and more) and unscale_ finds it finite, but
    the ReduceScatterV's float16 sum over the ranks passes 65504: the preconditioned .grad is NaN
    on every rank, so every rank's scaler skips the step and lowers its scale alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, factor_dtype="float16", lr=1e-3)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(comm.rank))
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(x).pow(2).mean()).backward()
    model[2].weight.grad[1, 3] = 1e5 / comm.size
    scaler.unscale_(opt)
    precond.step()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert comm.allgather_object(scaler.get_scale()) == [0.5] * comm.size
