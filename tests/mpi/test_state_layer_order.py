"""A state_dict() loads by layer name at any rank count: a model declaring the same layers in
another order (so that, with contiguous owners, its blocks change owner) resumes the saved run."""
import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner

BATCH = 12  # the global batch, split evenly at 1, 2, 3 and 4 ranks
OPTIONS = dict(lr=0.1, damping=1e-2, factor_update_interval=1, inverse_update_interval=2, kl_clip=1e-2,
               assignment="contiguous")


class Declared(nn.Module):
    """Three Linear layers of different shapes, declared in the given order, called in one."""

    def __init__(self, order: tuple[str, ...]) -> None:
        super().__init__()
        shapes = {"body": (4, 6), "neck": (6, 5), "head": (5, 3)}
        for name in order:
            setattr(self, name, nn.Linear(*shapes[name]))

    def forward(self, x):
        return self.head(torch.tanh(self.neck(torch.tanh(self.body(x)))))


def build(order, comm):
    """The model with its layers declared in ``order`` (the same weights whatever the order) and
    its preconditioner."""
    torch.manual_seed(0)
    model = Declared(order).double()
    model.load_state_dict(Declared(("body", "neck", "head")).double().state_dict())  # the same weights
    return model, KFACPreconditioner(model, comm=comm, **OPTIONS)


def run(model, precond, optimizer, steps, comm):
    share = BATCH // comm.size
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=gen)
        mine = slice(comm.rank * share, (comm.rank + 1) * share)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
        precond.step()
        optimizer.step()


@pytest.mark.mpi
def test_a_state_resumes_in_a_model_declaring_its_layers_in_another_order(comm):
    model, precond = build(("body", "neck", "head"), comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    run(model, precond, optimizer, range(3), comm)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "optimizer": optimizer.state_dict(), "kfac": precond.state_dict()}
    state["optimizer"]["state"] = {k: {n: v.clone() for n, v in s.items()}  # the momentum as it is now
                                   for k, s in state["optimizer"]["state"].items()}
    run(model, precond, optimizer, range(3, 5), comm)

    other, resumed = build(("head", "neck", "body"), comm)
    assert [b.name for b in resumed.engine.blocks] == ["head", "neck", "body"]
    other_optimizer = torch.optim.SGD([other.body.weight, other.body.bias, other.neck.weight, other.neck.bias,
                                       other.head.weight, other.head.bias], lr=0.1, momentum=0.9)
    other.load_state_dict(state["model"])
    other_optimizer.load_state_dict(state["optimizer"])  # by position: the saver's parameter order
    resumed.load_state_dict(state["kfac"])
    run(other, resumed, other_optimizer, range(3, 5), comm)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(dict(other.named_parameters())[name].detach().numpy(), p.detach().numpy(),
                                   rtol=1e-12, atol=1e-14)

    foreign = dict(state["kfac"], blocks={("tail" if k == "head" else k): v for k, v in state["kfac"]["blocks"].items()})
    with pytest.raises(ValueError, match="missing 'head'; not in this model 'tail'"):
        resumed.load_state_dict(foreign)
    comm.barrier()  # every rank raised: nobody is left waiting
