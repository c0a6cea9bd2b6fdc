"""hpckfac.ops.batchnorm_fisher (CPU reference) against explicit float64 formulas: x̂ from
the batch mean and biased variance, u = (Σ_t g x̂, Σ_t g) per example and channel, the
packed Σ_n u uᵀ added to ``out``; strides, dtypes, the block's use of it, bad input."""
import ml_dtypes
import numpy as np
import pytest

from hpckfac import ops
from hpckfac.layers import BatchNormBlock
from hpckfac.layers.block import pack_stack


def oracle(x, g, eps, scale):
    """The packed unit-wise Fisher in float64, written out."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    mean = x.mean(axis=(0, 2), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2), keepdims=True)
    x_hat = (x - mean) / np.sqrt(var + eps)
    u = np.stack([(g * x_hat).sum(axis=2), g.sum(axis=2)], axis=-1)  # (N, C, 2)
    fisher = np.einsum("nci,ncj->cij", u, u) * scale
    return fisher[:, [0, 0, 1], [0, 1, 1]].reshape(-1)


def draw(rng, shape, dtype=np.float64):
    channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    offset, spread = rng.uniform(-2.0, 2.0, channel), rng.uniform(0.3, 3.0, channel)
    x = (rng.standard_normal(shape) * spread + offset).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 3, 1), (7, 5, 9), (16, 32, 49)])
@pytest.mark.parametrize("dtype,out_dtype,rtol", [(np.float64, np.float64, 1e-11), (np.float32, np.float32, 2e-5),
                                                  (np.float32, np.float64, 2e-5)])
def test_adds_the_packed_fisher(shape, dtype, out_dtype, rtol):
    rng = np.random.default_rng(sum(shape))
    x, g = draw(rng, shape, dtype)
    start = rng.standard_normal(3 * shape[1]).astype(out_dtype)
    out = start.copy()
    eps, scale = 1e-3, 1.0 / shape[0]
    assert ops.batchnorm_fisher(x, g, eps, scale, out=out) is out
    want = oracle(x, g, eps, scale)
    np.testing.assert_allclose(out - start.astype(np.float64), want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_half_inputs_and_strided_views():
    rng = np.random.default_rng(3)
    x, g = draw(rng, (6, 4, 10))
    want = oracle(x, g, 1e-5, 0.5)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        xh, gh = x.astype(dtype), g.astype(dtype)
        got = ops.batchnorm_fisher(xh, gh, 1e-5, 0.5, out=np.zeros(12, np.float32))
        np.testing.assert_allclose(got, oracle(xh, gh, 1e-5, 0.5), rtol=2e-5, atol=1e-5 * np.abs(want).max())
    # channels-last memory: the same numbers through a non-contiguous (N, C, T) view
    x_last, g_last = np.ascontiguousarray(x.transpose(0, 2, 1)), np.ascontiguousarray(g.transpose(0, 2, 1))
    got = ops.batchnorm_fisher(x_last.transpose(0, 2, 1), g_last.transpose(0, 2, 1), 1e-5, 0.5, out=np.zeros(12))
    np.testing.assert_allclose(got, want, rtol=1e-11)


def test_mixed_input_and_gradient_dtypes():
    """A float64 input with a float32 gradient (and the reverse) works in the input's
    accumulation dtype, as under autocast where the two differ."""
    rng = np.random.default_rng(9)
    x, g = draw(rng, (5, 3, 8))
    for xd, gd, rtol in ((np.float64, np.float32, 1e-11), (np.float32, np.float64, 2e-5)):
        xs, gs = x.astype(xd), g.astype(gd)
        got = ops.batchnorm_fisher(xs, gs, 1e-5, 0.2, out=np.zeros(9))
        want = oracle(xs, gs, 1e-5, 0.2)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0)])
def test_no_examples_or_no_positions_add_nothing(shape):
    start = np.arange(9.0)
    out = ops.batchnorm_fisher(np.ones(shape), np.ones(shape), 1e-5, out=start.copy())
    np.testing.assert_array_equal(out, start)


def test_the_block_adds_the_same_statistics_as_its_fisher():
    rng = np.random.default_rng(5)
    x, g = draw(rng, (8, 3, 4, 5))  # BatchNorm2d input
    block = BatchNormBlock("bn", 3, 1e-5)
    stats = rng.standard_normal(block.stat_size)
    want = stats + pack_stack(block.fisher(x, g, 0.25))
    block.add_output_grad(stats, g, 0.25, x)
    np.testing.assert_array_equal(stats, want)


def test_bad_input_is_named():
    x = np.ones((2, 3, 4))
    out = np.zeros(9)
    with pytest.raises(ValueError, match="eps"):
        ops.batchnorm_fisher(x, x, 0.0, out=out)
    with pytest.raises(ValueError, match="scale"):
        ops.batchnorm_fisher(x, x, 1e-5, float("nan"), out=out)
    with pytest.raises(ValueError, match="g: shape"):
        ops.batchnorm_fisher(x, np.ones((2, 3, 5)), 1e-5, out=out)
    with pytest.raises(ValueError, match="x: expected a 3-D"):
        ops.batchnorm_fisher(np.ones((2, 3)), np.ones((2, 3)), 1e-5, out=out)
    with pytest.raises(ValueError, match="out"):
        ops.batchnorm_fisher(x, x, 1e-5, out=np.zeros(6))
    with pytest.raises(ValueError, match="out"):
        ops.batchnorm_fisher(x, x, 1e-5, out=np.zeros(9, np.int32))
    with pytest.raises(TypeError, match="x: dtype"):
        ops.batchnorm_fisher(x.astype(np.int32), x, 1e-5, out=out)
    with pytest.raises(TypeError, match="g: dtype"):
        ops.batchnorm_fisher(x, x.astype(np.int32), 1e-5, out=out)
    assert not out.any()
