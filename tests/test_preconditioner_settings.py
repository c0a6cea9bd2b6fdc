"""The engine's settings read and assigned through the preconditioner (``precond.damping``,
``.factor_decay``, ``.kl_clip`` and the update intervals), ``current_settings()``, and the
warning for ``skip_layers`` strings that name no module but a class, or match as a pattern."""
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner


@pytest.fixture
def comm():
    return Communicator(MPI.COMM_SELF)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def one_step(model, precond):
    """One step on a fixed batch; the preconditioned gradients written into ``.grad``."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    return [p.grad.clone() for p in model.parameters()]


def test_damping_assigned_on_the_preconditioner_is_the_engines_and_acts(comm):
    built = mlp()
    want = one_step(built, KFACPreconditioner(built, comm=comm, damping=0.5, kl_clip=None))
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, damping=1e-2, kl_clip=None)
    precond.damping = 0.5
    assert precond.damping == 0.5 == precond.engine.damping and "damping" not in vars(precond)
    got = one_step(model, precond)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    other = mlp()
    unchanged = one_step(other, KFACPreconditioner(other, comm=comm, damping=1e-2, kl_clip=None))
    assert not torch.allclose(got[0], unchanged[0])  # the assignment changed the step


def test_kl_clip_and_intervals_assigned_on_the_preconditioner(comm):
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, lr=1.0, kl_clip=1e-2)
    precond.kl_clip = 1e-8
    one_step(model, precond)
    assert precond.last_nu < 1.0
    precond.kl_clip = None
    assert precond.engine.kl_clip is None
    precond.kl_clip = 0  # off too, read back as None
    assert precond.kl_clip is None and precond.engine.kl_clip is None
    one_step(model, precond)
    assert precond.last_nu == 1.0
    precond.inverse_update_interval = 3
    precond.factor_update_interval = 2
    assert precond.engine.inverse_update_interval == 3 and precond.engine.factor_update_interval == 2
    assert precond.steps == 2 and precond.engine.is_factor_step() and not precond.engine.is_inverse_step()


@pytest.mark.parametrize("name,value", [("damping", -1.0), ("factor_decay", 1.0), ("kl_clip", lambda step: 1e-3),
                                        ("factor_update_interval", 0), ("inverse_update_interval", 2.5)])
def test_a_bad_value_assigned_is_named_at_once_and_the_old_one_kept(comm, name, value):
    precond = KFACPreconditioner(mlp(), comm=comm)
    before = getattr(precond, name)
    with pytest.raises(ValueError, match=f"^{name}: "):
        setattr(precond, name, value)
    assert getattr(precond, name) == before == getattr(precond.engine, name)


def test_current_settings_evaluates_the_schedules_at_the_step(comm):
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, lr=lambda step: 0.1 * (step + 1),
                                 damping=lambda step: 1e-2 / (step + 1), factor_decay=0.9, kl_clip=0)
    assert callable(precond.damping)
    assert precond.current_settings() == {"lr": 0.1, "damping": 1e-2, "factor_decay": 0.9, "kl_clip": None}
    one_step(model, precond)
    settings = precond.current_settings()
    assert settings["lr"] == pytest.approx(0.2) and settings["damping"] == pytest.approx(5e-3)


def test_skip_layers_given_class_names_or_patterns_say_what_they_would_match(comm, caplog):
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(mlp(), comm=comm, skip_layers=["Linear", "^[02]$", "fc9", "fc["])
    text = caplog.text
    assert "no module is named 'Linear', '^[02]$', 'fc9', 'fc['" in text  # "fc[" is no regular expression
    assert "'Linear' is the class name of '0', '2': to skip every module of that type, pass the class itself" in text
    assert "'^[02]$' read as a regular expression would match '0', '2'" in text
    assert "'fc9' read as" not in text and "'fc[' read as" not in text  # a plain typo gets no hint
    assert "'Linear' read as" not in text  # a class name gets that hint alone
    caplog.clear()
    wide = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with caplog.at_level("WARNING", logger="hpckfac"):
        KFACPreconditioner(wide, comm=comm, skip_layers=["^Lin", "Linear"])
    assert "'^Lin' read as a regular expression would match '0', '1', '2', '3' and 2 more" in caplog.text
    assert "'Linear' is the class name of '0', '1', '2', '3' and 2 more" in caplog.text
    assert [b.name for b in precond.engine.blocks] == ["0", "2"]  # nothing was skipped
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpckfac"):  # four names: all shown, none left to count
        KFACPreconditioner(wide[:4], comm=comm, skip_layers=["Linear"])
    assert "'Linear' is the class name of '0', '1', '2', '3': to skip" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpckfac"):
        skipped = KFACPreconditioner(mlp(), comm=comm, skip_layers=[nn.Linear])
    assert skipped.engine.blocks == [] and "skip_layers: no module" not in caplog.text


def test_a_name_in_skip_layers_skips_that_module_and_its_children_only(comm):
    """"1" skips module 1 and the layers inside it ("1.0", "1.1"), not "10", whose name only
    starts with the same characters."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    model[1] = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    precond = KFACPreconditioner(model, comm=comm, skip_layers=["1"])
    assert [b.name for b in precond.engine.blocks] == ["0", *map(str, range(2, 11))]
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    assert "first-order: in skip_layers" in lines["1.0"] and "first-order: in skip_layers" in lines["1.1"]
    assert "K-FAC" in lines["10"]
    assert "1" not in lines  # the container has no parameters of its own: no line of its own


@pytest.mark.parametrize("name", ["kl_clip", "factor_update_interval", "inverse_update_interval"])
def test_a_schedule_for_a_setting_that_takes_none_says_how_to_change_it(comm, name):
    """Other K-FAC libraries take a callable of the step for these; here each is a value, changed
    by assignment between steps, and the refusal says so, at construction and on assignment."""
    schedule = lambda step: 1  # noqa: E731
    with pytest.raises(ValueError, match=rf"^{name}: expected .*, not a schedule \(got <lambda>\); to change it "
                                         rf"during training, assign a new value between steps \(precond\.{name} = "):
        KFACPreconditioner(mlp(), comm=comm, **{name: schedule})
    precond = KFACPreconditioner(mlp(), comm=comm)
    before = getattr(precond, name)
    with pytest.raises(ValueError, match="not a schedule"):
        setattr(precond, name, schedule)
    assert getattr(precond, name) == before


def test_a_kfac_pytorch_state_dict_is_named_as_such(comm):
    """The keys kfac-pytorch's KFACPreconditioner.state_dict() returns: the refusal says what to
    do instead, and the preconditioner is left as it was."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm)
    one_step(model, precond)
    peer = {"steps": 3, "factor_update_steps": 1, "inv_update_steps": 10, "damping": 1e-3, "factor_decay": 0.95,
            "kl_clip": 1e-3, "lr": 0.1, "layers": {"0": {"A": torch.eye(6), "G": torch.eye(4)}}}
    with pytest.raises(ValueError, match=r"^state: not a preconditioner's state_dict\(\): no hyperparameters, blocks "
                                         r".*these are the keys of kfac-pytorch's state_dict\(\).*start afresh"):
        precond.load_state_dict(peer)
    assert precond.steps == 1
    # state_dict(include_factors=False), and a state whose intervals were callables (left out there)
    for partial in ({k: v for k, v in peer.items() if k != "layers"},
                    {k: v for k, v in peer.items() if not k.endswith("update_steps")}):
        with pytest.raises(ValueError, match="kfac-pytorch's state_dict"):
            precond.load_state_dict(partial)
    with pytest.raises(ValueError) as other:
        precond.load_state_dict({"steps": 3, "layers": {}})
    assert "kfac-pytorch" not in str(other.value)


def test_a_state_with_other_keys_is_not_named_a_kfac_pytorch_one(comm):
    """Named as kfac-pytorch's only with its ``steps`` and every layer's ``A`` and ``G`` (or its
    intervals): factors per layer without ``steps``, or layers holding something else or an ``A``
    alone, are some other state, refused without the kfac-pytorch hint."""
    precond = KFACPreconditioner(mlp(), comm=comm)
    factors = {"A": torch.randn(6, 6), "G": torch.randn(4, 4)}
    for other in ({"layers": {"0": factors}},
                  {"steps": 3, "layers": {"0": factors, "2": {"weight": torch.randn(3, 4)}}},
                  {"steps": 3, "layers": {"0": {"A": factors["A"]}}}):
        with pytest.raises(ValueError, match="not a preconditioner's state_dict") as refused:
            precond.load_state_dict(other)
        assert "kfac-pytorch" not in str(refused.value)
    assert precond.steps == 0
