"""The lag-product route of a stride-1 convolution's A factor against explicit patches in float64."""
import ml_dtypes
import numpy as np
import pytest
from hpckfac.layers import ConvBlock
from hpckfac.layers import conv_lags
from hpckfac.layers.conv_lags import lagged_a_factor, lags_pay

from test_layers_conv import loop_rows

# (kernel, padding, dilation): "same", "valid", over-padded, dilated, asymmetric, even kernels, 1-D and 3-D.
GEOMETRIES = [((3, 3), (1, 1), (1, 1)), ((3, 3), (0, 0), (1, 1)), ((3, 3), (4, 3), (1, 1)), ((5, 5), (2, 2), (1, 1)),
              ((3, 1), (0, 2), (1, 2)), ((3, 2), (2, 1), (2, 1)), ((4, 4), (1, 2), (1, 1)), ((1, 3), (0, 1), (1, 1)),
              ((3,), (2,), (2,)), ((3,), (0,), (1,)), ((2, 3, 2), (1, 0, 2), (2, 1, 1))]


def patch_factor(x, kernel, padding, dilation, bias, scale):
    rows, _ = loop_rows(x, kernel, (1,) * len(kernel), padding, dilation, bias)
    return scale * rows.T @ rows


@pytest.mark.parametrize("kernel,padding,dilation", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_the_patch_gram(kernel, padding, dilation, bias):
    rng = np.random.default_rng(len(kernel) * 100 + sum(kernel) * 10 + sum(padding) + bias)
    size = {1: (9,), 2: (6, 7), 3: (4, 5, 4)}[len(kernel)]
    x = rng.standard_normal((3, 2, *size)) + 0.3
    want = patch_factor(x, kernel, padding, dilation, bias, 1 / 3)
    got = lagged_a_factor(x, kernel, padding, dilation, bias, 1 / 3, packed=False)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
    packed = lagged_a_factor(x, kernel, padding, dilation, bias, 1 / 3, packed=True)
    np.testing.assert_allclose(packed, want[np.triu_indices(len(want))], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_narrow_inputs_accumulate_in_float32(dtype):
    # Values of up to ~10: their squares' sums overflow nothing in float32 but would round badly in half.
    x = (np.random.default_rng(4).standard_normal((4, 16, 8, 8)) * 3).astype(dtype)
    got = lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 0.25, packed=True)
    assert got.dtype == np.float32
    exact = patch_factor(x.astype(np.float64), (3, 3), (1, 1), (1, 1), True, 0.25)
    np.testing.assert_allclose(got, exact[np.triu_indices(len(exact))], rtol=2e-5, atol=2e-4)


def test_conv_block_takes_the_lags_where_they_pay(monkeypatch):
    calls = []
    monkeypatch.setattr("hpckfac.layers.conv.lagged_a_factor",
                        lambda *args, **kw: calls.append(args[1]) or lagged_a_factor(*args, **kw))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 7, 16)).transpose(0, 3, 1, 2)  # channels-last strides, (2, 16, 8, 7)
    x.flags.writeable = False
    block = ConvBlock("conv", 16, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)
    want = patch_factor(x, (3, 3), (1, 1), (1, 1), True, 0.5)
    np.testing.assert_allclose(block.a_factor(x, 0.5), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(block.a_factor(x, 0.5, packed=True), want[np.triu_indices(len(want))],
                               rtol=1e-12, atol=1e-12)
    assert calls == [(3, 3), (3, 3)]
    # Strided, grouped and narrow convolutions keep their patches.
    for other in (ConvBlock("s", 16, 4, (3, 3), (2, 2), (1, 1), (1, 1), True),
                  ConvBlock("g", 16, 4, (3, 3), (1, 1), (1, 1), (1, 1), True, groups=2),
                  ConvBlock("n", 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)):
        other.a_factor(x[:, :other.in_channels], 0.5)
    assert len(calls) == 2


def test_lags_pay_where_measured():
    # ResNet-20's 3x3 "same" convolutions at 16-64 channels; not for narrow inputs, 4x4 maps or 1x1 kernels.
    assert lags_pay(16, (32, 32), (3, 3), (1, 1), (1, 1))
    assert lags_pay(32, (16, 16), (3, 3), (1, 1), (1, 1))
    assert lags_pay(64, (8, 8), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(conv_lags.MIN_CHANNELS - 1, (32, 32), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(64, (4, 4), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(64, (8, 8), (1, 1), (0, 0), (1, 1))


def test_random_geometries_against_the_patch_gram():
    """Drawn kernels (1-4 per dimension, not all 1), dilations, paddings (including more than
    the kernel's reach) and sizes down to a one-position output, in 1, 2 and 3 dimensions."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        ndim = int(rng.integers(1, 4))
        kernel = tuple(int(k) for k in rng.integers(1, 5, ndim))
        if max(kernel) == 1:
            kernel = (2,) + kernel[1:]
        dilation = tuple(int(d) for d in rng.integers(1, 4, ndim))
        padding = tuple(int(p) for p in rng.integers(0, 5, ndim))
        reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
        size = tuple(max(1, r - 2 * p + 1) + int(rng.integers(0, 4)) for r, p in zip(reach, padding))
        bias = bool(rng.integers(0, 2))
        x = rng.standard_normal((2, 2, *size))
        want = patch_factor(x, kernel, padding, dilation, bias, 0.5)
        got = lagged_a_factor(x, kernel, padding, dilation, bias, 0.5, packed=False)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"kernel {kernel} padding {padding} dilation {dilation} size {size}")
