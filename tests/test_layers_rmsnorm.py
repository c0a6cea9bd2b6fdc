"""RMSNormBlock against independent float64 oracles: per-example gradients of the weight by
autograd, one example at a time, of ``nn.RMSNorm`` itself; the dense Fisher of all the weights
built from them; the damped solve as a division per unit; eps=None against what torch computes
for every input dtype; and the block as the preconditioner builds it (coverage, statistics, the
natural gradient written to .grad)."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.layers import LayerNormBlock, RMSNormBlock
from hpckfac.torch import KFACPreconditioner
from hpckfac.torch.bridge import to_array
from hpckfac.torch.registry import block_for
from torch_features import needs_rmsnorm

pytestmark = needs_rmsnorm


def weighted_module(normalized, eps, seed):
    torch.manual_seed(seed)
    module = nn.RMSNorm(normalized, eps=eps).double()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
    return module


def oracle(module, x):
    """Per example i: the gradient of its own loss l_i = sum(w_i * tanh(y_i)) with respect to the
    weight, flattened (units,), and with respect to the layer output, g[i]."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    us, gs = [], []
    for i in range(x.shape[0]):
        y = module(torch.from_numpy(x[i:i + 1]))
        loss = (w[i:i + 1] * torch.tanh(y)).sum()
        dw, gy = torch.autograd.grad(loss, (module.weight, y))
        us.append(dw.reshape(-1).numpy())
        gs.append(gy.numpy())
    return np.stack(us), np.concatenate(gs)


def inputs(shape, scale, seed):
    """Random inputs whose examples span magnitudes around sqrt(scale): there eps moves x̂ by
    a large share, so a wrong eps cannot pass."""
    rng = np.random.default_rng(seed)
    sizes = np.sqrt(scale) * 10.0 ** rng.uniform(-1, 1, (shape[0],) + (1,) * (len(shape) - 1))
    return rng.standard_normal(shape) * sizes


# (input shape, normalized_shape, eps): one and two normalised dimensions, batches of sequences,
# eps=None (float64's machine epsilon for float64 input) and given.
CASES = [((5, 6), (6,), None), ((4, 3, 5), (5,), None), ((4, 3, 5), 5, 1e-3), ((3, 2, 3, 4), (3, 4), None),
         ((3, 2, 3, 4), (3, 4), 1e-2), ((2, 3, 2, 4), (2, 4), 1e-5)]


@pytest.mark.parametrize("shape,normalized,eps", CASES)
def test_fisher_and_solve_against_per_example_autograd(shape, normalized, eps):
    module = weighted_module(normalized, eps, seed=sum(shape))
    x = inputs(shape, np.finfo(np.float64).eps if eps is None else eps, seed=len(shape))
    u, g = oracle(module, x)
    block = RMSNormBlock("rms", normalized, eps)
    n, units = shape[0], block.units
    dense = u.T @ u / n  # (units, units): (1/N) sum_i u_i u_i^T over every weight
    # Unit-wise: the block keeps the diagonal of the dense Fisher, one 1x1 block per unit.
    got = block.fisher(x, g, scale=1 / n)
    assert got.shape == (units, 1, 1) and got.dtype == np.float64
    np.testing.assert_allclose(got[:, 0, 0], np.diag(dense), rtol=1e-10, atol=0)
    stats = block.statistics(x, g, 1 / n)
    np.testing.assert_allclose(block.factors(stats)[0], got, rtol=1e-15)
    # The gradient of the mean loss is the mean of the u_i; its natural gradient per weight.
    mean = u.mean(0)
    mat = block.grad_matrix(mean.reshape(block.param_shape))
    assert mat.shape == (units, 1)
    damping = 1e-2 * np.diag(dense).mean()
    np.testing.assert_allclose(block.solve(stats, mat, damping)[:, 0], mean / (np.diag(dense) + damping),
                               rtol=1e-9)
    weight, bias = block.split_matrix(mat)
    assert bias is None and np.array_equal(weight, mean.reshape(block.param_shape))


def test_one_example_gives_its_exact_fisher():
    """With one example the unit-wise Fisher is that example's exact Fisher u_c^2 per weight."""
    module = weighted_module((2, 3), None, seed=4)
    x = inputs((1, 5, 2, 3), 1.0, seed=7)
    u, g = oracle(module, x)
    np.testing.assert_allclose(RMSNormBlock("rms", (2, 3)).fisher(x, g)[:, 0, 0], u[0] ** 2, rtol=1e-10)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3),
                                        (torch.bfloat16, 1e-2)])
def test_default_eps_is_the_one_torch_computes_with(dtype, rtol):
    """eps=None: x̂ of an input as the hooks hand it over (bfloat16 as ml_dtypes') equals torch's
    output for inputs whose mean square is the size of the epsilon torch uses, float32's for
    float16 and bfloat16 (their own would be 8000x and 65000x larger)."""
    torch.manual_seed(2)
    size = np.sqrt(np.finfo(np.float64 if dtype == torch.float64 else np.float32).eps)
    x = (torch.randn(3, 4, 5, dtype=torch.float64) * size).to(dtype)
    want = nn.RMSNorm(5, elementwise_affine=False)(x).double().numpy()
    got = block_for("rms", nn.RMSNorm(5).to(dtype)).normalized(to_array(x))
    assert got.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    np.testing.assert_allclose(got.swapaxes(1, 2).reshape(x.shape), want, rtol=rtol, atol=0)


def test_is_layernorm_without_centring_and_bias():
    """On inputs of mean zero over the normalised dimensions RMSNorm is LayerNorm without bias."""
    rng = np.random.default_rng(3)
    x, g = rng.standard_normal((4, 3, 6)), rng.standard_normal((4, 3, 6))
    x -= x.mean(-1, keepdims=True)
    np.testing.assert_allclose(RMSNormBlock("rms", 6, 1e-4).fisher(x, g),
                               LayerNormBlock("ln", 6, 1e-4, bias=False).fisher(x, g), rtol=1e-12)


def test_registration_coverage_and_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4), nn.RMSNorm(4, elementwise_affine=False),
                          nn.Unflatten(2, (2, 2)), nn.RMSNorm((2, 2), eps=1e-3), nn.Flatten(), nn.Linear(20, 2))
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    text = repr(precond)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert "4 of 4 layers with parameters preconditioned" in text.splitlines()[0]
    assert "RMSNorm" in lines["1"] and "K-FAC (4 units, 1x1 each)" in lines["1"], lines["1"]
    assert "RMSNorm" in lines["4"] and "K-FAC (4 units, 1x1 each)" in lines["4"], lines["4"]
    assert "2" not in lines  # elementwise_affine=False: no parameters, nothing to list
    assert [b.eps for b in precond.engine.blocks[1:3]] == [None, 1e-3]
    assert block_for("rms", nn.RMSNorm(4, elementwise_affine=False)) is None
    for args, match in ((((3, 0),), "normalized_shape"), ((3, 0.0), "eps"), ((3, -1.0), "eps")):
        with pytest.raises(ValueError, match=match):
            RMSNormBlock("rms", *args)
    with pytest.raises(ValueError, match=r"x: block 'rms' expects trailing dimensions \(4,\)"):
        RMSNormBlock("rms", 4).add_input(np.zeros(1), np.ones((2, 3, 5)))


@pytest.mark.parametrize("eps,fraction", [(None, 1.0), (1e-3, 1.0), (None, 0.5)])
def test_preconditioner_statistics_and_natural_gradient(eps, fraction):
    """Through the bridge, on (B, T, C) sequences: the block's statistics equal the per-example
    oracle's Fisher (over the first examples with statistics_fraction), and .grad becomes
    grad_c / (F_c + damping) per weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.RMSNorm(4, eps=eps), nn.Tanh(), nn.Flatten(),
                          nn.Linear(5 * 4, 2)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    damping = 1e-3
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), lr=0.1, damping=damping, kl_clip=None,
                                 statistics_fraction=fraction)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 3, dtype=torch.float64, generator=gen) * 1e-2  # mean squares near a given eps
    y = torch.randint(0, 2, (6,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    grad = model[1].weight.grad.numpy().copy()
    # The oracle in eval() mode, so that these extra forwards take no statistics.
    model.eval()
    u = np.stack([torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                      model[1].weight)[0].numpy() for i in range(6)])
    model.train()
    taken = int(np.ceil(fraction * 6))
    index = [type(b).__name__ for b in precond.engine.blocks].index("RMSNormBlock")
    fisher = precond.engine.blocks[index].factors(precond.local.result()[index])[0][:, 0, 0]
    np.testing.assert_allclose(fisher, (u[:taken] ** 2).mean(0), rtol=1e-10, atol=0)
    np.testing.assert_allclose(grad, u.mean(0), rtol=1e-10, atol=1e-15)
    precond.step()
    np.testing.assert_allclose(model[1].weight.grad.numpy(), grad / ((u[:taken] ** 2).mean(0) + damping), rtol=1e-9)
