"""KFACPreconditioner on one process: option validation, hooks, and one step
against a dense np.kron oracle built from independently captured tensors."""
import ast
import copy
import dataclasses
import functools
import io
import math
import os
import re
import warnings
import weakref
from collections import UserDict

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.layers import BatchNormBlock
from hpckfac.torch import KFACPreconditioner, checkpoint_context_fn, recomputing
from torch_features import needs_amp_grad_scaler

DAMPING = 1e-2


@pytest.fixture
def comm():
    return Communicator(MPI.COMM_SELF)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False)).double()


@pytest.mark.parametrize("name,value", [
    ("lr", 0.0), ("lr", "fast"), ("damping", -1.0), ("damping", 0.0), ("damping", math.nan), ("damping", 1e300),
    ("damping", 2e18), ("factor_decay", 1.0), ("factor_update_interval", 0), ("kl_clip", False), ("inverse_update_interval", 1.5), ("kl_clip", -1.0),
    ("assignment", "random"), ("factor_dtype", "int8"), ("bucket_bytes", 0), ("accumulation_steps", 0),
    ("skip_layers", [3]), ("grad_scaler", object()),
])
def test_invalid_options_name_the_parameter(comm, name, value):
    with pytest.raises(ValueError, match=name):
        KFACPreconditioner(mlp(), comm=comm, **{name: value})


def test_check_options_names_an_unknown_option_and_a_bad_assignment():
    """The engine's option table itself refuses a name it does not know and an assignment that is
    not one of ``ASSIGNMENTS`` with a ValueError naming it (the bridge and ``hpckfac train`` pass
    their options through it), rather than a KeyError or a later error of the assignment."""
    from hpckfac.stages.options import check_options

    with pytest.raises(ValueError, match=r"^damping_rate: unknown option \(known: damping, factor_decay, "):
        check_options(damping_rate=0.1)
    with pytest.raises(ValueError, match=r"^assignment: expected one of \('lpt', 'contiguous'\), got 'random'$"):
        check_options(assignment="random")
    assert check_options(assignment="contiguous", damping=1e18, factor_decay=0.0) == {
        "assignment": "contiguous", "damping": 1e18, "factor_decay": 0.0}


def test_skip_layers_none_skips_nothing(comm):
    """None, as for the other optional options, is the default: every Linear preconditioned."""
    explicit = KFACPreconditioner(mlp(), comm=comm, skip_layers=None)
    default = KFACPreconditioner(mlp(), comm=comm)
    assert explicit.skip_layers == default.skip_layers == ()
    assert [b.name for b in explicit.engine.blocks] == [b.name for b in default.engine.blocks] == ["0", "2"]


def test_the_optimizer_passed_as_lr_gets_a_short_answer(comm):
    model = mlp()
    with pytest.raises(ValueError, match=r"^lr: got the optimizer \(torch.optim.SGD\); pass its learning rate, or "
                                         r"the LR scheduler that drives it$"):
        KFACPreconditioner(model, comm=comm, lr=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"got list$"):
        KFACPreconditioner(model, comm=comm, lr=list(range(100)))


def test_the_defaults_are_the_documented_ones():
    """Every default of the options (the engine's and the bridge's) is the value the options table
    of docs/preconditioner.md gives, where the table gives a value rather than words."""
    from hpckfac.torch.options import DEFAULTS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "preconditioner.md"), encoding="utf-8").read()
    documented = dict(re.findall(r"^\| `(\w+)` \| ([^|]+?) \|", text, re.M))
    compared = set()
    for name, value in DEFAULTS.items():
        try:
            want = ast.literal_eval(documented[name].strip("`"))
        except (ValueError, SyntaxError):  # described in words (bucket_bytes)
            continue
        assert value == want, (name, value, want)
        compared.add(name)
    assert {"damping", "factor_decay", "factor_update_interval", "inverse_update_interval", "kl_clip",
            "assignment", "lr", "accumulation_steps", "statistics_fraction"} <= compared


def test_kl_clip_zero_or_none_switches_the_clip_off(comm):
    # A NumPy zero (from a config array) as well: np.float32(0) and np.int64(0) were refused as "not > 0".
    for value in (0, 0.0, None, np.float32(0), np.int64(0), np.float64(0)):
        assert KFACPreconditioner(mlp(), comm=comm, kl_clip=value).engine.kl_clip is None


@pytest.mark.parametrize("name,value", [("damping", -1.0), ("factor_decay", 1.5), ("kl_clip", math.inf)])
def test_settings_changed_between_steps_are_checked(comm, name, value):
    """The engine's damping, factor_decay and kl_clip may be reassigned between steps: a bad
    value raises ValueError naming it, before anything changes."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(x).pow(2).mean().backward()
    precond.step()
    running = [r.copy() for r in precond.engine.state.running]
    setattr(precond.engine, name, value)
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match=name):
        precond.step()
    assert precond.engine.steps == 1
    assert all(np.array_equal(r, s) for r, s in zip(precond.engine.state.running, running))


def test_a_kl_clip_schedule_is_refused_as_at_construction(comm):
    """kl_clip is a number or None, not a schedule (the constructor refuses a callable): one
    assigned between steps raises at the next step, rather than clipping by it and leaving a
    state_dict() that torch.save cannot pickle and load_state_dict refuses. A number assigned
    then steps, and the state saves and loads."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    precond.engine.kl_clip = lambda step: 1e-3
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"^kl_clip: expected a finite real number > 0, or None or 0 for no "
                                         r"clip, got <function"):
        precond.step()
    assert precond.engine.steps == 0
    precond.engine.kl_clip = 1e-3
    precond.step()
    buf = io.BytesIO()
    torch.save(precond.state_dict(), buf)
    buf.seek(0)
    precond.load_state_dict(torch.load(buf, weights_only=True))
    assert precond.engine.kl_clip == 1e-3 and precond.steps == 1


@pytest.mark.parametrize("target,name,value", [
    ("engine", "factor_update_interval", 0), ("engine", "factor_update_interval", 2.5),
    ("engine", "inverse_update_interval", 0), ("engine", "inverse_update_interval", -3),
    ("precond", "accumulation_steps", 0), ("precond", "statistics_fraction", 0.0),
    ("precond", "statistics_fraction", 2.0), ("precond", "lr", -1.0), ("precond", "lr", "0.1"),
])
def test_settings_reassigned_between_steps_are_refused_at_once(comm, target, name, value):
    """The intervals, accumulation_steps, statistics_fraction and lr are read by the hooks (or
    scale the statistics: accumulation_steps 0 zeroes every G): a bad value assigned between
    steps raises ValueError naming it, keeps the old value, and the next step runs as before."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, inverse_update_interval=1)
    owner = precond.engine if target == "engine" else precond
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model(x).pow(2).mean().backward()
    precond.step()
    before = getattr(owner, name)
    with pytest.raises(ValueError, match=f"^{name}: "):
        setattr(owner, name, value)
    assert getattr(owner, name) == before
    model.zero_grad()
    model(x).pow(2).mean().backward()
    precond.step()
    assert precond.steps == 2 and all(np.isfinite(r).all() and np.abs(r).max() > 0
                                      for r in precond.engine.state.running)


def test_a_checked_setting_not_yet_assigned_is_an_attribute_error():
    """Before its first assignment a checked setting reads as a missing attribute (what
    ``hasattr`` and ``getattr`` with a default expect), not a KeyError."""
    precond = KFACPreconditioner.__new__(KFACPreconditioner)
    assert not hasattr(precond, "accumulation_steps")
    assert getattr(precond, "lr", None) is None
    with pytest.raises(AttributeError, match="statistics_fraction"):
        precond.statistics_fraction


def test_a_scheduler_assigned_as_lr_is_read_as_its_rate(comm):
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    precond.lr = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    assert precond.current_lr() == 0.25


@pytest.mark.parametrize("value", ["0.1", b"0.1", True, np.True_, torch.tensor([0.1, 0.2]),
                                   torch.tensor(0.1, device="meta")],
                         ids=["str", "bytes", "bool", "np.bool_", "two-element tensor", "meta tensor"])
def test_a_schedule_of_lr_returning_text_or_a_bool_is_refused(comm, value):
    """float() would read text, bytes and bools as rates; a tensor float() cannot read (several
    elements: ValueError, a meta tensor: RuntimeError) is refused the same way."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, lr=lambda step: value)
    model(torch.randn(6, 5, dtype=torch.float64)).pow(2).mean().backward()
    with pytest.raises(ValueError, match="^lr: expected a finite number >= 0 at step 0"):
        precond.step()
    assert precond.steps == 0


@pytest.mark.parametrize("name,value", [("damping", 2.0 ** -5), ("factor_decay", 0.5)])  # exact in float32
@pytest.mark.parametrize("wrap", [torch.tensor, lambda v: torch.tensor([v]), np.array], ids=["0-d", "1", "np"])
def test_damping_and_decay_schedules_returning_one_element_tensors_read_their_number(comm, name, value, wrap):
    """A schedule computed with torch or NumPy returns its value as a one-element tensor or
    array, which lr's schedules take: damping's and factor_decay's read the number it holds
    too, the same steps as the plain float; several elements are refused, naming the option."""
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for schedule in (lambda step: value, lambda step: wrap(value)):
        model = mlp()
        precond = KFACPreconditioner(model, comm=comm, inverse_update_interval=1, **{name: schedule})
        for _ in range(3):
            model.zero_grad()
            model(x).pow(2).mean().backward()
            precond.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, **{name: lambda step: wrap([value, value])})
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match=rf"^{name}: .*\(at step 0\)$"):
        precond.step()


SCHEDULED = ["lr", "damping", "factor_decay"]


@pytest.mark.parametrize("name", SCHEDULED)
@pytest.mark.parametrize("schedule,shown", [(lambda: 0.1, r"<lambda>\(\)"), (lambda a, b: 0.1, r"<lambda>\(a, b\)"),
                                            (lambda *, step: 0.1, r"<lambda>\(\*, step\)")],
                         ids=["no argument", "two", "keyword-only"])
def test_a_schedule_that_cannot_take_the_step_is_refused_at_construction(comm, name, schedule, shown):
    """A schedule is called with the step count alone: one whose signature cannot take it is
    refused when given (ValueError naming the option and what it must be), not by a bare
    TypeError from inside step()."""
    expected = rf"^{name}: a schedule must be a callable\(step\) -> number, called with the step count alone; " \
               rf"got {shown}$"
    with pytest.raises(ValueError, match=expected):
        KFACPreconditioner(mlp(), comm=comm, **{name: schedule})
    if name == "lr":  # a checked setting: refused when assigned too, the old value kept
        precond = KFACPreconditioner(mlp(), comm=comm)
        with pytest.raises(ValueError, match=expected):
            precond.lr = schedule
        assert precond.lr == 0.1


@pytest.mark.parametrize("name", SCHEDULED)
def test_a_schedule_without_a_signature_that_cannot_take_the_step_names_the_option_at_the_step(comm, name):
    """Where no signature can be read (a functools.lru_cache wrapper, a damping assigned to the
    engine between steps), the TypeError of the call itself becomes the same ValueError at
    the start of step(), before anything is averaged."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, **{name: functools.lru_cache(lambda a, b: 0.1)})
    model(torch.randn(6, 5, dtype=torch.float64)).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"^{name}: a schedule must be a callable\(step\) -> number, called "
                                         r"with the step count alone; calling <lambda> with step 0 raised "
                                         r"TypeError: .*'b'$"):
        precond.step()
    assert precond.steps == 0 and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    if name != "lr":
        setattr(precond.engine, name, lambda: 0.1)
        with pytest.raises(ValueError, match=rf"^{name}: a schedule must be .*calling <lambda> with step 0"):
            precond.step()


class _Rate:
    def __call__(self, step):
        return 0.5

    def at(self, step, scale=1.0):
        return 0.5 * scale


def _wrapped(schedule):
    @functools.wraps(schedule)
    def with_base(step):  # a decorator that supplies an argument: its signature is not the wrapped one's
        return schedule(step, 0.5)
    return with_base


@pytest.mark.parametrize("schedule", [
    lambda *args: 0.5, lambda step, scale=1.0: 0.5 * scale, functools.partial(lambda scale, step: 0.5 * scale, 1.0),
    _Rate(), _Rate().at, _wrapped(lambda step, base: base), functools.lru_cache(lambda step: 0.5), {0: 0.5}.get,
    [0.5].__getitem__,
], ids=["*args", "default", "partial", "callable object", "bound method", "decorator", "lru_cache", "builtin",
         "builtin without a signature"])
@pytest.mark.parametrize("name", SCHEDULED)
def test_schedules_that_take_the_step_are_accepted(comm, name, schedule):
    """The signature check refuses only what cannot be called with the step: *args, defaults,
    partials, callable objects, bound methods, builtins, and decorators that change the signature
    (the wrapper's own is read, not the wrapped function's) all step."""
    from unittest import mock

    for given in (schedule, mock.Mock(side_effect=schedule)):
        model = mlp()
        precond = KFACPreconditioner(model, comm=comm, **{name: given})
        model(torch.randn(6, 5, dtype=torch.float64)).pow(2).mean().backward()
        precond.step()
        assert precond.steps == 1
        precond.remove_hooks()


@pytest.mark.parametrize("name", SCHEDULED)
@pytest.mark.parametrize("error", [TypeError, ZeroDivisionError, ValueError])
def test_an_exception_raised_inside_a_schedule_propagates_unchanged(comm, name, error):
    """An exception the schedule's own code raises (a TypeError among them) is the schedule's:
    it reaches the caller as it was raised, its traceback into the schedule kept, not rewritten
    as a wrong signature or an invalid value."""
    raised = error("from the schedule")

    def schedule(step):
        raise raised

    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, **{name: schedule})
    model(torch.randn(6, 5, dtype=torch.float64)).pow(2).mean().backward()
    with pytest.raises(error) as info:
        precond.step()
    assert info.value is raised and str(info.value) == "from the schedule"
    assert info.traceback[-1].name == "schedule" and precond.steps == 0


def test_kl_clip_set_to_zero_between_steps_switches_the_clip_off(comm):
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, kl_clip=1e-8)
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for kl_clip in (1e-8, 0):
        precond.engine.kl_clip = kl_clip
        model(x).pow(2).mean().backward()
        precond.step()
        assert (precond.last_nu < 1.0) == (kl_clip != 0)


def test_finds_layers_and_hooks_follow_modes(comm):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 3), nn.LayerNorm(3),
                          nn.Linear(3, 2))
    precond = KFACPreconditioner(model, comm=comm, skip_layers=["5"])
    kinds = [(type(m).__name__, type(b).__name__) for m, b in zip(precond.modules, precond.engine.blocks)]
    assert kinds == [("Conv2d", "ConvBlock"), ("BatchNorm2d", "BatchNormBlock"), ("Linear", "LinearBlock"),
                     ("LayerNorm", "LayerNormBlock")]
    assert {id(p) for p in precond.other_params} == {id(p) for p in model[5].parameters()}
    x = torch.randn(2, 2, 5, 5)
    model.eval()
    model(x).sum().backward()
    assert precond.local.examples == 0 and all(s is None for s in precond.local.result())
    model.train()
    with torch.no_grad():
        model(x)
    assert precond.local.examples == 0
    model(x).sum().backward()
    assert precond.local.examples == 2 and all(s is not None for s in precond.local.result())
    precond.local.reset()
    precond.remove_hooks()
    model(x).sum().backward()
    assert precond.local.examples == 0 and all(s is None for s in precond.local.result())


def test_a_model_cast_to_float64_after_construction_is_named(comm, caplog):
    """factor_dtype=None takes the parameters' dtype when the preconditioner is built: cast to
    float64 afterwards, the model keeps a float32 buffer, which a warning names, once; built
    after the cast, or with factor_dtype given, there is nothing to say."""
    x = torch.randn(6, 5, dtype=torch.float64)
    for build_after_cast, factor_dtype in [(False, None), (True, None), (False, torch.float32)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
        if build_after_cast:
            model.double()
        precond = KFACPreconditioner(model, comm=comm, factor_dtype=factor_dtype)
        model.double()
        caplog.clear()
        with caplog.at_level("WARNING", logger="hpckfac"):
            for _ in range(2):
                model(x).pow(2).mean().backward()
                precond.step()
        named = "K-FAC layers 0, 2 have float64 parameters but the preconditioner's buffer is float32"
        assert caplog.text.count(named) == (not build_after_cast and factor_dtype is None)
        precond.remove_hooks()
    # The head alone cast: it alone is named.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))
    precond = KFACPreconditioner(model, comm=comm)
    model[2].double()
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpckfac"):
        model[2](model[:2](x.float()).double()).pow(2).mean().backward()
        precond.step()
    assert "K-FAC layers 2 have float64 parameters but the preconditioner's buffer is float32" in caplog.text
    precond.remove_hooks()


def test_a_preconditioner_rebuilt_on_the_same_layers_takes_them_over(comm, caplog):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    first = KFACPreconditioner(model, comm=comm)
    other = KFACPreconditioner(nn.Linear(2, 2), comm=comm)  # other layers: left alone
    with caplog.at_level("WARNING", logger="hpckfac"):
        second = KFACPreconditioner(model, comm=comm)
    assert "built earlier on the same layers (0, 2)" in caplog.text and caplog.text.count("built earlier") == 1
    model(x).sum().backward()
    # Only the newest one takes statistics: the first one's hooks are gone, its sums untouched.
    assert first.local.examples == 0 and all(s is None for s in first.local.result())
    assert second.local.examples == 6 and all(s is not None for s in second.local.result())
    assert other._hooks.handles and not first._hooks.handles
    caplog.clear()
    second.remove_hooks()
    with caplog.at_level("WARNING", logger="hpckfac"):
        third = KFACPreconditioner(model, comm=comm)  # after remove_hooks(): nothing to say
    assert "built earlier" not in caplog.text
    for p in (other, third):
        p.remove_hooks()


@pytest.mark.parametrize("how", ["remove_hooks", "taken over"])
def test_step_after_the_hooks_are_removed_raises(comm, how):
    """A preconditioner without its hooks sees no forward: its step() would precondition with old
    factors and take no statistics (its warning blaming a missing forward). It raises instead,
    before touching .grad, which keeps the plain gradient of the loss."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    precond = KFACPreconditioner(model, comm=comm)
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    later = None
    if how == "remove_hooks":
        precond.remove_hooks()
    else:
        later = KFACPreconditioner(model, comm=comm)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    # Plain autograd on a copy without hooks: the gradient step() must leave in place.
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    plain.load_state_dict(model.state_dict())
    nn.functional.cross_entropy(plain(x), y).backward()
    reason = "remove_hooks\\(\\) was called" if how == "remove_hooks" else "a KFACPreconditioner built later on the same layers"
    with pytest.raises(RuntimeError, match=f"hooks are removed \\({reason}"):
        precond.step()
    for got, want in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)
    assert precond.steps == 1 and precond.state_dict()["steps"] == 1  # the state stays readable
    if later is not None:
        later.step()  # the preconditioner holding the layers steps as usual
        assert later.steps == 1
        later.remove_hooks()


@pytest.mark.parametrize("how", ["pickle", "torch.save", "copy", "deepcopy"])
def test_a_preconditioner_refuses_to_be_pickled_or_copied_naming_state_dict(comm, how):
    import copy
    import pickle
    model = nn.Sequential(nn.Linear(4, 3))
    precond = KFACPreconditioner(model, comm=comm)
    call = {"pickle": pickle.dumps, "torch.save": lambda p: torch.save(p, io.BytesIO()),
            "copy": copy.copy, "deepcopy": copy.deepcopy}[how]
    with pytest.raises(TypeError, match=r"cannot be pickled or copied .*save precond.state_dict\(\)"):
        call(precond)
    state = precond.state_dict()  # the remedy works, and the model itself still copies
    assert state["steps"] == 0 and set(state["blocks"]) == {"0"}
    assert isinstance(copy.deepcopy(model), nn.Sequential)
    precond.remove_hooks()


def test_repeated_and_unused_modules(comm):
    torch.manual_seed(1)
    shared, unused = nn.Linear(3, 3).double(), nn.Linear(3, 2).double()
    model = nn.ModuleDict({"shared": shared, "unused": unused})
    forward = lambda x: shared(torch.tanh(shared(x)))
    model.forward = forward
    precond = KFACPreconditioner(model, comm=comm, kl_clip=None, damping=DAMPING)
    inputs = []
    handle = shared.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach()))
    x = torch.randn(6, 3, dtype=torch.float64)
    model(x).pow(2).mean().backward()
    handle.remove()
    stats = precond.local.result()
    assert stats[1] is None  # the unused module has no statistics this step
    a = torch.cat([torch.cat([i, torch.ones(6, 1, dtype=torch.float64)], 1) for i in inputs]).numpy()
    np.testing.assert_allclose(stats[0][:10], (a.T @ a / 6)[np.triu_indices(4)], rtol=1e-12)
    precond.step()  # no crash; the unused module's parameters got a (zero-gradient) update
    assert torch.isfinite(shared.weight.grad).all()


def captured_step(model, x, y, comm):
    """One step; returns the oracle's captured inputs/output-gradients and the preconditioned grads."""
    captured = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            handles.append(m.register_forward_hook(lambda mod, a, out, n=name: captured.setdefault(n, {}).update(a=a[0].detach())))
            handles.append(m.register_full_backward_hook(lambda mod, gi, go, n=name: captured[n].update(g=go[0].detach())))
    precond = KFACPreconditioner(model, comm=comm, damping=DAMPING, kl_clip=None)
    with warnings.catch_warnings():  # the oracle's hook on the first layer, whose input needs no gradient
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        nn.functional.cross_entropy(model(x), y).backward()
    raw = {n: torch.cat([p.grad.reshape(p.shape[0], -1) for p in m.parameters(recurse=False)][::1], 1).clone()
           for n, m in model.named_modules() if n in captured}
    for h in handles:
        h.remove()
    precond.step()
    return captured, raw, precond


def kron_oracle(a_rows, g_rows, batch, positions, grad):
    """V from the dense damped Kronecker Fisher (A+pi*sqrt(l) I) kron (G+sqrt(l)/pi I)."""
    A = a_rows.T @ a_rows / batch
    G = g_rows.T @ g_rows / (batch * positions)
    pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    fisher = np.kron(A + pi * math.sqrt(DAMPING) * np.eye(len(A)), G + math.sqrt(DAMPING) / pi * np.eye(len(G)))
    vec = grad.reshape(-1, order="F")  # vec stacks the columns of the (d_G, d_A) gradient
    return np.linalg.solve(fisher, vec).reshape(grad.shape, order="F")


def test_one_step_against_dense_kron_oracle(comm):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(27, 4, bias=False)).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    captured, raw, _ = captured_step(model, x, y, comm)
    # conv: im2col by torch's unfold, plus the bias column; per-example g = grad_output * batch
    conv = captured["0"]
    patches = nn.functional.unfold(conv["a"], 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18).numpy()
    a_rows = np.hstack([patches, np.ones((len(patches), 1))])
    g_rows = (conv["g"] * 5).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    want = kron_oracle(a_rows, g_rows, 5, 9, raw["0"].numpy())
    got = torch.cat([model[0].weight.grad.reshape(3, -1), model[0].bias.grad[:, None]], 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)
    fc = captured["3"]
    want = kron_oracle(fc["a"].numpy(), (fc["g"] * 5).numpy(), 5, 1, raw["3"].numpy())
    np.testing.assert_allclose(model[3].weight.grad.numpy(), want, rtol=1e-9, atol=1e-13)


class SharedPositions(nn.Module):
    """A Linear on a learned ``(1, T, 3)`` table shared by the batch (added to every example's
    ``(T, 4)`` features), then a Linear head."""

    def __init__(self, positions: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, positions, 3))
        self.fc, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(x + self.fc(self.pos))).mean(1)


def test_a_batch_shared_input_as_long_as_the_batch_is_one_example_of_positions(comm):
    """A leading size 1 is a batch-shared input, not a sequence-first one, even with as many
    positions as examples: the dense Kronecker oracle of one example of T positions."""
    torch.manual_seed(7)
    model = SharedPositions(5).double()
    x, y = torch.randn(5, 5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    captured, raw, _ = captured_step(model, x, y, comm)
    fc = captured["fc"]
    a_rows = np.hstack([fc["a"][0].numpy(), np.ones((5, 1))])
    want = kron_oracle(a_rows, (fc["g"][0] * 5).numpy(), 5, 5, raw["fc"].numpy())
    got = torch.cat([model.fc.weight.grad, model.fc.bias.grad[:, None]], 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)


def test_single_example_linear_factors_give_the_exact_fisher(comm):
    # B = 1: the preconditioner's A kron G is that example's exact Fisher block vec(grad) vec(grad)^T.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    _, raw, precond = captured_step(model, x, y, comm)
    packed = precond.state_dict()["blocks"]["0"]["factors"].numpy()
    dense = []
    for n, chunk in ((4, packed[:10]), (3, packed[10:])):
        mat = np.zeros((n, n))
        mat[np.triu_indices(n)] = chunk
        dense.append(mat + np.triu(mat, 1).T)
    vec = raw["0"].numpy().reshape(-1, order="F")
    np.testing.assert_allclose(np.kron(dense[0], dense[1]), np.outer(vec, vec), rtol=1e-10, atol=1e-15)


def test_inplace_relu_after_preconditioned_layers_gives_the_same_steps():
    """torchvision-style nn.ReLU(inplace=True) after Conv/BatchNorm: the output-gradient
    hooks must see the gradient of the layer's own output, as without the in-place op."""
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(4))
    grads = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace),
                              nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Flatten(),
                              nn.Linear(4 * 8 * 8, 3)).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), inverse_update_interval=1)
        for _ in range(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])


def test_layers_called_by_keyword_give_the_same_steps():
    """``layer(input=x)`` hands the hooks the same input as ``layer(x)``."""
    class Net(nn.Module):
        def __init__(self, keyword: bool) -> None:
            super().__init__()
            self.keyword = keyword
            self.conv, self.norm, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            if self.keyword:
                x = self.norm(input=self.conv(input=x))
                return self.head(input=x.flatten(1))
            return self.head(self.norm(self.conv(x)).flatten(1))

    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(8))
    grads = []
    for keyword in (False, True):
        torch.manual_seed(0)
        model = Net(keyword).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), inverse_update_interval=1)
        for _ in range(2):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
        assert precond.local.examples == 0 and precond.engine.steps == 2
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])


def test_coverage_is_printed_and_same_padding_is_preconditioned(caplog):
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding="same"), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding="valid"),
                          nn.Conv2d(4, 4, 2, padding="same"), nn.Conv2d(4, 4, 3, groups=2), nn.PReLU(),
                          nn.Flatten(), nn.Linear(8, 3))
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), skip_layers=["7"])
    text = repr(precond)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "5 of 7 layers with parameters preconditioned" in text.splitlines()[0]
    assert "K-FAC (A 19x19, G 4x4)" in lines["0"] and "K-FAC (4 units, 2x2 each)" in lines["1"]
    assert "K-FAC (A 37x37" in lines["2"]
    assert "first-order: padding: 'same' with an even" in lines["3"]
    assert "K-FAC (2 groups of A 19x19, G 2x2)" in lines["4"]
    assert "K-FAC (1 slope, 1x1)" in lines["5"]
    assert "first-order: in skip_layers" in lines["7"]
    rnn = repr(KFACPreconditioner(nn.GRU(2, 2), comm=Communicator(MPI.COMM_SELF)))
    assert ("first-order: no curvature block for this type (averaged only: weight_ih_l0, weight_hh_l0, bias_ih_l0, "
            "bias_hh_l0)") in rnn
    # "same" at stride 1 with an odd (dilated) kernel is plain symmetric padding, d * (k - 1) / 2 on
    # each side: the factors match that padding.
    x = torch.randn(3, 2, 7, 7, generator=torch.Generator().manual_seed(6))
    for kernel, dilation, explicit in ((3, 1, 1), (3, 2, 2), ((3, 5), (2, 1), (2, 2))):
        blocks = [KFACPreconditioner(nn.Sequential(nn.Conv2d(2, 4, kernel, padding=p, dilation=dilation)),
                                     comm=Communicator(MPI.COMM_SELF)).engine.blocks[0] for p in ("same", explicit)]
        assert np.array_equal(blocks[0].a_rows(x.numpy()), blocks[1].a_rows(x.numpy())), (kernel, dilation)
    # Reflected or circular padding is no zero padding: im2col's patches would not be the layer's.
    reflect = repr(KFACPreconditioner(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
                                      comm=Communicator(MPI.COMM_SELF)))
    assert "first-order: padding_mode: 'reflect' padding is not supported (zeros only)" in reflect
    with caplog.at_level("WARNING", logger="hpckfac"):
        KFACPreconditioner(nn.Sequential(nn.GRU(2, 2)), comm=Communicator(MPI.COMM_SELF))
    assert "no layer of the model is preconditioned" in caplog.text


def test_model_without_kfac_layers_gets_no_missing_statistics_warning(comm, caplog):
    """An LSTM language model with its embedding and head tied has no K-FAC layer (construction
    says so): its factor-update steps take no statistics by design, so step() must not warn of an
    empty batch or eval() mode, and .grad stays the gradient of the loss."""
    torch.manual_seed(5)

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rnn, self.out = nn.Embedding(11, 6), nn.LSTM(6, 6, batch_first=True), nn.Linear(6, 11)
            self.out.weight = self.emb.weight

        def forward(self, tokens):
            return self.out(self.rnn(self.emb(tokens))[0])

    model = TiedLM().double()
    precond = KFACPreconditioner(model, comm=comm)
    assert not precond.engine.blocks
    tokens = torch.randint(0, 11, (4, 5))
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.roll(1, 1).reshape(-1)).backward()
        expected = [p.grad.clone() for p in model.parameters()]
        with caplog.at_level("WARNING", logger="hpckfac"):
            precond.step()
        assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
    assert "without statistics" not in caplog.text


def test_a_model_with_nothing_trained_is_not_told_that_no_gradient_reached_it(comm, caplog):
    """Every parameter frozen (the model stepped through while nothing of it is trained): no
    gradient is expected, so step() says nothing of one missing, and every .grad stays None."""
    model = mlp().requires_grad_(False)
    precond = KFACPreconditioner(model, comm=comm)
    gen = torch.Generator().manual_seed(3)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):
            model(torch.randn(4, 5, dtype=torch.float64, generator=gen))
            precond.step()
    assert "found no gradient" not in caplog.text
    assert all(p.grad is None for p in model.parameters())
    precond.remove_hooks()


def test_every_k_fac_layer_frozen_takes_no_statistics_without_a_word(comm, caplog):
    """Fine-tuning only first-order parameters (a LayerNorm in skip_layers) with every K-FAC
    layer frozen: those layers take no statistics by design, so the factor steps without any
    are not warned about; once the head is unfrozen, a step in which it saw no example is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    precond = KFACPreconditioner(model, comm=comm, skip_layers=nn.LayerNorm)
    assert len(precond.engine.blocks) == 2
    for layer in (model[0], model[3]):
        layer.requires_grad_(False)
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with caplog.at_level("WARNING", logger="hpckfac"):
        for k in range(4):
            if k == 2:
                model[3].requires_grad_(True)
                optimizer.add_param_group({"params": model[3].parameters()})
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            optimizer.step()
    assert caplog.text == "" and model[3].weight.grad is not None
    with caplog.at_level("WARNING", logger="hpckfac"):  # a trained head that saw no example is named
        optimizer.zero_grad()
        model(x[:0]).sum().backward()
        precond.step()
    assert caplog.text.count("a factor-update step without statistics on this rank") == 1, caplog.text
    precond.remove_hooks()


def test_lazy_modules_are_refused_until_their_first_forward_then_preconditioned(comm):
    """Before its first forward a lazy module has no shapes to build a block from: a ValueError
    naming it; after it, the layers are preconditioned as their plain twins are."""
    torch.manual_seed(3)
    lazy = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.LazyLinear(3)).double()
    with pytest.raises(ValueError, match=r"model: lazy parameters not yet initialised \(0.weight"):
        KFACPreconditioner(lazy, comm=comm)
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    lazy(x)
    plain = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    plain.load_state_dict(lazy.state_dict())
    grads = []
    for model in (lazy, plain):
        precond = KFACPreconditioner(model, comm=comm, kl_clip=None)
        assert not precond.other_params  # every parameter in a K-FAC block
        ((model(x) - y) ** 2).mean().backward()
        precond.step()
        grads.append([p.grad.clone() for p in model.parameters()])
        precond.remove_hooks()
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_model_wrapped_in_distributed_data_parallel_is_named(tmp_path, caplog):
    """DistributedDataParallel would average every gradient before step() averages it again."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(3, 2)))
        with caplog.at_level("WARNING", logger="hpckfac"):
            KFACPreconditioner(wrapped.module, comm=Communicator(MPI.COMM_SELF)).remove_hooks()
            assert "DistributedDataParallel" not in caplog.text
            KFACPreconditioner(wrapped, comm=Communicator(MPI.COMM_SELF)).remove_hooks()
    finally:
        dist.destroy_process_group()
    assert "wrapped in DistributedDataParallel" in caplog.text


@pytest.mark.parametrize("fraction,n", [(0.25, 12), (0.5, 7), (1e-3, 5)])
def test_statistics_fraction_takes_the_factors_of_the_first_examples(fraction, n):
    """The factors from a fraction of each batch are those of the whole pipeline run on those
    examples alone (the per-example gradient does not depend on the batch size)."""
    x = torch.randn(n, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(6))
    m = max(1, math.ceil(fraction * n))
    factors = []
    for inputs, targets, frac in ((x, y, fraction), (x[:m], y[:m], 1.0)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 3)).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), statistics_fraction=frac)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        precond.step()
        factors.append([r.copy() for r in precond.engine.state.running])
    for sampled, alone in zip(*factors):
        np.testing.assert_allclose(sampled, alone, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="statistics_fraction"):
        KFACPreconditioner(nn.Linear(2, 2), comm=Communicator(MPI.COMM_SELF), statistics_fraction=0)



def test_statistics_fraction_leaves_batchnorm_the_whole_batch():
    """BatchNorm normalises by the whole micro-batch's mean and variance, so its unit-wise Fisher
    takes every example whatever ``statistics_fraction`` is: against a float64 oracle of
    u_i = (sum_t g_i x^_i, sum_t g_i) over all n examples, x^ normalised by the batch's statistics."""
    n, fraction = 6, 0.5
    x = torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)).double()
    captured = {}
    bn.register_forward_hook(lambda m, args, out: captured.update(x=args[0].detach().clone()))
    bn.register_full_backward_hook(lambda m, gin, gout: captured.update(g=gout[0].detach().clone()))
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), statistics_fraction=fraction)
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    xs, g = captured["x"].numpy(), captured["g"].numpy() * n  # the per-example losses' gradients
    x_hat = (xs - xs.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(xs.var(axis=(0, 2, 3), keepdims=True) + bn.eps)
    u = np.stack([(g * x_hat).sum(axis=(2, 3)), g.sum(axis=(2, 3))], -1)  # (n, C, 2)
    fisher = np.einsum("ncj,nck->cjk", u, u) / n
    want = fisher.reshape(3, 4)[:, [0, 1, 3]].reshape(-1)
    state = precond.engine.state
    (i,) = [i for i, b in enumerate(state.blocks) if isinstance(b, BatchNormBlock)]
    np.testing.assert_allclose(state.running[i], want, rtol=1e-10, atol=1e-14)
    precond.remove_hooks()


def test_statistics_fraction_of_rows_that_are_not_a_multiple_of_the_batch():
    """A layer that sees fewer rows than the micro-batch has examples (``fc(x[:3])`` of 8) takes
    the same share of its rows as of the examples, rounded up: with a fraction of 1/4 (2 of 8
    examples) one row of 3, never none; A is that row's outer product over the 2 sampled
    examples (float64 oracle)."""
    class FirstRows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x[:3])

    torch.manual_seed(0)
    model = FirstRows().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), statistics_fraction=0.25)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model(x).pow(2).sum().backward()
    stats = precond.local.result()[0]
    assert stats is not None and precond.local.sampled == 2
    a, _ = precond.engine.blocks[0].factors(stats)
    row = np.append(x[0].numpy(), 1.0)
    np.testing.assert_allclose(a[0], np.outer(row, row) / 2, rtol=1e-13, atol=1e-15)
    precond.remove_hooks()


def test_each_step_starts_its_own_forward_count(caplog):
    """``step()`` forgets how the last step's forwards were counted: after a step whose model
    forward counted the examples, a next step that calls a layer directly (an auxiliary head,
    not reached by the model's forward) counts its examples, on a step without statistics (no
    warning that there was no forward) as on a factor step (A of its own rows, float64 oracle)."""
    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    model = WithAux().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), factor_update_interval=2,
                                 inverse_update_interval=2)
    gen = torch.Generator().manual_seed(5)
    model(torch.randn(6, 4, dtype=torch.float64, generator=gen)).pow(2).sum().backward()
    precond.step()
    z = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(2):  # a step without statistics, then a factor step
            model.zero_grad()
            model.aux(z).pow(2).sum().backward()
            if precond.engine.is_factor_step():
                assert precond.local.examples == 7
                (index,) = [i for i, m in enumerate(precond.modules) if m is model.aux]
                a, _ = precond.engine.blocks[index].factors(precond.local.result()[index])
                rows = np.hstack([z.numpy(), np.ones((7, 1))])
                np.testing.assert_allclose(a[0], rows.T @ rows / 7, rtol=1e-13, atol=1e-15)
            precond.step()
    assert "without a training forward" not in caplog.text
    precond.remove_hooks()


def test_layers_called_directly_count_each_pass_once():
    """Without the model's own forward a pass starts when the first layer fires, and again when
    a layer that already fired fires again: two passes through two layers (5 and 3 examples)
    count 8 examples, not a pass per later layer, and A of the first layer is that of both
    passes' rows over 8 (float64 oracle)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(n, 4, dtype=torch.float64, generator=gen) for n in (5, 3)]
    for x in xs:
        model[2](torch.tanh(model[0](x))).pow(2).sum().backward()
    assert precond.local.examples == 8 and precond.local.passes == 2
    a, _ = precond.engine.blocks[0].factors(precond.local.result()[0])
    rows = np.hstack([torch.cat(xs).numpy(), np.ones((8, 1))])
    np.testing.assert_allclose(a[0], rows.T @ rows / 8, rtol=1e-13, atol=1e-15)
    precond.remove_hooks()


def test_statistics_from_part_of_the_batch_are_not_read_as_outside_gradients(caplog):
    """With ``statistics_fraction`` < 1 the gradient comes from every example and the statistics
    from the first ones: an embedding row looked up only by the unsampled examples has gradient
    and no count, which is no sign of another reader of the weight (no warning); with the whole
    batch sampled, a gradient added outside the lookups is still named."""
    ids = torch.tensor([[0, 1], [1, 0], [5, 6], [6, 5]])
    for fraction, named in ((0.5, False), (1.0, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(6, 2)).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), statistics_fraction=fraction)
        caplog.clear()
        with caplog.at_level("WARNING", logger="hpckfac"):
            loss = model(ids).pow(2).sum()
            if named:  # a penalty on a row no example looks up
                loss = loss + model[0].weight[9].pow(2).sum()
            loss.backward()
            precond.step()
        assert ("own calls cannot give" in caplog.text) == named, fraction
        precond.remove_hooks()


class FlatRows(nn.Module):
    """A Linear fed the batch flattened to ``(batch * positions, features)`` rows (or the
    ``(batch, positions, features)`` sequence itself with ``flat=False``)."""

    def __init__(self, flat: bool):
        super().__init__()
        self.flat = flat
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1) if self.flat else self.fc(x).reshape(x.shape[0], -1)


def flat_and_sequence_factors(make, x, y, fraction):
    """The first block's factors after one step of ``make(flat)`` for flat = True, once every
    block's running statistics are checked equal to those of ``make(False)``."""
    running, factors = [], None
    for flat in (True, False):
        torch.manual_seed(0)
        model = make(flat).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), statistics_fraction=fraction,
                                     factor_decay=0.0)
        nn.functional.cross_entropy(model(x)[:, :3], y).backward()
        precond.step()
        running.append([r.copy() for r in precond.engine.state.running])
        if flat:
            factors = precond.engine.blocks[0].factors(running[0][0])
    for got, want in zip(*running):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    return factors


class FlatGroups(nn.Module):
    """A Linear fed ``(batch, 6, 4)`` as ``(batch * 3, 2, 4)``: each example's positions split into
    3 rows of 2 (as attention code reshapes heads into the batch), or the sequence with ``flat=False``."""

    def __init__(self, flat: bool):
        super().__init__()
        self.flat = flat
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x.reshape(-1, 2, 4)) if self.flat else self.fc(x)
        return h.reshape(x.shape[0], -1)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_flattened_groups_of_positions_take_the_factors_of_the_sequence(fraction):
    """A 3-D input whose leading axis is neither the batch nor 1, and whose second axis is not the
    batch, is ``(batch * k, positions, features)``, not sequence-first: the factors of the sequence."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    flat_and_sequence_factors(FlatGroups, x, y, fraction)


def test_a_layernorm_on_rows_whose_first_normalised_dimension_equals_the_batch():
    """LayerNorm((2, 3)) fed the batch of 2 flattened to ``(rows, 2, 3)``: a normalised dimension of
    the batch's size is a feature axis, not the batch of a sequence-first input; the unit-wise Fisher
    is that of the rows as hooked (``LayerNormBlock.fisher``, checked against autograd elsewhere)."""
    from hpckfac.layers import LayerNormBlock

    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.head = nn.LayerNorm((2, 3)), nn.Linear(5 * 6, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.ln(x.reshape(-1, 2, 3))).reshape(x.shape[0], -1))

    torch.manual_seed(8)
    model = Rows().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), skip_layers=["head"])
    seen = {}

    def capture(module, args, out):
        seen["a"] = args[0].detach()
        out.register_hook(lambda g: seen.update(g=g.detach()))

    model.ln.register_forward_hook(capture)
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(2, 5, 2, 3, dtype=torch.float64, generator=gen), torch.randint(0, 3, (2,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    got = precond.engine.blocks[0].factors(precond.local.result()[0])[0]
    want = LayerNormBlock("ln", (2, 3), 1e-5).fisher(seen["a"].numpy(), (seen["g"] * 2).numpy(), scale=1 / 2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("batch", [4, 3], ids=["batch == in_features", "batch == out_features"])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_flattened_rows_whose_features_equal_the_batch_stay_rows(batch, fraction):
    """``(batch * positions, features)`` rows with as many features as examples (here the Linear's
    4 inputs or 3 outputs) are rows, not a sequence-first layout to transpose: the same factors as
    the ``(batch, positions, features)`` sequence, and at 1 the dense ``A`` of all the rows."""
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 5, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (batch,), generator=gen)
    flat = flat_and_sequence_factors(FlatRows, x, y, fraction)
    if fraction == 1.0:
        rows = np.concatenate([x.reshape(-1, 4).numpy(), np.ones((5 * batch, 1))], axis=1)
        np.testing.assert_allclose(flat[0][0], rows.T @ rows / batch, rtol=1e-12)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3])
def test_flattened_rows_take_the_factors_of_the_sequence(fraction):
    """A layer that sees the batch as ``(batch * positions, features)`` rows takes the same
    factors as on the ``(batch, positions, features)`` sequence, at every statistics fraction
    (all rows at 1, the first examples' rows below), and at 1 the dense float64 formula:
    ``A = sum of [a, 1][a, 1]^T / batch``."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    flat = flat_and_sequence_factors(FlatRows, x, y, fraction)
    if fraction == 1.0:
        rows = np.concatenate([x.reshape(-1, 4).numpy(), np.ones((30, 1))], axis=1)
        np.testing.assert_allclose(flat[0][0], rows.T @ rows / 6, rtol=1e-12)


class FlatTokens(nn.Module):
    """An Embedding fed ``(batch, tokens)`` indices, or the same flattened to ``(batch * tokens,)``."""

    def __init__(self, flat: bool):
        super().__init__()
        self.flat = flat
        self.emb = nn.Embedding(7, 3)

    def forward(self, x):
        out = self.emb(x.reshape(-1)) if self.flat else self.emb(x)
        return out.reshape(x.shape[0], -1)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_flattened_tokens_take_the_factors_of_the_sequence(fraction):
    x = torch.randint(0, 7, (6, 4), generator=torch.Generator().manual_seed(9))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(10))
    flat_and_sequence_factors(FlatTokens, x, y, fraction)


class SequenceFirst(nn.Module):
    """Embedding, LayerNorm and Linear on ``(batch, tokens)`` indices, the layers after the
    embedding run sequence-first, ``(tokens, batch, features)`` (PyTorch's ``batch_first=False``),
    with ``seq_first``, else batch-first."""

    def __init__(self, seq_first: bool):
        super().__init__()
        self.seq_first = seq_first
        self.emb, self.norm, self.fc = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        if self.seq_first:
            return self.fc(self.norm(self.emb(x.T))).transpose(0, 1).mean(1)
        return self.fc(self.norm(self.emb(x))).mean(1)


@pytest.mark.parametrize("batch, tokens, fraction", [(6, 4, 1.0), (6, 4, 0.5), (3, 5, 1.0)])
def test_sequence_first_layers_take_the_factors_of_batch_first(batch, tokens, fraction):
    """Layers that see ``(tokens, batch, ...)`` take the factors of the batch-first layout, fewer
    and more tokens than examples: read as batch-first, G was scaled by tokens/batch (so it
    changed with the ranks' share of the batch) and LayerNorm summed over the wrong axis."""
    x = torch.randint(0, 7, (batch, tokens), generator=torch.Generator().manual_seed(11))
    y = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(12))
    flat_and_sequence_factors(SequenceFirst, x, y, fraction)


@pytest.mark.parametrize("batch_first", [False, True])
def test_as_many_positions_as_examples_warn_only_beside_a_sequence_first_module(batch_first, caplog):
    """An LSTM's output into a Linear head, as many steps as examples: that layout cannot be told
    apart; with ``batch_first=False`` the head's reading may be the wrong one and a warning says so
    (once), with ``batch_first=True`` nothing is said. Positions not equal to the batch: silence."""
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 4, batch_first=batch_first), nn.Linear(4, 2)

        def forward(self, x):  # x batch-first, as the preconditioner reads the model's input
            return self.head(self.rnn(x if batch_first else x.transpose(0, 1))[0])

    torch.manual_seed(0)
    model = Tagger().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), factor_update_interval=1)
    said = []
    for steps in (4, 5, 5):  # batch 5 throughout
        with caplog.at_level("WARNING", logger="hpckfac"):
            caplog.clear()
            model(torch.randn(5, steps, 3, dtype=torch.float64)).square().mean().backward()
            precond.step()
        said.append("as many positions as examples" in caplog.text)
    assert said == [False, not batch_first, False]


@pytest.mark.parametrize("batch_first", [False, True])
def test_a_head_on_an_rnns_final_state_is_named(batch_first, caplog):
    """A Linear head on a one-layer GRU's final state ``h_n`` (1, batch, hidden), whatever the
    GRU's ``batch_first``, reads as one input shared by the batch (G scaled by 1/batch): a warning
    names ``h_n[-1]``, with which the head takes the factors of ``(batch, hidden)`` rows."""
    class Classifier(nn.Module):
        def __init__(self, last: bool):
            super().__init__()
            self.last = last
            self.rnn, self.head = nn.GRU(3, 4, batch_first=batch_first), nn.Linear(4, 2)

        def forward(self, x):
            h = self.rnn(x if batch_first else x.transpose(0, 1))[1]
            return self.head(h[-1]) if self.last else self.head(h)[0]

    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 2, (5,), generator=torch.Generator().manual_seed(3))
    said = []
    for last in (False, True):
        with caplog.at_level("WARNING", logger="hpckfac"):
            caplog.clear()
            counted_step(Communicator(MPI.COMM_SELF), lambda: Classifier(last), lambda m: m(x), y, 5)
        said.append("h_n[-1]" in caplog.text)
    assert said == [True, False]


def test_a_batch_first_sequence_as_long_as_the_batch_stays_batch_first():
    """``(batch, positions, features)`` with as many positions as examples cannot be told from a
    sequence-first layout and is read batch-first: a LayerNorm's unit-wise Fisher equals the
    mean over examples of ``u_i u_iᵀ``, ``u_i`` example i's own (γ_c, β_c) gradient by autograd."""
    torch.manual_seed(4)
    batch = 5
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Flatten(), nn.Linear(batch * 4, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, batch, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (batch,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    model.eval()  # the oracle's forwards take no statistics
    u = np.stack([np.stack([g.numpy() for g in torch.autograd.grad(
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), (model[1].weight, model[1].bias))], -1)
        for i in range(batch)])  # (examples, units, 2)
    index = [type(b).__name__ for b in precond.engine.blocks].index("LayerNormBlock")
    fisher = precond.engine.blocks[index].factors(precond.local.result()[index])[0]
    np.testing.assert_allclose(fisher, np.einsum("iuk,iul->ukl", u, u) / batch, rtol=1e-10, atol=1e-15)


class DictInput(nn.Module):
    """A model called as model({"x": x}): no tensor among its arguments."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, batch):
        return self.net(batch["x"])


def counted_step(comm, make_model, call, y, examples):
    """The running factors after one step of ``call(model)`` on a model built after seeding 0,
    asserting that the step counted ``examples`` examples."""
    torch.manual_seed(0)
    model = make_model().double()
    precond = KFACPreconditioner(model, comm=comm, inverse_update_interval=1)
    nn.functional.cross_entropy(call(model), y).backward()
    assert precond.local.examples == examples
    precond.step()
    return [r.copy() for r in precond.engine.state.running]


def test_examples_are_counted_from_the_layers_when_the_input_is_not_a_tensor(comm):
    x = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(3))
    # DictInput builds the same Sequential first: identical weights.
    wrapped = counted_step(comm, DictInput, lambda m: m({"x": x}), y, 7)
    plain = counted_step(comm, lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)),
                         lambda m: m(x), y, 7)
    for got, want in zip(wrapped, plain):
        np.testing.assert_allclose(got, want, rtol=1e-12)



class Conv2dSame(nn.Conv2d):
    """A convolution padded in forward to TensorFlow's "same" output size, as timm's
    ``Conv2dSame``: the module's own ``padding`` is 0, the input it convolves is not its hook's."""

    def forward(self, x):
        pads = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                for n, k, s, d in zip(x.shape[2:], self.kernel_size, self.stride, self.dilation)]
        x = nn.functional.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("side", [8, 9])
def test_a_convolution_padding_in_forward_is_refused_naming_it(comm, side):
    """The patches of A would be those of the unpadded input while G takes the padded output's
    positions (before, both were added without a word: 3x3 against 4x4 positions at side 8; at
    side 9 the layer is an nn.Conv2d with padding 1 whose A lacked the border patches). Listed in
    skip_layers, its gradient is averaged."""
    x = torch.randn(4, 2, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2))

    def model():
        torch.manual_seed(0)
        return nn.Sequential(Conv2dSame(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(),
                             nn.Linear(3 * ((side + 1) // 2) ** 2, 3)).double()
    net = model()
    precond = KFACPreconditioner(net, comm=comm)
    with pytest.raises(ValueError, match=r"block '0' expected an output of spatial size .* Conv2dSame"):
        nn.functional.cross_entropy(net(x), y).backward()
    precond.remove_hooks()
    net = model()
    precond = KFACPreconditioner(net, comm=comm, skip_layers=[Conv2dSame])
    nn.functional.cross_entropy(net(x), y).backward()
    want = net[0].weight.grad.clone()
    precond.step()
    assert torch.equal(net[0].weight.grad, want)


class PackedRNN(nn.Module):
    """An LSTM (first-order) on a ``PackedSequence``, then LayerNorm and a Linear head on the
    last layer's final state."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.ln, self.head = nn.LSTM(3, 5, batch_first=True), nn.LayerNorm(5), nn.Linear(5, 2)

    def forward(self, packed):
        _, (h, _) = self.rnn(packed)
        return self.head(torch.tanh(self.ln(h[-1])))


def test_a_packed_sequence_counts_its_sequences(comm):
    """``model(pack_padded_sequence(...))``: the data's 22 rows are the time steps of 6
    sequences, and the statistics are those of 6 examples, against factors computed here from
    each example's LayerNorm input and output gradient (before, 22 examples were counted and
    the preconditioned gradients were off by 60%)."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 7, 3, dtype=torch.float64, generator=gen), torch.randint(0, 2, (6,), generator=gen)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 2, 5, 1, 4, 3]), batch_first=True,
                                               enforce_sorted=False)
    torch.manual_seed(0)
    model = PackedRNN().double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    precond = KFACPreconditioner(model, comm=comm, damping=DAMPING, kl_clip=None)
    seen = {}

    def capture(module, args, out):
        seen[module] = [args[0].detach().clone()]
        out.register_hook(lambda g: seen[module].append(g.detach() * len(x)))  # each example's own
    for module in (model.ln, model.head):
        module.register_forward_hook(capture)
    nn.functional.cross_entropy(model(packed), y).backward()
    ln_grads = [model.ln.weight.grad.clone(), model.ln.bias.grad.clone()]
    head_grad = torch.cat([model.head.weight.grad, model.head.bias.grad[:, None]], 1).numpy()
    precond.step()

    (a, g), (h, gh) = seen[model.ln], seen[model.head]
    x_hat = ((a - a.mean(1, keepdim=True)) / torch.sqrt(a.var(1, unbiased=False, keepdim=True) + model.ln.eps))
    u = torch.stack([g * x_hat, g], -1).numpy()  # (examples, elements, 2)
    fisher = np.einsum("nci,ncj->cij", u, u) / len(x)
    want = np.einsum("cij,jc->ic", np.linalg.inv(fisher + DAMPING * np.eye(2)),
                     torch.stack(ln_grads).numpy())
    np.testing.assert_allclose(torch.stack([model.ln.weight.grad, model.ln.bias.grad]).numpy(), want, rtol=1e-10)
    rows = np.hstack([h.numpy(), np.ones((len(h), 1))])
    A, G = rows.T @ rows / len(x), gh.numpy().T @ gh.numpy() / len(x)
    pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    want = (np.linalg.inv(G + math.sqrt(DAMPING) / pi * np.eye(len(G))) @ head_grad
            @ np.linalg.inv(A + pi * math.sqrt(DAMPING) * np.eye(len(A))))
    got = torch.cat([model.head.weight.grad, model.head.bias.grad[:, None]], 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10)


@dataclasses.dataclass
class Batch:
    x: torch.Tensor


class FlatBatch(nn.Module):
    """A model called with a mapping or a dataclass holding ``x`` (batch, T, 5), whose first
    layer sees the batch flattened to ``(batch * T, 5)`` rows."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, batch):
        x = batch if isinstance(batch, torch.Tensor) else batch["x"] if isinstance(batch, UserDict) else batch.x
        return self.net(x.reshape(-1, 5)).reshape(x.shape[0], -1, 3).mean(1)


@pytest.mark.parametrize("wrap", [UserDict, Batch])
def test_examples_are_counted_in_mappings_and_dataclasses(comm, wrap):
    """A ``UserDict`` (Hugging Face's ``BatchEncoding``) or a dataclass batch counts its tensors'
    batch, not the flattened rows its first layer sees: the statistics of ``model(x)``."""
    x = torch.randn(7, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(3))
    wrapped = counted_step(comm, FlatBatch, lambda m: m(wrap(x=x)), y, 7)
    plain = counted_step(comm, FlatBatch, lambda m: m(x), y, 7)
    for got, want in zip(wrapped, plain):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@dataclasses.dataclass
class ScaledBatch:
    x: torch.Tensor
    scale: torch.Tensor = torch.full((3, 1), 2.0)  # a class attribute as well as each instance's default


def test_tensors_in_reads_dataclass_instances_not_dataclass_types():
    """An instance's fields are read, in order; a dataclass type passed as an argument (a config
    class) holds no example, though its defaults are class attributes."""
    from hpckfac.torch.micro_batch import tensors_in

    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(4))
    other = torch.randn(2, 5, generator=torch.Generator().manual_seed(5))
    found = list(tensors_in([ScaledBatch, {"b": ScaledBatch(x, other)}, (x,)]))
    assert len(found) == 3 and found[0] is x and found[1] is other and found[2] is x
    assert list(tensors_in(ScaledBatch)) == []


class ScaledInput(nn.Module):
    """``model(scale, x)`` or ``model(positions, x)``: a 1-D tensor before the batch; the batch
    flattened to ``(batch * positions, features)`` rows before the first layer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, first, x=None):
        if x is None:  # model(x): the batch alone
            first, x = torch.ones(()), first
        scale = first if first.numel() == 1 else 1.0
        return self.net(x.reshape(-1, x.shape[-1]) * scale).reshape(x.shape[0], -1, 3).mean(1)


@pytest.mark.parametrize("first", ["scale", "positions", "more positions than examples"])
def test_examples_are_the_batch_beside_a_one_dimensional_argument(comm, first):
    """A ``(1,)`` scale or ``(T,)`` positions passed before the batch do not change the count:
    the statistics equal those of the same model called on the batch alone (7 examples)."""
    positions = 14 if first == "more positions than examples" else 3
    x = torch.randn(7, positions, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(3))
    other = torch.ones(1, dtype=torch.float64) if first == "scale" else torch.arange(positions)
    beside = counted_step(comm, ScaledInput, lambda m: m(other, x), y, 7)
    alone = counted_step(comm, ScaledInput, lambda m: m(x), y, 7)
    for got, want in zip(beside, alone):
        np.testing.assert_allclose(got, want, rtol=1e-12)


class PositionsFirst(nn.Module):
    """Token and position embeddings, the positions' embedding computed first."""

    def __init__(self) -> None:
        super().__init__()
        self.pos, self.tok, self.head = nn.Embedding(6, 4), nn.Embedding(9, 4), nn.Linear(4, 3)

    def forward(self, ids, positions, empty=None):
        return self.head(torch.tanh(self.pos(positions) + self.tok(ids))).mean(1)


@pytest.mark.parametrize("case", ["(1, T) positions", "empty placeholder"])
def test_broadcast_positions_computed_first_count_the_batch(comm, case):
    """``model(ids (B, T), positions (1, T))`` counts B even when the positions' embedding fires
    first, and its statistics equal those of (B, T) positions."""
    ids = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(6).unsqueeze(0)
    extra = (torch.zeros(0, 4),) if case == "empty placeholder" else ()
    shared = counted_step(comm, PositionsFirst, lambda m: m(ids, positions, *extra), y, 5)
    each = counted_step(comm, PositionsFirst, lambda m: m(ids, positions.expand(5, 6), *extra), y, 5)
    for got, want in zip(shared, each):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("empty", ["backpropagated", "left out of backward"])
def test_an_empty_micro_batch_beside_batch_shared_positions_adds_nothing(comm, empty, caplog):
    """An uneven last micro-batch of no examples among accumulated ones: the (1, T) positions'
    embedding still runs on its one row, which stands for no example; and the empty batch's loss
    (NaN, a mean over nothing) may be left out of backward. Either way the step's factors and
    preconditioned gradients are those of the non-empty micro-batch alone."""
    ids = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(6).unsqueeze(0)

    def step(sizes):
        torch.manual_seed(0)
        model = PositionsFirst().double()
        precond = KFACPreconditioner(model, comm=comm, accumulation_steps=2, inverse_update_interval=1)
        for n in sizes:
            loss = nn.functional.cross_entropy(model(ids[:n], positions), y[:n]) / 2
            if n or empty == "backpropagated":
                loss.backward()
        precond.step()
        return [r.copy() for r in precond.engine.state.running] + [p.grad.clone() for p in model.parameters()]

    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="hpckfac"):
        warnings.simplefilter("ignore")  # torch: the mean of an empty batch
        got = step([4, 0])
        # The empty micro-batch is one of the two accumulated: no advice to change accumulation_steps.
        assert "accumulation_steps" not in caplog.text, caplog.text
        for got, want in zip(got, step([4])):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_batch_candidates():
    from hpckfac.torch.micro_batch import batch_candidates, batch_size

    t = lambda *shape: torch.zeros(shape)  # noqa: E731
    assert batch_candidates([t(4, 6), t(1, 6)]) == [4] and batch_candidates([t(1, 6), t(4, 6)]) == [4, 1]
    assert batch_candidates([t(0, 5), t(1, 6), t(4, 6)]) == [4, 1]
    assert batch_candidates([t(1), t(4, 3)]) == [4] and batch_candidates([t(6), t(1, 6, 5)]) == [1]
    assert batch_candidates([t(0, 5), t(4, 5)]) == [4] and batch_candidates([t(7)]) == [7]
    assert batch_candidates([t(3, 2), t(5, 2)]) == [3, 5] and batch_candidates([t(), t()]) == []
    assert batch_size([3, 5], 5) == (5, False) and batch_size([3, 5], 15) == (3, True)
    assert batch_size([3, 5], 10) == (5, False) and batch_size([3, 5], 7) == (3, True)
    assert batch_size([], 8) == (8, False) and batch_size([3, 5], 0) == (3, True)
    assert batch_size([4, 1], 1) == (1, False) and batch_size([4, 1], 1, shared=True) == (4, False)
    assert batch_size([4, 1], 12) == (4, False) and batch_size([4, 1], 3) == (4, False)
    assert batch_size([1, 3], 7) == (1, False)  # none divides: the first, not the first larger


class MaskedAttention(nn.Module):
    """Self-attention of a ``(batch, T, 4)`` sequence under a ``(T, T)`` additive mask, passed
    to the model or (``mask=None``) built in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, mask=None):
        if mask is None:
            mask = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype)
        q = self.q(x)
        return self.head(torch.softmax(q @ q.transpose(-1, -2) + mask, -1) @ q).mean(1)


class StatefulRNN(nn.Module):
    """A two-layer LSTM whose initial state ``(h0, c0)``, ``(2, batch, 5)`` each, may be passed."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 5, num_layers=2, batch_first=True), nn.Linear(5, 3)

    def forward(self, x, state=None):
        return self.head(self.rnn(x, state)[0]).mean(1)


class LearnedQuery(nn.Module):
    """Attention pooling of ``x`` (batch, T, 4) by a learned ``(1, 4)`` query whose projection,
    the first K-FAC layer to fire, sees one row; ``positions`` (1, T) are added to ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 4))
        self.q, self.k, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x, positions=None):
        if positions is not None:
            x = x + positions[..., None].to(x.dtype)
        query = self.q(self.query)
        return self.head((torch.softmax(self.k(x) @ query.T, 1) * x).sum(1))


def test_a_batch_shared_layer_firing_first_beside_positions_counts_the_batch(comm):
    """``model(x, positions (1, T))`` whose first K-FAC layer takes a learned ``(1, 4)`` query:
    the batch is counted, not the query's one row: the statistics of ``(B, T)`` positions."""
    x = torch.randn(6, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(5).unsqueeze(0)
    shared = counted_step(comm, LearnedQuery, lambda m: m(x, positions), y, 6)
    each = counted_step(comm, LearnedQuery, lambda m: m(x, positions.expand(6, 5)), y, 6)
    for got, want in zip(shared, each):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("make, extra", [
    (MaskedAttention, lambda b: torch.zeros(6, 6, dtype=torch.float64)),
    (StatefulRNN, lambda b: (torch.zeros(2, b, 5, dtype=torch.float64),) * 2)])
def test_a_tensor_that_is_not_per_example_beside_a_batch_of_one_counts_one(comm, batch, make, extra):
    """A ``(T, T)`` mask or an LSTM's ``(num_layers, batch, hidden)`` state beside a batch of one
    example: one example counted (not T or num_layers), the statistics of the model called on the
    batch alone."""
    x = torch.randn(batch, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(3))
    beside = counted_step(comm, make, lambda m: m(x, extra(batch)), y, batch)
    alone = counted_step(comm, make, lambda m: m(x), y, batch)
    for got, want in zip(beside, alone):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("first", ["(3, 3) setting", "(T, T) mask"])
def test_flattened_rows_beside_a_tensor_that_is_not_per_example(comm, first, caplog):
    """``model(other, x)`` with the first layer on ``(batch * T, ...)`` rows: the one size that
    divides the rows is the batch (the statistics of ``model(x)``); when both divide them the
    count is a guess, and a warning names the remedy."""
    x = torch.randn(7, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (7,), generator=torch.Generator().manual_seed(3))
    other = torch.eye(3 if first == "(3, 3) setting" else 5, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="hpckfac"):
        beside = counted_step(comm, ScaledInput, lambda m: m(other, x), y, 7 if first == "(3, 3) setting" else 5)
    alone = counted_step(comm, ScaledInput, lambda m: m(x), y, 7)
    if first == "(3, 3) setting":
        for got, want in zip(beside, alone):
            np.testing.assert_allclose(got, want, rtol=1e-12)
    assert ("pass the batch's tensors first" in caplog.text) == (first == "(T, T) mask")


def test_a_comm_that_is_not_a_communicator_and_skip_layers_that_match_nothing_are_named(comm, caplog):
    with pytest.raises(TypeError, match="comm: expected an hpckfac.comm.Communicator, got Intracomm"):
        KFACPreconditioner(mlp(), comm=MPI.COMM_SELF)
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(mlp(), comm=comm, skip_layers=["2", "fc9"])
    assert "skip_layers: no module is named 'fc9' (the model's names" in caplog.text  # only the typo named
    assert [b.name for b in precond.engine.blocks] == ["0"]  # "2" was skipped, "fc9" matched nothing


def test_submodules_called_directly_count_on_steps_without_statistics_too(comm, caplog):
    """The model's own forward never runs: the first K-FAC layer starts each pass, on factor
    steps and plain steps alike (no "step() without a training forward" on the plain ones)."""
    torch.manual_seed(2)
    model = nn.ModuleDict({"a": nn.Linear(3, 4).double(), "b": nn.Linear(4, 2).double()})
    precond = KFACPreconditioner(model, comm=comm, factor_update_interval=2, damping=DAMPING)
    x = torch.randn(5, 3, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(3):
            model["b"](torch.tanh(model["a"](x))).pow(2).mean().backward()
            precond.step()
    assert "without a training forward" not in caplog.text


def test_training_in_eval_mode_is_named(comm, caplog):
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm)
    model.eval()  # a forward/backward in eval() mode takes no statistics
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with caplog.at_level("WARNING", logger="hpckfac"):
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
    assert "step() without a training forward/backward" in caplog.text and "eval() mode" in caplog.text


def test_a_forward_never_backpropagated_leaves_the_factors_as_they_were(comm, caplog):
    """A training-mode forward whose loss is never backpropagated (here before the real one):
    its layers' statistics of the step are dropped with a warning, not mixed in with the
    wrong weight, and a step without it takes them as usual."""
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm, damping=DAMPING, inverse_update_interval=1)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(3)]
    factors = lambda: [b["factors"].clone() for b in precond.state_dict()["blocks"].values()]
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    precond.step()
    before = factors()
    with caplog.at_level("WARNING", logger="hpckfac"):
        model(data[1][0])  # e.g. a metric computed in train mode
        nn.functional.cross_entropy(model(data[1][0]), data[1][1]).backward()
        precond.step()
    assert "dropped at step 1" in caplog.text and "0, 2" in caplog.text
    for old, new in zip(before, factors()):
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    nn.functional.cross_entropy(model(data[2][0]), data[2][1]).backward()
    precond.step()
    assert all(not torch.equal(old, new) for old, new in zip(before, factors()))


@pytest.mark.parametrize("clipped", [False, True], ids=["", "clipped"])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
@pytest.mark.parametrize("zeroing", ["missing", "set_to_none", "zeros", "data", "model", "late", "late zeros"])
def test_a_loop_without_zero_grad_is_named(comm, caplog, zeroing, accumulation_steps, clipped):
    """Without zero_grad() the next backward adds its gradient to the preconditioned one that
    step() wrote, which the next step() preconditions again: the .grad it finds is that sum
    (checked against autograd on a copy of the model), and it says so, once, also when
    clip_grad_norm_ scales .grad in place between step() and optimizer.step(). Every way of
    zeroing (None, zeros, through .data, the model's zero_grad) hears nothing, nor does a
    zero_grad(), to None or to zeros, after another backward into the model (a GAN's
    discriminator's, here in eval() mode to take no statistics) that met the written .grad."""
    model = mlp()
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm, accumulation_steps=accumulation_steps)
    gen = torch.Generator().manual_seed(4)
    batches = [[(torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))
                for _ in range(accumulation_steps)] for _ in range(3)]
    with caplog.at_level("WARNING", logger="hpckfac"):
        for k, batch in enumerate(batches):
            if zeroing == "set_to_none":
                optimizer.zero_grad()
            elif zeroing == "zeros":
                optimizer.zero_grad(set_to_none=False)
            elif zeroing == "data" and k > 0:
                for p in model.parameters():
                    p.grad.data.zero_()
            elif zeroing == "model":
                model.zero_grad()
            elif zeroing in ("late", "late zeros"):
                model.eval()
                model(batch[0][0]).sum().backward()
                model.train()
                optimizer.zero_grad(set_to_none=zeroing == "late")
            kept = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            plain.load_state_dict(model.state_dict())
            plain.zero_grad()
            for x, y in batch:
                (nn.functional.cross_entropy(model(x), y) / accumulation_steps).backward()
                (nn.functional.cross_entropy(plain(x), y) / accumulation_steps).backward()
            for p, q, old in zip(model.parameters(), plain.parameters(), kept):
                want = q.grad if zeroing != "missing" or old is None else old + q.grad
                torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-14)
            precond.step()
            if clipped:  # a norm far below the gradients': every .grad scaled in place
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
            optimizer.step()
    said = caplog.text.count("the .grad that the first step() wrote was still in place")
    assert said == (1 if zeroing == "missing" else 0), caplog.text
    precond.remove_hooks()
    assert all(not p._backward_hooks for p in model.parameters())


@pytest.mark.parametrize("write", ["copy", "assign"])
def test_gradients_of_autograd_grad_written_into_grad_are_not_a_missing_zero_grad(comm, caplog, write):
    """torch.autograd.grad(loss, params) adds nothing to .grad; a loop that writes its gradients
    into .grad (copied into the one there, or assigned) gives step() each step's own gradient,
    as autograd's on a copy of the model: no zero_grad() is missing, and nothing is said."""
    model = mlp()
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm)
    gen = torch.Generator().manual_seed(4)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(3):
            x, y = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
            grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
            for p, g in zip(model.parameters(), grads):
                if write == "copy" and p.grad is not None:
                    p.grad.copy_(g)
                else:
                    p.grad = g
            plain.load_state_dict(model.state_dict())
            plain.zero_grad()
            nn.functional.cross_entropy(plain(x), y).backward()
            for p, q in zip(model.parameters(), plain.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
            precond.step()
            optimizer.step()
    assert caplog.text == ""
    precond.remove_hooks()
    assert all(not p._backward_hooks and not p._post_accumulate_grad_hooks for p in model.parameters())


def test_gradients_the_first_step_wrote_are_freed_by_zero_grad(comm):
    """The hooks that follow the .grad the first step() wrote, up to the second, do not keep it:
    zero_grad() frees it before the next forward, as it does without a preconditioner, so the
    second step's forward and backward do not hold a second copy of the gradients."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    optimizer.step()
    written = [weakref.ref(p.grad) for p in model.parameters()]
    optimizer.zero_grad()
    assert all(ref() is None for ref in written)
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    precond.remove_hooks()


@pytest.mark.parametrize("frozen", [False, True])
def test_a_layer_left_out_of_the_optimizer_is_named_as_such(comm, caplog, frozen):
    """A K-FAC layer left out of the optimizer but still requiring grad is never zeroed by its
    zero_grad(): the warning names that cause beside a missing zero_grad(); frozen with
    requires_grad_(False), it is not met, and nothing is said."""
    model = mlp()
    model[0].requires_grad_(not frozen)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            optimizer.step()
    said = caplog.text.count("or a K-FAC layer left out of the optimizer that still requires grad")
    assert said == (0 if frozen else 1), caplog.text
    assert frozen or caplog.text.count("WARNING") == 1
    precond.remove_hooks()


def test_a_layer_frozen_with_a_gradient_left_from_before_is_not_watched(comm, caplog):
    """A warm start with zero_grad(set_to_none=False) leaves zeros in every .grad; a layer frozen
    after it keeps them. The first step() watches only trained parameters for a loop without
    zero_grad() (torch refuses a hook on a frozen one), and the run goes on without a word."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model[2].parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            optimizer.step()
    assert caplog.text == ""
    assert all(torch.count_nonzero(p.grad) == 0 for p in model[0].parameters())
    precond.remove_hooks()


def test_misuse_warnings_and_tied_weights(comm, caplog):
    model = mlp()
    precond = KFACPreconditioner(model, comm=comm)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with caplog.at_level("WARNING", logger="hpckfac"):
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        assert "step() without" not in caplog.text
        precond.step()  # twice in one optimizer step
    assert "step() without a training forward/backward" in caplog.text
    # Two Linear layers sharing one weight: both stay first-order, the weight gets one update.
    shared = nn.Linear(4, 4, bias=False)
    tied = nn.Sequential(nn.Linear(5, 4), shared, nn.Tanh(), nn.Linear(4, 4, bias=False), nn.Linear(4, 3))
    tied[3].weight = shared.weight
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(tied.double(), comm=comm)
    assert "layer 1 (Linear) stays first-order: it shares a parameter with 3 (tied weights)" in caplog.text
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    assert "first-order: shares a parameter with '1' (tied weights)" in lines["3"]
    assert "first-order: shares a parameter with '3' (tied weights)" in lines["1"]
    assert not {id(tied[1]), id(tied[3])} & {id(m) for m in precond.modules}
    assert [m for m in precond.modules] == [tied[0], tied[4]]
    nn.functional.cross_entropy(tied(x), y).backward()
    precond.step()
    assert torch.isfinite(shared.weight.grad).all()


def test_tied_embedding_and_head_warning_names_the_embedding_to_skip(comm, caplog):
    """An embedding tied to its output head: the warning says to skip the embedding. Skipping the
    head instead leaves the embedding's block a gradient in rows its batch never looked up (the
    head's share), which its token counts cannot give (the first factor step names it); skipping
    the embedding leaves the head's block, whose calls reach every row, and no such warning."""

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(11, 6), nn.Linear(6, 11)
            self.out.weight = self.emb.weight

        def forward(self, tokens):
            return self.out(torch.tanh(self.emb(tokens)))

    tokens = torch.randint(0, 5, (4, 3))  # tokens 5..10 never looked up: their rows get the head's gradient
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(TiedLM().double(), comm=comm)
    assert "put emb in skip_layers (not the other" in caplog.text
    assert not precond.engine.blocks
    precond.remove_hooks()
    for skip, kfac, outside in (("out", "emb", True), ("emb", "out", False)):
        torch.manual_seed(0)
        model = TiedLM().double()
        caplog.clear()
        with caplog.at_level("WARNING", logger="hpckfac"):
            precond = KFACPreconditioner(model, skip_layers=[skip], comm=comm)
            assert [block.name for block in precond.engine.blocks] == [kfac]
            nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.roll(1, 1).reshape(-1)).backward()
            precond.step()
        assert ("get gradient the layers' own calls cannot give" in caplog.text) is outside, skip
        precond.remove_hooks()
    # Two embeddings sharing one table: no layer of another kind to keep, so the remedy is the
    # general one, not to skip both.
    pair = nn.ModuleDict({"src": nn.Embedding(11, 6), "tgt": nn.Embedding(11, 6)})
    pair["tgt"].weight = pair["src"].weight
    caplog.clear()
    with caplog.at_level("WARNING", logger="hpckfac"):
        KFACPreconditioner(pair, comm=comm).remove_hooks()
    assert "to precondition it by one layer's curvature, put the others in skip_layers" in caplog.text
    assert "(not the other" not in caplog.text


def test_a_kfac_layer_replaced_by_a_new_module_is_averaged_and_named(caplog):
    """A K-FAC layer swapped for a new module under the same name (a new head) has no hooks or
    block: its parameters are averaged first-order and named in the warning, although the
    model had parameters of those names at construction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    model[2] = nn.Linear(5, 3).double()
    assert [id(p) for p in precond.other_params] == [id(p) for p in model[2].parameters()]
    model(torch.randn(6, 4, dtype=torch.float64)).pow(2).mean().backward()
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.step()
    assert "averaged first-order, not preconditioned: 2.weight, 2.bias" in caplog.text


@pytest.mark.parametrize("change", ["none", "tensor", "parametrization"])
def test_a_kfac_weight_no_longer_a_parameter_is_named(change):
    """A K-FAC layer's weight set to None, replaced by a plain tensor or parametrized after
    construction: step() names the layer (an AttributeError from the gradient copy before)."""
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    if change == "none":
        model[2].weight = None
        model = model[:2]
    elif change == "tensor":
        weight = model[2].weight.detach().clone().requires_grad_()
        del model[2].weight
        model[2].weight = weight
    else:
        parametrize.register_parametrization(model[2], "weight", nn.Tanh())
    model(torch.randn(6, 4, dtype=torch.float64)).pow(2).mean().backward()
    with pytest.raises(ValueError, match="K-FAC layer 2 no longer has every parameter its block covers"):
        precond.step()


def resizable(kind):
    """A Linear or Conv2d K-FAC layer ``0`` before a Linear head, and an input for it."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), torch.randn(6, 5).double()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    return model, torch.randn(6, 3, 7, 7).double()


def resize(model, kind, how):
    """Layer 0 of ``resizable(kind)`` given other shapes (the head follows where the output changes)."""
    layer, head = model[0], model[-1]
    weight = (6, 5) if kind == "linear" else (4, 3, 2, 2)  # more outputs; a smaller kernel
    if how == "parameter":
        layer.weight = nn.Parameter(torch.randn(weight, dtype=torch.float64))
    else:
        layer.weight.data = torch.randn(weight, dtype=torch.float64)
    if kind == "linear":
        layer.bias.data = torch.zeros(6, dtype=torch.float64)
        head.weight = nn.Parameter(torch.randn(3, 6, dtype=torch.float64))


@pytest.mark.parametrize("how", ["parameter", "data"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_a_kfac_layer_resized_after_construction_is_named_by_step(comm, kind, how):
    """A K-FAC layer given other shapes after construction (a new Parameter or ``.data``) has a
    block of the old ones: step() raises ValueError naming the layer and both shapes, at a step
    whose hooks took nothing, before any gradient is read (a shape error deep in the gradient
    copy, or for a smaller kernel statistics of the wrong patches, before)."""
    model, x = resizable(kind)
    precond = KFACPreconditioner(model, comm=comm, factor_update_interval=2)
    model(x).pow(2).mean().backward()
    precond.step()
    resize(model, kind, how)
    model.zero_grad()
    model(x).pow(2).mean().backward()  # not a factor step: no hook looks at the shapes
    old, new = ("(4, 5)", "(6, 5)") if kind == "linear" else ("(4, 3, 3, 3)", "(4, 3, 2, 2)")
    kind_name = "Linear" if kind == "linear" else "Conv2d"
    with pytest.raises(ValueError, match=rf"^model: K-FAC layer 0 \({kind_name}\) was resized after the "
                                         rf"preconditioner was built: weight has shape {re.escape(new)}, its block "
                                         rf"was built for {re.escape(old)}"):
        precond.step()


def test_a_kfac_layer_resized_after_construction_is_named_by_its_hook(comm):
    """At a factor step the hooks meet the resized layer's tensors first: the block's shape
    error comes as ValueError naming the layer and both shapes, raised in backward."""
    model, x = resizable("linear")
    precond = KFACPreconditioner(model, comm=comm)
    model(x).pow(2).mean().backward()
    precond.step()
    model[2].weight = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))  # a head of 5 outputs, not 3
    model[2].bias = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"K-FAC layer 2 \(Linear\) was resized .*: weight has shape \(5, 4\), "
                                         r"its block was built for \(3, 4\); bias has shape \(5,\), its block "
                                         r"was built for \(3,\)") as info:
        model(x).pow(2).mean().backward()
    assert "expects 3 features" in str(info.value.__cause__)  # the block's own error, kept as the cause


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_a_model_moved_after_construction_is_named(comm, device):
    """A model moved to another device after the preconditioner was built for it (``meta``
    stands in for a GPU where none exists): the hooks of a factor step, and step() at a step
    without statistics, raise ValueError naming both devices and the remedy (torch's "can't
    convert ... to numpy" from deep in the gradient copy, before)."""
    want = rf"^model: its K-FAC layers are on {device}(:0)?, but the KFACPreconditioner was built for them on cpu"
    for factor_step in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        precond = KFACPreconditioner(model, comm=comm, factor_update_interval=2)
        x = torch.randn(6, 5, dtype=torch.float64)
        if not factor_step:
            model(x).pow(2).mean().backward()
            precond.step()  # step 1 takes no statistics
        model.to(device)
        model.zero_grad()
        if factor_step:
            with pytest.raises(ValueError, match=want + r".*after model\.to\(device\)$"):
                model(x.to(device))
        else:
            model(x.to(device)).pow(2).mean().backward()
            with pytest.raises(ValueError, match=want + r".*after model\.to\(device\)$"):
                precond.step()
        precond.remove_hooks()


@pytest.mark.parametrize("index", [2, 4], ids=["middle", "last"])
def test_a_kfac_layer_removed_after_construction_is_named_and_its_block_idles(comm, caplog, index):
    """A K-FAC layer taken out of the model on every rank (a middle one, or the last block's):
    step() goes on, the others preconditioned as before, with one warning naming the layer; its
    block preconditions nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    precond = KFACPreconditioner(model, comm=comm)
    x = torch.randn(6, 5, dtype=torch.float64)
    model(x).pow(2).mean().backward()
    precond.step()
    removed = model[index]
    model[index] = nn.Identity()
    model.zero_grad()
    model(x).pow(2).mean().backward()
    raw = model[0].weight.grad.clone()
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.step()
    assert f"K-FAC layers no longer in the model: {index} (removed, or replaced by a new module" in caplog.text
    assert "without statistics" not in caplog.text  # named once, as gone, not also as a layer not called
    assert removed.weight.grad is None and removed.bias.grad is None
    assert not torch.allclose(model[0].weight.grad, raw)  # still preconditioned


def test_a_kfac_layer_frozen_after_construction_keeps_no_gradient_until_unfrozen(comm):
    """Freezing a K-FAC layer after construction (on every rank) leaves its .grad None at each
    step while frozen; unfrozen, it is preconditioned by its block again."""
    model, x = resizable("linear")
    precond = KFACPreconditioner(model, comm=comm)
    for frozen in (False, True, False):
        model[0].requires_grad_(not frozen)
        model.zero_grad()
        model(x).pow(2).mean().backward()
        raw = None if frozen else model[0].weight.grad.clone()
        precond.step()
        if frozen:
            assert model[0].weight.grad is None and model[0].bias.grad is None
        else:
            assert not torch.allclose(model[0].weight.grad, raw)


def test_weights_loaded_after_construction_stay_preconditioned(comm):
    """``load_state_dict`` after construction copies into the same parameters: they are
    preconditioned as before (the gradient differs from the raw one). A state of other shapes
    is torch's to refuse, ``assign=True`` or not, and leaves the model as it was."""
    model, x = resizable("linear")
    precond = KFACPreconditioner(model, comm=comm)
    model(x).pow(2).mean().backward()
    precond.step()
    model.load_state_dict({k: v + 0.5 for k, v in model.state_dict().items()})
    state = model.state_dict()
    state["2.weight"] = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="size mismatch for 2.weight"):
        model.load_state_dict(state, assign=True)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    raw = model[0].weight.grad.clone()
    precond.step()
    assert not torch.allclose(model[0].weight.grad, raw)


def test_parameters_unfrozen_or_added_after_construction_are_averaged(caplog):
    """step() averages the first-order parameters as they are at that step: a head frozen at
    construction and unfrozen later, and a layer appended afterwards (named in a warning), get
    their gradients written; nothing is preconditioned that was not at construction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[2].requires_grad_(False)
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), skip_layers=["2"])
    model[2].requires_grad_(True)
    model.append(nn.PReLU(3).double())
    assert {id(p) for p in precond.other_params} == {id(p) for p in [*model[2].parameters(), *model[3].parameters()]}
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model(x).pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if name.startswith(("2.", "3."))}
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.step()
    assert "added to the model after the preconditioner was built" in caplog.text and "3.weight" in caplog.text
    for name, p in model.named_parameters():  # one rank: first-order gradients are their own mean
        if name in grads:
            assert torch.equal(p.grad, grads[name]), name
    assert len(precond.modules) == 1


def test_sparse_embeddings_are_refused_up_front(comm):
    """Sparse gradients cannot travel through the dense collectives: refused at construction
    (and by allreduce_gradients) with a message naming the layer, not mid-step."""
    from hpckfac.torch import allreduce_gradients

    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer 0 \(Embedding\) has sparse=True"):
        KFACPreconditioner(model, comm=comm)
    model(torch.randint(0, 10, (3, 5))).sum().backward()
    with pytest.raises(ValueError, match="sparse gradient"):
        allreduce_gradients(model, comm)


def test_complex_parameters_are_refused_at_construction(comm):
    """K-FAC's statistics and buffers are real: a complex K-FAC layer is refused at construction,
    naming it, not by the first forward hook. A complex parameter left first-order would be
    averaged by the collectives, which carry real floating-point gradients only: refused too,
    unless frozen (never averaged)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Complex modules are a new feature")
        layer = nn.Linear(3, 2).to(torch.complex64)
    with pytest.raises(ValueError, match=r"^model: layer 0 \(Linear\) has complex64 parameters; K-FAC layers need "
                                         r"real floating-point parameters"):
        KFACPreconditioner(nn.Sequential(layer, nn.Linear(2, 2)), comm=comm)
    with pytest.raises(ValueError, match=r"^model: layer \(model\) \(Linear\) has complex64"):
        KFACPreconditioner(layer, comm=comm)
    with pytest.raises(ValueError, match=r"^model: trainable complex parameters \(0.weight, 0.bias\) cannot be "
                                         "averaged over ranks"):
        KFACPreconditioner(nn.Sequential(layer, nn.Linear(2, 2)), comm=comm, skip_layers="0")
    layer.requires_grad_(False)
    precond = KFACPreconditioner(nn.Sequential(layer, nn.Linear(2, 2)), comm=comm, skip_layers="0")
    assert len(precond.modules) == 1


def test_float16_statistics_beyond_its_range_are_refused_with_hpckfacs_warning_alone(comm, caplog):
    """Statistics above 65504 overflow a float16 buffer: hpckfac refuses them with its warning,
    and NumPy's RuntimeWarning from the cast does not come besides."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    precond = KFACPreconditioner(model, comm=comm, factor_dtype="float16")
    (1e-6 * model(torch.full((4, 3), 1000.0)).sum()).backward()  # A = 1e6, gradients small
    with warnings.catch_warnings(), caplog.at_level("WARNING", logger="hpckfac"):
        warnings.simplefilter("error")
        precond.step()
    assert "non-finite statistics refused" in caplog.text
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_statistics_refused_in_several_blocks_give_one_warning_naming_them(comm, caplog):
    """A diverged model refuses every block's statistics at every update: one log line per
    update names them all, rather than one line per block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    precond = KFACPreconditioner(model, comm=comm, factor_dtype="float16")
    x = torch.full((4, 3), 1000.0)
    x[:, 1] = torch.randn(4)
    (1e-6 * model(x).sum()).backward()  # both first layers' A (and the next's) overflow float16
    with caplog.at_level("WARNING", logger="hpckfac.stages.owner"):
        precond.step()
    lines = [r.getMessage() for r in caplog.records if "non-finite statistics refused" in r.getMessage()]
    assert len(lines) == 1, lines
    refused = [b.name for b, ok in zip(precond.engine.state.blocks, precond.engine.state.initialized) if not ok]
    assert len(refused) >= 2 and precond.engine.state.refused == len(refused)
    assert f"blocks {', '.join(refused)};" in lines[0] and "running averages keep their old values" in lines[0]


def test_one_rank_averages_nothing_and_keeps_its_gradients(monkeypatch):
    """Over one rank each gradient is its own mean: the gradients stay the same tensors, a
    missing one stays None, and no array view or flag is built (on a GPU, a CuPy view per
    gradient and a device fill per missing one, every step)."""
    import hpckfac.torch.distributed as distributed
    from hpckfac.torch import allreduce_gradients

    monkeypatch.setattr(distributed, "to_array", lambda t: pytest.fail("an array view at one rank"))
    net = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    net["used"](torch.randn(4, 3, dtype=torch.float64)).pow(2).sum().backward()
    grads = [p.grad for p in net["used"].parameters()]
    allreduce_gradients(net, Communicator(MPI.COMM_SELF))
    assert all(p.grad is g for p, g in zip(net["used"].parameters(), grads))
    assert all(p.grad is None for p in net["unused"].parameters())



def test_one_rank_refuses_gradients_the_collectives_cannot_carry():
    """A gradient refused at several ranks (complex: the collectives take real floats) is
    refused at one rank too, so a script tried on one process does not fail only at scale."""
    from hpckfac.torch import allreduce_gradients

    net = nn.Linear(3, 2, dtype=torch.complex64)
    net(torch.randn(4, 3, dtype=torch.complex64)).abs().sum().backward()
    with pytest.raises(TypeError, match="unsupported dtype complex64"):
        allreduce_gradients(net, Communicator(MPI.COMM_SELF))


@needs_amp_grad_scaler
def test_a_grad_scalers_scale_is_read_once_per_step(monkeypatch):
    """``get_scale()`` reads the scale back from the GPU (a wait for its queue) and the scale
    changes only in ``scaler.update()``, after ``step()``: the backward hooks read it once per
    step, not once per layer, and the next step reads the new one. The factors equal those of
    an unscaled run (powers of two: exactly)."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    reads = []
    real = scaler.get_scale
    monkeypatch.setattr(scaler, "get_scale", lambda: reads.append(1) or real())
    plain, scaled = model(), model()
    pre_plain = KFACPreconditioner(plain, comm=Communicator(MPI.COMM_SELF))
    pre_scaled = KFACPreconditioner(scaled, comm=Communicator(MPI.COMM_SELF), grad_scaler=scaler)
    opt = torch.optim.SGD(scaled.parameters(), lr=0.1)
    for step in range(2):
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        plain(x).pow(2).mean().backward()
        scaler.scale(scaled(x).pow(2).mean()).backward()
        scaler.unscale_(opt)
        pre_plain.step()
        pre_scaled.step()
        assert len(reads) == step + 1
        for mine, theirs in zip(pre_scaled.engine.state.running, pre_plain.engine.state.running):
            assert np.array_equal(mine, theirs), step
        scaler.update(new_scale=2.0)


class SharedLayerNorm(nn.Module):
    """One LayerNorm applied to two inputs, each output feeding its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)

    def forward(self, x1, x2):
        return self.ln(x1), self.ln(x2)


def test_each_backward_pass_meets_its_own_calls_input(comm):
    """A layer called twice, each call's output in its own loss, each loss backpropagated on its
    own in call order (the reverse of one backward's): each output gradient is paired with the
    input of its own call, so the unit-wise Fisher equals the sum over calls and examples of the
    per-example gradient products of (gamma, beta), from torch.func."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(5)
    model = SharedLayerNorm().double()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.5, 0.5)
    precond = KFACPreconditioner(model, comm=comm, damping=DAMPING)
    gen = torch.Generator().manual_seed(6)
    x1 = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    x2 = 2 * torch.randn(3, 4, dtype=torch.float64, generator=gen) + 1
    w1, w2 = (torch.randn(3, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    losses = [lambda y, w: (w * torch.tanh(y)).sum(), lambda y, w: (w * y * y).sum()]  # per example
    y1, y2 = model(x1, x2)
    losses[0](y1, w1).div(3).backward()  # the mean over the micro-batch of 3
    losses[1](y2, w2).div(3).backward()
    got = precond.engine.blocks[0].factors(precond.local.result()[0])[0]
    precond.step()

    model.eval()  # the oracle's forwards add no statistics
    params = {k: v.detach() for k, v in model.ln.named_parameters()}
    u = []
    for x, w, loss in ((x1, w1, losses[0]), (x2, w2, losses[1])):
        per = vmap(grad(lambda p, xi, wi: loss(functional_call(model.ln, p, (xi,)), wi)),
                   in_dims=(None, 0, 0))(params, x, w)
        u.append(torch.stack([per["weight"], per["bias"]], -1))  # (examples, units, 2)
    u = torch.cat(u).numpy()
    want = np.einsum("nca,ncb->cab", u, u) / 3  # summed over both calls, per example of the batch
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_a_second_backward_through_one_forward_is_named(comm, caplog):
    """Two losses of one forward backpropagated one after the other (``retain_graph=True``): the
    shared layer's G takes the first backward's output gradient, not the sum the parameters get
    (its outer product cannot be completed once added), and a warning names the layer."""
    torch.manual_seed(2)
    trunk, head1, head2 = nn.Linear(4, 3).double(), nn.Linear(3, 2).double(), nn.Linear(3, 2).double()

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk, self.head1, self.head2 = trunk, head1, head2

        def forward(self, x):
            h = torch.tanh(self.trunk(x))
            return self.head1(h), self.head2(h)

    model = TwoHeads()
    precond = KFACPreconditioner(model, comm=comm, damping=DAMPING)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="hpckfac"):
        out1, out2 = model(x)
        out1.pow(2).sum(1).mean().backward(retain_graph=True)
        (out2 - 1).pow(2).sum(1).mean().backward()
    assert "layer trunk got a second output gradient from one forward" in caplog.text
    got_a, got_g = (f[0] for f in precond.engine.blocks[0].factors(precond.local.result()[0]))  # one group
    model.eval()  # the oracle's forward below adds no statistics
    pre = trunk(x).detach().requires_grad_()
    g1 = torch.autograd.grad(head1(torch.tanh(pre)).pow(2).sum(), pre)[0]  # per-example, first loss
    a = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1)
    np.testing.assert_allclose(got_a, (a.T @ a / 5).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_g, (g1.T @ g1 / 5).numpy(), rtol=1e-12, atol=1e-14)


class Checkpointed(nn.Module):
    """A Linear/LayerNorm/Tanh block run through ``torch.utils.checkpoint`` (``mode``) or plainly."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.block, self.head = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh()), nn.Linear(6, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        if self.mode == "reentrant":
            h = checkpoint(self.block, x, use_reentrant=True)
        elif self.mode == "non_reentrant":
            h = checkpoint(self.block, x, use_reentrant=False, context_fn=checkpoint_context_fn)
        elif self.mode == "bare_non_reentrant":
            h = checkpoint(self.block, x, use_reentrant=False)
        else:
            h = self.block(x)
        return self.head(h)


def checkpointed_run(mode: str, steps: int = 3):
    """Running factors and last gradients of ``Checkpointed(mode)`` after ``steps`` K-FAC steps."""
    torch.manual_seed(0)
    model = Checkpointed(mode).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), inverse_update_interval=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 5, dtype=torch.float64, generator=gen).requires_grad_(mode == "reentrant")
        y = torch.randint(0, 3, (8,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
    return [r.copy() for r in precond.engine.state.running], [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_activation_checkpointing_takes_each_call_once(mode, caplog):
    """Checkpointed layers take the statistics of the plain model, bit for bit: the reentrant
    forward runs without autograd (only its recomputation is seen), the non-reentrant one with
    ``checkpoint_context_fn`` hides its recomputation."""
    with caplog.at_level("WARNING", logger="hpckfac"):
        factors, grads = checkpointed_run(mode)
    want_factors, want_grads = checkpointed_run("plain")
    assert "dropped" not in caplog.text
    for got, want in zip(factors + grads, want_factors + want_grads):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_bare_non_reentrant_checkpoint_drops_its_statistics_and_says_how_to_keep_them(caplog):
    """Without ``checkpoint_context_fn`` the recomputation is a second call without an output
    gradient: the block's statistics are dropped (its factors stay at their start) with a
    warning naming the remedy."""
    with caplog.at_level("WARNING", logger="hpckfac"):
        factors, _ = checkpointed_run("bare_non_reentrant")
    assert "context_fn=hpckfac.torch.checkpoint_context_fn" in caplog.text
    want, _ = checkpointed_run("plain")
    assert not np.allclose(factors[0], want[0])


def test_a_second_backward_through_a_checkpoint_recomputes_again(caplog):
    """``retain_graph=True`` makes a second backward recompute the checkpointed block, entering
    ``checkpoint_context_fn``'s recomputation context again: it still hides the calls (a one-use
    context manager raised AttributeError there); the second gradient is refused with a warning."""
    torch.manual_seed(0)
    model = Checkpointed("non_reentrant").double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    loss = model(torch.randn(8, 5, dtype=torch.float64)).pow(2).sum()
    loss.backward(retain_graph=True)
    first = [r.copy() for r in precond.local._sums]
    with caplog.at_level("WARNING", logger="hpckfac"):
        loss.backward()
    assert "second output gradient" in caplog.text
    assert all(np.array_equal(r, s) for r, s in zip(precond.local._sums, first))
    assert precond.local.unpaired == [] and precond.local.examples == 8


def test_a_checkpoint_of_the_whole_model_counts_one_forward():
    """Checkpointing the model itself recomputes its forward in backward: not a second pass."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(6, 4, dtype=torch.float64)
    checkpoint(model, x, use_reentrant=False, context_fn=checkpoint_context_fn).sum().backward()
    assert precond._forwards == 1 and len(precond.local._passes) == 1 and precond.local.examples == 6


def test_recomputing_hides_every_call_in_its_block():
    """Inside ``recomputing()`` a training forward adds no statistics and counts no examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(6, 4, dtype=torch.float64)
    with recomputing():
        model(x).sum().backward()
    assert precond.local.examples == 0
    model(x).sum().backward()
    assert precond.local.examples == 6


def test_nested_recomputing_blocks_hide_calls_until_the_outer_one_ends():
    """A checkpoint inside a checkpointed block recomputes inside the outer recomputation: the
    inner block's end leaves the calls hidden until the outer one ends."""
    from hpckfac.torch.hooks import recomputing_now

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(5, 4, dtype=torch.float64)
    with recomputing():
        with recomputing():
            assert recomputing_now() == 2
        assert recomputing_now() == 1
        model(x).sum().backward()
    assert recomputing_now() == 0 and precond.local.examples == 0
    model(x).sum().backward()
    assert precond.local.examples == 5


def test_a_step_without_statistics_leaves_a_batch_shared_output_unexpanded():
    """On a factor step a batch-shared layer's ``(1, T)`` output is expanded to the micro-batch
    (so that its output gradient is every example's own); on a step without statistics nothing
    is captured, and the output keeps its one row."""
    torch.manual_seed(0)
    model = PositionsFirst().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), factor_update_interval=2,
                                 inverse_update_interval=2)
    shapes = []  # the output the model goes on with: a hook registered after the preconditioner's sees it
    model.pos.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    ids = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(6).unsqueeze(0)
    for _ in range(2):
        model.zero_grad()
        model(ids, positions).sum().backward()
        precond.step()
    assert shapes == [(5, 6, 4), (1, 6, 4)]


def test_the_input_name_of_a_positional_only_forward_is_none():
    """A layer whose ``forward`` takes its input positionally only cannot be given it by
    keyword: no name is looked up in a call's keywords (nor offered in the error)."""
    from hpckfac.torch.hooks import _input_name

    class PositionalOnly(nn.Linear):
        def forward(self, x, /):
            return super().forward(x)

    assert _input_name(nn.Linear(2, 2)) == "input"
    assert _input_name(PositionalOnly(2, 2)) is None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's import
def test_a_compiled_model_runs_the_hooks_eagerly_and_takes_the_eager_statistics(monkeypatch):
    """Under ``torch.compile`` the hooks run as Python, not traced by dynamo (which recompiled
    for every layer, up to its limit): the factors equal the eager model's."""
    seen = []
    on_input = KFACPreconditioner._on_input
    from torch import _dynamo
    compiling = getattr(torch.compiler, "is_compiling", None) or _dynamo.is_compiling  # torch < 2.3: dynamo's own

    def spy(self, index, a, output):
        seen.append(compiling())
        return on_input(self, index, a, output)

    monkeypatch.setattr(KFACPreconditioner, "_on_input", spy)

    def factors(compiled: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
        run = torch.compile(model) if compiled else model
        x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        run(x).pow(2).mean().backward()
        precond.step()
        return [np.array(r) for r in precond.engine.state.running]

    want = factors(False)
    seen.clear()
    got = factors(True)
    assert seen and not any(seen)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


@pytest.mark.parametrize("tracing", [False, True])
def test_hooks_run_on_a_torch_without_torch_compiler_is_compiling(monkeypatch, tracing):
    """torch 2.1 and 2.2 (setup.py takes torch >= 2.1) have no ``torch.compiler.is_compiling``:
    a hook asks ``torch._utils.is_compiling``, which their dynamo reads as True while it traces,
    and runs as itself outside compilation, through ``torch.compiler.disable`` inside it. (The
    hook is called directly, with that function answering as inside a trace or outside one:
    newer torch's own module calls need the attribute, and its ``torch._utils.is_compiling``
    asks it.)"""
    from hpckfac.torch.hooks import _eager

    monkeypatch.delattr(torch.compiler, "is_compiling", raising=False)
    monkeypatch.setattr(torch._utils, "is_compiling", lambda: tracing)
    disabled = []
    monkeypatch.setattr(torch.compiler, "disable", lambda fn: disabled.append(fn) or fn)
    calls = []

    def body(*args):
        calls.append(args)
        return "out"

    hook = _eager(body)
    assert hook(1, 2) == "out" and calls == [(1, 2)]
    assert disabled == ([body] if tracing else [])


def steps_with_changing_sets(comm, caplog, mark):
    """The preconditioner's noted warnings after each of 12 steps of three Linear layers, where
    ``mark(layer, x)`` is first called on another two of them at each step (``x``: the step's input)."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4) for _ in range(3)]
    model = nn.Sequential(*layers)
    precond = KFACPreconditioner(model, comm=comm)
    warned = []
    with caplog.at_level("WARNING", logger="hpckfac"):
        for step in range(12):
            x = torch.randn(2, 4)
            model.train()  # undoes the last step's eval() marks
            for i in (step % 3, (step + 1) % 3):
                mark(layers[i], x)
            model(x).sum().backward()
            precond.step()
            warned.append(set(precond._warned))
    return warned


def test_layers_dropped_in_changing_sets_are_named_once_each(comm, caplog):
    """Layers whose training calls get no backward, another set at each step (probes of layers
    picked at random), are named once per layer: neither a warning nor a noted key per set."""
    warned = steps_with_changing_sets(comm, caplog, lambda layer, x: layer(x))  # a call no backward reaches
    dropped = [r.getMessage() for r in caplog.records if "dropped at step" in r.getMessage()]
    assert [m.split(" dropped")[0] for m in dropped] == ["K-FAC statistics of 0, 1", "K-FAC statistics of 2"]
    assert warned[-1] == warned[2]


def test_layers_in_eval_mode_in_changing_sets_are_named_once_each(comm, caplog):
    """Layers put in eval() inside a training model, another set at each step, are named once per
    layer: neither a warning nor a noted key per set."""
    warned = steps_with_changing_sets(comm, caplog, lambda layer, x: layer.eval())
    named = [r.getMessage() for r in caplog.records if "in eval() mode" in r.getMessage()]
    assert [m.split(";")[0] for m in named] == ["K-FAC layers in eval() mode at step 0: 0, 1",
                                                "K-FAC layers in eval() mode at step 1: 2"]
    assert warned[-1] == warned[2]


def test_a_layer_in_eval_mode_inside_a_training_model_is_named_as_such(caplog):
    """A BatchNorm put in eval() while the rest trains (fine-tuning) takes no statistics: the
    warning says eval() mode, not that the layer was not called; without a KL clip its gradient
    is the plain one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 3)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), kl_clip=None)  # no rescaling
    model.train()
    model[1].eval()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model[1].parameters()]
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.step()
    assert "K-FAC layers in eval() mode at step 0: 1;" in caplog.text
    assert "not called" not in caplog.text
    for got, want in zip(model[1].parameters(), plain):
        torch.testing.assert_close(got.grad, want, rtol=0, atol=0)


class Unreached(nn.Module):
    """Three K-FAC layers, of which ``forward`` never calls ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.a(x)))


def test_the_eval_mode_warning_names_only_the_layers_in_eval_mode(caplog):
    """A layer in eval() beside one in train() mode that the forward never reaches: both lack
    statistics, and the eval() warning names only the one in eval() mode."""
    torch.manual_seed(0)
    model = Unreached().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    model.a.eval()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.step()
    named = [r.getMessage().split(";")[0] for r in caplog.records if "in eval() mode at step" in r.getMessage()]
    assert named == ["K-FAC layers in eval() mode at step 0: a"], caplog.text


@pytest.mark.parametrize("steps", [1, 2])
def test_forwards_per_step_other_than_accumulation_steps_are_named(steps, caplog):
    """Two micro-batches before one ``step()``, each loss divided by 2: only with
    ``accumulation_steps=2`` is G that of the whole batch; with 1 it is a quarter of it, and a
    warning names the setting."""
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3))
    model = mlp()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), accumulation_steps=steps)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for half in (slice(0, 3), slice(3, 6)):
            (nn.functional.cross_entropy(model(x[half]), y[half]) / 2).backward()
        precond.step()
    assert ("set accumulation_steps to it" in caplog.text) == (steps == 1)


def test_an_uneven_last_group_of_micro_batches_is_not_named(caplog):
    """Three micro-batches per step, then an epoch's last step of one, each loss divided by
    ``accumulation_steps=3`` (torch's recipe): no warning, where three forwards at first with
    ``accumulation_steps=4`` get one."""
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(3))
    for steps, groups in ((3, (3, 1)), (4, (3,))):
        caplog.clear()
        model = mlp()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), accumulation_steps=steps)
        with caplog.at_level("WARNING", logger="hpckfac"):
            for forwards in groups:
                for _ in range(forwards):
                    (nn.functional.cross_entropy(model(x), y) / steps).backward()
                precond.step()
        assert ("set accumulation_steps to it" in caplog.text) == (steps == 4)


@pytest.mark.parametrize("wrong", [lambda m: m.parameters(), lambda m: list(m.parameters()),
                                   lambda m: m.state_dict(), lambda m: [m]])
def test_anything_but_a_module_as_model_raises_type_error_naming_model(comm, wrong):
    """What an optimizer takes (model.parameters(), a list of tensors) or a state_dict, passed
    where the model goes, is refused with one line naming `model` by every entry point that
    takes one, before anything is communicated; check_replicas at one rank included, which
    would otherwise compare nothing and pass."""
    from hpckfac.torch import allreduce_gradients, broadcast_parameters, check_replicas, sync_batchnorm_stats

    model = mlp()
    calls = [lambda m: KFACPreconditioner(m, comm=comm), lambda m: broadcast_parameters(m, comm),
             lambda m: allreduce_gradients(m, comm), lambda m: sync_batchnorm_stats(m, comm),
             lambda m: check_replicas(m, comm)]
    for call in calls:
        with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got \w+ \(pass the model "
                                            r"itself, not model.parameters\(\) or its state_dict\(\)\)$"):
            call(wrong(model))
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got int$"):
        KFACPreconditioner(3, comm=comm)


def test_the_coverage_table_aligns_the_model_row():
    """A parameter held by the model itself is listed as `(model)`; the name column is wide
    enough for it, so every status starts in the same column."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.offset = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return self.fc(x) + self.offset

    rows = repr(KFACPreconditioner(Model(), comm=Communicator(MPI.COMM_SELF))).splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["(model)", "fc"]
    assert len({row.index("first-order") if "first-order" in row else row.index("K-FAC") for row in rows}) == 1


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, "0.01", True])
def test_a_bad_kl_clip_names_the_ways_to_switch_it_off(comm, value):
    """kl_clip takes None or 0 for no clip besides a number > 0: the message says so."""
    with pytest.raises(ValueError, match=r"^kl_clip: expected a finite real number > 0, or None or 0 for no clip, "
                                         rf"got {re.escape(repr(value))}$"):
        KFACPreconditioner(mlp(), comm=comm, kl_clip=value)
    for off in (None, 0, 0.0, np.float32(0)):
        assert KFACPreconditioner(mlp(), comm=comm, kl_clip=off).engine.kl_clip is None



class SharedLinearChain(nn.Module):
    """One nn.Linear applied twice in a chain, as an unrolled recurrence shares its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def pre_activations(self, x):
        s1 = self.shared(torch.tanh(self.inp(x)))
        s2 = self.shared(torch.tanh(s1))
        return s1, s2

    def forward(self, x):
        return self.out(torch.tanh(self.pre_activations(x)[1]))


def test_a_linear_called_twice_in_one_forward_sums_both_calls(comm):
    """One backward through both calls of a shared nn.Linear: its A and G are the sums over the
    two calls of each call's own input and per-example output-gradient products, divided by the
    batch, against inputs and output gradients captured here by torch's autograd alone (float64)."""
    torch.manual_seed(7)
    model = SharedLinearChain().double()
    precond = KFACPreconditioner(model, comm=comm)
    gen = torch.Generator().manual_seed(8)
    batch = 5
    x = torch.randn(batch, 3, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (batch,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    index = [b.name for b in precond.engine.blocks].index("shared")
    a_got, g_got = precond.engine.blocks[index].factors(precond.local.result()[index])
    precond.step()

    model.eval()  # the oracle's forward adds no statistics
    s1, s2 = model.pre_activations(x)
    s1.retain_grad()
    s2.retain_grad()
    nn.functional.cross_entropy(model.out(torch.tanh(s2)), y).backward()
    ones = torch.ones(batch, 1, dtype=torch.float64)
    rows = [torch.cat([torch.tanh(model.inp(x)), ones], 1).detach(), torch.cat([torch.tanh(s1), ones], 1).detach()]
    grads = [s1.grad * batch, s2.grad * batch]  # per example: the mean loss's gradient times the batch
    a_want = sum(r.T @ r for r in rows) / batch
    g_want = sum(g.T @ g for g in grads) / batch
    np.testing.assert_allclose(a_got[0], a_want.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_got[0], g_want.numpy(), rtol=1e-12, atol=1e-14)


def test_a_deep_copy_of_the_model_is_not_seen_and_pickles_without_the_preconditioner(tmp_path):
    """``copy.deepcopy(model)`` after construction (``AveragedModel``, an EMA or best-so-far copy)
    copies the hooks with the modules: it works, and the copy's training forwards and backwards
    leave the preconditioned model's steps as they are without it, bit for bit; ``torch.save``
    of the whole model loads as a plain model."""
    def train(with_copy: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 5 * 5, 4)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), inverse_update_interval=2)
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)) if with_copy else None
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
            y = torch.randint(0, 4, (6,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if ema is not None:  # a training forward and backward of the copy between backward and step()
                ema.module(x).sum().backward()
            precond.step()
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
        return model, precond, ema

    model, precond, ema = train(True)
    plain, _, _ = train(False)
    for got, want in zip(model.parameters(), plain.parameters()):
        assert torch.equal(got, want)
    assert ema.module[0].weight.grad is not None  # the copy computed its own gradients, unchanged by step()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    examples = precond.local.examples
    loaded(torch.randn(6, 2, 5, 5, dtype=torch.float64)).sum().backward()
    assert precond.local.examples == examples and precond.steps == 3


def test_layers_skipped_at_random_are_named_once_each(comm, caplog):
    """A model that skips layers at random (LayerDrop) misses another set of layers at nearly
    every step: each missing layer is named once, in the first step it misses, not once per set."""
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
    gen = torch.Generator().manual_seed(3)

    class LayerDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            for layer in self.layers:
                if torch.rand((), generator=gen) < 0.5:
                    x = x + layer(x)
            return x

    model = LayerDrop().double()
    precond = KFACPreconditioner(model, comm=comm)
    with caplog.at_level("WARNING", logger="hpckfac"):
        for _ in range(12):
            model(torch.randn(3, 4, dtype=torch.float64)).square().sum().backward()
            precond.step()
            model.zero_grad()
    named = [line.split(": ", 1)[1].split(" (")[0].split(", ")
             for line in caplog.text.splitlines() if "without statistics" in line]
    flat = [name for names in named for name in names]
    assert len(flat) == len(set(flat)), f"a layer named twice: {named}"
    assert len(flat) >= 3  # this draw skips most layers at least once


class _Projections(nn.Module):
    """Three projections of one hidden state (query, key, value), then one of a copy of it."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(5, 4), nn.Linear(5, 3), nn.Linear(5, 4, bias=False), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(x)
        return torch.cat([self.q(h), self.k(h), self.v(h), self.o(h.clone())], dim=-1)


def test_projections_of_one_input_take_each_its_own_a():
    """The A part one projection's call shares with the next of the same input (LocalStatistics'
    source) is each layer's own: against the float64 oracle sum_t [h, 1]^T [h, 1] / B."""
    torch.manual_seed(0)
    model = _Projections().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    model(x).square().sum().backward()
    h = torch.tanh(x).reshape(-1, 5).numpy()
    with_ones = np.hstack([h, np.ones((len(h), 1))])
    for block, stats in zip(precond.engine.blocks, precond.local.result()):
        rows = with_ones if block.has_bias else h
        got = stats[:block.d_A * (block.d_A + 1) // 2]
        want = (rows.T @ rows / 6)[np.triu_indices(block.d_A)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


class _ChangedInPlace(nn.Module):
    """Two projections of one tensor, changed in place between them (its version moves on); the
    output is the second's (the first saved the tensor for a backward that the change spoiled)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(5, 4), nn.Linear(5, 3)

    def forward(self, x):
        h = x.clone()
        self.q(h)
        h.mul_(3.0).add_(1.0)
        return self.k(h)


def test_a_projection_of_an_input_changed_in_place_takes_the_changed_values():
    """The second projection's A is that of the tensor as changed in place, not the part the
    first projection took of the same tensor: against the float64 oracle of its changed rows."""
    torch.manual_seed(1)
    model = _ChangedInPlace().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    model(x).square().sum().backward()
    rows = np.hstack([(x * 3.0 + 1.0).reshape(-1, 5).numpy(), np.ones((42, 1))])
    block = precond.engine.blocks[1]
    assert block.name == "k"
    got = precond.local.result()[1][:block.d_A * (block.d_A + 1) // 2]
    np.testing.assert_allclose(got, (rows.T @ rows / 6)[np.triu_indices(block.d_A)], rtol=1e-12, atol=1e-14)


def test_a_linear_on_a_buffer_refilled_between_micro_batches_takes_each_ones_a():
    """A tensor viewing a NumPy buffer refilled between accumulated micro-batches keeps its version:
    the second pass's call takes the new rows' A, not the part the first pass's call took of the
    same tensor (float64 oracle of both passes' rows over their 12 examples)."""
    torch.manual_seed(2)
    model = nn.Linear(5, 3).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), accumulation_steps=2)
    rng = np.random.default_rng(3)
    buffer = np.empty((6, 5))
    x = torch.from_numpy(buffer)
    rows = []
    for _ in range(2):
        buffer[...] = rng.standard_normal(buffer.shape)
        rows.append(np.hstack([buffer, np.ones((6, 1))]))
        model(x).square().sum().backward()
    rows = np.vstack(rows)
    got = precond.local.result()[0][:21]
    np.testing.assert_allclose(got, (rows.T @ rows / 12)[np.triu_indices(6)], rtol=1e-12, atol=1e-14)


class _TwoProjections(nn.Module):
    """Two projections of the model's input itself (as query and key)."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(5, 4), nn.Linear(5, 3)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x)], dim=-1)


def test_projections_of_an_inference_tensor_with_their_biases_trained_take_its_a():
    """An input made under inference_mode keeps no version, which sharing A parts reads: with only
    the biases trained (BitFit; autograd saves no input then) both projections take the input's A
    of the float64 oracle instead of failing on the missing version."""
    torch.manual_seed(3)
    model = _TwoProjections().double()
    for layer in (model.q, model.k):
        layer.weight.requires_grad_(False)
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    with torch.inference_mode():
        x = torch.randn(6, 7, 5, dtype=torch.float64)
    model(x).square().sum().backward()
    rows = np.hstack([x.reshape(-1, 5).numpy(), np.ones((42, 1))])
    for stats in precond.local.result():
        np.testing.assert_allclose(stats[:21], (rows.T @ rows / 6)[np.triu_indices(6)], rtol=1e-12, atol=1e-14)


def test_the_input_a_shared_part_came_from_is_not_kept_past_step():
    """The tensor whose A part the next projection may share is dropped by step(): the caller's
    input is freed when the caller lets it go, not held until the next forward."""
    model = _TwoProjections().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    x = torch.randn(6, 7, 5, dtype=torch.float64)
    model(x).square().sum().backward()
    precond.step()
    taken = weakref.ref(x)
    del x
    assert taken() is None


def test_a_forward_never_backpropagated_frees_its_activations_when_dropped():
    """A training forward whose loss is left out of backward (a micro-batch's NaN loss) frees its
    graph and the activations it saved once the caller drops its output, as without a
    preconditioner: the input whose A part the next projection may share is not kept for that."""
    model = _TwoProjections().double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    h = torch.tanh(torch.randn(6, 7, 5, dtype=torch.float64, requires_grad=True))
    taken = weakref.ref(h)
    out = model(h)
    del h, out
    assert taken() is None
    precond.remove_hooks()
