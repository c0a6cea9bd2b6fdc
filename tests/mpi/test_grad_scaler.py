"""GradScaler over ranks: one rank's overflow skips the step on every rank."""
import math

import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner


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
