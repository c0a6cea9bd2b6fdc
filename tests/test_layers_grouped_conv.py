"""Grouped and depthwise convolutions: one Kronecker pair per group, against loop-built
per-group patches, torch autograd and the dense damped Kronecker solve of each group (float64)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.layers import ConvBlock
from test_layers_conv import loop_rows

# (in, out, groups, kernel, stride, padding, dilation, bias)
CASES = [(4, 6, 2, (3, 3), (1, 1), (1, 1), (1, 1), True),
         (6, 6, 6, (3, 3), (2, 2), (1, 1), (1, 1), False),      # depthwise
         (3, 6, 3, (2,), (1,), (1,), (2,), True),                # depthwise with a multiplier of 2, 1-d
         (4, 2, 2, (1, 2, 2), (1, 1, 1), (0, 1, 0), (1, 1, 1), True)]


def make(case, rng, n=3):
    c_in, c_out, groups, kernel, stride, padding, dilation, bias = case
    size = {1: (7,), 2: (5, 6), 3: (3, 4, 4)}[len(kernel)]
    x = rng.standard_normal((n, c_in, *size))
    block = ConvBlock("conv", c_in, c_out, kernel, stride, padding, dilation, bias, groups=groups)
    return x, block


def dense_group_solve(a_stack, g_stack, grad, damping):
    """Each group's rows of ``grad`` solved with the dense pi-damped ``np.kron`` Fisher of its pair."""
    d_G = g_stack.shape[-1]
    out = np.empty_like(grad)
    for j, (A, G) in enumerate(zip(a_stack, g_stack)):
        pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
        root = math.sqrt(damping)
        fisher = np.kron(A + pi * root * np.eye(len(A)), G + root / pi * np.eye(len(G)))
        gj = grad[j * d_G:(j + 1) * d_G]
        out[j * d_G:(j + 1) * d_G] = np.linalg.solve(fisher, gj.reshape(-1, order="F")).reshape(gj.shape, order="F")
    return out


@pytest.mark.parametrize("case", CASES)
def test_each_group_gets_the_factors_of_its_own_channels(case):
    c_in, c_out, groups, kernel, stride, padding, dilation, bias = case
    rng = np.random.default_rng(c_in + 10 * groups)
    x, block = make(case, rng)
    cin_g, cout_g = c_in // groups, c_out // groups
    assert (block.groups, block.d_A, block.d_G) == (groups, cin_g * math.prod(kernel) + bias, cout_g)
    # print(preconditioner)'s line: the pair is each group's, not the layer's.
    assert block.describe() == f"{groups} groups of A {block.d_A}x{block.d_A}, G {cout_g}x{cout_g}"
    rows = [loop_rows(x[:, j * cin_g:(j + 1) * cin_g], kernel, stride, padding, dilation, bias)[0]
            for j in range(groups)]
    out = loop_rows(x[:, :cin_g], kernel, stride, padding, dilation, bias)[1]
    g = rng.standard_normal((x.shape[0], c_out, *out))
    a_factor, g_factor = block.a_factor(x, 1 / 3), block.g_factor(g, 1 / 3)
    assert a_factor.shape == (groups, block.d_A, block.d_A) and g_factor.shape == (groups, cout_g, cout_g)
    positions = math.prod(out)
    for j in range(groups):
        np.testing.assert_allclose(a_factor[j], rows[j].T @ rows[j] / 3, rtol=1e-13, atol=1e-14)
        gj = np.moveaxis(g[:, j * cout_g:(j + 1) * cout_g], 1, -1).reshape(-1, cout_g)
        np.testing.assert_allclose(g_factor[j], gj.T @ gj / (3 * positions), rtol=1e-13, atol=1e-14)
    packed = block.statistics(x, g, 1 / 3)
    stacks = block.factors(packed)
    np.testing.assert_allclose(stacks[0], a_factor, rtol=1e-15)
    np.testing.assert_allclose(stacks[1], g_factor, rtol=1e-15)


@pytest.mark.parametrize("case", CASES)
def test_gradient_matrix_is_each_groups_sum_of_row_products(case):
    c_in, c_out, groups, kernel, stride, padding, dilation, bias = case
    torch.manual_seed(1)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(kernel)](
        c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias).double()
    x, block = make(case, np.random.default_rng(2))
    out = conv(torch.from_numpy(x))
    gout = torch.randn_like(out)
    out.backward(gout)
    mat = block.grad_matrix(conv.weight.grad.numpy(), conv.bias.grad.numpy() if bias else None)
    cin_g, cout_g = c_in // groups, c_out // groups
    for j in range(groups):
        a = loop_rows(x[:, j * cin_g:(j + 1) * cin_g], kernel, stride, padding, dilation, bias)[0]
        g = np.moveaxis(gout.numpy()[:, j * cout_g:(j + 1) * cout_g], 1, -1).reshape(-1, cout_g)
        np.testing.assert_allclose(mat[j * cout_g:(j + 1) * cout_g], g.T @ a, rtol=1e-12, atol=1e-13)
    weight, bias_part = block.split_matrix(mat)
    np.testing.assert_array_equal(weight, conv.weight.grad.numpy())
    assert (bias_part is None) == (not bias)


@pytest.mark.parametrize("case", CASES)
def test_solve_is_the_damped_kron_solve_of_each_group(case):
    rng = np.random.default_rng(3)
    x, block = make(case, rng)
    out = block.output_size(x.shape[2:])
    g = rng.standard_normal((x.shape[0], block.out_channels, *out))
    a_factor, g_factor = block.a_factor(x, 1 / 3), block.g_factor(g, 1 / 3)
    grad = rng.standard_normal(block.grad_shape)
    got = block.solve(block.statistics(x, g, 1 / 3), grad, 0.05)
    np.testing.assert_allclose(got, dense_group_solve(a_factor, g_factor, grad, 0.05), rtol=1e-9, atol=1e-12)


def test_half_inputs_accumulate_in_float32():
    rng = np.random.default_rng(4)
    x, block = make(CASES[0], rng)
    half = (x * 100).astype(np.float16)  # squares beyond float16's range
    got = block.a_factor(half, 0.5)
    assert got.dtype == np.float32
    want = block.a_factor(half.astype(np.float64), 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_groups_must_divide_the_channels():
    with pytest.raises(ValueError, match="groups"):
        ConvBlock("conv", 4, 6, (3, 3), 1, 0, 1, True, groups=4)
    with pytest.raises(ValueError, match="a_rows"):
        ConvBlock("conv", 4, 6, (3, 3), 1, 0, 1, True, groups=2).a_rows(np.zeros((1, 4, 5, 5)))
