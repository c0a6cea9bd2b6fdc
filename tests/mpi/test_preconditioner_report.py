"""report() on one rank does not wait for the others; report(gather=True) is the collective view."""
import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner


@pytest.mark.mpi
def test_report_on_one_rank_then_gathered(comm, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    precond = KFACPreconditioner(model, comm=comm)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(comm.rank))
    model(x).pow(2).mean().backward()
    precond.step()
    if comm.rank == comm.size - 1:  # the others go straight to the next collective
        local = precond.report()
        assert "local_factors" in local and local in capsys.readouterr().out
        assert local.split("\n")[0].split() == ["stage", "mean_ms"]  # no spread over ranks to show
    gathered = precond.report(gather=True)
    assert "max_ms" in gathered and "total" in gathered


@pytest.mark.mpi
def test_a_long_wait_in_a_collective_is_named(comm, caplog, monkeypatch):
    """A rank that reaches state_dict() long before the others logs which collective it waits in."""
    import time

    monkeypatch.setenv("HPCKFAC_WAIT_NOTICE", "0.2")
    model = nn.Sequential(nn.Linear(4, 3))
    precond = KFACPreconditioner(model, comm=comm)
    if comm.rank != 0:
        time.sleep(0.8)
    with caplog.at_level("WARNING", logger="hpckfac"):
        state = precond.state_dict()
    assert set(state["blocks"]) == {"0"}
    waited = "state_dict() has waited" in caplog.text
    assert waited == (comm.rank == 0 and comm.size > 1)


@pytest.mark.mpi(min_size=2)
def test_state_dict_on_one_rank_while_the_others_step_raises_everywhere(comm):
    """``if rank == 0: precond.state_dict()`` before the next ``step()``: every rank gets the error."""
    from hpckfac.comm import CollectiveMismatchError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    precond = KFACPreconditioner(model, comm=comm)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(comm.rank))
    model(x).pow(2).mean().backward()
    precond.step()  # past the first step's comparison of the weights
    model(x).pow(2).mean().backward()
    with pytest.raises(CollectiveMismatchError, match=r"ranks disagree on the call \(state_dict\(\) on ranks \[0\]; the model's structure in step\(\) "
                                                      r"on ranks"):
        if comm.rank == 0:
            precond.state_dict()
        else:
            precond.step()
