"""The lag-product route of a stride-1 convolution's A factor against explicit patches in float64."""
import ml_dtypes
import numpy as np
import pytest
import torch
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


# 7 channels of a "valid" 5x5 convolution: frame slabs of 4 x 5 offsets, 140 columns and the
# bias, whose Grams upper_gram computes in two column panels (the strict lower triangle left zero).
@pytest.mark.parametrize("kernel,padding,dilation,channels",
                         [geometry + (2,) for geometry in GEOMETRIES] + [((5, 5), (0, 0), (1, 1), 7)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_equals_the_patch_gram(kernel, padding, dilation, channels, bias, method):
    rng = np.random.default_rng(len(kernel) * 100 + sum(kernel) * 10 + sum(padding) + bias)
    size = {1: (9,), 2: (6, 7), 3: (4, 5, 4)}[len(kernel)]
    x = rng.standard_normal((3, channels, *size)) + 0.3
    want = patch_factor(x, kernel, padding, dilation, bias, 1 / 3)
    got = lagged_a_factor(x, kernel, padding, dilation, bias, 1 / 3, packed=False, method=method)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got, got.T)
    packed = lagged_a_factor(x, kernel, padding, dilation, bias, 1 / 3, packed=True, method=method)
    np.testing.assert_allclose(packed, want[np.triu_indices(len(want))], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("autocast", [False, True])
def test_narrow_inputs_accumulate_in_float32(dtype, method, autocast):
    # Values of up to ~10: their squares' sums overflow nothing in float32 but would round badly in half.
    # Inside torch's CPU autocast, where a forward hook of a model under autocast runs, as outside.
    x = (np.random.default_rng(4).standard_normal((4, 16, 8, 8)) * 3).astype(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 0.25, packed=True, method=method)
    assert got.dtype == np.float32
    exact = patch_factor(x.astype(np.float64), (3, 3), (1, 1), (1, 1), True, 0.25)
    np.testing.assert_allclose(got, exact[np.triu_indices(len(exact))], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_bfloat16_inputs_on_a_torch_without_uint16_arrays(monkeypatch, method):
    """torch before 2.3 (setup.py takes 2.1) refuses a uint16 array in ``torch.from_numpy``: a
    bfloat16 input is read through int16 bits there, with the same factor as a float64 Gram of
    its values."""
    from_numpy = torch.from_numpy

    def old_from_numpy(a):
        if a.dtype == np.uint16:
            raise TypeError("can't convert np.ndarray of type numpy.uint16")
        return from_numpy(a)

    monkeypatch.setattr(torch, "from_numpy", old_from_numpy)
    x = (np.random.default_rng(6).standard_normal((4, 16, 8, 8)) * 3).astype(ml_dtypes.bfloat16)
    got = lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 0.25, packed=True, method=method)
    exact = patch_factor(x.astype(np.float64), (3, 3), (1, 1), (1, 1), True, 0.25)
    np.testing.assert_allclose(got, exact[np.triu_indices(len(exact))], rtol=2e-5, atol=2e-4)


def test_conv_block_takes_the_lags_where_they_pay(monkeypatch):
    calls = []
    monkeypatch.setattr("hpckfac.layers.conv.lagged_a_factor",
                        lambda *args, **kw: calls.append(args[1]) or lagged_a_factor(*args, **kw))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 12, 10, 16)).transpose(0, 3, 1, 2)  # channels-last strides, (32, 16, 12, 10)
    x.flags.writeable = False
    block = ConvBlock("conv", 16, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)
    want = patch_factor(x, (3, 3), (1, 1), (1, 1), True, 0.5)
    np.testing.assert_allclose(block.a_factor(x, 0.5), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(block.a_factor(x, 0.5, packed=True), want[np.triu_indices(len(want))],
                               rtol=1e-12, atol=1e-12)
    assert calls == [(3, 3), (3, 3)]
    # Strided, grouped and "valid" convolutions on small maps keep their patches, and so does
    # a batch of two (few examples per frequency).
    for other in (ConvBlock("s", 16, 4, (3, 3), (2, 2), (1, 1), (1, 1), True),
                  ConvBlock("g", 16, 4, (3, 3), (1, 1), (1, 1), (1, 1), True, groups=2),
                  ConvBlock("v", 8, 4, (3, 3), (1, 1), (0, 0), (1, 1), True)):
        other.a_factor(x[:, :other.in_channels], 0.5)
    block.a_factor(x[:2], 0.5)
    assert len(calls) == 2


def test_lags_pay_where_measured():
    # 3x3 "same" convolutions at batch 64 down to 4x4 maps and 3 channels, 5x5 kernels, 3-D,
    # ResNet-50's shapes at batch 32; not on 2x2 or 3x3 maps, for "valid" 3x3 convolutions on
    # 8x8 maps, for small problems (the lag route's fixed cost) or for 1x1 kernels.
    for n, channels, size in [(64, 16, (32, 32)), (64, 32, (16, 16)), (64, 64, (8, 8)), (64, 128, (4, 4)),
                              (64, 3, (32, 32)), (32, 256, (14, 14)), (32, 64, (56, 56)), (16, 32, (8, 8, 8)),
                              (16, 64, (8, 8)), (8, 64, (8, 8)), (1438, 8, (8, 8))]:
        ndim = len(size)
        assert lags_pay(n, channels, size, (3,) * ndim, (1,) * ndim, (1,) * ndim), (n, channels, size)
    assert lags_pay(64, 16, (32, 32), (5, 5), (2, 2), (1, 1))
    assert not lags_pay(64, 64, (3, 3), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(64, 64, (2, 2), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(64, 64, (8, 8), (3, 3), (0, 0), (1, 1))
    assert not lags_pay(128, 8, (8, 8), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(128, 16, (4, 4), (3, 3), (1, 1), (1, 1))
    assert not lags_pay(64, 64, (8, 8), (1, 1), (0, 0), (1, 1))


def test_fft_for_many_examples_gemms_for_few():
    # Measured: the FFT route 1.3x faster at 32 examples (more beyond), the GEMMs 1.1-1.9x faster at 8.
    for channels, size in [(16, (32, 32)), (32, (16, 16)), (64, (8, 8))]:
        geometry = (size, (3, 3), (1, 1), (1, 1))
        fft, gemm, _ = conv_lags._work(32, channels, *geometry)
        assert fft < gemm and conv_lags.lag_method(32, channels, *geometry) == "fft", (channels, size)
        fft, gemm, _ = conv_lags._work(8, channels, *geometry)
        assert fft > gemm and conv_lags.lag_method(8, channels, *geometry) == "gemm", (channels, size)
    with pytest.raises(ValueError, match="method"):
        lagged_a_factor(np.ones((2, 2, 4, 4)), (3, 3), (1, 1), (1, 1), False, 1.0, True, method="lu")


@pytest.mark.parametrize("shift", [0.0, 20.0])
@pytest.mark.parametrize("method", ["fft", "gemm"])
def test_float32_rounding_as_the_patch_gram(shift, method):
    """Nonnegative inputs (after a ReLU), also with a mean far above their spread: the FFT's
    rounding stays within a few float32 ulps of the diagonal's scale, as the patch Gram's."""
    rng = np.random.default_rng(12)
    x = (np.maximum(rng.standard_normal((16, 24, 12, 10)), 0) + shift).astype(np.float32)
    exact = patch_factor(x.astype(np.float64), (3, 3), (1, 1), (1, 1), True, 1.0)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    for got in (lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 1.0, packed=False, method=method),
                patch_factor(x, (3, 3), (1, 1), (1, 1), True, 1.0)):
        assert np.abs(got - exact).max() / scale.max() < 1e-5
        assert (np.abs(got - exact) / scale).max() < 1e-5


def test_frequencies_in_chunks(monkeypatch):
    # Chunks of 4 frequencies with a remainder: the same factor as all frequencies at once.
    x = np.random.default_rng(13).standard_normal((3, 4, 7, 6))
    whole = lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 0.5, packed=True, method="fft")
    monkeypatch.setattr(conv_lags, "GRAM_CHUNK_ELEMENTS", 4 * 4 * 4 ** 2)  # 45 frequencies
    chunked = lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 0.5, packed=True, method="fft")
    np.testing.assert_allclose(chunked, whole, rtol=1e-13, atol=1e-13)
    want = patch_factor(x, (3, 3), (1, 1), (1, 1), True, 0.5)
    np.testing.assert_allclose(chunked, want[np.triu_indices(len(want))], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["fft", "gemm", None])
def test_no_examples_give_the_zero_factor(method):
    x = np.zeros((0, 16, 8, 8), dtype=np.float32)
    got = lagged_a_factor(x, (3, 3), (1, 1), (1, 1), True, 1.0, packed=True, method=method)
    assert got.dtype == np.float32 and got.shape == (145 * 146 // 2,) and not got.any()
    assert not lags_pay(0, 16, (8, 8), (3, 3), (1, 1), (1, 1))
    block = ConvBlock("conv", 16, 4, (3, 3), (1, 1), (1, 1), (1, 1), True)
    assert not block.a_factor(x, 0.5, packed=True).any()


def test_fast_fft_lengths():
    assert [conv_lags._smooth_size(m) for m in (1, 7, 11, 34, 97, 121)] == [1, 8, 12, 36, 100, 125]


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
        for method in ("fft", "gemm"):
            got = lagged_a_factor(x, kernel, padding, dilation, bias, 0.5, packed=False, method=method)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{method}: kernel {kernel} "
                                       f"padding {padding} dilation {dilation} size {size}")
