"""LinearBlock against per-example gradients from torch.func and explicit sums (float64)."""
import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from hpckfac.layers import LinearBlock


def per_example_grads(model, x, y):
    """(param name -> per-example gradients, per-example output gradients) of a cross-entropy loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    def loss_of_output(si, yi):
        return nn.functional.cross_entropy(si[None], yi[None])

    with torch.no_grad():
        outputs = model(x)
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y), vmap(grad(loss_of_output))(outputs, y)


@pytest.mark.parametrize("bias", [True, False])
def test_one_example_kron_equals_exact_fisher(bias):
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=bias).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    grads, g = per_example_grads(model, x, y)
    block = LinearBlock("fc", 4, 3, bias=bias)
    a_factor = block.a_factor(x.numpy())
    g_factor = block.g_factor(g.numpy())
    weight_grad = grads["weight"][0].numpy()
    matrix = block.grad_matrix(weight_grad, grads["bias"][0].numpy() if bias else None)
    assert matrix.shape == (3, 4 + bias)
    vec = matrix.reshape(-1, order="F")  # column-major vec of (d_G, d_A): the Fisher block is A kron G
    np.testing.assert_allclose(np.kron(a_factor, g_factor), np.outer(vec, vec), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bias", [True, False])
def test_factors_are_normalised_sums_over_examples(bias):
    rng = np.random.default_rng(1)
    a, g = rng.standard_normal((7, 5)), rng.standard_normal((7, 3))
    block = LinearBlock("fc", 5, 3, bias=bias)
    want_a = sum(np.outer(r, r) for r in (np.append(row, 1.0) if bias else row for row in a)) / 7
    want_g = sum(np.outer(r, r) for r in g) / 7
    np.testing.assert_allclose(block.a_factor(a, 1 / 7), want_a, rtol=1e-13)
    np.testing.assert_allclose(block.g_factor(g, 1 / 7), want_g, rtol=1e-13)
    assert block.positions(g) == 1
    packed = block.a_factor(a, 1 / 7, packed=True)
    np.testing.assert_allclose(packed, want_a[np.triu_indices(5 + bias)], rtol=1e-13)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2)])
def test_extra_dimensions_are_positions(shape):
    rng = np.random.default_rng(2)
    a, g = rng.standard_normal((*shape, 5)), rng.standard_normal((*shape, 2))
    block = LinearBlock("proj", 5, 2, bias=True)
    want_a, want_g = np.zeros((6, 6)), np.zeros((2, 2))
    positions = int(np.prod(shape[1:]))
    for i in range(shape[0]):
        for t in np.ndindex(*shape[1:]):
            row = np.append(a[(i, *t)], 1.0)
            want_a += np.outer(row, row)
            want_g += np.outer(g[(i, *t)], g[(i, *t)])
    scale = 1 / shape[0]
    assert block.positions(g) == positions
    np.testing.assert_allclose(block.a_factor(a, scale), want_a * scale, rtol=1e-13)
    np.testing.assert_allclose(block.g_factor(g, scale), want_g * scale / positions, rtol=1e-13)


def test_a_call_on_an_empty_sequence_adds_nothing():
    """nn.Linear takes (B, 0, d) inputs: no rows, so such a call leaves the statistics of another
    call (the explicit sums) as they were, rather than dividing G by its zero positions."""
    rng = np.random.default_rng(13)
    a, g = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 2))
    block = LinearBlock("proj", 5, 2, bias=True)
    stats = block.statistics(a, g, 1 / 3)
    saved = block.add_input(stats, np.empty((3, 0, 5)))
    block.add_output_grad(stats, np.empty((3, 0, 2)), 1 / 3, saved)
    rows = np.hstack([a.reshape(-1, 5), np.ones((12, 1))])
    got_a, got_g = block.factors(stats)
    np.testing.assert_allclose(got_a[0], rows.T @ rows / 3, rtol=1e-13)
    np.testing.assert_allclose(got_g[0], g.reshape(-1, 2).T @ g.reshape(-1, 2) / (3 * 4), rtol=1e-13)


def test_grad_matrix_matches_torch_layout_and_splits_back():
    torch.manual_seed(3)
    layer = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    gout = torch.randn(4, 3, dtype=torch.float64)
    layer(x).backward(gout)
    block = LinearBlock("fc", 5, 3, bias=True)
    matrix = block.grad_matrix(layer.weight.grad.numpy(), layer.bias.grad.numpy())
    # the weight gradient is sum over rows of g a~^T
    np.testing.assert_allclose(matrix, block.g_rows(gout.numpy()).T @ block.a_rows(x.numpy()), rtol=1e-12)
    weight, bias = block.split_matrix(matrix)
    np.testing.assert_array_equal(weight, layer.weight.grad.numpy())
    np.testing.assert_array_equal(bias, layer.bias.grad.numpy())
    nobias = LinearBlock("fc", 5, 3, bias=False)
    weight, bias = nobias.split_matrix(nobias.grad_matrix(layer.weight.grad.numpy()))
    assert bias is None and np.array_equal(weight, layer.weight.grad.numpy())
    # A float32 weight with a float64 bias: the matrix takes the wider dtype, the bias not rounded.
    mixed = block.grad_matrix(layer.weight.grad.numpy().astype(np.float32), layer.bias.grad.numpy())
    assert mixed.dtype == np.float64
    np.testing.assert_array_equal(mixed[:, -1], layer.bias.grad.numpy())


@pytest.mark.parametrize("dtype,g_dtype", [(np.float32, np.float32), (np.float16, np.float16),
                                           (ml_dtypes.bfloat16, ml_dtypes.bfloat16), (ml_dtypes.bfloat16, np.float16)])
def test_narrow_inputs_accumulate_in_float32(dtype, g_dtype):
    rng = np.random.default_rng(4)
    a, g = rng.standard_normal((64, 6)).astype(dtype), rng.standard_normal((64, 2)).astype(g_dtype)
    block = LinearBlock("fc", 6, 2, bias=True)
    exact = np.hstack([a.astype(np.float64), np.ones((64, 1))])
    got = block.a_factor(a, 1 / 64)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, exact.T @ exact / 64, rtol=1e-5, atol=1e-6)
    # The packed statistics too: a half-precision buffer would round every sum to 8 or 11 bits.
    stats = block.statistics(a, g, 1 / 64)
    assert stats.dtype == np.float32
    got_a, got_g = block.factors(stats)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(got_a[0], exact.T @ exact / 64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_g[0], g64.T @ g64 / 64, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("a_dtype,g_dtype", [(np.float64, np.float32), (np.float32, np.float64)])
def test_statistics_of_mixed_dtypes_are_float64(a_dtype, g_dtype):
    """An input and an output gradient of different precisions (a float64 layer fed float32
    gradients, or the reverse): the packed statistics are float64, each factor as exact as its
    own operands allow, not rounded to float32 where the other operand is float32."""
    rng = np.random.default_rng(12)
    a, g = rng.standard_normal((7, 4)).astype(a_dtype), rng.standard_normal((7, 3)).astype(g_dtype)
    block = LinearBlock("fc", 4, 3, bias=True)
    stats = block.statistics(a, g, 1 / 7)
    assert stats.dtype == np.float64
    rows = np.hstack([a.astype(np.float64), np.ones((7, 1))])
    want_a, want_g = rows.T @ rows / 7, g.astype(np.float64).T @ g.astype(np.float64) / 7
    got_a, got_g = block.factors(stats)
    # float64 operands: float64 rounding; float32 ones: products and sums in float32.
    for got, want, dtype in ((got_a[0], want_a, a_dtype), (got_g[0], want_g, g_dtype)):
        rtol = 1e-13 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_wrong_shapes_name_the_argument():
    block = LinearBlock("fc", 5, 3, bias=True)
    with pytest.raises(ValueError, match="a:"):
        block.a_rows(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="g:"):
        block.g_rows(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="weight_grad"):
        block.grad_matrix(np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="bias_grad"):
        block.grad_matrix(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="bias_grad"):
        LinearBlock("fc", 5, 3, bias=False).grad_matrix(np.zeros((3, 5)), np.zeros(3))
    with pytest.raises(ValueError, match="mat"):
        block.split_matrix(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="stats"):  # one element short: not silently unpacked
        block.factors(np.zeros(block.stat_size - 1))
    with pytest.raises(ValueError, match="inverses"):
        block.precondition(np.zeros((3, 6)), [np.eye(5)[None], np.eye(3)[None]])


@pytest.mark.parametrize("kwargs,name", [
    ({"in_features": 0}, "in_features"), ({"in_features": 2.5}, "in_features"), ({"in_features": True}, "in_features"),
    ({"out_features": -1}, "out_features"), ({"out_features": "3"}, "out_features"),
    ({"bias": "yes"}, "bias"), ({"name": 3}, "name"),
])
def test_invalid_constructor_arguments(kwargs, name):
    args = {"name": "fc", "in_features": 4, "out_features": 3, "bias": True, **kwargs}
    with pytest.raises(ValueError, match=name):
        LinearBlock(**args)


def test_an_unbatched_input_is_refused_not_read_as_examples():
    """nn.Linear takes an unbatched (features,) input, one example; the block refuses it rather
    than count its features as examples (in the forward pass, through the preconditioner)."""
    import torch
    from mpi4py import MPI
    from torch import nn

    from hpckfac.comm import Communicator
    from hpckfac.torch import KFACPreconditioner

    block = LinearBlock("fc", 4, 3, bias=True)
    with pytest.raises(ValueError, match=r"a: block 'fc' expects \(batch, \.\.\., 4\); an unbatched input"):
        block.a_factor(np.ones(4))
    model = nn.Sequential(nn.Linear(4, 3))
    KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    with pytest.raises(ValueError, match="unbatched input of shape"):
        model(torch.randn(4))
    model(torch.randn(2, 4))  # batched: fine


class Latents(nn.Module):
    """Attention of each example's ``(B, d)`` input over ``L`` learned latents projected by
    ``proj``, times the input; with ``expand`` the latents are expanded to the batch before the projection."""

    def __init__(self, count: int, expand: bool) -> None:
        super().__init__()
        self.expand = expand
        self.latents, self.proj = nn.Parameter(torch.randn(count, 4)), nn.Linear(4, 4)

    def forward(self, x):
        latents = self.latents.expand(len(x), *self.latents.shape) if self.expand else self.latents
        k = self.proj(latents)
        return (torch.softmax(x[:, None] @ k.transpose(-1, -2), -1) @ k)[:, 0] * x


@pytest.mark.parametrize("count", [1, 3, 10])
def test_latents_shared_by_the_batch_take_the_examples_factors_once_expanded(count):
    """A Linear on latents shared by the batch (docs/preconditioner.md, "Batch-shared inputs"): on
    ``latents.expand(B, L, d)`` its factors are the per-example ones, each example's own output
    gradient on each of its ``L`` positions (autograd, one example at a time), and ``step()`` writes
    ``G^-1 [dW | db] A^-1``; on the latents themselves, ``(L, d)``, they are not."""
    from mpi4py import MPI

    from hpckfac.comm import Communicator
    from hpckfac.torch import KFACPreconditioner

    damping = 1e-3
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(count))
    errors = []
    for expand in (True, False):
        torch.manual_seed(1)
        model = Latents(count, expand).double()
        precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), damping=damping, kl_clip=None)
        model(x).sin().sum(1).mean().backward()  # per-example losses, their mean
        w, b = model.proj.weight, model.proj.bias
        k = nn.functional.linear(model.latents, w, b).detach().requires_grad_()
        g = torch.stack([torch.autograd.grad((torch.softmax(xi[None] @ k.T, -1) @ k * xi).sin().sum(), k)[0]
                         for xi in x])
        rows = torch.cat([model.latents.detach(), torch.ones(count, 1, dtype=torch.float64)], 1).numpy()
        a_factor = rows.T @ rows  # (1/B) sum over the B examples of each one's L rows
        g_factor = torch.einsum("bld,ble->de", g, g).numpy() / (5 * count)
        pi = np.sqrt((np.trace(a_factor) / 5) / (np.trace(g_factor) / 4))
        grad_matrix = torch.cat([w.grad, b.grad[:, None]], 1).numpy()
        want = (np.linalg.inv(g_factor + np.sqrt(damping) / pi * np.eye(4)) @ grad_matrix
                @ np.linalg.inv(a_factor + pi * np.sqrt(damping) * np.eye(5)))
        precond.step()
        got = torch.cat([w.grad, b.grad[:, None]], 1).numpy()
        errors.append(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert errors[0] < 1e-12 and errors[1] > 0.1
