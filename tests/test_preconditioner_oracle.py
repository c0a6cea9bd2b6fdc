"""docs/design.md's "Math conventions" end to end through KFACPreconditioner, in float64: for a
model holding a convolution, BatchNorm, an Embedding with a padding token, LayerNorm and Linear
layers on a sequence and a Linear head, three steps of .grad against factors, running averages,
pi-damped inverses and the KL clip computed here from the layers' inputs and output gradients
(torch's own hooks, np.linalg), with no hpckfac code in the oracle."""
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac import ops
from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.ops import inverse as cpu_inverse
from hpckfac.stages.engine import KFACEngine
from hpckfac.torch import KFACPreconditioner

LR, DAMPING, DECAY, KL_CLIP = 0.1, 1e-2, 0.8, 1e-4
BATCH, TOKENS, VOCAB, SIDE = 6, 3, 7, 4


class Net(nn.Module):
    """An image branch (Conv2d, BatchNorm2d) and a token branch (Embedding, LayerNorm, Linear on
    the sequence), joined by a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.emb, self.ln, self.seq = nn.Embedding(VOCAB, 4, padding_idx=0), nn.LayerNorm(4), nn.Linear(4, 4)
        self.head = nn.Linear(7, 3)

    def forward(self, x, tokens):
        image = torch.tanh(self.bn(self.conv(x))).mean((2, 3))
        sequence = torch.tanh(self.seq(self.ln(self.emb(tokens)))).mean(1)
        return self.head(torch.cat([image, sequence], 1))


def capture(net):
    """Each layer's input and per-example output gradient (the mean loss's times the batch)."""
    seen = {}

    def hook(name):
        def forward(module, args, out):
            seen[name] = {"a": args[0].detach().numpy().copy()}
            out.register_hook(lambda g: seen[name].__setitem__("g", g.detach().numpy() * BATCH))
        return forward

    for name in ("conv", "bn", "emb", "ln", "seq", "head"):
        getattr(net, name).register_forward_hook(hook(name))
    return seen


def with_ones(rows):
    return np.hstack([rows, np.ones((len(rows), 1))])


def kron_pair(a_rows, g_rows, positions):
    """A = (1/B) sum_i sum_t a a^T, G = (1/(B |T|)) sum_i sum_t g g^T."""
    return [a_rows.T @ a_rows / BATCH, g_rows.T @ g_rows / (BATCH * positions)]


def unit_fisher(x_hat, g):
    """Per unit c, (1/B) sum_i u_i u_i^T with u_i = (sum_t g x_hat, sum_t g); inputs (B, C, T)."""
    u = np.stack([(g * x_hat).sum(2), g.sum(2)], -1)
    return [np.einsum("nci,ncj->cij", u, u) / BATCH]


def statistics(seen, net):
    conv, bn, emb, ln, seq, head = (seen[n] for n in ("conv", "bn", "emb", "ln", "seq", "head"))
    patches = nn.functional.unfold(torch.from_numpy(conv["a"]), 3, padding=1).transpose(1, 2).reshape(-1, 18)
    x = bn["a"].reshape(BATCH, 3, -1)
    bn_hat = (x - x.mean((0, 2), keepdims=True)) / np.sqrt(x.var((0, 2), keepdims=True) + net.bn.eps)
    tokens = emb["a"]
    counts = np.bincount(tokens[tokens != 0].ravel(), minlength=VOCAB)  # the padding token is no input
    emb_g = emb["g"].reshape(-1, 4)
    x = ln["a"]
    ln_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + net.ln.eps)
    return {
        "conv": kron_pair(with_ones(patches.numpy()), conv["g"].transpose(0, 2, 3, 1).reshape(-1, 3), SIDE * SIDE),
        "bn": unit_fisher(bn_hat, bn["g"].reshape(BATCH, 3, -1)),
        # Padding positions still count in G: the example's positions, as a Linear's zero rows.
        "emb": [np.diag(counts / BATCH), emb_g.T @ emb_g / (BATCH * TOKENS)],
        "ln": unit_fisher(ln_hat.transpose(0, 2, 1), ln["g"].transpose(0, 2, 1)),
        "seq": kron_pair(with_ones(seq["a"].reshape(-1, 4)), seq["g"].reshape(-1, 4), TOKENS),
        "head": kron_pair(with_ones(head["a"]), head["g"], 1),
    }


def gradient(net, name):
    """The layer's gradient as the matrix its curvature acts on: [W | b], the transposed table of an
    Embedding, (gamma_c, beta_c) rows of a normalisation layer."""
    module = getattr(net, name)
    weight = module.weight.grad.numpy()
    if name == "emb":
        return weight.T.copy()
    if name in ("bn", "ln"):
        return np.stack([weight, module.bias.grad.numpy()], 1)
    return np.hstack([weight.reshape(len(weight), -1), module.bias.grad.numpy()[:, None]])


def inverses(factors):
    if len(factors) == 1:  # unit-wise: F_c + lambda I
        return [np.linalg.inv(factors[0] + DAMPING * np.eye(2))]
    a, g = factors
    pi = math.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    return [np.linalg.inv(a + pi * math.sqrt(DAMPING) * np.eye(len(a))),
            np.linalg.inv(g + math.sqrt(DAMPING) / pi * np.eye(len(g)))]


def precondition(inverse, grad):
    if len(inverse) == 1:
        return np.einsum("cij,cj->ci", inverse[0], grad)
    return inverse[1] @ grad @ inverse[0]


def test_three_steps_of_every_convention_against_the_oracle():
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        for norm in (net.bn, net.ln):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    seen = capture(net)
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF), lr=LR, damping=DAMPING, factor_decay=DECAY,
                                 factor_update_interval=1, inverse_update_interval=2, kl_clip=KL_CLIP)
    assert len(precond.modules) == 6 and not precond.other_params
    gen = torch.Generator().manual_seed(1)
    running, inverse, nus = {}, {}, []
    for step in range(3):
        x = torch.randn(BATCH, 2, SIDE, SIDE, generator=gen, dtype=torch.float64)
        tokens = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)
        tokens[0, 0] = 0
        y = torch.randint(0, 3, (BATCH,), generator=gen)
        net.zero_grad()
        nn.functional.cross_entropy(net(x, tokens), y).backward()
        for name, new in statistics(seen, net).items():
            # X <- rho X + (1 - rho) X_new, rho = factor_decay; the first update sets X = X_new.
            old = running.get(name)
            running[name] = new if old is None else [DECAY * o + (1 - DECAY) * n for o, n in zip(old, new)]
        if step % 2 == 0:
            inverse = {name: inverses(factors) for name, factors in running.items()}
        grads = {name: gradient(net, name) for name in running}
        v = {name: precondition(inverse[name], grad) for name, grad in grads.items()}
        total = sum(float(np.sum(v[name] * grads[name])) for name in v)
        nu = min(1.0, math.sqrt(KL_CLIP / (LR ** 2 * total)))
        precond.step()
        assert math.isclose(precond.last_nu, nu, rel_tol=1e-12)
        for name in v:
            np.testing.assert_allclose(gradient(net, name), nu * v[name], rtol=1e-9, atol=1e-14, err_msg=name)
        nus.append(nu)
    assert max(nus) < 1.0  # the clip was active at every step


def one_linear_step(layer, damping, x, y):
    """One step of ``layer`` (an nn.Linear) on ``x`` (float64 values exact in the layer's dtype):
    its .grad after step() as ``[dW | db]`` in float64, the float64 oracle's ``A`` and ``G``
    from the same inputs, and the ``[dW | db]`` step() was given."""
    precond = KFACPreconditioner(layer, comm=Communicator(MPI.COMM_SELF), damping=damping, kl_clip=None)
    seen = {}
    out = layer(x.to(layer.weight.dtype))
    out.register_hook(lambda g: seen.__setitem__("g", g.double().numpy() * len(x)))
    (out - y.to(out.dtype)).pow(2).mean().backward()
    grad = gradient_matrix(layer)
    precond.step()
    a = with_ones(x.numpy())
    return gradient_matrix(layer), [a.T @ a / len(x), seen["g"].T @ seen["g"] / len(x)], grad


def gradient_matrix(layer):
    return np.hstack([layer.weight.grad.double().numpy(), layer.bias.grad.double().numpy()[:, None]])


@pytest.mark.parametrize("damping", [1e-2, 1e-6, 1e-10])
def test_float32_preconditioning_error_follows_the_condition_number(damping):
    """A float32 Linear layer whose inputs span 4 decades (A's condition number ~1e8 before
    damping): the preconditioned gradient is within kappa * eps32 of the float64 oracle, kappa
    the damped A's condition number (docs/preconditioner.md, "Accuracy"; measured 0.2-0.6 of
    it), and the float64 model's within kappa * eps64 (0.05-0.35)."""
    gen = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    x = (torch.randn(256, 16, generator=gen, dtype=torch.float64) * torch.logspace(0, -4, 16, dtype=torch.float64)) @ q.T
    x = x.float().double()  # the float32 model's inputs, exactly
    y = torch.randn(256, 5, generator=gen, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        got, factors, grad = one_linear_step(nn.Linear(16, 5).to(dtype), damping, x, y)
        inv_a, inv_g = inverses_at(factors, damping)
        oracle = inv_g @ grad @ inv_a
        a = factors[0]
        pi = math.sqrt((np.trace(a) / len(a)) / (np.trace(factors[1]) / len(factors[1])))
        kappa = np.linalg.cond(a + pi * math.sqrt(damping) * np.eye(len(a)))
        eps = torch.finfo(dtype).eps
        error = np.linalg.norm(got - oracle) / np.linalg.norm(oracle)
        assert error <= kappa * eps, dtype


def inverses_at(factors, damping):
    """A Kronecker pair's pi-damped inverses at ``damping``."""
    a, g = factors
    pi = math.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
    return [np.linalg.inv(a + pi * math.sqrt(damping) * np.eye(len(a))),
            np.linalg.inv(g + math.sqrt(damping) / pi * np.eye(len(g)))]


def test_the_smallest_damping_on_a_singular_factor_is_raised_by_the_jitter():
    """More inputs than examples (A of rank 7 in 31 dimensions) under the smallest damping
    allowed: pi*sqrt(damping) does not register next to A's entries, so the inversion's jitter
    fallback inverts ``A + j * mean(diag A) * I`` for one documented ``j`` (docs/preconditioner.md,
    "Accuracy"), the updates stay finite, and the .grad is that of the jittered A."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(7, 30, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    ops.reset_inversion_counters()
    got, (a, g), grad = one_linear_step(nn.Linear(30, 4).double(), 5e-324, x, y)
    assert ops.inversion_counters()["jitter"] >= 1 and np.isfinite(got).all()
    inv_g = np.linalg.inv(g)  # G (4x4 from 7 examples) is positive definite; sqrt(damping)/pi is 0 to it

    def error(j):
        oracle = inv_g @ grad @ np.linalg.inv(a + j * np.diag(a).mean() * np.eye(len(a)))
        return np.linalg.norm(got - oracle) / np.linalg.norm(oracle)

    assert min(error(j) for j in cpu_inverse.JITTERS) < 1e-6


class ScaledLinear(nn.Module):
    """A float32 first-order scale registered before a float64 Linear layer: the model's first
    parameter is float32, its only K-FAC layer float64."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 1.5))
        self.linear = nn.Linear(6, 4).double()

    def forward(self, x):
        return self.linear(x) * self.scale.double()


def test_a_float32_first_order_parameter_leaves_a_float64_layer_in_float64():
    """factor_dtype=None takes float64 from the K-FAC layers, not from whichever parameter the
    model registers first: the float64 layer's .grad matches the float64 oracle to float64's
    precision (a float32 buffer would leave ~1e-7)."""
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(32, 6, generator=gen, dtype=torch.float64), torch.randn(32, 4, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    net = ScaledLinear()
    precond = KFACPreconditioner(net, comm=Communicator(MPI.COMM_SELF), damping=1e-3, kl_clip=None)
    seen = {}
    out = net.linear(x)
    out.register_hook(lambda g: seen.__setitem__("g", g.numpy() * len(x)))
    (out * net.scale.double() - y).pow(2).mean().backward()
    grad = gradient_matrix(net.linear)
    precond.step()
    a = with_ones(x.numpy())
    g = seen["g"]  # the layer's output gradient, the scale's factor in it
    inv_a, inv_g = inverses_at([a.T @ a / len(x), g.T @ g / len(x)], 1e-3)
    np.testing.assert_allclose(gradient_matrix(net.linear), inv_g @ grad @ inv_a, rtol=1e-12, atol=1e-15)
    assert np.dtype(precond.engine.comm_dtype) == np.float64


@pytest.mark.parametrize("seed", range(3))
def test_a_damping_term_beyond_float32s_range_is_inverted_not_refused(seed):
    """Float32 factors of ~1e30 (inputs of 1e15) and ~1e-30 (output gradients of 1e-15) under the
    largest damping allowed, 1e18: ``pi * sqrt(damping)`` (1e39) is finite in float64 and beyond
    float32's range. The step inverts ``A + pi sqrt(l) I`` (its float64 eigen fallback) and gives
    the float64 oracle's update instead of raising on a damping cast to inf."""
    rng = np.random.default_rng(seed)
    block = LinearBlock("fc", 7, 4, bias=False)
    x, y = rng.standard_normal((64, 7)) * 1e15, rng.standard_normal((64, 4)) * 1e-15
    a, g = (np.asarray(m.T @ m / 64, dtype=np.float32).astype(np.float64) for m in (x, y))
    stats = np.concatenate([a[np.triu_indices(7)], g[np.triu_indices(4)]])
    grad = rng.standard_normal((4, 7)).astype(np.float32).astype(np.float64)
    damping = 1e18
    engine = KFACEngine([block], Communicator(MPI.COMM_SELF), damping=damping, kl_clip=None, comm_dtype=np.float32)
    (got,) = engine.step([grad], [stats], lr=0.1)
    inv_a, inv_g = inverses_at([a, g], damping)
    pi = math.sqrt((np.trace(a) / 7) / (np.trace(g) / 4))
    assert float(np.finfo(np.float32).max) < pi * math.sqrt(damping) < math.inf
    want = inv_g @ grad @ inv_a
    assert np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / np.linalg.norm(want) < 1e-4
