"""KFACPreconditioner checkpoints, bf16 autocast, GradScaler and non-finite gradients (one process)."""
import copy
import io

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hpckfac.comm import Communicator
from hpckfac.models import resnet
from hpckfac.torch import KFACPreconditioner
from torch_features import needs_amp_grad_scaler

OPTIONS = dict(lr=0.05, damping=1e-2, factor_update_interval=2, inverse_update_interval=3, kl_clip=1e-2)


@pytest.fixture
def comm():
    return Communicator(MPI.COMM_SELF)


def model_and_data(depthwise: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 3, bias=False)).double()
    if depthwise:  # grouped blocks: a stack of small inverses per layer
        model[1] = nn.Conv2d(4, 4, 3, padding=1, groups=4).double()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
            for _ in range(8)]
    return model, data


def train(model, opt, precond, data):
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


@pytest.mark.parametrize("depthwise", [False, True])
def test_checkpoint_resume_gives_the_same_trajectory(comm, depthwise):
    model, data = model_and_data(depthwise)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, KFACPreconditioner(model, comm=comm, **OPTIONS), data)
    uninterrupted = flat(model)

    model, data = model_and_data(depthwise)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    train(model, opt, precond, data[:4])  # stop between an inverse (3) and a factor (4) update
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "precond": precond.state_dict()}, buf)
    precond.remove_hooks()

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh, _ = model_and_data(depthwise)
    fresh.load_state_dict(saved["model"])
    opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    resumed = KFACPreconditioner(fresh, comm=comm, **dict(OPTIONS, damping=0.5))  # overwritten by the load
    resumed.load_state_dict(saved["precond"])
    assert resumed.steps == 4 and resumed.engine.damping == OPTIONS["damping"]
    train(fresh, opt, resumed, data[4:])
    np.testing.assert_array_equal(flat(fresh), uninterrupted)



class NoisyDigits(Dataset):
    """Random augmentation: noise from torch's generator on every item taken."""

    def __init__(self):
        gen = torch.Generator().manual_seed(2)
        self.x = torch.randn(48, 5, generator=gen, dtype=torch.float64)
        self.y = torch.randint(0, 3, (48,), generator=gen)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(5, dtype=torch.float64), self.y[i]


def test_the_readmes_resume_with_dropout_and_augmentation_is_bit_for_bit(comm):
    """README: torch's RNG state restored once the resumed loader has skipped the batches already
    taken resumes bit for bit; restored before the skip, the run takes other draws."""
    dataset, epochs, stop = NoisyDigits(), 2, 8  # 6 batches an epoch: stop in epoch 1, 2 batches done

    def build(state=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 5))
        sampler = DistributedSampler(dataset, num_replicas=comm.size, rank=comm.rank, shuffle=True)
        precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, lr=sched))
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            precond.load_state_dict(state["kfac"])
        return model, opt, sched, sampler, DataLoader(dataset, batch_size=8, sampler=sampler), precond

    def run(state=None, restore_before_skip=False, stop_after=None):
        model, opt, sched, sampler, loader, precond = build(state)
        first, done = divmod(state["step"], len(loader)) if state else (0, 0)
        for epoch in range(first, epochs):
            sampler.set_epoch(epoch)
            if state and epoch == first and restore_before_skip:
                torch.set_rng_state(state["rng"])
            batches = iter(loader)
            for _ in range(done if epoch == first else 0):
                next(batches)
            if state and epoch == first and not restore_before_skip:
                torch.set_rng_state(state["rng"])
            for x, y in batches:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                precond.step()
                opt.step()
                sched.step()
                if sched.last_epoch == stop_after:
                    buf = io.BytesIO()
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "kfac": precond.state_dict(),
                                "rng": torch.get_rng_state(), "step": stop_after}, buf)
                    buf.seek(0)
                    return torch.load(buf, weights_only=True)
        return flat(model)

    uninterrupted = run()
    saved = run(stop_after=stop)
    np.testing.assert_array_equal(run(saved), uninterrupted)
    assert not np.array_equal(run(saved, restore_before_skip=True), uninterrupted)


def test_a_state_dict_is_the_callers_to_change(comm):
    """The tensors of a state_dict() share no memory with the preconditioner: changed in place
    (a state being edited before saving), the next state_dict() and the next step are as before;
    and each holds only its own block's values, so torch.save writes the state once."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    train(model, opt, precond, data[:3])
    state = precond.state_dict()
    before = {name: {k: (v.clone() if torch.is_tensor(v) else [x.clone() for x in v]) for k, v in block.items()}
              for name, block in state["blocks"].items()}
    for block in state["blocks"].values():
        block["factors"].mul_(-3.0)
        for x in block["inverses"]:
            x.fill_(float("nan"))
    again = precond.state_dict()["blocks"]
    for name, block in before.items():
        assert torch.equal(again[name]["factors"], block["factors"])
        assert all(torch.equal(x, y) for x, y in zip(again[name]["inverses"], block["inverses"]))
    sizes = [t.untyped_storage().nbytes() for b in again.values() for t in [b["factors"], *b["inverses"]]]
    assert sizes == [t.numel() * t.element_size() for b in again.values() for t in [b["factors"], *b["inverses"]]]


def test_load_rejects_a_different_model(comm):
    model, data = model_and_data()
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    train(model, torch.optim.SGD(model.parameters(), lr=0.05), precond, data[:1])
    state = precond.state_dict()
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="blocks"):
        KFACPreconditioner(other, comm=comm, **OPTIONS).load_state_dict(state)
    renamed = {"0": state["blocks"]["4"], "1": state["blocks"]["1"], "4": state["blocks"]["0"]}
    with pytest.raises(ValueError, match="shape"):
        KFACPreconditioner(model_and_data()[0], comm=comm, **OPTIONS).load_state_dict(dict(state, blocks=renamed))


class Declared(nn.Module):
    """Two Linear layers declared in either order: the same layers, named alike, whose blocks
    (in the order of named_modules) come in that order."""

    def __init__(self, head_first: bool) -> None:
        super().__init__()
        if head_first:
            self.head, self.body = nn.Linear(5, 3), nn.Linear(4, 5)
        else:
            self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_blocks_load_by_name_whatever_the_order_of_the_layers(comm):
    """A state loads into a model whose layers are declared in another order (blocks matched by
    name) and continues as the model that saved it; a block missing or foreign is named."""
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])

    def run(model, precond, steps):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            optimizer.step()

    options = dict(OPTIONS, inverse_update_interval=2)
    results = []
    for head_first in (False, True):
        torch.manual_seed(0)
        saver = Declared(False).double()
        precond = KFACPreconditioner(saver, comm=comm, **options)
        run(saver, precond, 3)
        state = precond.state_dict()
        model = Declared(head_first).double()
        model.load_state_dict(saver.state_dict())
        resumed = KFACPreconditioner(model, comm=comm, **options)
        assert [b.name for b in resumed.engine.blocks] == (["head", "body"] if head_first else ["body", "head"])
        resumed.load_state_dict(state)
        run(model, resumed, 2)
        results.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert all(torch.equal(results[0][name], results[1][name]) for name in results[0])
    with pytest.raises(ValueError, match="missing 'head'; not in this model 'tail'"):
        resumed.load_state_dict(dict(state, blocks={"body": state["blocks"]["body"], "tail": state["blocks"]["head"]}))


class LateBranch(nn.Module):
    """Three Linear layers of one shape (one run of batched products), the third reached from
    step 2 on only: its first inverse comes from a step that does not invert."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.late = False

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.head(torch.tanh(self.c(h)) if self.late else h)


def test_a_resumed_run_preconditions_a_late_block_as_the_uninterrupted_one(comm, monkeypatch):
    """A block first inverted on its own (its first statistics on a step that does not invert)
    completes its run: the uninterrupted run then preconditions the run with one batched
    product, as a run resumed from its state does (stacked on load), so that both round alike
    (batched and single products may differ in the last bit, e.g. on a GPU)."""
    from hpckfac.layers.kron import KronBlock

    batched = []
    plain = KronBlock.precondition_batch_into
    monkeypatch.setattr(KronBlock, "precondition_batch_into",
                        lambda self, *args: (batched.append(self.name), plain(self, *args))[1])
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(4)]
    options = dict(OPTIONS, factor_update_interval=1, inverse_update_interval=4)

    def run(model, precond, optimizer, steps):
        for step in steps:
            model.late = step >= 2
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data[step][0]), data[step][1]).backward()
            precond.step()
            optimizer.step()

    def build():
        torch.manual_seed(0)
        model = LateBranch().double()
        return model, KFACPreconditioner(model, comm=comm, **options), torch.optim.SGD(model.parameters(), lr=0.1)

    model, precond, optimizer = build()
    run(model, precond, optimizer, range(3))
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "kfac": precond.state_dict()}
    batched.clear()
    run(model, precond, optimizer, [3])
    uninterrupted = list(batched)
    resumed_model, resumed, resumed_optimizer = build()
    resumed_model.load_state_dict(state["model"])  # plain SGD: no optimizer state
    resumed.load_state_dict(state["kfac"])
    batched.clear()
    run(resumed_model, resumed, resumed_optimizer, [3])
    assert uninterrupted == batched == ["a", "head"]  # the run a, b, c at once, then the head
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_numpy_numbers_assigned_between_steps_save_for_weights_only_loading(comm):
    """damping, factor_decay and kl_clip assigned to the engine between steps as NumPy numbers
    (the docs allow them), and an assignment given as np.str_, are saved as Python values:
    torch.load(weights_only=True) refuses NumPy scalars, so the checkpoint could not be read back."""
    model, data = model_and_data()
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS, assignment=np.str_("lpt"))
    precond.engine.damping, precond.engine.factor_decay = np.float64(0.02), np.float32(0.5)
    precond.engine.kl_clip = np.float64(0.03)
    train(model, torch.optim.SGD(model.parameters(), lr=0.05), precond, data[:2])
    buffer = io.BytesIO()
    torch.save(precond.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    hyper = state["hyperparameters"]
    assert (hyper["damping"], hyper["factor_decay"], hyper["kl_clip"]) == (0.02, float(np.float32(0.5)), 0.03)
    assert all(type(hyper[k]) is float for k in ("damping", "factor_decay", "kl_clip")) and type(hyper["assignment"]) is str
    fresh = KFACPreconditioner(model_and_data()[0], comm=comm, **OPTIONS)
    fresh.load_state_dict(state)
    assert (fresh.engine.damping, fresh.engine.kl_clip) == (0.02, 0.03)


def one_update(dtype_context, comm):
    torch.manual_seed(0)
    model = resnet(depth=8, width=4, in_channels=1)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    precond = KFACPreconditioner(model, comm=comm, lr=0.1, damping=1e-2, kl_clip=None)
    with dtype_context:
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    raw = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()
    precond.step()
    return raw, torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


def test_bf16_autocast_is_finite_and_close_to_fp32(comm):
    raw32, pre32 = one_update(torch.autocast("cpu", enabled=False), comm)
    raw16, pre16 = one_update(torch.autocast("cpu", dtype=torch.bfloat16), comm)
    assert np.isfinite(pre16).all()
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    # bf16 (8-bit mantissa) already moves the plain gradient by ~15% on this model; the
    # preconditioned one must not amplify that by more than 2x.
    assert rel(pre16, pre32) <= 2 * rel(raw16, raw32) and rel(pre16, pre32) < 0.5


@needs_amp_grad_scaler
def test_grad_scaler_scale_is_undone_in_the_factors(comm):
    model, data = model_and_data()
    x, y = data[0]
    results = []
    for scale in (1.0, 1024.0):
        torch.manual_seed(0)
        model = model_and_data()[0]
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, kl_clip=None, damping=1e-2)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        precond.step()
        results.append((precond.state_dict()["blocks"], [p.grad.clone() for p in model.parameters()]))
    for name in results[0][0]:
        torch.testing.assert_close(results[0][0][name]["factors"], results[1][0][name]["factors"], rtol=1e-10, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@needs_amp_grad_scaler
@pytest.mark.parametrize("kl_clip", [1e-2, None])
def test_a_float16_buffer_overflow_makes_the_scaler_skip_the_step(comm, kl_clip):
    """Finite float32 gradients beyond 65504 become inf in a float16 buffer (factor_dtype), after
    scaler.unscale_ found them finite: the preconditioned .grad is not finite (NaN with the KL
    clip, inf without), so the scaler must skip the step and lower its scale, not step with it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, factor_dtype="float16", kl_clip=kl_clip,
                                 lr=1e-3)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(1e6 * model(x).pow(2).mean()).backward()
    scaler.unscale_(opt)
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and max(g.abs().max() for g in grads) > 65504
    precond.step()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert scaler.get_scale() == 0.5


@needs_amp_grad_scaler
def test_a_step_without_unscale_raises_naming_it(comm):
    """With an enabled GradScaler, step() before scaler.unscale_(optimizer) would precondition
    gradients still multiplied by the scale: the KL clip shrinks the step by that factor (65536
    by default) and training stalls without a word. It raises instead, before anything is
    averaged, and the recipe with unscale_ then runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, lr=0.1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(4))
    scaler.scale(model(x).pow(2).mean()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"grad_scaler: .*scaler\.unscale_\(optimizer\)"):
        precond.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), scaled))
    scaler.unscale_(opt)
    precond.step()
    scaler.step(opt)
    scaler.update()
    assert precond.steps == 1


def test_non_finite_gradients_reach_grad_but_not_the_factors(comm):
    model, data = model_and_data()
    precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, factor_update_interval=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train(model, opt, precond, data[:1])
    before = precond.state_dict()["blocks"]
    x, y = data[1]
    opt.zero_grad()
    (nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    precond.step()
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    after = precond.state_dict()["blocks"]
    for name in before:
        torch.testing.assert_close(before[name]["factors"], after[name]["factors"], rtol=0, atol=0)
        assert all(torch.isfinite(t).all() for t in after[name]["inverses"])


def test_learning_rate_from_zero_and_bad_learning_rates(comm):
    """A warmup from lr = 0 (and an lr that underflows) leaves the KL clip at 1; NaN or a
    negative lr raises ValueError naming lr instead of silently disabling the clip."""
    model, data = model_and_data()
    schedule = lambda k: [0.0, 1e-300, 0.05, float("nan"), -1.0][k]  # noqa: E731
    precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, lr=schedule))
    for k, (x, y) in enumerate(data[:5]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if k < 3:
            precond.step()
            assert precond.last_nu == 1.0 if k < 2 else precond.last_nu <= 1.0
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        else:
            with pytest.raises(ValueError, match="^lr: expected a finite number >= 0 at step"):
                precond.step()
            break


def test_a_torch_scheduler_as_lr_equals_its_schedule(comm):
    """``lr=scheduler`` reads the optimizer's current rate: the same steps as the callable
    giving the same rates."""
    rate = lambda k: 0.2 * (k + 1) / 4 if k < 4 else 0.2 * 0.5 ** (k - 3)  # noqa: E731
    results = []
    for as_scheduler in (True, False):
        model, data = model_and_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: rate(k) / 0.2)
        precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, lr=sched if as_scheduler else rate))
        nus = []
        for x, y in data[:6]:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            opt.step()
            sched.step()
            nus.append(precond.last_nu)
        assert min(nus) < 1.0
        results.append((nus, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    with pytest.raises(ValueError, match="lr: expected a number > 0, a callable step -> rate, or a torch LR"):
        KFACPreconditioner(model_and_data()[0], comm=comm, lr="fast")


def test_huge_learning_rates_clip_instead_of_zeroing_the_step(comm):
    """lr^2 would overflow: nu = sqrt(kl_clip / sum <V, grad>) / lr keeps nu * lr the same for
    every lr that clips, and the update nonzero."""
    scaled = []
    for lr in (1.0, 1e155, 1e300):
        model, data = model_and_data()
        precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, lr=lr))
        x, y = data[0]
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        assert 0.0 < precond.last_nu < 1.0
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in model.parameters())
        scaled.append(precond.last_nu * lr)
    assert scaled[1] == pytest.approx(scaled[0], rel=1e-12) and scaled[2] == pytest.approx(scaled[0], rel=1e-12)


def test_frozen_weights_keep_no_gradient(comm):
    model, data = model_and_data()
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    # Its bias is trained: the layer takes statistics, not "frozen now" as a wholly frozen one.
    assert "K-FAC" in repr(precond).splitlines()[1] and "frozen now" not in repr(precond)
    for x, y in data[:4]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()
    assert model[0].weight.grad is None and torch.equal(model[0].weight, before)
    assert model[0].bias.grad is not None and model[-1].weight.grad.abs().max() > 0


def test_a_frozen_weight_counts_as_a_zero_gradient_beside_its_trained_bias(comm):
    """The layer is preconditioned as a whole: its bias gets what it gets when the weight is
    trained but its gradient is zero (docs/preconditioner.md)."""
    grads = []
    for frozen in (True, False):
        model, data = model_and_data()
        model[0].weight.requires_grad_(not frozen)
        precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
        for x, y in data[:3]:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if not frozen:
                model[0].weight.grad.zero_()
            precond.step()
        grads.append(model[0].bias.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_a_wholly_frozen_first_layer_is_not_reported_missing(comm, caplog):
    """An embedding or first layer frozen whole gets no output gradient, hence no statistics:
    expected, so no warning about layers "not called"."""
    model, data = model_and_data()
    for p in model[0].parameters():
        p.requires_grad_(False)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    assert "frozen now: no statistics, .grad stays None" in repr(precond).splitlines()[1]
    with caplog.at_level("WARNING", logger="hpckfac"):
        for x, y in data[:2]:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
    assert "without statistics" not in caplog.text
    assert all(p.grad is None for p in model[0].parameters())


def trained(comm):
    model, data = model_and_data()
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    for x, y in data[:4]:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
    return precond


@pytest.mark.parametrize("damage,message", [
    (lambda s: s["blocks"]["0"]["inverses"].__setitem__(0, torch.zeros(3, 3)), "has inverses of shapes"),
    (lambda s: s["blocks"]["1"]["factors"].__setitem__(0, float("nan")), "has non-finite factors"),
    (lambda s: s["blocks"]["4"]["inverses"][1].__setitem__((0, 0), float("inf")), "has non-finite inverses"),
    (lambda s: s.__setitem__("steps", -3), "steps must be an integer >= 0"),
    (lambda s: s.__setitem__("steps", -1), "steps must be an integer >= 0"),
    (lambda s: s.__setitem__("steps", True), "steps must be an integer >= 0, got True"),
    (lambda s: s.__setitem__("steps", 2.5), "steps must be an integer >= 0"),
    (lambda s: s.__setitem__("steps", torch.tensor(6.5)), "steps must be an integer >= 0"),
    (lambda s: s.__setitem__("steps", torch.tensor(1e20)), "steps must be an integer >= 0"),
    (lambda s: s.__setitem__("steps", torch.tensor([3, 4])), "steps must be an integer >= 0"),
    (lambda s: s["blocks"]["0"].__setitem__("factors", None), "has inverses but no factors"),
    (lambda s: s["blocks"]["4"].pop("inverses"), "block '4' must be a dict with keys 'factors' and 'inverses'"),
    (lambda s: s["blocks"].__setitem__("1", None), "block '1' must be a dict"),
    (lambda s: s.pop("hyperparameters"), "not a preconditioner's state_dict\\(\\): no hyperparameters"),
    (lambda s: s["blocks"]["4"]["inverses"][0].neg_(), "not symmetric with a positive diagonal"),
    (lambda s: s["blocks"]["4"]["inverses"][1][0, 0, 1].add_(1.0), "not symmetric with a positive diagonal"),
    # A zero on the diagonal, and an asymmetry of 1% of the largest entry (ten times the tolerance).
    (lambda s: s["blocks"]["4"]["inverses"][1].__setitem__((0, 1, 1), 0.0), "not symmetric with a positive diagonal"),
    (lambda s: s["blocks"]["4"]["inverses"][1][0, 0, 1].add_(1e-2 * s["blocks"]["4"]["inverses"][1].abs().max()),
     "not symmetric with a positive diagonal"),
    (lambda s: s["blocks"]["4"].__setitem__("inverses", "abc"), "block .4. has inverses of type ndarray, expected a list"),
    (lambda s: s["blocks"]["4"].__setitem__("inverses", [[1.0]]), "block .4. has inverses of shapes"),
    # A single (2, 2) matrix where the BatchNorm block holds a stack of four: not taken as a stack of one.
    (lambda s: s["blocks"]["1"]["inverses"].__setitem__(0, torch.eye(2, dtype=torch.float64)),
     r"block '1' has inverses of shapes \[\(2, 2\)\], expected \[\(4, 2, 2\)\]"),
    (lambda s: s["blocks"]["0"].__setitem__("factors", "abc"), "factors of shape"),
    # An option that is not a saved hyperparameter (fixed at construction): named, not an AttributeError.
    (lambda s: s["hyperparameters"].__setitem__("factor_dtype", "float16"),
     "state: unknown hyperparameter\\(s\\) 'factor_dtype'"),
    (lambda s: s["hyperparameters"].__setitem__("foo", 1), "state: unknown hyperparameter\\(s\\) 'foo'"),
    # The owners are fixed at construction: a checkpoint of the other assignment is refused, not adopted.
    (lambda s: s["hyperparameters"].__setitem__("assignment", "contiguous"), "state: assignment differs"),
    # Tensors without values NumPy can hold (meta, sparse) and complex ones, whose imaginary
    # parts a cast to real would drop, are a ValueError naming the block.
    (lambda s: s["blocks"]["1"].__setitem__("factors", s["blocks"]["1"]["factors"].to("meta")),
     "block '1' has factors that are not arrays of numbers"),
    (lambda s: s["blocks"]["1"].__setitem__("factors", s["blocks"]["1"]["factors"].to_sparse()),
     "block '1' has factors that are not arrays of numbers"),
    (lambda s: s["blocks"]["1"].__setitem__("factors", s["blocks"]["1"]["factors"].to(torch.complex128)),
     "block '1' has complex factors"),
    # A conjugate view (torch refuses numpy() of it) and a ragged list (NumPy refuses its shape).
    (lambda s: s["blocks"]["1"].__setitem__("factors", s["blocks"]["1"]["factors"].to(torch.complex128).conj()),
     "block '1' has factors that are not arrays of numbers"),
    (lambda s: s["blocks"]["1"].__setitem__("factors", [[1.0], [1.0, 2.0]]),
     r"block '1' has factors of shape \(ragged\)"),
])
def test_load_state_dict_refuses_bad_state_and_changes_nothing(comm, damage, message):
    state = trained(comm).state_dict()
    damage(state)
    target = trained(comm)
    before = target.state_dict()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    after = target.state_dict()
    assert after["steps"] == before["steps"]
    for name in before["blocks"]:
        assert torch.equal(after["blocks"][name]["factors"], before["blocks"][name]["factors"])


@pytest.mark.parametrize("wrong", ["model", "checkpoint", "none"])
def test_load_state_dict_names_what_it_got_instead(comm, wrong):
    """A model's state_dict, a whole checkpoint holding the preconditioner's, or None: a
    ValueError that says so, before anything changes."""
    target = trained(comm)
    state = {"model": target.model.state_dict(), "kfac": target.state_dict()}
    given = {"model": target.model.state_dict(), "checkpoint": state, "none": None}[wrong]
    message = "got NoneType" if wrong == "none" else "not a preconditioner's state_dict\\(\\): no steps"
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(given)
    assert target.steps == 4


def test_a_state_in_bfloat16_or_with_tuples_of_inverses_loads_its_values(comm):
    """bfloat16 tensors (a checkpoint cast to halve its size), which NumPy has no type for, and
    inverses kept in a tuple load as the same values do in float64 and in a list (they raised
    TypeError, and ValueError on NumPy's ragged array)."""
    state = trained(comm).state_dict()

    def converted(cast, sequence):
        return {**state, "blocks": {name: {"factors": None if b["factors"] is None else cast(b["factors"]),
                                           "inverses": None if b["inverses"] is None else
                                           sequence(cast(x) for x in b["inverses"])}
                                    for name, b in state["blocks"].items()}}

    rounded = KFACPreconditioner(model_and_data()[0], comm=comm, **OPTIONS)
    rounded.load_state_dict(converted(lambda t: t.bfloat16(), tuple))
    oracle = KFACPreconditioner(model_and_data()[0], comm=comm, **OPTIONS)
    oracle.load_state_dict(converted(lambda t: t.bfloat16().double(), list))
    got, want = rounded.state_dict(), oracle.state_dict()
    for name, block in want["blocks"].items():
        assert torch.equal(got["blocks"][name]["factors"], block["factors"])
        for x, y in zip(got["blocks"][name]["inverses"], block["inverses"]):
            assert torch.equal(x, y)
    assert not torch.equal(want["blocks"]["0"]["factors"], state["blocks"]["0"]["factors"])  # it did round


def test_checkpoint_hyperparameters_win_with_a_warning(comm, caplog):
    state = trained(comm).state_dict()
    model, _ = model_and_data()
    other = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, damping=0.5))
    with caplog.at_level("WARNING", logger="hpckfac"):
        other.load_state_dict(state)
    assert other.engine.damping == OPTIONS["damping"]
    assert "damping 0.5 -> 0.01" in caplog.text


def test_a_checkpoints_learning_rate_wins_unless_the_caller_schedules_it(comm, caplog):
    """A constant lr saved in the checkpoint replaces the caller's, named in a warning; a schedule
    passed by the caller stays, read at the loaded step count."""
    state = trained(comm).state_dict()
    assert state["hyperparameters"]["lr"] == OPTIONS["lr"]
    model, _ = model_and_data()
    other = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, lr=0.5))
    with caplog.at_level("WARNING", logger="hpckfac"):
        other.load_state_dict(state)
    assert other.lr == OPTIONS["lr"] and other.current_lr() == OPTIONS["lr"]
    assert "the checkpoint's lr 0.05 replaces 0.5" in caplog.text
    schedule = lambda k: 0.5 / (k + 1)  # noqa: E731
    scheduled = KFACPreconditioner(model_and_data()[0], comm=comm, **dict(OPTIONS, lr=schedule))
    scheduled.load_state_dict(state)
    assert scheduled.lr is schedule and scheduled.current_lr() == 0.5 / (state["steps"] + 1)


def test_a_checkpoint_without_a_kl_clip_switches_the_callers_clip_off(comm):
    """A checkpoint saved without a KL clip (``kl_clip`` None) wins over the caller's clip as any
    other saved hyperparameter: the loaded run steps as the uninterrupted one does, whose steps
    the clip would have scaled."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=OPTIONS["lr"])
    precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, kl_clip=None))
    train(model, opt, precond, data[:4])
    state = copy.deepcopy(precond.state_dict())
    assert state["hyperparameters"]["kl_clip"] is None
    resumed_model = copy.deepcopy(model)
    resumed = KFACPreconditioner(resumed_model, comm=comm, **OPTIONS)
    resumed.load_state_dict(state)
    assert resumed.engine.kl_clip is None
    clipped_model = copy.deepcopy(model)
    clipped = KFACPreconditioner(clipped_model, comm=comm, **OPTIONS)
    clipped.load_state_dict({**state, "hyperparameters": {**state["hyperparameters"], "kl_clip": OPTIONS["kl_clip"]}})
    x, y = data[4]
    grads = []
    for net, pre in ((model, precond), (resumed_model, resumed), (clipped_model, clipped)):
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        pre.step()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert resumed.engine.last_nu == 1.0 and clipped.engine.last_nu < 1.0
    for got, want, clip in zip(grads[1], grads[0], grads[2]):
        assert torch.equal(got, want)
    assert not all(torch.allclose(c, w) for c, w in zip(grads[2], grads[0]))


@pytest.mark.parametrize("name", ["damping", "factor_decay"])
def test_a_schedule_is_saved_as_none_and_the_state_loads_without_pickles(comm, name):
    """A ``damping`` or ``factor_decay`` schedule is saved as None (a function cannot be read back
    by ``torch.load(weights_only=True)``), and loading that state keeps the loader's own value."""
    model, data = model_and_data()
    schedule = {"damping": lambda k: 0.03 / (k + 1), "factor_decay": lambda k: 0.9 - 0.1 / (k + 1)}[name]
    precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, **{name: schedule}))
    train(model, torch.optim.SGD(model.parameters(), lr=OPTIONS["lr"]), precond, data[:3])
    buf = io.BytesIO()
    torch.save(precond.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["hyperparameters"][name] is None and state["steps"] == 3
    constant = {"damping": 0.02, "factor_decay": 0.8}[name]
    other = KFACPreconditioner(model_and_data()[0], comm=comm, **dict(OPTIONS, **{name: constant}))
    other.load_state_dict(state)
    assert getattr(other.engine, name) == constant and other.steps == 3


@pytest.mark.parametrize("name", ["damping", "factor_decay"])
def test_a_callers_schedule_stays_over_a_checkpoints_constant(comm, name):
    """A schedule passed by the caller for ``damping`` or ``factor_decay`` stays after loading a
    checkpoint that saved a constant for it (as a scheduled lr does), read at the loaded step
    count; the checkpoint's other settings win."""
    state = trained(comm).state_dict()
    assert state["hyperparameters"][name] == OPTIONS.get(name, 0.95)
    schedule = {"damping": lambda k: 0.3 / (k + 1), "factor_decay": lambda k: 0.5 - 0.01 * k}[name]
    scheduled = KFACPreconditioner(model_and_data()[0], comm=comm, **dict(OPTIONS, kl_clip=0.5, **{name: schedule}))
    scheduled.load_state_dict(state)
    assert getattr(scheduled.engine, name) is schedule
    assert scheduled.engine.current(name) == schedule(state["steps"])
    assert scheduled.engine.kl_clip == OPTIONS["kl_clip"]


def test_checkpoints_with_unstacked_kronecker_inverses_still_load(comm):
    """Checkpoints from before every factor became a (count, n, n) stack held (n, n) inverses."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    train(model, opt, precond, data[:4])
    state = precond.state_dict()
    old = {**state, "blocks": {name: {**b, "inverses": None if b["inverses"] is None else
                                      [x[0] if x.shape[0] == 1 else x for x in b["inverses"]]}
                               for name, b in state["blocks"].items()}}
    assert tuple(old["blocks"]["0"]["inverses"][0].shape) == (19, 19)  # the old (d_A, d_A) form
    again = KFACPreconditioner(model, comm=comm, **OPTIONS)
    again.load_state_dict(old)
    for name, block in again.state_dict()["blocks"].items():
        for x, y in zip(block["inverses"], state["blocks"][name]["inverses"]):
            assert torch.equal(x, y)


def test_values_beyond_the_states_range_are_refused(comm):
    """A float32 model's state is float32: a saved float64 value beyond its range would load as
    infinity (and every inversion would then fail), so it is refused as non-finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    precond = KFACPreconditioner(model, comm=comm)
    model(torch.randn(5, 3)).sum().backward()
    precond.step()
    state = precond.state_dict()
    state["blocks"]["0"]["factors"] = state["blocks"]["0"]["factors"].double() * 1e300
    with pytest.raises(ValueError, match=r"block '0' has non-finite factors \(in float32\)"):
        precond.load_state_dict(state)


def test_resuming_with_another_accumulation_keeps_the_callers_and_the_trajectory(comm, caplog):
    """A run saved at one micro-batch per step resumes with two half micro-batches per step (the
    same batch, as at half the ranks): the script's accumulation_steps stays, so the steps equal
    those of the uninterrupted whole-batch run (the checkpoint's count would scale G by 1/4)."""
    def setup(accumulation):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, KFACPreconditioner(model, comm=comm, **dict(OPTIONS, factor_update_interval=1),
                                              accumulation_steps=accumulation)

    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
               for _ in range(6)]

    def run(model, opt, precond, steps):
        for x, y in steps:
            opt.zero_grad()
            micro = precond.accumulation_steps
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (nn.functional.cross_entropy(model(xs), ys) / micro).backward()
            precond.step()
            opt.step()

    whole = setup(1)
    run(*whole, batches)
    saved = setup(1)
    run(*saved, batches[:3])
    state = {"model": saved[0].state_dict(), "opt": saved[1].state_dict(), "kfac": saved[2].state_dict()}
    model, opt, precond = setup(2)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond.load_state_dict(state["kfac"])
    assert precond.accumulation_steps == 2 and "keeping accumulation_steps 2" in caplog.text
    run(model, opt, precond, batches[3:])
    np.testing.assert_allclose(flat(model), flat(whole[0]), rtol=1e-10, atol=1e-12)


def test_a_load_drops_the_statistics_of_micro_batches_taken_before_it(comm, caplog):
    """A state loaded between micro-batches (a script that restores its last checkpoint after
    some forwards of the next step) replaces that step: the statistics its forwards took are
    dropped, with a warning, so the run goes on as one that loaded into a fresh preconditioner
    (kept, they were added to the next factor step's)."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    train(model, opt, precond, data[:4])  # the next step, 4, is a factor step
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kfac": precond.state_dict()}, buffer)

    def resumed(interrupted):
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        model, _ = model_and_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
        if interrupted:
            x, y = data[7]
            nn.functional.cross_entropy(model(x[:3]), y[:3]).backward()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        with caplog.at_level("WARNING", logger="hpckfac"):
            precond.load_state_dict(state["kfac"])
        train(model, opt, precond, data[4:])
        return flat(model), precond.state_dict()

    caplog.clear()
    fresh, fresh_state = resumed(False)
    assert "dropping the statistics" not in caplog.text
    after, after_state = resumed(True)
    assert "dropping the statistics of 1 training forward(s)" in caplog.text
    np.testing.assert_array_equal(after, fresh)
    for name, block in fresh_state["blocks"].items():
        assert torch.equal(after_state["blocks"][name]["factors"], block["factors"]), name


@needs_amp_grad_scaler
def test_a_load_forgets_the_grad_scalers_scale_read_before_it(comm):
    """The GradScaler's scale is read once per step, in the first backward: one read before a
    load (whose script then restores the scaler's saved state, another scale) is not the scale
    of the loaded step's gradients, and the factors would be scaled by the square of the ratio."""
    model, data = model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    precond = KFACPreconditioner(model, comm=comm, **OPTIONS)
    train(model, opt, precond, data[:4])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "kfac": precond.state_dict(),
                "scaler": torch.amp.GradScaler("cpu", init_scale=2.0).state_dict()}, buffer)

    def resumed(interrupted):
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        model, _ = model_and_data()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, **OPTIONS)
        if interrupted:
            x, y = data[7]
            scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        precond.load_state_dict(state["kfac"])
        x, y = data[4]  # step 4: a factor step
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        precond.step()
        return precond.state_dict()["blocks"]

    fresh, after = resumed(False), resumed(True)
    for name, block in fresh.items():
        assert torch.equal(after[name]["factors"], block["factors"]), name


@pytest.mark.parametrize("name, bad", [("damping", -1.0), ("damping", float("nan")), ("factor_decay", 1.5)])
def test_a_bad_scheduled_value_is_refused_before_any_gradient_is_averaged(comm, monkeypatch, name, bad):
    """A schedule of ``damping`` or ``factor_decay`` returning a bad value raises
    ValueError naming it before the step reduces anything, as ``lr`` does: a script that
    catches the error keeps its own, unaveraged gradients."""
    import hpckfac.torch.preconditioner as bridge

    model, data = model_and_data()
    good = {"damping": 1e-2, "factor_decay": 0.9}[name]
    precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, **{name: lambda k: good if k == 0 else bad}))
    averaged = []
    real = bridge.average_grads
    monkeypatch.setattr(bridge, "average_grads", lambda *a, **kw: averaged.append(1) or real(*a, **kw))
    for k, (x, y) in enumerate(data[:2]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if k == 0:
            precond.step()
            continue
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=f"^{name}"):
            precond.step()
        assert averaged == [1]
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_a_damping_schedule_runs_once_per_step(comm):
    """The schedule is checked at the start of ``step()`` and its value handed to the engine,
    not evaluated a second time (a schedule that logs or counts sees one call per step)."""
    model, data = model_and_data()
    calls = []
    precond = KFACPreconditioner(model, comm=comm, **dict(OPTIONS, damping=lambda k: calls.append(k) or 1e-2))
    for x, y in data[:3]:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
    assert calls == [0, 1, 2]


@needs_amp_grad_scaler
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("scale", [2.0 ** 16, 2.0 ** 70, 2.0 ** 100])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_grown_grad_scaler_scale_leaves_the_float32_factors_those_of_the_true_gradients(comm, seed, scale,
                                                                                          autocast):
    """A float32 model (or bf16 autocast, where nothing overflows to stop the scale from
    growing) under a GradScaler whose scale has grown large: the gradients the hooks see are the
    true ones times the scale, their Gram beyond float32's range and the scale's square below
    it, while the factors of the true gradients fit. The preconditioned .grad is the float64
    oracle's, from the layers' inputs and unscaled per-example output gradients."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    seen = {}

    def capture(name):
        def forward(module, args, out):
            seen[name] = {"a": args[0].detach().double().numpy().copy()}
            out.register_hook(lambda g: seen[name].__setitem__("g", g.detach().double().numpy() / scale))
        return forward

    for name in ("0", "2"):
        model.get_submodule(name).register_forward_hook(capture(name))
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    damping = 1e-2
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=scaler, kl_clip=None, damping=damping)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    scaler.scale(nn.functional.cross_entropy(out.float(), y)).backward()
    scaler.unscale_(opt)
    grads = {name: np.hstack([m.weight.grad.double().numpy(), m.bias.grad.double().numpy()[:, None]])
             for name, m in (("0", model[0]), ("2", model[2]))}
    precond.step()
    for name, m in (("0", model[0]), ("2", model[2])):
        a = np.hstack([seen[name]["a"], np.ones((16, 1))])
        g = seen[name]["g"] * 16  # per-example: the mean loss's times the batch
        fa, fg = a.T @ a / 16, g.T @ g / 16
        pi = np.sqrt((np.trace(fa) / len(fa)) / (np.trace(fg) / len(fg)))
        want = np.linalg.inv(fg + np.sqrt(damping) / pi * np.eye(len(fg))) @ grads[name] @ np.linalg.inv(
            fa + pi * np.sqrt(damping) * np.eye(len(fa)))
        got = np.hstack([m.weight.grad.double().numpy(), m.bias.grad.double().numpy()[:, None]])
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, name


@needs_amp_grad_scaler
@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.float64, 1e-12)])
def test_grad_scaler_scale_is_undone_in_g_of_float16_and_float64_gradients(comm, dtype, rtol):
    """G of a float16 model (its Gram taken of the scaled gradients, then divided by the scale's
    square) and of a float64 one (unscaled in float64 before its Gram) under a GradScaler: the
    float64 oracle's of the true per-example output gradients."""
    torch.manual_seed(3)
    scale = 2.0 ** 12
    model = nn.Linear(8, 6).to(dtype)
    seen = {}

    def capture(module, args, out):
        out.register_hook(lambda g: seen.__setitem__("g", g.double().numpy() / scale))

    model.register_forward_hook(capture)
    precond = KFACPreconditioner(model, comm=comm, grad_scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    x = torch.randn(16, 8).to(dtype)
    precond.grad_scaler.scale(model(x).float().square().mean()).backward()
    g = seen["g"] * 16  # per-example: the mean loss's times the batch
    block, stats = precond.engine.blocks[0], precond.local.result()[0]
    got = stats[block.d_A * (block.d_A + 1) // 2:].astype(np.float64)
    np.testing.assert_allclose(got, (g.T @ g / 16)[np.triu_indices(6)], rtol=rtol, atol=0)
