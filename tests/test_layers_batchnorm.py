"""BatchNormBlock: unit-wise 2x2 Fishers against per-example gradients of (gamma, beta) from
torch.func, and the per-channel solve against np.linalg (float64)."""
import ml_dtypes
import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from hpckfac.layers import BatchNormBlock

EPS = 1e-3


def per_example_affine_grads(x, weights):
    """Per-example gradients of (gamma, beta) and of the output for y = gamma x_hat + beta,
    x_hat from torch's batch normalisation in training mode (batch statistics), held fixed."""
    x = torch.from_numpy(x)
    x_hat = torch.nn.functional.batch_norm(x, None, None, training=True, eps=EPS)
    channels = x.shape[1]
    view = (channels,) + (1,) * (x.dim() - 2)
    gamma = torch.linspace(0.5, 1.5, channels, dtype=torch.float64)
    beta = torch.linspace(-0.3, 0.2, channels, dtype=torch.float64)
    w = torch.from_numpy(weights)

    def loss(params, xh, wi):
        y = params[0].reshape(view) * xh + params[1].reshape(view)
        return (wi * torch.tanh(y)).sum()

    def loss_of_output(y, wi):
        return (wi * torch.tanh(y)).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))((gamma, beta), x_hat, w)
    y = gamma.reshape(view) * x_hat + beta.reshape(view)
    return grads[0].numpy(), grads[1].numpy(), vmap(grad(loss_of_output))(y, w).numpy()


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 7), (4, 3, 3, 5)])
def test_fisher_against_per_example_gradients(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 2.0 + 0.5
    grad_gamma, grad_beta, g = per_example_affine_grads(x, rng.standard_normal(shape))
    block = BatchNormBlock("bn", shape[1], EPS)
    got = block.fisher(x, g, scale=1 / shape[0])
    assert got.shape == (shape[1], 2, 2) and got.dtype == np.float64
    for c in range(shape[1]):
        u = np.stack([grad_gamma[:, c], grad_beta[:, c]], axis=1)  # (N, 2)
        np.testing.assert_allclose(got[c], u.T @ u / shape[0], rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("autocast", [False, True])
def test_fisher_of_float32_input_is_float32(autocast):
    """Also inside torch's CPU autocast, where a backward() called in the autocast region runs
    the hooks: the statistics' torch reductions stay float32."""
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((8, 3, 4)), rng.standard_normal((8, 3, 4))
    block = BatchNormBlock("bn", 3, EPS)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = block.fisher(x.astype(np.float32), g.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, block.fisher(x, g), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_narrow_input_with_float32_gradients(dtype):
    """Autocast's case: a half input and float32 output gradients, accumulated in float32, on a
    channel whose mean is large against its spread (the centred form keeps its digits)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 4, 6, 6)) * 0.5 + np.array([0.0, 8.0, -3.0, 1.0])[:, None, None]).astype(dtype)
    g = rng.standard_normal((16, 4, 6, 6)).astype(np.float32)
    x.flags.writeable = False
    block = BatchNormBlock("bn", 4, EPS)
    got = block.unit_gradients(x, g)
    assert got.dtype == np.float32 and got.shape == (16, 4, 2)
    np.testing.assert_allclose(got, block.unit_gradients(x.astype(np.float64), g.astype(np.float64)),
                               rtol=2e-5, atol=2e-5)


def test_solve_against_linalg_solve():
    rng = np.random.default_rng(2)
    block = BatchNormBlock("bn", 5, EPS)
    x, g = rng.standard_normal((7, 5, 3)), rng.standard_normal((7, 5, 3))
    fisher = block.fisher(x, g, 1 / 7)
    grad = rng.standard_normal((5, 2))
    got = block.solve(block.statistics(x, g, 1 / 7), grad, 0.01)
    for c in range(5):
        want = np.linalg.solve(fisher[c] + 0.01 * np.eye(2), grad[c])
        np.testing.assert_allclose(got[c], want, rtol=1e-11)


def test_singular_channels_solve_with_the_damping():
    """Rank-1 and zero Fishers: the damped system is still solved exactly (no pseudo-inverse)."""
    rng = np.random.default_rng(3)
    block = BatchNormBlock("bn", 3, EPS)
    u = rng.standard_normal(2)
    fisher = np.stack([np.outer(u, u), np.zeros((2, 2)), np.array([[2.0, 0.3], [0.3, 1.0]])])  # rank 1, 0, full
    stats = fisher[:, [0, 0, 1], [0, 1, 1]].reshape(-1)
    grad = rng.standard_normal((3, 2))
    got = block.solve(stats, grad, 1e-6)
    for c in range(3):
        np.testing.assert_allclose(got[c], np.linalg.solve(fisher[c] + 1e-6 * np.eye(2), grad[c]), rtol=1e-8)


def test_grad_matrix_columns_and_split():
    rng = np.random.default_rng(4)
    block = BatchNormBlock("bn", 4, EPS)
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    mat = block.grad_matrix(gamma, beta)
    np.testing.assert_array_equal(mat, np.stack([gamma, beta], 1))
    back = block.split_matrix(mat)
    np.testing.assert_array_equal(back[0], gamma)
    np.testing.assert_array_equal(back[1], beta)
    # A float32 gamma with a float64 beta: the matrix takes the wider dtype, beta unrounded.
    mixed = block.grad_matrix(gamma.astype(np.float32), beta)
    assert mixed.dtype == np.float64
    np.testing.assert_array_equal(mixed[:, 1], beta)


def test_bad_arguments_name_the_parameter():
    block = BatchNormBlock("bn", 2, EPS)
    stats = np.array([1.0, 0.0, 1.0, 2.0, 0.1, 1.0])
    with pytest.raises(ValueError, match="mats"):
        block.solve(stats * np.nan, np.ones((2, 2)), 0.1)
    with pytest.raises(ValueError, match="stats"):
        block.solve(stats[:5], np.ones((2, 2)), 0.1)
    with pytest.raises(ValueError, match="grad"):
        block.solve(stats, np.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="inverses"):  # one unit's inverse would broadcast to both
        block.precondition(np.ones((2, 2)), [np.eye(2)[None]])
    with pytest.raises(ValueError, match="x:"):  # unbatched: no channel axis to find the units on
        block.check_input(np.ones(2))
    with pytest.raises(ValueError, match="damping"):
        block.solve(stats, np.ones((2, 2)), -1.0)
    with pytest.raises(ValueError, match="bias_grad"):
        block.grad_matrix(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="x:"):
        block.fisher(np.ones((4, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="g:"):
        block.fisher(np.ones((4, 2, 3)), np.ones((4, 2, 2)))


@pytest.mark.parametrize("kwargs,name", [
    ({"num_features": 0}, "num_features"), ({"num_features": 2.0}, "num_features"), ({"eps": 0.0}, "eps"),
    ({"eps": float("nan")}, "eps"), ({"eps": "small"}, "eps"), ({"name": 1}, "name"),
])
def test_invalid_constructor_arguments(kwargs, name):
    args = {"name": "bn", "num_features": 3, "eps": EPS, **kwargs}
    with pytest.raises(ValueError, match=name):
        BatchNormBlock(**args)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (3, 3, 4, 5)])
def test_normalized_input_is_torch_batch_norm_in_training(shape):
    """``x̂``: per channel over the batch and every position, biased variance, as
    ``torch.nn.functional.batch_norm`` normalises in training mode."""
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, size=(1, 3) + (1,) * (len(shape) - 2)) + 2.0
    block = BatchNormBlock("bn", 3, 1e-3)
    want = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True, eps=1e-3).numpy()
    np.testing.assert_allclose(block.normalized(x), want.reshape(shape[0], 3, -1), rtol=1e-12, atol=1e-12)
