"""InstanceNormBlock against independent float64 oracles: per-example gradients of
(gamma_c, beta_c) by autograd, one example at a time (no vmap, no torch.func); the dense
Fisher of all 2C affine parameters built from them; the damped solve by np.linalg.solve; the
exact Fisher of a single example; and the block as the preconditioner builds it from
``nn.InstanceNorm{1,2,3}d`` (coverage, statistics, the natural gradient written to .grad)."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.layers import GroupNormBlock, InstanceNormBlock
from hpckfac.torch import KFACPreconditioner
from hpckfac.torch.registry import block_for

EPS = 1e-4
NORMS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def affine_module(dims, channels, seed):
    torch.manual_seed(seed)
    module = NORMS[dims](channels, eps=EPS, affine=True).double()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module


def oracle(module, x):
    """Per example i: the gradient of its own loss l_i = sum(w_i * tanh(y_i)) with respect to
    (weight, bias), as u[i] of shape (C, 2), and with respect to the layer output, g[i]."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    us, gs = [], []
    for i in range(x.shape[0]):
        xi = torch.from_numpy(x[i:i + 1])
        y = module(xi)
        y.retain_grad()
        loss = (w[i:i + 1] * torch.tanh(y)).sum()
        dw, db = torch.autograd.grad(loss, (module.weight, module.bias), retain_graph=True)
        (gy,) = torch.autograd.grad(loss, y)
        us.append(torch.stack([dw, db], -1).numpy())
        gs.append(gy.numpy())
    return np.stack(us), np.concatenate(gs)


def dense_fisher(u):
    """The (2C, 2C) Fisher (1/N) sum_i vec(u_i) vec(u_i)^T, vec row-major over (channel, (gamma, beta))."""
    flat = u.reshape(u.shape[0], -1)
    return flat.T @ flat / u.shape[0]


SHAPES = [(1, (5, 3, 7)), (1, (4, 2, 2)), (2, (4, 3, 5, 4)), (2, (3, 1, 2, 3)), (3, (3, 2, 2, 3, 2))]


@pytest.mark.parametrize("dims,shape", SHAPES)
def test_fisher_and_solve_against_per_example_autograd(dims, shape):
    module = affine_module(dims, shape[1], seed=sum(shape))
    x = np.random.default_rng(len(shape)).standard_normal(shape) * 2 + 0.3
    u, g = oracle(module, x)
    block = InstanceNormBlock("in", shape[1], EPS, spatial_dims=dims)
    n, c = shape[:2]
    dense = dense_fisher(u)
    # Unit-wise: the block keeps the 2x2 diagonal blocks of the dense Fisher.
    got = block.fisher(x, g, scale=1 / n)
    assert got.shape == (c, 2, 2) and got.dtype == np.float64
    for k in range(c):
        np.testing.assert_allclose(got[k], dense[2 * k:2 * k + 2, 2 * k:2 * k + 2], rtol=1e-10, atol=1e-14)
    stats = block.statistics(x, g, 1 / n)
    np.testing.assert_allclose(block.factors(stats)[0], got, rtol=1e-15)
    # The gradient of the mean loss is the mean of the u_i; its natural gradient per channel.
    mean = u.mean(0)
    mat = block.grad_matrix(mean[:, 0].copy(), mean[:, 1].copy())
    damping = 1e-2
    want = np.zeros_like(mat)
    for k in range(c):
        want[k] = np.linalg.solve(dense[2 * k:2 * k + 2, 2 * k:2 * k + 2] + damping * np.eye(2), mean[k])
    np.testing.assert_allclose(block.solve(stats, mat, damping), want, rtol=1e-9)


def test_one_example_gives_its_exact_fisher():
    """With one example the unit-wise Fisher is that example's exact Fisher u u^T per channel."""
    module = affine_module(2, 3, seed=4)
    x = np.random.default_rng(7).standard_normal((1, 3, 4, 5))
    u, g = oracle(module, x)
    got = InstanceNormBlock("in", 3, EPS).fisher(x, g)
    for k in range(3):
        np.testing.assert_allclose(got[k], np.outer(u[0, k], u[0, k]), rtol=1e-10, atol=1e-15)


def test_equals_groupnorm_with_one_channel_per_group():
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((4, 6, 3, 5)), rng.standard_normal((4, 6, 3, 5))
    np.testing.assert_allclose(InstanceNormBlock("in", 6, EPS).fisher(x, g),
                               GroupNormBlock("gn", 6, 6, EPS).fisher(x, g), rtol=1e-12)


def test_registration_and_coverage():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True), nn.InstanceNorm2d(3),
                          nn.InstanceNorm2d(3, affine=True, track_running_stats=True), nn.Flatten(),
                          nn.Unflatten(1, (3, 4)), nn.InstanceNorm1d(3, affine=True), nn.Flatten(),
                          nn.Unflatten(1, (3, 1, 2, 2)), nn.InstanceNorm3d(3, affine=True), nn.Flatten(),
                          nn.Linear(12, 2))
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    text = repr(precond)
    print(text)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "6 of 6 layers with parameters preconditioned" in text.splitlines()[0]
    for name, kind in (("1", "InstanceNorm2d"), ("3", "InstanceNorm2d"), ("6", "InstanceNorm1d"),
                       ("9", "InstanceNorm3d")):
        assert kind in lines[name] and "K-FAC (3 units, 2x2 each)" in lines[name], lines[name]
    assert "2" not in lines  # affine=False: no parameters, nothing to list
    assert [b.spatial_dims for b in precond.engine.blocks[1:5]] == [2, 2, 1, 3]
    assert block_for("in", nn.InstanceNorm2d(3)) is None


def test_unbatched_input_is_refused():
    """InstanceNorm1d takes an unbatched (C, L) input; the block must not read it as C examples."""
    block = block_for("in", nn.InstanceNorm1d(3, affine=True))
    with pytest.raises(ValueError, match="x: .*expects 3 dimensions"):
        block.fisher(np.ones((3, 3)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="x: .*expects 3 dimensions"):  # InstanceNorm1d refuses 2-d maps too
        block.fisher(np.ones((2, 3, 4, 4)), np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="x: .*expects 3 units"):
        block.fisher(np.ones((2, 4, 3)), np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="x: .*expects at least 3 dimensions"):  # spatial_dims=None
        InstanceNormBlock("in", 3, EPS).fisher(np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="num_features"):
        InstanceNormBlock("in", 0, EPS)
    with pytest.raises(ValueError, match="eps"):
        InstanceNormBlock("in", 3, 0.0)
    with pytest.raises(ValueError, match="spatial_dims"):
        InstanceNormBlock("in", 3, EPS, spatial_dims=0)
    model = nn.Sequential(nn.InstanceNorm1d(3, affine=True), nn.Flatten(0), nn.Linear(12, 2)).double()
    KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    with pytest.raises(ValueError, match="unbatched"):
        model(torch.ones(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_preconditioner_statistics_and_natural_gradient(fraction):
    """Through the bridge: the block's statistics equal the per-example oracle's Fisher (over the
    first examples with statistics_fraction), and .grad becomes (F_c + damping I)^-1 grad_c."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    damping = 1e-2
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), lr=0.1, damping=damping, kl_clip=None,
                                 statistics_fraction=fraction)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 2, (6,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    grad = torch.stack([model[1].weight.grad, model[1].bias.grad], -1).numpy().copy()
    # The oracle in eval() mode, so that these extra forwards take no statistics (InstanceNorm
    # without running statistics normalises the same way in eval()).
    model.eval()
    u = np.stack([torch.stack(torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                                  (model[1].weight, model[1].bias)), -1).numpy()
                  for i in range(6)])
    model.train()
    taken = int(np.ceil(fraction * 6))
    index = [type(b).__name__ for b in precond.engine.blocks].index("InstanceNormBlock")
    stats = precond.local.result()[index]
    block = precond.engine.blocks[index]
    fisher = block.factors(stats)[0]
    dense = dense_fisher(u[:taken])
    for k in range(3):
        np.testing.assert_allclose(fisher[k], dense[2 * k:2 * k + 2, 2 * k:2 * k + 2], rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(grad, u.mean(0), rtol=1e-10, atol=1e-15)
    precond.step()
    got = torch.stack([model[1].weight.grad, model[1].bias.grad], -1).numpy()
    for k in range(3):
        want = np.linalg.solve(dense[2 * k:2 * k + 2, 2 * k:2 * k + 2] + damping * np.eye(2), grad[k])
        np.testing.assert_allclose(got[k], want, rtol=1e-9)
