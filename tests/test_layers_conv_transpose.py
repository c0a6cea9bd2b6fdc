"""ConvTransposeBlock against torch autograd (the weight gradient is the sum over output positions
of output-gradient rows times input rows), a loop-built oracle of its rows, and the dense damped
Kronecker solve (float64)."""
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.layers import ConvTransposeBlock
from test_layers_grouped_conv import dense_group_solve

# (in, out, groups, kernel, stride, padding, output_padding, dilation, bias)
CASES = [(2, 3, 1, (3,), (2,), (1,), (1,), (1,), True),
         (3, 2, 1, (3, 2), (2, 1), (1, 0), (1, 0), (1, 1), False),
         (4, 6, 2, (3, 3), (2, 2), (0, 1), (0, 1), (1, 1), True),
         (2, 2, 1, (2, 3), (1, 2), (1, 3), (0, 1), (2, 1), True),    # padding beyond d(k-1): cropped
         (2, 2, 1, (3,), (2,), (4,), (1,), (1,), True),              # cropped by a multiple of the stride
         (2, 2, 2, (2, 1, 2), (2, 1, 1), (0, 0, 1), (1, 0, 0), (1, 1, 1), False)]


def torch_layer(case):
    c_in, c_out, groups, kernel, stride, padding, output_padding, dilation, bias = case
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[len(kernel)]
    return cls(c_in, c_out, kernel, stride=stride, padding=padding, output_padding=output_padding,
               dilation=dilation, groups=groups, bias=bias).double()


def make(case, rng, n=2):
    c_in, c_out, groups, kernel, stride, padding, output_padding, dilation, bias = case
    size = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}[len(kernel)]
    x = rng.standard_normal((n, c_in, *size))
    return x, ConvTransposeBlock("up", c_in, c_out, kernel, stride, padding, output_padding, dilation, bias,
                                 groups=groups)


def loop_rows(x, block, out):
    """Rows of one group's transposed convolution by its definition: the input values that
    reach output position q through kernel offset k, columns (c_in, k) with k flipped."""
    n, c, *size = x.shape
    rows = []
    for i in range(n):
        for q in itertools.product(*(range(o) for o in out)):
            row = []
            for ch in range(c):
                for k in itertools.product(*(range(kk) for kk in block.kernel_size)):
                    # output q receives input p through offset kflip when q = p*s + kflip*d - pad
                    kflip = [kk - 1 - kj for kk, kj in zip(block.kernel_size, k)]
                    num = [q[j] + block.padding[j] - kflip[j] * block.dilation[j] for j in range(len(q))]
                    ok = all(v % s == 0 and 0 <= v // s < size[j]
                             for j, (v, s) in enumerate(zip(num, block.stride)))
                    row.append(x[(i, ch, *[v // s for v, s in zip(num, block.stride)])] if ok else 0.0)
            rows.append(row + [1.0] * block.has_bias)
    return np.array(rows)


@pytest.mark.parametrize("case", CASES)
def test_weight_gradient_is_sum_of_row_products(case):
    torch.manual_seed(0)
    layer = torch_layer(case)
    x, block = make(case, np.random.default_rng(1))
    out = layer(torch.from_numpy(x))
    assert tuple(out.shape[2:]) == block.output_size(x.shape[2:])
    for seed in (2, 3):
        layer.zero_grad()
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        layer(torch.from_numpy(x)).backward(gout)
        mat = block.grad_matrix(layer.weight.grad.numpy(), layer.bias.grad.numpy() if block.has_bias else None)
        rows = block.input_rows(x)
        cin_g = block.in_channels // block.groups
        width = cin_g * math.prod(block.kernel_size)
        g = np.moveaxis(gout.numpy(), 1, -1).reshape(-1, block.out_channels)
        for j in range(block.groups):
            a = rows[:, j * width:(j + 1) * width]
            gj = g[:, j * block.d_G:(j + 1) * block.d_G]
            np.testing.assert_allclose(mat[j * block.d_G:(j + 1) * block.d_G, :width], gj.T @ a,
                                       rtol=1e-12, atol=1e-12)
            if block.has_bias:
                np.testing.assert_allclose(mat[j * block.d_G:(j + 1) * block.d_G, -1], gj.sum(0), rtol=1e-12)
        weight, bias = block.split_matrix(mat)
        np.testing.assert_array_equal(weight, layer.weight.grad.numpy())
        assert (bias is None) == (not block.has_bias)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 1])
def test_rows_against_the_definition(case):
    x, block = make(case, np.random.default_rng(4))
    out = block.output_size(x.shape[2:])
    rows = loop_rows(x, block, out)
    np.testing.assert_array_equal(block.a_rows(x), rows)
    want = rows.T @ rows * 0.25
    np.testing.assert_allclose(block.a_factor(x, 0.25), want, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(block.a_factor(x, 0.25, packed=True), want[np.triu_indices(block.d_A)],
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("case", CASES[:3])
def test_solve_is_the_damped_kron_solve(case):
    rng = np.random.default_rng(5)
    x, block = make(case, rng)
    out = block.output_size(x.shape[2:])
    g = rng.standard_normal((x.shape[0], block.out_channels, *out))
    a_factor, g_factor = block.a_factor(x, 0.5), block.g_factor(g, 0.5)
    if block.groups == 1:
        a_factor, g_factor = a_factor[None], g_factor[None]
    grad = rng.standard_normal(block.grad_shape)
    got = block.solve(block.statistics(x, g, 0.5), grad, 0.02)
    np.testing.assert_allclose(got, dense_group_solve(a_factor, g_factor, grad, 0.02), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs,name", [
    ({"in_channels": 0}, "in_channels"), ({"groups": 4}, "groups"), ({"output_padding": (2,)}, "output_padding"),
    ({"kernel_size": ()}, "kernel_size"), ({"stride": (0,)}, "stride"), ({"bias": 1}, "bias"),
])
def test_invalid_arguments_name_the_parameter(kwargs, name):
    args = dict(name="up", in_channels=2, out_channels=2, kernel_size=(3,), stride=(2,), padding=(1,),
                output_padding=(1,), dilation=(1,), bias=True, groups=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ConvTransposeBlock(**args)


@pytest.mark.parametrize("case", [c for c in CASES if c[2] == 1 and max(c[3]) > 1])
def test_a_calls_output_size_gives_the_rows_of_that_output(case):
    """forward(x, output_size=...) pads the output beyond the module's output_padding: given
    that size, add_input takes the rows of its output positions (the definition's, loop-built),
    pairs them with an output gradient of that size, and refuses a size no padding gives."""
    x, block = make(case, np.random.default_rng(7))
    largest = tuple(n + max(s, d) - 1 - op for n, s, d, op in
                    zip(block.output_size(x.shape[2:]), block.stride, block.dilation, block.output_padding))
    padded = ConvTransposeBlock("up", block.in_channels, block.out_channels, block.kernel_size, block.stride,
                                block.padding, tuple(o - n + op for o, n, op in zip(
                                    largest, block.output_size(x.shape[2:]), block.output_padding)),
                                block.dilation, block.has_bias)
    rows = loop_rows(x, padded, largest)
    stats = np.zeros(block.stat_size)
    saved = block.add_input(stats, x, output_size=largest)
    assert tuple(saved) == largest
    np.testing.assert_allclose(stats[:block.d_A * (block.d_A + 1) // 2], (rows.T @ rows)[np.triu_indices(block.d_A)],
                               rtol=1e-13, atol=1e-13)
    block.add_output_grad(stats, np.ones((x.shape[0], block.out_channels, *largest)), 1.0, saved)
    with pytest.raises(ValueError, match="output_size: block 'up' cannot give"):
        block.add_input(stats, x, output_size=tuple(o + 1 for o in largest))
    given, plain = np.zeros(block.stat_size), np.zeros(block.stat_size)
    block.add_input(given, x, output_size=block.output_size(x.shape[2:]))
    block.add_input(plain, x)
    np.testing.assert_array_equal(given, plain)


def test_output_size_other_than_the_modules_is_refused():
    """An output gradient of another size than the one add_input was given (a subclass whose
    forward changes its output) is refused."""
    x, block = make(CASES[0], np.random.default_rng(6))
    stats = np.zeros(block.stat_size)
    saved = block.add_input(stats, x)
    out = block.output_size(x.shape[2:])
    with pytest.raises(ValueError, match="output_size"):
        block.add_output_grad(stats, np.ones((x.shape[0], block.out_channels, out[0] - 1)), 1.0, saved)
    block.add_output_grad(stats, np.ones((x.shape[0], block.out_channels, *out)), 1.0, saved)
