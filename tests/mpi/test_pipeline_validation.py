"""A rank with a different model or different options fails on every rank, fast."""
import copy
import re
import time

import pytest
import torch
from torch import nn

from mpi4py import MPI

from hpckfac.comm import CollectiveMismatchError, Communicator
from hpckfac.torch import KFACPreconditioner
from hpckfac.torch.structure import StructureAgreement
from liveness import LIVENESS_S
from torch_features import needs_amp_grad_scaler


def model(last_out):
    torch.manual_seed(0)  # the same weights on every rank, whatever earlier tests drew
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, last_out))


@pytest.mark.mpi
def test_mismatched_model_fails_on_every_rank(comm):
    odd = comm.rank == comm.size - 1 and comm.size > 1
    start = time.perf_counter()
    if comm.size == 1:  # nobody to disagree with
        KFACPreconditioner(model(3), comm=comm).remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError, match="'2'"):
        KFACPreconditioner(model(2 if odd else 3), comm=comm)
    assert time.perf_counter() - start < LIVENESS_S


@pytest.mark.mpi
@pytest.mark.parametrize("option,usual,other", [("factor_update_interval", 1, 2), ("damping", 1e-2, 2e-2),
                                                ("kl_clip", 1e-2, None), ("statistics_fraction", 1.0, 0.5)])
def test_mismatched_options_fail_on_every_rank(comm, option, usual, other):
    """Every option but the learning rate is compared at construction, before any step."""
    value = other if comm.rank == comm.size - 1 and comm.size > 1 else usual
    if comm.size == 1:
        KFACPreconditioner(model(3), comm=comm, **{option: value}).remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError, match=f"option {option}"):
        KFACPreconditioner(model(3), comm=comm, **{option: value})


@pytest.mark.mpi
@pytest.mark.parametrize("odd", ["bfloat16 model", pytest.param("grad scaler", marks=needs_amp_grad_scaler)])
def test_a_rank_with_another_dtype_or_scaler_fails_on_every_rank(comm, odd):
    """Shapes alike, but one rank's model is bfloat16, or one rank undoes a GradScaler's scale:
    its factors would differ from the others', so construction fails on every rank."""
    import torch

    last = comm.rank == comm.size - 1 and comm.size > 1
    net = model(3).to(torch.bfloat16) if last and odd == "bfloat16 model" else model(3)
    scaler = torch.amp.GradScaler("cpu", enabled=True) if last and odd == "grad scaler" else None
    if comm.size == 1:
        KFACPreconditioner(net, comm=comm, grad_scaler=scaler).remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError, match="bfloat16" if odd == "bfloat16 model" else "grad_scaler"):
        KFACPreconditioner(net, comm=comm, grad_scaler=scaler)


@pytest.mark.mpi
@pytest.mark.parametrize("option", ["lr", "damping", "kl_clip", "inverse_update_interval", "accumulation_steps",
                                    "statistics_fraction", "training mode",
                                    "K-FAC layers not in the model's mode"])
@pytest.mark.parametrize("when", ["from the start", "from step 2"])
def test_a_rank_with_other_step_settings_fails_on_every_rank(comm, when, option):
    """Different learning rates, damping, KL clips, intervals, accumulation, statistics samples,
    or a model or one of its K-FAC layers in eval() on one rank would make
    replicas drift: every rank raises instead, whether a schedule differs or an attribute is
    changed on one rank."""
    import torch

    odd = comm.rank == comm.size - 1 and comm.size > 1
    start = 0 if when == "from the start" else 2
    lr = (lambda k: 0.1 * (2 if odd and k >= start else 1)) if option == "lr" else 0.1  # noqa: E731
    net = model(3)
    precond = KFACPreconditioner(net, comm=comm, lr=lr)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    for step in range(4):
        net(x).pow(2).mean().backward()
        if odd and step == start:
            if option in ("damping", "kl_clip", "inverse_update_interval"):
                setattr(precond.engine, option, 2 * getattr(precond.engine, option))
            elif option in ("accumulation_steps", "statistics_fraction"):
                setattr(precond, option, {"accumulation_steps": 2, "statistics_fraction": 0.5}[option])
            elif option == "training mode":
                net.eval()
            else:  # a K-FAC layer alone (a BatchNorm frozen for fine-tuning) takes no statistics there
                net[0].eval()
        if comm.size > 1 and step == start:
            # The rank whose setting changed names it; when every rank compares, all do; the
            # others name the comparison they were not part of.
            pattern = f"{option}: rank 0 has|changed on rank {comm.rank}: .*{option}" if odd else \
                f"{option}: rank 0 has|check_same.* on ranks"
            with pytest.raises(CollectiveMismatchError, match=pattern):
                precond.step()
            return
        precond.step()


@pytest.mark.mpi
@pytest.mark.parametrize("inverse", [False, True])
def test_a_factor_interval_set_on_one_rank_only_is_named(comm, inverse):
    """A factor_update_interval changed on one rank makes that rank's step take no statistics
    while the others' do: the steps' first collective differs in length before the settings are
    compared. Every rank raises; the changed rank names the interval and its change (and the
    inverse interval's, changed with it). One rank, with nobody to disagree with, takes the new
    interval: step 2 then takes no statistics and leaves the running factors as they were."""
    odd = comm.rank == comm.size - 1
    net = model(3)
    precond = KFACPreconditioner(net, comm=comm, factor_update_interval=1, inverse_update_interval=2)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    for step in range(3):
        net(x).pow(2).mean().backward()
        if step == 2:
            if odd:
                precond.factor_update_interval = 3  # step 2 takes no statistics here
                if inverse:
                    precond.inverse_update_interval = 6
            if comm.size == 1:
                before = {k: b["factors"].clone() for k, b in precond.state_dict()["blocks"].items()}
                precond.step()
                after = precond.state_dict()["blocks"]
                assert all(torch.equal(factors, after[name]["factors"]) for name, factors in before.items())
                return
            pattern = f"changed on rank {comm.rank}: factor_update_interval 1 -> 3"
            pattern = (pattern + (", inverse_update_interval 2 -> 6$" if inverse else "$")) if odd else "allreduce_many"
            with pytest.raises(CollectiveMismatchError, match=pattern):
                precond.step()
            return
        precond.step()


@pytest.mark.mpi
def test_a_state_loaded_on_one_rank_only_fails_on_every_rank_naming_the_load(comm):
    """A state of step 0 loaded on one rank after step 0 (factor_update_interval 2): that rank
    takes statistics at its step while the others do not, so the step's first collective differs
    in length before any settings are compared. Every rank raises the mismatch: the loaded rank
    names its load, the others, whose intervals are unchanged, name no change of theirs."""
    if comm.size == 1:  # nobody to disagree with
        return
    net = model(3)
    precond = KFACPreconditioner(net, comm=comm, factor_update_interval=2, inverse_update_interval=2)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    state = copy.deepcopy(precond.state_dict())
    net(x).pow(2).mean().backward()
    precond.step()
    if comm.rank == comm.size - 1:
        precond.load_state_dict(state)
    net(x).pow(2).mean().backward()
    with pytest.raises(CollectiveMismatchError) as raised:
        precond.step()
    message = str(raised.value)
    assert "changed on rank" not in message
    loaded = f"a state loaded on rank {comm.rank} since the ranks last agreed? load_state_dict() must run on every rank"
    assert (loaded in message) == (comm.rank == comm.size - 1), message


class Surgical(nn.Module):
    """Three K-FAC layers by name: ``a``, ``b`` (4 to 4: removable) and the head ``c``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def operate(net, change):
    """``change`` made to a ``Surgical`` after its preconditioner was built; returns the words
    the structure check names it by."""
    torch.manual_seed(1)
    if change == "removed":
        net.b = nn.Identity()
        return r"no parameter b\.weight \(K-FAC layer b\)"
    if change == "replaced":
        net.b = nn.Linear(4, 4)
        return r"b\.weight in a new module, not K-FAC layer b's"
    if change == "added":
        net.extra = nn.Linear(3, 3)
        return r"an extra parameter extra\.weight of shape \(3, 3\)"
    if change == "frozen":
        net.a.weight.requires_grad_(False)
        return r"a\.weight frozen"
    net.c.weight = nn.Parameter(torch.randn(2, 4))  # resized: two outputs, not three
    net.c.bias = nn.Parameter(torch.randn(2))
    return r"c\.weight of shape \(2, 4\), not \(3, 4\)"


@pytest.mark.mpi
@pytest.mark.parametrize("change", ["removed", "replaced", "added", "frozen", "resized"])
def test_a_model_changed_on_one_rank_only_fails_on_every_rank(comm, change):
    """The last rank changes its model between steps: a K-FAC layer removed, replaced by a new
    module or resized, a layer added, or a parameter frozen. step() compares every rank's
    structure before reducing anything, so every rank, those that changed nothing included,
    raises CollectiveMismatchError naming the rank and the change (where the replicas would have
    trained apart, or the collectives disagreed on lengths); the ranks stay in step, for the
    next test. Alone, the rank goes on, a resized layer named in a ValueError."""
    net = Surgical()
    precond = KFACPreconditioner(net, comm=comm, factor_update_interval=2)  # step 1: no hook looks
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    net(x).pow(2).mean().backward()
    precond.step()
    last = comm.rank == comm.size - 1
    named = operate(net, change) if last else None
    net.zero_grad()
    net(x).pow(2).mean().backward()
    start = time.perf_counter()
    if comm.size == 1:
        if change == "resized":
            with pytest.raises(ValueError, match=r"K-FAC layer c \(Linear\) was resized"):
                precond.step()
        else:
            precond.step()
        precond.remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError) as info:
        precond.step()
    message = str(info.value)
    named = comm.allgather_object(named)[-1]  # what the last rank did, checked on every rank
    others = list(range(comm.size - 1))
    assert re.search(rf"ranks disagree on the model's structure at step 1: rank {comm.size - 1} has {named}", message)
    assert f", against ranks {others}, whose model every rank had at the last step(); every rank must" in message
    assert comm.allgather_object(message) == [message] * comm.size
    assert time.perf_counter() - start < LIVENESS_S
    precond.remove_hooks()


@pytest.mark.mpi
@pytest.mark.parametrize("first", ["trained", "frozen with a kept .grad"])
def test_a_second_step_on_one_rank_only_fails_on_every_rank(comm, first):
    """The last rank calls step() twice for one backward. Its extra step() meets the others' next
    one, whose collectives have the same lengths: each rank's optimizer would then apply another
    step's gradient and the replicas train apart without an error. Its step() finds the .grad its
    last one wrote untouched, which travels with the structure's digest, so every rank raises
    CollectiveMismatchError naming that rank, at that step. Alone, the second step() is a warning.
    A first K-FAC layer frozen with a .grad kept from before (a warm start) is passed over: the
    .grad followed is the first trained layer's."""
    net = model(3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    if first != "trained":
        net(x).pow(2).mean().backward()
        net[0].requires_grad_(False)
        net[2].zero_grad()
    precond = KFACPreconditioner(net, comm=comm)
    net(x).pow(2).mean().backward()
    precond.step()
    last = comm.rank == comm.size - 1
    if not last:
        net.zero_grad()
        net(x).pow(2).mean().backward()
    start = time.perf_counter()
    if comm.size == 1:
        precond.step()
        precond.remove_hooks()
        return
    with pytest.raises(CollectiveMismatchError) as info:
        precond.step()
    message = str(info.value)
    assert message.startswith(f"ranks disagree on the step at step 1: ranks [{comm.size - 1}] call step() again "
                              f"on the .grad their last step() wrote, with no training forward and backward since, "
                              f"while ranks {list(range(comm.size - 1))} have new gradients")
    assert comm.allgather_object(message) == [message] * comm.size
    assert time.perf_counter() - start < LIVENESS_S
    precond.remove_hooks()


@pytest.mark.mpi
@pytest.mark.parametrize("zeroing", ["to None", "to zeros", "through .data"])
def test_a_rank_that_zeroes_its_gradients_and_skips_its_backward_steps_with_the_others(comm, zeroing):
    """An empty shard: the last rank zeroes its gradients (to None, to zeros, or as older loops
    do, ``p.grad.data.zero_()``, whose ``.data`` has a version counter of its own, so the .grad the
    last step() wrote keeps its version) and runs no forward before its step(). That is no second
    step() for one backward: every rank steps, and the gradients are the others' share."""
    net = model(3)
    precond = KFACPreconditioner(net, comm=comm)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    net(x).pow(2).mean().backward()
    precond.step()
    if zeroing == "through .data":
        for p in net.parameters():
            p.grad.data.zero_()
    else:
        net.zero_grad(set_to_none=zeroing == "to None")
    if comm.rank != comm.size - 1 or comm.size == 1:
        net(x).pow(2).mean().backward()
    precond.step()
    grads = [p.grad.clone() for p in net.parameters()]
    for mine, first in zip(grads, comm.allgather_object(grads)[0]):
        torch.testing.assert_close(mine, first, rtol=0, atol=0)
    precond.remove_hooks()


@pytest.mark.mpi
def test_a_rank_that_skips_its_backward_under_a_frozen_first_layer_with_a_kept_grad_steps_with_the_others(comm):
    """A warm start froze the first layer after a backward, its .grad kept (the optimizer trains
    the other parameters and never zeroes it), and the last rank's shard is empty. That .grad is
    none that step() wrote and stays in place at every step: it tells nothing of a second step(),
    which the first trained K-FAC parameter's .grad does."""
    net = model(3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    net(x).pow(2).mean().backward()
    net[0].requires_grad_(False)
    precond = KFACPreconditioner(net, comm=comm)
    trained = [p for p in net.parameters() if p.requires_grad]
    for p in trained:
        p.grad = None
    net(x).pow(2).mean().backward()
    precond.step()
    for p in trained:
        p.grad = None
    if comm.rank != comm.size - 1 or comm.size == 1:
        net(x).pow(2).mean().backward()
    precond.step()
    grads = [p.grad.clone() for p in trained]
    for mine, first in zip(grads, comm.allgather_object(grads)[0]):
        torch.testing.assert_close(mine, first, rtol=0, atol=0)
    precond.remove_hooks()


@pytest.mark.mpi
def test_ranks_in_eval_mode_that_zero_their_gradients_in_place_or_to_none_step_together(comm):
    """Every rank backpropagates in eval() mode (no training forward, so no statistics) and the
    last rank zeroes its gradients in place while the others set them to None: its backward adds
    to the .grad the last step() wrote, which is then a new gradient, not a second step() for one
    backward. Every rank steps, and each step's .grad is the mean of the ranks' plain gradients
    (nothing inverted yet), computed here from every rank's batch."""
    net = model(3).double().eval()
    precond = KFACPreconditioner(net, comm=comm)
    reference = copy.deepcopy(net)
    batches = [[torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * k + r))
                for r in range(comm.size)] for k in range(3)]
    for k, xs in enumerate(batches):
        net.zero_grad(set_to_none=comm.rank != comm.size - 1)
        net(xs[comm.rank]).pow(2).mean().backward()
        precond.step()
        want = [torch.zeros_like(p) for p in reference.parameters()]
        for x in xs:
            for total, g in zip(want, torch.autograd.grad(reference(x).pow(2).mean(), list(reference.parameters()))):
                total += g / comm.size
        for p, w in zip(net.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)
    precond.remove_hooks()


# (name, shape, requires_grad, K-FAC block or -1) of each parameter, as ``structure`` gives them:
# two K-FAC layers "a" and "b" and a first-order "n".
AGREED = (("a.weight", (3, 2), True, 0), ("a.bias", (3,), True, 0), ("b.weight", (1, 3), True, 1),
          ("b.bias", (1,), True, 1), ("n.weight", (3,), True, -1))


def varied(*changes: tuple[str, int, object]) -> tuple:
    """``AGREED`` with field ``i`` (1: shape, 2: requires_grad, 3: block) of parameter ``name``
    set to ``value``, for each ``(name, i, value)`` of ``changes``."""
    rows = [list(row) for row in AGREED]
    for name, i, value in changes:
        next(row for row in rows if row[0] == name)[i] = value
    return tuple(map(tuple, rows))


@pytest.fixture
def agreement() -> StructureAgreement:
    """The agreement of layers "a" and "b" after a step at which every rank had ``AGREED``."""
    found = StructureAgreement(Communicator(MPI.COMM_SELF), ["a", "b"])
    found.agreed = AGREED
    return found


def test_the_structure_agreed_at_the_last_step_is_the_reference_while_a_rank_has_it(agreement):
    """Two ranks of three froze the same weight: they are the ones named, against the rank that
    still has the structure every rank agreed on, not the rank outside the majority."""
    frozen = varied(("a.weight", 2, False))
    assert agreement.difference([AGREED, frozen, frozen], 3).startswith(
        "ranks disagree on the model's structure at step 3: rank 1 has a.weight frozen; rank 2 has a.weight "
        "frozen, against ranks [0], whose model every rank had at the last step(); every rank must")


def test_without_the_agreed_structure_the_most_common_one_then_the_lowest_rank_is_the_reference(agreement):
    frozen, resized = varied(("a.weight", 2, False)), varied(("b.weight", 1, (2, 3)))
    assert agreement.difference([frozen, resized, resized], 1).startswith(
        "ranks disagree on the model's structure at step 1: rank 0 has a.weight frozen, "
        "b.weight of shape (1, 3), not (2, 3), against ranks [1, 2]; every rank must")
    assert agreement.difference([frozen, resized], 1).startswith(
        "ranks disagree on the model's structure at step 1: rank 1 has a.weight trainable, "
        "b.weight of shape (2, 3), not (1, 3), against ranks [0]; every rank must")


def test_changes_names_a_parameter_moved_to_the_first_layer_and_counts_those_past_four(agreement):
    """Up to four differences are named; past them, how many more (none counted at four)."""
    assert agreement.changes(AGREED, varied(("b.weight", 3, 0))) == "b.weight in K-FAC layer a"
    assert agreement.changes(AGREED, varied(("b.weight", 3, -1))) == "b.weight in a new module, not K-FAC layer b's"
    many = varied(("a.weight", 2, False), ("a.bias", 2, False), ("b.weight", 1, (2, 3)), ("b.bias", 1, (2,)),
                  ("n.weight", 2, False)) + (("x.weight", (2,), True, -1),)
    assert agreement.changes(AGREED, many) == ("a.weight frozen, a.bias frozen, b.weight of shape (2, 3), not (1, 3), "
                                               "b.bias of shape (2,), not (1,) and 2 more differences")
    four = varied(("a.weight", 2, False), ("a.bias", 2, False), ("b.weight", 1, (2, 3)), ("n.weight", 2, False))
    assert agreement.changes(AGREED, four) == ("a.weight frozen, a.bias frozen, b.weight of shape (2, 3), not (1, 3), "
                                               "n.weight frozen")


@pytest.mark.mpi(min_size=3)
def test_models_changed_differently_on_two_ranks_are_both_named(comm):
    """Two ranks change their models, each its own way: the message names both, on every rank,
    against the structure the ranks agreed on at the last step()."""
    net = Surgical()
    precond = KFACPreconditioner(net, comm=comm)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    net(x).pow(2).mean().backward()
    precond.step()
    changes = {1: "frozen", 2: "added"}
    if comm.rank in changes:
        operate(net, changes[comm.rank])
    net.zero_grad()
    net(x).pow(2).mean().backward()
    with pytest.raises(CollectiveMismatchError, match=r"rank 1 has a\.weight frozen; rank 2 has an extra parameter "
                                                      r"extra\.weight of shape \(3, 3\)"):
        precond.step()
    precond.remove_hooks()


@pytest.mark.mpi(min_size=2)
def test_a_preconditioner_built_on_one_rank_only_fails_on_every_rank(comm):
    """Rank 0 builds a second preconditioner while the others go on to step(): both calls
    are named collectives, so every rank raises instead of waiting."""
    import torch

    net = model(3)
    precond = KFACPreconditioner(net, comm=comm)
    net(torch.randn(4, 5)).sum().backward()
    with pytest.raises(CollectiveMismatchError):
        if comm.rank == 0:
            KFACPreconditioner(model(3), comm=comm)
        else:
            precond.step()


@pytest.mark.mpi
@pytest.mark.parametrize("layer", ["kfac", "first-order"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_rank_whose_layer_changes_dtype_fails_on_every_rank(comm, layer, dtype):
    """A layer cast to another dtype on one rank after the first step (the first compares the
    weights' bytes) keeps the shapes the collectives check, and a bfloat16 gradient travels as
    float32 alike: its forward, and the weights its optimizer rounds, would differ from the
    others' without a word. Every rank raises instead, the changed rank naming the dtypes; a
    single rank, with nobody to disagree with, goes on in the new dtype."""
    odd = comm.rank == comm.size - 1
    net = model(3)
    precond = KFACPreconditioner(net, comm=comm, skip_layers=["2"] if layer == "first-order" else [])
    index = 0 if layer == "kfac" else 2
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))
    for step in range(3):
        net.zero_grad()
        net[index + 1:](net[:index + 1](x.to(net[0].weight.dtype)).float()).pow(2).mean().backward()
        if odd and step == 2:
            net[index].to(dtype)  # its gradients too
        if comm.size > 1 and step == 2:
            if layer == "first-order" and dtype == torch.float64:  # the allreduce's layout differs first
                pattern = "ranks disagree on layout"
            else:  # the rank that cast names it; the others, the comparison they were not part of
                pattern = f"changed on rank {comm.rank}: parameter dtypes" if odd else "check_same.* on ranks"
            with pytest.raises(CollectiveMismatchError, match=pattern):
                precond.step()
            return
        precond.step()
    assert [p.grad.dtype for p in net[index].parameters()] == [dtype] * 2


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["lr", "damping", "factor_decay"])
def test_a_schedule_that_cannot_take_the_step_fails_alike_on_every_rank(comm, name):
    """A schedule runs on every rank at the start of step(), before any collective: one whose
    signature could not be read at construction (a functools.lru_cache wrapper) and cannot take
    the step raises the same ValueError, naming the option, on every rank; none waits for the
    others, and with a working value the ranks step on together."""
    import functools

    import numpy as np

    net = model(3)
    precond = KFACPreconditioner(net, comm=comm, **{name: functools.lru_cache(lambda a, b: 0.1)})
    net(torch.randn(4, 5, generator=torch.Generator().manual_seed(comm.rank))).pow(2).mean().backward()
    with pytest.raises(ValueError) as info:
        precond.step()
    assert str(info.value).startswith(f"{name}: a schedule must be a callable(step) -> number")
    assert comm.allgather_object(str(info.value)) == [str(info.value)] * comm.size
    setattr(precond if name == "lr" else precond.engine, name, 0.1)
    precond.step()
    grads = [p.grad.detach().numpy().copy() for p in net.parameters()]
    assert all(np.array_equal(g, o) for theirs in comm.allgather_object(grads) for g, o in zip(grads, theirs))


class MaxNormBag(nn.Module):
    """Token ids averaged by an embedding with ``max_norm``, then a Linear head."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(7, 4, max_norm=1.0), nn.Linear(4, 3)
        self.emb.weight.data *= 3  # rows beyond max_norm: each lookup renormalises them
        self.emb.weight.requires_grad_(not frozen)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


@pytest.mark.mpi
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_an_embedding_with_max_norm_is_refused_over_several_ranks(comm, frozen):
    """Each rank's forward renormalises the rows its own micro-batch looks up, in place: the replicas
    would drift apart (and the first step() blame a forgotten broadcast_parameters). One rank trains."""
    model = MaxNormBag(frozen)
    if comm.size == 1:
        precond = KFACPreconditioner(model, comm=comm)
        tokens = torch.randint(0, 7, (4, 5), generator=torch.Generator().manual_seed(1))
        model(tokens).sum().backward()
        precond.step()
        precond.remove_hooks()
        assert model.emb.weight.norm(dim=1).max() <= 1.0 + 1e-6  # torch renormalised the rows looked up
        return
    with pytest.raises(ValueError, match=r"layer emb \(Embedding\) has max_norm=1\.0: .* use max_norm=None"):
        KFACPreconditioner(model, comm=comm)
