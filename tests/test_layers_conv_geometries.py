"""ConvBlock and ConvTransposeBlock on drawn geometries (1-3 spatial dimensions, groups, strides,
dilations, padding beyond the kernel's reach, output padding, batches of one), in float64,
against patches taken from the torch layer itself: its output on each unit weight in turn is
that weight column's patch at every output position, with no im2col and no equivalent
convolution. A, G, the lag-product routes where they apply, and the gradient layout
(grad_matrix of autograd's weight gradient is sum_t g a~^T, split_matrix its inverse)."""
import random

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.layers import ConvBlock, ConvTransposeBlock, conv_lags


def draw(rng, transposed):
    """A layer, its block and an input whose output is not empty, drawn from ``rng``."""
    while True:
        nd = rng.choice([1, 2, 2, 3])
        groups = rng.choice([1, 1, 2, 3])
        c_in, c_out = groups * rng.randint(1, 3), groups * rng.randint(1, 3)
        kernel = tuple(rng.randint(1, 4) for _ in range(nd))
        stride = tuple(rng.randint(1, 3) for _ in range(nd))
        dilation = tuple(rng.randint(1, 3) for _ in range(nd))
        padding = tuple(rng.randint(0, 4) for _ in range(nd))
        size = tuple(rng.randint(1, 7 if nd < 3 else 4) for _ in range(nd))
        bias = rng.random() < 0.6
        if not transposed and rng.random() < 0.3:  # what the lag-product routes take
            groups, c_in, c_out, stride = 1, c_in // groups, c_out // groups, (1,) * nd
        if transposed:
            output_padding = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
            layer = getattr(nn, f"ConvTranspose{nd}d")(c_in, c_out, kernel, stride, padding, output_padding,
                                                       groups, bias, dilation)
            block = ConvTransposeBlock("up", c_in, c_out, kernel, stride, padding, output_padding, dilation, bias,
                                       groups)
        else:
            layer = getattr(nn, f"Conv{nd}d")(c_in, c_out, kernel, stride, padding, dilation, groups, bias)
            block = ConvBlock("conv", c_in, c_out, kernel, stride, padding, dilation, bias, groups)
        x = torch.randn(rng.randint(1, 3), c_in, *size, dtype=torch.float64)
        try:
            with torch.no_grad():
                out = layer.double()(x)
        except RuntimeError:  # input smaller than the dilated kernel
            continue
        if out.numel():
            return layer, block, x


def unit_patches(layer, x):
    """Per group, rows (N * T, d_A) of the patches in the block's column order: the layer's
    output on each unit weight, one column of every group at a time."""
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    groups, weight = layer.groups, layer.weight
    kernel = weight.shape[2:]
    per_group = weight.shape[0] // groups if transposed else weight.shape[1]
    columns = []
    with torch.no_grad():
        for col in range(per_group * int(np.prod(kernel))):
            c, *k = np.unravel_index(col, (per_group, *kernel))
            unit = torch.zeros_like(weight)
            if transposed:
                for j in range(groups):
                    unit[(j * per_group + c, slice(None), *k)] = 1.0
                y = getattr(nn.functional, f"conv_transpose{len(kernel)}d")(
                    x, unit, None, layer.stride, layer.padding, layer.output_padding, groups, layer.dilation)
            else:
                unit[(slice(None), c, *k)] = 1.0
                y = layer._conv_forward(x, unit, None)
            columns.append(y)
    y = torch.stack(columns, -1)
    y = y.reshape(len(x), groups, -1, int(np.prod(y.shape[2:-1])), len(columns))[:, :, 0]
    rows = [y[:, j].reshape(-1, len(columns)).numpy() for j in range(groups)]
    if transposed:  # the block's columns follow the equivalent convolution's flipped kernel
        order = np.flip(np.arange(len(columns)).reshape(per_group, *kernel), tuple(range(1, 1 + len(kernel))))
        rows = [r[:, order.reshape(-1)] for r in rows]
    if layer.bias is not None:
        rows = [np.hstack([r, np.ones((len(r), 1))]) for r in rows]
    return rows


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("seed", range(4))
def test_drawn_geometries_against_the_layers_own_patches(transposed, seed):
    rng = random.Random(seed + 100 * transposed)
    lag_checked = 0
    for _ in range(12):
        layer, block, x = draw(rng, transposed)
        rows = unit_patches(layer, x)
        y = layer(x)
        g = torch.randn_like(y)
        g_rows = np.split(g.movedim(1, -1).reshape(-1, y.shape[1]).numpy(), layer.groups, axis=1)
        positions = int(np.prod(y.shape[2:]))
        want_a = np.stack([r.T @ r for r in rows]) / 3
        want_g = np.stack([q.T @ q for q in g_rows]) / (3 * positions)
        got_a, got_g = block.a_factor(x.numpy(), 1 / 3), block.g_factor(g.numpy(), 1 / 3)
        if layer.groups == 1:
            got_a, got_g = got_a[None], got_g[None]
        np.testing.assert_allclose(got_a, want_a, rtol=1e-12, atol=1e-13 * np.abs(want_a).max(), err_msg=repr(layer))
        np.testing.assert_allclose(got_g, want_g, rtol=1e-12, atol=1e-13 * np.abs(want_g).max(), err_msg=repr(layer))
        if not transposed and layer.groups == 1 and set(block.stride) == {1} and np.prod(block.kernel_size) > 1:
            for method in ("fft", "gemm"):
                lags = conv_lags.lagged_a_factor(x.numpy(), block.kernel_size, block.padding, block.dilation,
                                                 block.has_bias, 1 / 3, False, method=method)
                np.testing.assert_allclose(lags, want_a[0], rtol=1e-12, atol=1e-13 * np.abs(want_a).max(),
                                           err_msg=f"{method}: {layer!r}")
            lag_checked += 1
        (y * g).sum().backward()
        bias_grad = None if layer.bias is None else layer.bias.grad.numpy()
        mat = block.grad_matrix(layer.weight.grad.numpy(), bias_grad)
        want = np.concatenate([q.T @ r for q, r in zip(g_rows, rows)])
        np.testing.assert_allclose(mat, want, rtol=1e-12, atol=1e-13 * np.abs(want).max(), err_msg=repr(layer))
        weight, bias = block.split_matrix(mat)
        assert np.array_equal(weight, layer.weight.grad.numpy())
        assert (bias is None) == (bias_grad is None) and (bias is None or np.array_equal(bias, bias_grad))
    if not transposed:
        assert lag_checked  # each seed draws some stride-1 single-group convolutions
