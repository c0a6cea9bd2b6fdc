"""Two preconditioners on one communicator: each step() and state_dict() meets the same
preconditioner's call on every rank. Same-shaped models stepped in another order on one rank
raise CollectiveMismatchError on every rank instead of summing one model's gradients and factors
with the other's."""
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.comm import CollectiveMismatchError
from hpckfac.torch import KFACPreconditioner
from liveness import LIVENESS_S

DAMPING, LR, KL_CLIP = 1e-2, 0.1, 1e-2
N_GLOBAL = 12


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def global_batch(step, seed):
    gen = torch.Generator().manual_seed(100 * step + seed)
    return torch.randn(N_GLOBAL, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N_GLOBAL,), generator=gen)


def shard(comm, x, y):
    """This rank's equal share of the global batch (N_GLOBAL divides by 1, 2, 3 and 4)."""
    part = slice(comm.rank * N_GLOBAL // comm.size, (comm.rank + 1) * N_GLOBAL // comm.size)
    return x[part], y[part]


def oracle_first_step(seed, x, y):
    """The first step's KL-clipped natural gradient of ``make_model(seed)`` on the whole batch,
    per Linear layer as ``[dW | db]``: K-FAC written out in float64 with torch.linalg (A from
    the inputs with a ones column, G from the per-example output gradients, pi-corrected
    Tikhonov damping), independent of hpckfac."""
    model = make_model(seed)
    inputs, outputs = [], []

    def keep(module, args, output):
        inputs.append(args[0].detach())
        output.register_hook(outputs.append)
    for layer in (model[0], model[2]):
        layer.register_forward_hook(keep)
    nn.functional.cross_entropy(model(x), y).backward()
    outputs.reverse()  # the backward meets the last layer first
    n, grads, inner = len(x), [], 0.0
    for layer, a, g in zip((model[0], model[2]), inputs, outputs):
        a = torch.cat([a, torch.ones(n, 1, dtype=a.dtype)], 1)
        g = g * n  # per-example gradients of the mean loss
        big_a, big_g = a.T @ a / n, g.T @ g / n
        pi = math.sqrt((big_a.trace() / len(big_a)) / (big_g.trace() / len(big_g)))
        root = math.sqrt(DAMPING)
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        v = (torch.linalg.inv(big_g + root / pi * torch.eye(len(big_g), dtype=a.dtype)) @ grad
             @ torch.linalg.inv(big_a + pi * root * torch.eye(len(big_a), dtype=a.dtype)))
        grads.append(v)
        inner += float((v * grad).sum())
    nu = min(1.0, math.sqrt(KL_CLIP / (LR * LR * inner)))
    return [nu * v for v in grads]


def build(comm):
    models = [make_model(0), make_model(1)]
    preconds = [KFACPreconditioner(m, comm=comm, lr=LR, damping=DAMPING, kl_clip=KL_CLIP) for m in models]
    return models, preconds


def backward_both(comm, models, step):
    for seed, model in enumerate(models):
        model.zero_grad()
        x, y = shard(comm, *global_batch(step, seed))
        nn.functional.cross_entropy(model(x), y).backward()


def stepped_once(comm):
    """Both models and their preconditioners after a first step taken alike on every rank."""
    models, preconds = build(comm)
    backward_both(comm, models, 0)
    for precond in preconds:
        precond.step()
    return models, preconds


def expect_mismatch(comm, call):
    """``call()`` raises CollectiveMismatchError naming both preconditioners on every rank, promptly."""
    start = time.perf_counter()
    with pytest.raises(CollectiveMismatchError, match=r"the preconditioner \(#1 on ranks .*#2 on ranks"):
        call()
    assert time.perf_counter() - start < LIVENESS_S
    buf = np.full(3, comm.rank + 1.0)  # nothing left in flight: the next collective is right
    np.testing.assert_array_equal(comm.allreduce(buf), np.full(3, comm.size * (comm.size + 1) / 2))


@pytest.mark.mpi
def test_two_preconditioners_each_take_their_own_gradients(comm):
    models, preconds = stepped_once(comm)
    for seed, model in enumerate(models):
        expected = oracle_first_step(seed, *global_batch(0, seed))
        for layer, want in zip((model[0], model[2]), expected):
            got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for precond in preconds:
        precond.remove_hooks()


@pytest.mark.mpi
def test_steps_in_another_order_on_one_rank_raise(comm):
    models, preconds = stepped_once(comm)  # the first step alike everywhere: each model's replicas checked
    backward_both(comm, models, 1)
    order = preconds[::-1] if comm.rank == comm.size - 1 else preconds

    def both():
        for precond in order:
            precond.step()
    if comm.size == 1:
        both()
    else:
        expect_mismatch(comm, both)
    for precond in preconds:
        precond.remove_hooks()


@pytest.mark.mpi
def test_state_dicts_in_another_order_on_one_rank_raise(comm):
    _, preconds = stepped_once(comm)
    mine = preconds[1] if comm.rank == comm.size - 1 else preconds[0]
    if comm.size == 1:
        assert mine.state_dict()["steps"] == 1
    else:
        expect_mismatch(comm, mine.state_dict)
    for precond in preconds:
        precond.remove_hooks()


@pytest.mark.mpi
def test_a_sweep_on_one_on_change_communicator_keeps_no_dropped_preconditioners_calls():
    """``check_agreement="on_change"`` remembers the calls it has seen agreed, numbered by
    preconditioner: one dropped (a sweep's run over) takes its entries along, so the set after
    several runs is the set after one."""
    import gc

    from hpckfac.comm import Communicator

    comm = Communicator(check_agreement="on_change")

    def run(seed):
        model = make_model(seed)
        precond = KFACPreconditioner(model, comm=comm, damping=DAMPING, lr=LR, kl_clip=KL_CLIP)
        x, y = shard(comm, *global_batch(0, seed))
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        precond.state_dict()
        del model, precond
        gc.collect()
        return len(comm._agreed)

    first = run(0)
    assert [run(seed) for seed in range(1, 6)] == [first] * 5


@pytest.mark.mpi
def test_a_dropped_preconditioner_takes_only_its_own_agreed_calls_along():
    """Ranks collect garbage at different times, so a live preconditioner's agreed calls must not
    go with another's: a rank that forgot them would run the agreement check where the others
    skip it. Dropping one of two keeps the other's entries as they were and leaves none of the
    dropped one's number."""
    import gc

    from hpckfac.comm import Communicator

    comm = Communicator(check_agreement="on_change")
    if comm.size == 1:
        pytest.skip("one rank has nothing to agree with")
    models = [make_model(seed) for seed in (0, 1)]
    preconds = [KFACPreconditioner(m, comm=comm, damping=DAMPING, lr=LR, kl_clip=KL_CLIP) for m in models]
    x, y = shard(comm, *global_batch(0, 0))
    for i in (0, 1):
        nn.functional.cross_entropy(models[i](x), y).backward()
        preconds[i].step()
    kept, dropped = (p.engine.instance for p in preconds)
    mine = {sig for sig in comm._agreed if sig.instance == kept}
    assert mine and any(sig.instance == dropped for sig in comm._agreed)
    del models[1], preconds[1]
    gc.collect()
    assert {sig for sig in comm._agreed if sig.instance == kept} == mine
    assert not any(sig.instance == dropped for sig in comm._agreed)
