"""ConvBlock against a pure-Python loop patch extraction, torch's unfold and torch autograd (float64)."""
import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.layers import ConvBlock

# (kernel, stride, padding, dilation, bias); spatial input sizes are chosen per dimension count
CONV1D = [((1,), (1,), (0,), (1,), True), ((3,), (2,), (1,), (1,), False), ((3,), (1,), (2,), (2,), True),
          ((3,), (2,), (0,), (2,), False)]
CONV2D = [((3, 3), (1, 1), (1, 1), (1, 1), True), ((3, 1), (2, 1), (0, 2), (1, 2), False),
          ((1, 1), (2, 2), (0, 0), (1, 1), True), ((3, 2), (2, 2), (2, 1), (2, 1), False),
          ((3, 3), (2, 1), (1, 0), (2, 2), True)]
CONV3D = [((2, 3, 1), (1, 2, 1), (1, 0, 2), (2, 1, 1), True)]


def loop_rows(x, kernel, stride, padding, dilation, bias):
    """im2col by explicit loops over examples, output positions, channels and kernel offsets."""
    n, c, *size = x.shape
    out = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation)]
    rows = []
    for i in range(n):
        for t in itertools.product(*(range(o) for o in out)):
            row = []
            for ch in range(c):
                for off in itertools.product(*(range(k) for k in kernel)):
                    idx = [t[j] * stride[j] - padding[j] + off[j] * dilation[j] for j in range(len(kernel))]
                    inside = all(0 <= idx[j] < size[j] for j in range(len(kernel)))
                    row.append(x[(i, ch, *idx)] if inside else 0.0)
            rows.append(row + [1.0] * bias)
    return np.array(rows), out


def make_case(rng, kernel, c_in=2, c_out=3, n=2):
    size = {1: (9,), 2: (6, 7), 3: (4, 5, 4)}[len(kernel)]
    return rng.standard_normal((n, c_in, *size)), c_in, c_out


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", CONV1D + CONV2D + CONV3D)
def test_factors_against_loop_patches(kernel, stride, padding, dilation, bias):
    rng = np.random.default_rng(sum(kernel) + 10 * sum(padding))
    x, c_in, c_out = make_case(rng, kernel)
    block = ConvBlock("conv", c_in, c_out, kernel, stride, padding, dilation, bias)
    rows, out = loop_rows(x, kernel, stride, padding, dilation, bias)
    g = rng.standard_normal((x.shape[0], c_out, *out))
    positions = int(np.prod(out))
    assert block.d_A == c_in * int(np.prod(kernel)) + bias and block.d_G == c_out
    np.testing.assert_array_equal(block.a_rows(x), rows)
    want_a = sum(np.outer(r, r) for r in rows) / x.shape[0]
    np.testing.assert_allclose(block.a_factor(x, 1 / x.shape[0]), want_a, rtol=1e-13, atol=1e-15)
    # Packed A (taken from kernel-major patches for kernels larger than 1x1) in pack_sym order.
    np.testing.assert_allclose(block.a_factor(x, 1 / x.shape[0], packed=True), want_a[np.triu_indices(block.d_A)],
                               rtol=1e-13, atol=1e-15)
    volume = int(np.prod(kernel))
    kernel_major = block.input_rows(x, ones=bias, kernel_major=True)
    channel, offset = np.divmod(np.arange(c_in * volume), volume)  # channel-major column c * volume + k
    np.testing.assert_array_equal(kernel_major[:, offset * c_in + channel], rows[:, :c_in * volume])
    np.testing.assert_array_equal(kernel_major[:, c_in * volume:], rows[:, c_in * volume:])
    want_g = np.zeros((c_out, c_out))
    for i in range(x.shape[0]):
        for t in itertools.product(*(range(o) for o in out)):
            col = g[(i, slice(None), *t)]
            want_g += np.outer(col, col)
    assert block.positions(g) == positions
    np.testing.assert_allclose(block.g_factor(g, 1 / x.shape[0]), want_g / (x.shape[0] * positions), rtol=1e-13)


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", CONV2D)
def test_rows_match_torch_unfold(kernel, stride, padding, dilation, bias):
    x = np.random.default_rng(5).standard_normal((3, 4, 8, 7))
    block = ConvBlock("conv", 4, 2, kernel, stride, padding, dilation, bias)
    cols = nn.functional.unfold(torch.from_numpy(x), kernel, dilation=dilation, padding=padding, stride=stride)
    want = cols.transpose(1, 2).reshape(-1, block.d_A - bias).numpy()
    np.testing.assert_array_equal(block.a_rows(x)[:, :block.d_A - bias], want)


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias", CONV1D + CONV2D + CONV3D)
def test_weight_gradient_is_sum_of_row_products(kernel, stride, padding, dilation, bias):
    torch.manual_seed(6)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(kernel)](
        2, 3, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    x, _, _ = make_case(np.random.default_rng(7), kernel)
    out = conv(torch.from_numpy(x))
    gout = torch.randn_like(out)
    out.backward(gout)
    block = ConvBlock("conv", 2, 3, kernel, stride, padding, dilation, bias)
    matrix = block.grad_matrix(conv.weight.grad.numpy(), conv.bias.grad.numpy() if bias else None)
    assert matrix.shape == (block.d_G, block.d_A)
    np.testing.assert_allclose(matrix, block.g_rows(gout.numpy()).T @ block.a_rows(x), rtol=1e-12, atol=1e-13)
    weight, bias_part = block.split_matrix(matrix)
    assert weight.shape == tuple(conv.weight.shape)
    np.testing.assert_array_equal(weight, conv.weight.grad.numpy())
    assert (bias_part is None) == (not bias)
    # Identity inverses leave the gradient as it is.
    update = block.precondition(matrix, [np.eye(block.d_A)[None], np.eye(block.d_G)[None]])
    np.testing.assert_allclose(update, matrix, rtol=0, atol=0)


def test_noncontiguous_and_half_inputs():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 6, 3)).transpose(0, 3, 1, 2)  # (2, 3, 5, 6), channels-last strides
    block = ConvBlock("conv", 3, 2, (3, 3), (1, 1), (1, 1), (1, 1), True)
    rows, _ = loop_rows(x, (3, 3), (1, 1), (1, 1), (1, 1), True)
    np.testing.assert_array_equal(block.a_rows(x), rows)
    half = x.astype(np.float16)
    got = block.a_factor(half, 0.5)
    assert got.dtype == np.float32
    exact = block.a_rows(half.astype(np.float64))
    np.testing.assert_allclose(got, exact.T @ exact * 0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_factors_inside_cpu_autocast_accumulate_in_float32(dtype):
    """A model under ``torch.autocast("cpu", dtype=torch.bfloat16)`` runs the hooks in the autocast
    region (the forward's always, the backward's when backward() is called there): the factors'
    torch products must still run in float32, not in bfloat16."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 6, 7, 5)) + 0.5).astype(dtype)
    g = rng.standard_normal((4, 5, 7, 5)).astype(dtype)
    block = ConvBlock("conv", 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), True)
    rows, _ = loop_rows(x.astype(np.float64), (3, 3), (1, 1), (1, 1), (1, 1), True)
    grows = g.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_a, got_g = block.a_factor(x, 0.25), block.g_factor(g, 0.25)
    assert got_a.dtype == got_g.dtype == np.float32
    np.testing.assert_allclose(got_a, rows.T @ rows / 4, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_g, grows.T @ grows / (4 * 35), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride,bias", [((2, 2), False), ((2, 1), True)])
def test_wide_strided_factor_against_loop_patches(stride, bias):
    """16 channels and a 3x3 kernel: 144+ columns, so the patch Gram runs in column panels and
    comes back from kernel-major to PyTorch's column order, dense and packed."""
    rng = np.random.default_rng(sum(stride) + bias)
    x = rng.standard_normal((3, 16, 7, 6))
    block = ConvBlock("conv", 16, 4, (3, 3), stride, (1, 1), (1, 1), bias)
    rows, _ = loop_rows(x, (3, 3), stride, (1, 1), (1, 1), bias)
    want = rows.T @ rows / 3
    assert block.d_A == 144 + bias
    np.testing.assert_allclose(block.a_factor(x, 1 / 3), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(block.a_factor(x, 1 / 3, packed=True), want[np.triu_indices(block.d_A)],
                               rtol=1e-12, atol=1e-12)


def test_wrong_inputs_name_the_argument():
    block = ConvBlock("conv", 3, 2, (3, 3), (1, 1), (0, 0), (1, 1), True)
    with pytest.raises(ValueError, match="a:"):
        block.a_rows(np.zeros((2, 4, 5, 5)))
    with pytest.raises(ValueError, match="a:"):
        block.a_rows(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="a:.*smaller"):
        block.a_rows(np.zeros((2, 3, 2, 5)))
    with pytest.raises(ValueError, match="g:"):
        block.g_rows(np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="g:"):  # 4 channels for 2: would reshape to 2 of 18 positions
        block.g_factor(np.zeros((2, 4, 3, 3)))
    with pytest.raises(ValueError, match="weight_grad"):
        block.grad_matrix(np.zeros((2, 27)), np.zeros(2))



def test_an_output_of_another_size_than_the_inputs_is_refused():
    """An output gradient whose spatial size the input and the block's settings do not give (a
    forward that pads its input itself) would pair G with patches of other positions."""
    block = ConvBlock("conv", 2, 3, (3, 3), (2, 2), (0, 0), (1, 1), True)
    x = np.random.default_rng(3).standard_normal((2, 2, 8, 8))
    stats = np.zeros(block.stat_size)
    saved = block.add_input(stats, x)
    assert tuple(saved) == (3, 3)
    with pytest.raises(ValueError, match=r"g: block 'conv' expected an output of spatial size \(3, 3\).*\(4, 4\)"):
        block.add_output_grad(stats, np.ones((2, 3, 4, 4)), 1.0, saved)
    block.add_output_grad(stats, np.ones((2, 3, 3, 3)), 1.0, saved)

@pytest.mark.parametrize("kwargs,name", [
    ({"in_channels": 0}, "in_channels"), ({"out_channels": 1.5}, "out_channels"),
    ({"kernel_size": ()}, "kernel_size"), ({"kernel_size": (0, 3)}, "kernel_size"), ({"kernel_size": 3}, "kernel_size"),
    ({"stride": (0, 1)}, "stride"), ({"stride": (1, 1, 1)}, "stride"), ({"padding": (-1, 0)}, "padding"),
    ({"padding": (True, 0)}, "padding"),  # a bool is no size, though an Integral
    ({"dilation": 0}, "dilation"), ({"bias": None}, "bias"), ({"groups": 0}, "groups"), ({"name": None}, "name"),
])
def test_invalid_constructor_arguments(kwargs, name):
    args = {"name": "conv", "in_channels": 2, "out_channels": 4, "kernel_size": (3, 3), "stride": (1, 1),
            "padding": (1, 1), "dilation": (1, 1), "bias": True, **kwargs}
    with pytest.raises(ValueError, match=name):
        ConvBlock(**args)


def test_int_hyperparameters_broadcast():
    block = ConvBlock("conv", 2, 3, (3, 3), 2, 1, 1, False)
    assert (block.stride, block.padding, block.dilation) == ((2, 2), (1, 1), (1, 1))


@pytest.mark.parametrize("kernel,padding", [((1, 1), (0, 0)), ((3, 3), (0, 0)), ((3, 2), (1, 0))])
def test_rows_do_not_depend_on_the_memory_layout(kernel, padding):
    """Channels-last and pointwise inputs take the one-copy path: the same rows as the loop oracle."""
    x = np.random.default_rng(9).standard_normal((2, 6, 5, 3)).transpose(0, 3, 1, 2)  # (2, 3, 6, 5), C stride 1
    block = ConvBlock("conv", 3, 2, kernel, (1, 1), padding, (1, 1), True)
    want, _ = loop_rows(np.ascontiguousarray(x), kernel, (1, 1), padding, (1, 1), True)
    np.testing.assert_array_equal(block.a_rows(x), want)
    np.testing.assert_array_equal(block.a_rows(np.ascontiguousarray(x)), want)
