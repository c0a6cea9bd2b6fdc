"""KFACPreconditioner under the ways training scripts run models: forwards of several sizes before
one backward, activation checkpointing across several forwards, and torch.compile, each against
factors computed independently here (autograd's own tensors, or the eager model's factors)."""
import contextlib
import copy
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.utils.checkpoint import checkpoint

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner, checkpoint_context_fn, recomputing


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def kfac(model, **kw):
    return KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), **kw)


def two_losses(y1, y2):
    """Each term a mean over its own forward's examples."""
    return y1.pow(2).mean() + torch.tanh(y2).sum(1).mean()


def oracle(model, xs, loss):
    """A and G of each Linear of ``model`` by autograd alone: every call's input rows with a ones
    column, and its output gradient times its own forward's size (the per-example gradient of a
    mean), summed over the calls and divided by all the forwards' examples."""
    calls = []

    def keep(module, args, out):
        out.retain_grad()
        calls.append((module, args[0].detach(), out))

    handles = [layer.register_forward_hook(keep) for layer in (model[0], model[2])]
    sizes = [x.shape[0] for x in xs]
    loss(*[model(x) for x in xs]).backward()
    for handle in handles:
        handle.remove()
    total = sum(sizes)
    want = []
    for layer in (model[0], model[2]):
        mine = [(a, out, out.shape[0]) for module, a, out in calls if module is layer]
        rows = [torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) for a, _, _ in mine]
        grads = [out.grad * n for _, out, n in mine]
        want += [sum(r.T @ r for r in rows) / total, sum(g.T @ g for g in grads) / total]
    return [w.numpy() for w in want]


def factors(precond):
    got = []
    for block, stats in zip(precond.engine.blocks, precond.local.result()):
        a, g = block.factors(stats)
        got += [a[0], g[0]]
    return got


def test_forwards_of_different_sizes_before_one_backward_take_each_forwards_own_size():
    """Two forwards (6 and 3 examples) whose mean losses are added and backpropagated once: each
    call's output gradient is made per-example with its own forward's size, not the latest
    forward's (which scaled the first call's G by (3/6)^2)."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 5, dtype=torch.float64, generator=gen) for n in (6, 3)]
    model = mlp()
    precond = kfac(model)
    two_losses(model(xs[0]), model(xs[1])).backward()
    got = factors(precond)
    model.eval()  # the oracle's forwards add no statistics
    for g, w in zip(got, oracle(model, xs, two_losses)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)



def test_a_gan_discriminator_frozen_for_the_generators_step_takes_only_its_own_forwards():
    """A GAN's discriminator step (real and generated batches, 6 and 4 examples), then the
    generator's step through the discriminator with its parameters frozen (pix2pix's
    ``set_requires_grad(D, False)``): the generator's loss gives the discriminator's parameters no
    gradient and adds nothing to its statistics, so its next step's factors are those of its own
    two forwards (before, the generator's forward through it was added to them)."""
    gen = torch.Generator().manual_seed(5)
    disc = mlp()
    torch.manual_seed(1)
    generator = nn.Linear(2, 5).double()
    precond = kfac(disc)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (disc, generator)]

    def batches():
        return torch.randn(6, 5, dtype=torch.float64, generator=gen), torch.randn(4, 2, dtype=torch.float64,
                                                                                   generator=gen)
    for _ in range(2):
        real, z = batches()
        fake = generator(z)
        optimizers[0].zero_grad()
        two_losses(disc(real), disc(fake.detach())).backward()
        precond.step()
        optimizers[0].step()
        optimizers[1].zero_grad()
        disc.requires_grad_(False)
        torch.tanh(disc(fake)).sum(1).mean().backward()
        disc.requires_grad_(True)
        optimizers[1].step()
    real, z = batches()
    fake = generator(z).detach()
    two_losses(disc(real), disc(fake)).backward()
    got = factors(precond)
    disc.eval()
    for g, w in zip(got, oracle(disc, [real, fake], two_losses)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("hidden", [True, False], ids=["under_recomputing", "seen"])
def test_a_gradient_penalty_forward_under_recomputing_adds_nothing(hidden, caplog):
    """WGAN-GP's critic step: real and generated batches, and a forward on their interpolates
    differentiated by torch.autograd.grad(create_graph=True) for the penalty, all backpropagated
    once. Under ``recomputing()`` the interpolates' calls are not seen, and the factors are those
    of the two batches (autograd's oracle); seen, their output gradient is the penalty's input
    gradient, not a loss's, and the warning says to run that forward under ``recomputing()``."""
    gen = torch.Generator().manual_seed(6)
    real, fake = (torch.randn(n, 5, dtype=torch.float64, generator=gen) for n in (6, 4))
    mix = torch.rand(4, 1, dtype=torch.float64, generator=gen)
    interpolates = (mix * real[:4] + (1 - mix) * fake).requires_grad_()
    critic = mlp()
    precond = kfac(critic)
    with caplog.at_level(logging.WARNING, logger="hpckfac"):
        loss = two_losses(critic(real), critic(fake))
        with recomputing() if hidden else contextlib.nullcontext():
            scores = critic(interpolates)
        slopes, = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
        (loss + ((slopes.norm(dim=1) - 1) ** 2).mean()).backward()
    if not hidden:
        assert "recomputing()" in caplog.text
        return
    assert "second output gradient" not in caplog.text
    got = factors(precond)
    critic.eval()
    for g, w in zip(got, oracle(critic, [real, fake], two_losses)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)

@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_a_whole_model_checkpoint_over_two_forwards_of_different_sizes(mode):
    """The same with the whole model checkpointed: a reentrant checkpoint counts each forward at
    its recomputation, a non-reentrant one (with ``checkpoint_context_fn``) at its forward."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 5, dtype=torch.float64, generator=gen) for n in (6, 3)]
    model = mlp()
    precond = kfac(model)
    if mode == "reentrant":
        run = lambda x: checkpoint(model, x.clone().requires_grad_(), use_reentrant=True)  # noqa: E731
    else:
        run = lambda x: checkpoint(model, x, use_reentrant=False, context_fn=checkpoint_context_fn)  # noqa: E731
    two_losses(run(xs[0]), run(xs[1])).backward()
    got = factors(precond)
    model.eval()
    for g, w in zip(got, oracle(model, xs, two_losses)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)


class PartlyCheckpointed(nn.Module):
    """``mlp()``'s layers with the last one in a reentrant checkpoint."""

    def __init__(self):
        super().__init__()
        self.seq = mlp()

    def forward(self, x):
        h = self.seq[1](self.seq[0](x))
        return checkpoint(self.seq[2], h, use_reentrant=True)


def test_a_reentrant_recomputation_after_several_forwards_is_named(caplog):
    """A reentrant checkpoint's layers are seen only when backward recomputes them: after two
    forwards, which one a call belongs to is unknown, and it is counted with the latest (wrong
    here, with forwards of 6 and 3 examples); a warning names the layer and the remedy. One
    backward per forward, as accumulation runs, gets none and the right factors."""
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 5, dtype=torch.float64, generator=gen) for n in (6, 3)]
    model = PartlyCheckpointed()
    precond = kfac(model)
    with caplog.at_level(logging.WARNING, logger="hpckfac"):
        for x in xs:
            (model(x).pow(2).mean() / 2).backward()
    assert "first seen in a backward pass" not in caplog.text
    got = factors(precond)
    model.eval()
    want = oracle(model.seq, xs, lambda y1, y2: (y1.pow(2).mean() + y2.pow(2).mean()) / 2)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
    precond.step()

    model.train()
    with caplog.at_level(logging.WARNING, logger="hpckfac"):
        two_losses(model(xs[0]), model(xs[1])).backward()
    assert "layer seq.2 was first seen in a backward pass that follows 2 training forwards" in caplog.text
    assert "use_reentrant=False with context_fn=hpckfac.torch.checkpoint_context_fn" in caplog.text


def compile_available():
    try:
        torch.compile(lambda x: x + 1, backend="eager")(torch.zeros(1))
    except Exception:  # noqa: BLE001 (any failure: no usable torch.compile here)
        return False
    return True


needs_compile = pytest.mark.skipif(not hasattr(torch, "compile") or not compile_available(),
                                   reason="torch.compile is not available")


def state_of(precond, model) -> list[np.ndarray]:
    """The running factors and the parameters' gradients: what two runs that must agree share."""
    return [np.array(r) for r in precond.engine.state.running] + [p.grad.numpy().copy() for p in model.parameters()]


def assert_bitwise(got: list[np.ndarray], want: list[np.ndarray], count: int) -> None:
    """Two runs' ``state_of``, ``count`` arrays each, equal bit for bit."""
    assert len(got) == len(want) == count
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def train(model, run, precond, steps=2):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        model.zero_grad()
        nn.functional.cross_entropy(run(x), y).backward()
        precond.step()
    return state_of(precond, model)


@needs_compile
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # dynamo's import
@pytest.mark.parametrize("compiled_first", ["this model", "another instance"])
def test_a_preconditioner_built_after_a_compiled_forward_gets_its_statistics(compiled_first, caplog):
    """Code that torch.compile compiled before the hooks existed runs the model without them
    (dynamo does not guard on module hooks), whether it was this model's forward or another
    instance's of the same class: every K-FAC layer was silently first-order. The preconditioner
    discards it (torch.compiler.reset(), with a warning), and the factors and gradients are the
    eager model's."""
    torch.compiler.reset()
    model = mlp()
    want = train(model, model, kfac(model, inverse_update_interval=1))
    torch.compiler.reset()

    model = mlp()
    compiled = torch.compile(model if compiled_first == "this model" else mlp(), backend="eager")
    compiled(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    if compiled_first == "another instance":
        compiled = torch.compile(model, backend="eager")
    model.zero_grad()
    with caplog.at_level(logging.WARNING, logger="hpckfac"):
        precond = kfac(model, inverse_update_interval=1)
        got = train(model, compiled, precond)
    assert "discarded with torch.compiler.reset()" in caplog.text
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
    torch.compiler.reset()


def test_a_run_that_never_compiles_does_not_import_dynamo():
    """Hooks that run eagerly under torch.compile need dynamo's disabling wrapper only once
    something compiles: importing dynamo costs seconds at every rank's start-up (a storm of
    file reads on a parallel file system), so a run without torch.compile never imports it."""
    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from hpckfac.torch import KFACPreconditioner\n"
        "model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))\n"
        "precond = KFACPreconditioner(model, inverse_update_interval=1)\n"
        "for _ in range(2):\n"
        "    model(torch.randn(4, 2, 4, 4)).square().sum().backward()\n"
        "    precond.step()\n"
        "assert model[0].weight.grad is not None\n"
        "print('torch._dynamo' in sys.modules)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False", "a run without torch.compile imported torch._dynamo"


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_evaluation_forwards_in_train_mode_add_nothing(context):
    """Forwards under no_grad/inference_mode in train() mode, between steps and between a
    training forward and its backward, of another batch size: the factors and gradients are
    those of the run without them, bit for bit."""
    def run(evaluate):
        model = mlp()
        precond = kfac(model, inverse_update_interval=1)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            x, y = torch.randn(8, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            other = torch.randn(5, 5, dtype=torch.float64, generator=gen)
            if evaluate:
                with context():
                    model(other)
            model.zero_grad()
            out = model(x)
            if evaluate:
                with context():
                    model(other)
            nn.functional.cross_entropy(out, y).backward()
            precond.step()
        return state_of(precond, model)

    assert_bitwise(run(True), run(False), 6)  # two running factor sets, four gradients


def _torch_func_calls(model, x, y):
    """The model in train() mode under torch.func's transforms: per-example outputs (vmap), an
    input gradient for an adversarial example (grad), a Jacobian (jacrev), and per-example
    parameter gradients (vmap of grad over functional_call with the model's own parameters)."""
    from torch.func import functional_call, grad, jacrev, vmap
    params = dict(model.named_parameters())

    def example_loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    vmap(model)(x)
    grad(lambda inputs: nn.functional.cross_entropy(model(inputs), y))(x)
    jacrev(model)(x[:2])
    vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)


def test_forwards_inside_torch_func_transforms_add_nothing():
    """torch.func transforms of the model in train() mode, between steps and between a training
    forward and its backward: the factors and gradients are those of the run without them, bit for
    bit (the hooks read functorch's wrapper tensors, which have no storage, and raised
    'Cannot access data pointer of Tensor that doesn't have storage')."""
    def run(transforms):
        model = mlp()
        precond = kfac(model, inverse_update_interval=1)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            x, y = torch.randn(8, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            other = torch.randn(5, 5, dtype=torch.float64, generator=gen)
            if transforms:
                _torch_func_calls(model, other, y[:5])
            model.zero_grad()
            out = model(x)
            if transforms:
                _torch_func_calls(model, other, y[:5])
            nn.functional.cross_entropy(out, y).backward()
            precond.step()
        return state_of(precond, model)

    assert_bitwise(run(True), run(False), 6)  # two running factor sets, four gradients


def test_a_vectorized_backward_between_forward_and_backward_adds_nothing():
    """Rows of the input Jacobian of a training forward by a vectorized backward
    (``torch.autograd.grad(..., is_grads_batched=True)``, autograd's own vmap), then the loss's
    backward: the factors and gradients are those of the run without the Jacobian, bit for bit
    (the output's tensor hook got the batched gradients and raised 'Batching rule not
    implemented for aten::detach'); so with ``jacobian(..., vectorize=True)`` of a forward run
    under ``recomputing()``, as the docs advise for forwards that are not the loss's."""
    def run(jacobian):
        model = mlp()
        precond = kfac(model, inverse_update_interval=1)
        gen = torch.Generator().manual_seed(9)
        for _ in range(3):
            x = torch.randn(8, 5, dtype=torch.float64, generator=gen).requires_grad_()
            y = torch.randint(0, 3, (8,), generator=gen)
            model.zero_grad()
            out = model(x)
            if jacobian:
                rows = torch.eye(3, dtype=torch.float64)[:, None, :].expand(3, 8, 3)
                torch.autograd.grad(out, x, grad_outputs=rows, is_grads_batched=True, retain_graph=True)
                with recomputing():
                    torch.autograd.functional.jacobian(model, x[:2].detach(), vectorize=True)
            nn.functional.cross_entropy(out, y).backward()
            precond.step()
        return state_of(precond, model)

    assert_bitwise(run(True), run(False), 6)  # two running factor sets, four gradients


def test_a_model_trained_through_vmap_takes_no_statistics_and_is_told(caplog):
    """A loss on vmap(model)(x) backpropagated as usual: the calls inside vmap are not seen, so
    step() averages the plain gradient (the same as autograd's, on one rank) and says why."""
    from torch.func import vmap
    model = mlp()
    precond = kfac(model)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    with caplog.at_level(logging.WARNING, logger="hpckfac"):
        nn.functional.cross_entropy(vmap(model)(x), y).backward()
        plain = [p.grad.clone() for p in model.parameters()]
        precond.step()
    assert "torch.func transform such as vmap" in caplog.text
    for p, want in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("change", ["load_state_dict", "double", "channels_last"])
def test_parameters_swapped_by_torch_after_steps_train_as_converted_in_place(change):
    """Under ``torch.__future__.set_swap_module_params_on_conversion(True)`` torch swaps each
    parameter's and gradient's contents (``torch.utils.swap_tensors``) in ``load_state_dict`` and
    in conversions, and refuses a tensor that has a weak reference: after a step() that was every
    model (``Couldn't swap Conv2d.weight``). Done after the first and the second step, the run
    gives the factors and gradients of the same run converting in place, the default, bit for bit."""
    def run(swap):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        precond = kfac(model, inverse_update_interval=1)
        gen = torch.Generator().manual_seed(7)
        before = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(swap)
        try:
            for k in range(4):
                x, y = torch.randn(5, 2, 4, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)
                if k in (1, 2) and change == "load_state_dict":
                    model.load_state_dict({name: t.clone() for name, t in model.state_dict().items()})
                elif k == 1 and change == "double":
                    model.double()
                elif k in (1, 2) and change == "channels_last":
                    model.to(memory_format=torch.channels_last if k == 1 else torch.contiguous_format)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x.to(model[0].weight.dtype)), y).backward()
                precond.step()
                optimizer.step()
        finally:
            torch.__future__.set_swap_module_params_on_conversion(before)
        return state_of(precond, model)

    assert_bitwise(run(True), run(False), 6)  # two running factor sets, four gradients


def test_a_forward_hook_registered_before_that_replaces_the_output_leaves_g_the_layers_own():
    """A user's forward hook registered on a K-FAC layer before the preconditioner, returning
    another output (here ``0.5 y + 0.1``): G is the layer's own output gradient's, from autograd
    on a copy with the scaling written out, and A its input's (float64); before, the
    preconditioner's hook ran second and took the gradient of the hook's output, 0.5 times the
    layer's, so G was a quarter of it."""
    from hpckfac.ops.packing import unpack_upper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    plain = copy.deepcopy(model)
    model[0].register_forward_hook(lambda module, args, out: 0.5 * out + 0.1)
    precond = kfac(model)
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(7, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (7,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    out = plain[0](x)
    out.retain_grad()
    nn.functional.cross_entropy(plain[2](plain[1](0.5 * out + 0.1)), y).backward()
    rows, g = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1), out.grad * 7
    packed = precond.state_dict()["blocks"]["0"]["factors"].numpy()
    a, g_factor = unpack_upper(packed[:28], 1, 7)[0], unpack_upper(packed[28:], 1, 5)[0]
    np.testing.assert_allclose(a, (rows.T @ rows / 7).numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g_factor, (g.T @ g / 7).numpy(), rtol=1e-12, atol=1e-14)


def test_gradients_that_step_wrote_save_and_load_with_weights_only():
    """The .grad tensors step() wrote (the first K-FAC parameter's, marked for the second-step
    check, and every one between the first and second step, marked for the zero_grad() check)
    save with torch.save and load with torch.load(weights_only=True) as the same values."""
    import io

    model = mlp()
    precond = kfac(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for _ in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        buffer = io.BytesIO()
        torch.save([p.grad for p in model.parameters()], buffer)
        buffer.seek(0)
        for loaded, p in zip(torch.load(buffer, weights_only=True), model.parameters()):
            torch.testing.assert_close(loaded, p.grad, rtol=0, atol=0)



@pytest.mark.parametrize("zeroing", ["to none", "in place", "never"])
def test_no_zero_grad_check_mark_is_left_on_the_gradients(zeroing):
    """The marks by which the zero_grad() check follows each .grad from the first step() to the
    second are gone after the second: where zero_grad(set_to_none=False) zeroed the marked
    tensors in place and a backward added to them (the check stopped following them there), and
    where no zero_grad() ran (the check followed them to the second step, and warned)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence().entropy % 2**31))
    model = mlp()
    precond = kfac(model)
    for step in range(3):
        if zeroing != "never":
            model.zero_grad(set_to_none=zeroing == "to none")
        x, y = torch.randn(6, 5, dtype=torch.float64, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        if step > 0:
            left = {name: [a for a in vars(p.grad) if a.startswith("_hpckfac_watched")]
                    for name, p in model.named_parameters()}
            assert not any(left.values()), left


class AutocastNet(nn.Module):
    """A Linear on float32 inputs, a Conv1d and a Linear on the bfloat16 activations that CPU
    autocast gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv, self.head = nn.Linear(6, 8), nn.Conv1d(4, 4, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).view(-1, 4, 2)
        return self.head(torch.tanh(self.conv(h + 1)).flatten(1))


def test_statistics_under_bf16_autocast_are_float32_sums_of_what_the_layers_saw():
    """Forward and backward inside ``torch.autocast("cpu", dtype=torch.bfloat16)``: each layer's
    A and G equal float64 sums of the inputs and output gradients it saw (float32 for the first
    Linear, bfloat16 for the others) to float32's precision, far below bfloat16's 4e-3."""
    torch.manual_seed(0)
    model = AutocastNet()
    precond = kfac(model)
    seen = {}

    def capture(module, args, out):
        seen[module] = [args[0].detach().double()]
        out.register_hook(lambda g: seen[module].append(g.detach().double() * 16))
    for layer in (model.fc, model.conv, model.head):
        layer.register_forward_hook(capture)
    gen = torch.Generator().manual_seed(7)
    x, y = 3 * torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(model(x), y).backward()
    assert seen[model.conv][0].dtype == torch.float64 and seen[model.conv][1].dtype == torch.float64
    for block, stats, layer in zip(precond.engine.blocks, precond.local.result(), (model.fc, model.conv, model.head)):
        a, g = seen[layer]
        if layer is model.conv:
            a = nn.functional.unfold(a.unsqueeze(-1), (3, 1), padding=(1, 0)).transpose(1, 2).reshape(-1, 12)
            g, positions = g.transpose(1, 2).reshape(-1, 4), 2
        else:
            positions = 1
        rows = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1).numpy()
        want = [rows.T @ rows / 16, g.numpy().T @ g.numpy() / (16 * positions)]
        assert stats.dtype == np.float32
        for got, w in zip(block.factors(stats), want):
            np.testing.assert_allclose(got[0], w, rtol=0, atol=1e-6 * np.abs(w).max())
