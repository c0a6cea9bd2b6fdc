"""A checkpoint with one malformed block raises ValueError on every rank (its owner and the
others alike) instead of raising on the owner and hanging the rest."""
import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner


@pytest.mark.mpi
def test_bad_inverse_raises_on_every_rank(comm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    precond = KFACPreconditioner(model, comm=comm, inverse_update_interval=1)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(comm.rank))
    model(x).pow(2).mean().backward()
    precond.step()
    state = precond.state_dict()
    state["blocks"]["2"]["inverses"][0] = torch.zeros(2, 2)  # one block, owned by one rank
    with pytest.raises(ValueError, match="block '2' has inverses of shapes"):
        precond.load_state_dict(state)
    comm.barrier()  # every rank got here: nobody is left waiting


def _stepped(comm) -> tuple[nn.Module, torch.Tensor, KFACPreconditioner, dict]:
    """A small model, this rank's input, and its preconditioner after three steps, with the
    state it had after the first (a collective)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    precond = KFACPreconditioner(model, comm=comm)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(comm.rank))
    for k in range(3):
        model(x).pow(2).mean().backward()
        precond.step()
        if k == 0:
            first = precond.state_dict()
    return model, x, precond, first


@pytest.mark.mpi(min_size=2)
def test_a_checkpoint_loaded_on_one_rank_only_is_named(comm):
    """load_state_dict() on rank 0 alone: the next step() fails on every rank, and the message
    says what most likely happened."""
    from hpckfac.comm import CollectiveMismatchError

    model, x, precond, _ = _stepped(comm)
    state = precond.state_dict()
    fresh = KFACPreconditioner(model, comm=comm)
    if comm.rank == 0:
        fresh.load_state_dict(state)
    model(x).pow(2).mean().backward()
    with pytest.raises(CollectiveMismatchError, match=r"load_state_dict\(\) must run on every rank"):
        fresh.step()


@pytest.mark.mpi(min_size=2)
def test_an_earlier_checkpoint_loaded_on_one_rank_only_during_training_fails_on_every_rank(comm):
    """A preconditioner that has stepped loads an earlier checkpoint on rank 0 alone, with the
    settings every rank agreed on: its step count differs from the others', so the next step()
    fails on every rank instead of running the ranks at different steps. Only rank 0 compares the
    settings there, the others having no change to compare: its message says what most likely
    happened, theirs point to it."""
    from hpckfac.comm import CollectiveMismatchError

    model, x, precond, state = _stepped(comm)
    if comm.rank == 0:
        precond.load_state_dict(state)
    model(x).pow(2).mean().backward()
    with pytest.raises(CollectiveMismatchError) as info:
        precond.step()
    assert "ranks [0] compare settings that changed there alone" in str(info.value)
    assert ("load_state_dict() must run on every rank" in str(info.value)) is (comm.rank == 0), str(info.value)
