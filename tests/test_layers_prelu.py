"""PReLUBlock against a float64 oracle: the slopes' per-example gradients from torch.func, their
dense ``C x C`` Fisher, and the preconditioned gradient that ``step()`` writes into ``.grad``,
``(F + λ I)^-1`` times the mean gradient, on inputs (N, C), (N, C, L) and (N, C, H, W) with one
slope per channel and one shared slope, batch 1 included."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.func import functional_call, grad, vmap

from hpckfac.comm import Communicator
from hpckfac.layers import PReLUBlock
from hpckfac.torch import KFACPreconditioner

DAMPING = 1e-3
# (input shape, slopes): every rank of input the layer takes, per channel and shared, batch 1 too.
CASES = [((6, 4), 4), ((6, 4), 1), ((5, 3, 7), 3), ((5, 3, 7), 1), ((4, 3, 5, 6), 3), ((4, 3, 5, 6), 1),
         ((1, 5, 4), 5), ((1, 2, 3, 3), 1), ((7, 1, 4), 1)]


def setup(shape, slopes, seed):
    """A double PReLU with random slopes of both signs, its input (about a third of it negative),
    and per-example weights of a nonlinear loss on its output."""
    gen = torch.Generator().manual_seed(seed)
    module = nn.PReLU(slopes).double()
    with torch.no_grad():
        module.weight.copy_(torch.rand(slopes, generator=gen, dtype=torch.float64) - 0.3)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return module, x, w


def example_loss(y, w):
    """One example's loss: nonlinear in the output, so its gradient differs from example to example."""
    return (w * torch.tanh(y)).sum()


def oracle(module, x, w):
    """Per-example gradients of the slopes ``(N, C)`` and of the layer output (shaped as ``x``),
    each from one example's own loss."""
    params = {"weight": module.weight.detach()}

    def loss(p, xi, wi):
        return example_loss(functional_call(module, p, (xi[None],))[0], wi)

    slopes = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, w)["weight"]
    with torch.no_grad():
        y = module(x)
    return slopes.numpy(), vmap(grad(example_loss))(y, w).numpy()


def max_rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("shape,slopes", CASES)
def test_fisher_is_the_dense_fisher_of_the_per_example_slope_gradients(shape, slopes):
    module, x, w = setup(shape, slopes, seed=len(shape) * 10 + slopes)
    u, g = oracle(module, x, w)
    n = shape[0]
    fisher = u.T @ u / n
    block = PReLUBlock("prelu", slopes)
    assert max_rel(block.slope_gradients(x.numpy(), g), u) < 1e-13
    got = block.fisher(x.numpy(), g, scale=1 / n)
    assert got.shape == (slopes, slopes) and got.dtype == np.float64
    assert max_rel(got, fisher) < 1e-13
    stats = block.statistics(x.numpy(), g, 1 / n)
    assert stats.shape == (slopes * (slopes + 1) // 2,)
    (stack,) = block.factors(stats)
    assert max_rel(stack[0], fisher) < 1e-13
    # The block's own solve is the dense damped solve of the mean gradient.
    mean = u.mean(0)
    want = np.linalg.solve(fisher + DAMPING * np.eye(slopes), mean)
    got = block.solve(stats, block.grad_matrix(mean), DAMPING)
    assert max_rel(block.split_matrix(got)[0], want) < 1e-10



@pytest.mark.parametrize("x_dtype,g_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_mixed_input_and_gradient_dtypes_compute_in_the_wider(x_dtype, g_dtype):
    """A float32 input with float64 gradients (or the other way round): the slopes' gradients
    and their Fisher are computed in float64, from the narrower operand widened exactly, not
    rounded to float32."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((6, 3, 5)) * 2 + 0.5).astype(x_dtype)
    g = rng.standard_normal((6, 3, 5)).astype(g_dtype)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    u = np.stack([[sum(g64[i, c, t] * min(x64[i, c, t], 0.0) for t in range(5)) for c in range(3)]
                  for i in range(6)])
    block = PReLUBlock("prelu", 3)
    got = block.slope_gradients(x, g)
    assert got.dtype == np.float64 and max_rel(got, u) < 1e-14
    fisher = block.fisher(x, g, scale=1 / 6)
    assert fisher.dtype == np.float64 and max_rel(fisher, u.T @ u / 6) < 1e-14


@pytest.mark.parametrize("shape,slopes", CASES)
def test_step_writes_the_damped_natural_gradient(shape, slopes):
    """Through the hooks and the pipeline (one rank): a model that is the PReLU alone, trained on
    the mean of the examples' losses; after step() its ``.grad`` is ``(F + λ I)^-1 ∇w``."""
    module, x, w = setup(shape, slopes, seed=len(shape) * 10 + slopes + 1)
    u, _ = oracle(module, x, w)
    fisher = u.T @ u / shape[0]
    precond = KFACPreconditioner(module, comm=Communicator(MPI.COMM_SELF), lr=0.1, damping=DAMPING, kl_clip=None,
                                 factor_update_interval=1, inverse_update_interval=1)
    torch.stack([example_loss(y, wi) for y, wi in zip(module(x), w)]).mean().backward()
    np.testing.assert_allclose(module.weight.grad.numpy(), u.mean(0), rtol=1e-12, atol=1e-15)
    precond.step()
    want = np.linalg.solve(fisher + DAMPING * np.eye(slopes), u.mean(0))
    assert module.weight.grad.dtype == torch.float64
    assert max_rel(module.weight.grad.numpy(), want) < 1e-10


def test_coverage_and_gradient_layout():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(12, 2), nn.PReLU())
    text = repr(KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF)))
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "4 of 4 layers with parameters preconditioned" in text.splitlines()[0]
    assert "PReLU" in lines["1"] and "K-FAC (3 slopes, 3x3)" in lines["1"]
    assert "K-FAC (1 slope, 1x1)" in lines["4"]
    block = PReLUBlock("p", 3)
    assert block.param_shapes == ((3,), None) and block.grad_shape == (3, 1) and block.cost() == 27
    weight = np.arange(3.0)
    mat = block.grad_matrix(weight)
    back, bias = block.split_matrix(mat)
    assert bias is None and np.array_equal(back, weight) and np.shares_memory(back, mat)


def test_precondition_orientation_on_general_matrices():
    """``precondition`` is ``inv @ grad``, row ``i`` the sum over ``j`` of ``inv[i, j] grad[j]``:
    checked on a non-symmetric matrix, for which its transpose gives another result (the
    symmetric inverse of the pipeline cannot tell the two apart)."""
    rng = np.random.default_rng(8)
    block = PReLUBlock("prelu", 4)
    inv, grad = rng.standard_normal((1, 4, 4)), rng.standard_normal((4, 1))
    want = (inv[0] * grad[:, 0]).sum(axis=1)[:, None]
    np.testing.assert_allclose(block.precondition(grad, [inv]), want, rtol=1e-12, atol=1e-12)


def test_bad_arguments_and_inputs_are_refused():
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ValueError, match="num_parameters"):
            PReLUBlock("p", bad)
    block = PReLUBlock("p", 3)
    with pytest.raises(ValueError, match="x: block 'p' expects 3 channels on axis 1"):
        block.statistics(np.zeros((2, 4, 5)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="g: shape"):
        block.statistics(np.zeros((2, 3, 5)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="bias_grad"):
        block.grad_matrix(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="inverses"):
        block.precondition(np.ones((3, 1)), [np.eye(2)[None]])
    # A shared slope takes a 1-D input too: one example's features, which would be read as examples.
    module = nn.PReLU().double()
    KFACPreconditioner(module, comm=Communicator(MPI.COMM_SELF))
    with pytest.raises(ValueError, match="unbatched input of shape \\(5,\\) is not supported"):
        module(torch.randn(5, dtype=torch.float64))
