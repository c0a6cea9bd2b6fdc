"""GPU BatchNorm statistics (kernels/unitwise.cu) against the float64 formulas and the CPU
reference: input dtypes, channels-last strides, shapes of ResNet-50's BatchNorm layers,
accumulation into ``out``, repeatable bits."""
import ml_dtypes
import numpy as np
import pytest

from gpu_helpers import cupy, host, poisoned_allocations, requires_gpu
from hpckfac import ops
from hpckfac.layers import BatchNormBlock
from test_ops_batchnorm import draw, oracle

pytestmark = requires_gpu

SHAPES = [(1, 1, 1), (3, 5, 7), (32, 64, 12544), (32, 2048, 49), (32, 256, 196)]
TOL = {"float64": 1e-11, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
def test_against_the_float64_formulas(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x, g = draw(rng, shape, np.float32)
    x, g = x.astype(dtype), g.astype(dtype)
    out_dtype = np.float64 if dtype == np.float64 else np.float32
    start = rng.standard_normal(3 * shape[1]).astype(out_dtype)
    with poisoned_allocations():
        out = cupy.asarray(start)
        got = ops.batchnorm_fisher(cupy.asarray(x), cupy.asarray(g), 1e-5, 1.0 / shape[0], out=out)
    assert got is out
    want = oracle(x, g, 1e-5, 1.0 / shape[0])
    # the inputs are rounded to `dtype` alike on both sides: what remains is the sums' rounding
    tol = TOL[np.dtype(dtype).name]
    total = start.astype(np.float64) + want
    np.testing.assert_allclose(host(out), total, rtol=tol, atol=tol * np.abs(total).max())


def test_a_large_mean_against_the_spread():
    """Moments taken about each channel's first value: an input whose mean is 10^5 times
    its spread keeps a float32-grade result (sums of raw moments would not)."""
    rng = np.random.default_rng(4)
    x, g = draw(rng, (16, 8, 49))
    x += 1e5
    got = ops.batchnorm_fisher(cupy.asarray(x), cupy.asarray(g), 1e-5, 1 / 16, out=cupy.zeros(24))
    want = oracle(x, g, 1e-5, 1 / 16)
    np.testing.assert_allclose(host(got), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0)])
def test_no_examples_or_no_positions_add_nothing(shape):
    out = cupy.arange(9.0)
    ops.batchnorm_fisher(cupy.ones(shape), cupy.ones(shape), 1e-5, out=out)
    np.testing.assert_array_equal(host(out), np.arange(9.0))


def test_mixed_dtypes_strides_and_repeatable_bits():
    rng = np.random.default_rng(11)
    x, g = draw(rng, (8, 6, 30))
    want = oracle(x.astype(np.float16), g.astype(np.float32), 1e-3, 0.5)
    # channels-last storage of a half input with a float32 gradient, as under autocast
    x_dev = cupy.asarray(np.ascontiguousarray(x.astype(np.float16).transpose(0, 2, 1))).transpose(0, 2, 1)
    g_dev = cupy.asarray(np.ascontiguousarray(g.astype(np.float32).transpose(0, 2, 1))).transpose(0, 2, 1)
    runs = [host(ops.batchnorm_fisher(x_dev, g_dev, 1e-3, 0.5, out=cupy.zeros(18, np.float32))) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_allclose(runs[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # x channels-last, g contiguous: each read with its own strides
    got = ops.batchnorm_fisher(x_dev, cupy.asarray(g.astype(np.float32)), 1e-3, 0.5, out=cupy.zeros(18, np.float32))
    np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a strided `out` (every other element of a buffer) is written where it points
    buffer = cupy.zeros(36, np.float32)
    ops.batchnorm_fisher(x_dev, g_dev, 1e-3, 0.5, out=buffer[::2])
    np.testing.assert_array_equal(host(buffer[::2]), runs[0])
    assert not host(buffer[1::2]).any()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_block_on_the_device_matches_the_host(dtype):
    rng = np.random.default_rng(2)
    x, g = draw(rng, (16, 8, 6, 6))
    x, g = x.astype(dtype), g.astype(dtype)
    block = BatchNormBlock("bn", 8, 1e-5)
    host_stats = np.zeros(block.stat_size, dtype=dtype)
    block.add_output_grad(host_stats, g, 0.125, x)
    device_stats = cupy.zeros(block.stat_size, dtype=dtype)
    block.add_output_grad(device_stats, cupy.asarray(g), 0.125, cupy.asarray(x))
    np.testing.assert_allclose(host(device_stats), host_stats, rtol=1e-11 if dtype == np.float64 else 2e-5,
                               atol=1e-6 * np.abs(host_stats).max())
