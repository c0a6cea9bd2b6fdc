"""LayerNormBlock and GroupNormBlock: unit-wise Fishers against per-example gradients of
(gamma, beta) from torch.func, and the per-unit damped solve against np.linalg (float64)."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch.func import functional_call, grad, vmap

from hpckfac.comm import Communicator
from hpckfac.layers import GroupNormBlock, LayerNormBlock
from hpckfac.torch import KFACPreconditioner
from torch_features import needs_rmsnorm

EPS = 1e-4


def per_example(module, x):
    """Per-example gradients of the affine parameters, and of the output, for a nonlinear loss."""
    x = torch.from_numpy(x)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p, xi, wi):
        return (wi * torch.tanh(functional_call(module, p, (xi[None],))[0])).sum()

    def loss_of_output(y, wi):
        return (wi * torch.tanh(y)).sum()

    with torch.no_grad():
        y = module(x)
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, w), vmap(grad(loss_of_output))(y, w).numpy()


def check_fisher(block, module, x):
    grads, g = per_example(module, x)
    got = block.fisher(x, g, scale=1 / x.shape[0])
    names = ["weight"] + (["bias"] if block.has_bias else [])
    u = np.stack([grads[n].reshape(x.shape[0], -1).numpy() for n in names], axis=-1)  # (N, units, k)
    assert got.shape == (block.units, block.k, block.k) and got.dtype == np.float64
    for c in range(block.units):
        np.testing.assert_allclose(got[c], u[:, c].T @ u[:, c] / x.shape[0], rtol=1e-10, atol=1e-13)
    stats = block.statistics(x, g, 1 / x.shape[0])
    np.testing.assert_allclose(block.factors(stats)[0], got, rtol=1e-15)
    return got, stats


@pytest.mark.parametrize("shape,normalized,bias", [((5, 6), (6,), True), ((4, 3, 5), (5,), True),
                                                   ((3, 2, 3, 4), (3, 4), False)])
def test_layernorm_fisher_against_per_example_gradients(shape, normalized, bias):
    torch.manual_seed(1)
    module = torch.nn.LayerNorm(normalized, eps=EPS, bias=bias).double()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        if bias:
            module.bias.uniform_(-0.5, 0.5)
    x = np.random.default_rng(2).standard_normal(shape) * 2 + 0.3
    check_fisher(LayerNormBlock("ln", normalized, EPS, bias=bias), module, x)


@pytest.mark.parametrize("shape,groups", [((5, 6, 3), 3), ((4, 4, 2, 3), 1), ((3, 6, 2, 2), 6)])
def test_groupnorm_fisher_against_per_example_gradients(shape, groups):
    torch.manual_seed(3)
    module = torch.nn.GroupNorm(groups, shape[1], eps=EPS).double()
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    x = np.random.default_rng(4).standard_normal(shape) * 2 + 0.3
    check_fisher(GroupNormBlock("gn", groups, shape[1], EPS), module, x)


def test_solve_and_gradient_layout():
    rng = np.random.default_rng(5)
    block = LayerNormBlock("ln", (2, 3), EPS)
    x, g = rng.standard_normal((4, 5, 2, 3)), rng.standard_normal((4, 5, 2, 3))
    fisher = block.fisher(x, g, 0.25)
    weight, bias = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    mat = block.grad_matrix(weight, bias)
    assert mat.shape == (6, 2)
    got = block.solve(block.statistics(x, g, 0.25), mat, 0.01)
    for c in range(6):
        np.testing.assert_allclose(got[c], np.linalg.solve(fisher[c] + 0.01 * np.eye(2), mat[c]), rtol=1e-10)
    back = block.split_matrix(mat)
    np.testing.assert_array_equal(back[0], weight)
    np.testing.assert_array_equal(back[1], bias)
    single = LayerNormBlock("ln", 3, EPS, bias=False)
    assert single.grad_matrix(weight[0]).shape == (3, 1) and single.split_matrix(np.ones((3, 1)))[1] is None


def test_unit_wise_preconditioning_orientation_on_general_matrices():
    """``precondition`` and ``precondition_batch`` apply unit ``c``'s matrix as ``inv[c] @ grad[c]``:
    checked on non-symmetric matrices, for which applying the transposed matrix gives another
    result (the symmetric inverses of the pipeline cannot tell the two apart)."""
    rng = np.random.default_rng(12)
    block = LayerNormBlock("ln", (2, 3), EPS)
    inv, grad = rng.standard_normal((6, 2, 2)), rng.standard_normal((6, 2))
    want = np.stack([m @ v for m, v in zip(inv, grad)])
    np.testing.assert_allclose(block.precondition(grad, [inv]), want, rtol=1e-13, atol=1e-14)
    got = block.precondition_batch(grad.reshape(-1), [inv])
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-13, atol=1e-14)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="num_groups"):
        GroupNormBlock("gn", 4, 6, EPS)
    with pytest.raises(ValueError, match="eps"):
        LayerNormBlock("ln", 3, 0.0)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNormBlock("ln", (3, 0), EPS)
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNormBlock("ln", (), EPS)
    with pytest.raises(ValueError, match="x:"):
        LayerNormBlock("ln", 3, EPS).fisher(np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="x:"):  # unbatched: no example axis before the normalised ones
        LayerNormBlock("ln", (2, 3), EPS).check_input(np.ones((2, 3)))
    with pytest.raises(ValueError, match="g:"):
        GroupNormBlock("gn", 2, 4, EPS).fisher(np.ones((2, 4, 3)), np.ones((2, 4, 2)))


def test_unit_wise_blocks_check_their_input_when_it_arrives():
    """add_input only keeps the input for the backward pass: it checks it there and then, so a
    wrong input fails in the forward pass that passed it."""
    from hpckfac.layers import BatchNormBlock, GroupNormBlock, InstanceNormBlock, LayerNormBlock

    stats = np.zeros(1)
    wrong = np.ones((2, 5, 3))
    for block, match in ((BatchNormBlock("bn", 4, 1e-5), "expects 4 units"),
                         (GroupNormBlock("gn", 2, 4, 1e-5), "expects 4 units"),
                         (InstanceNormBlock("in", 4, 1e-5, spatial_dims=1), "expects 4 units"),
                         (LayerNormBlock("ln", (4,), 1e-5), r"expects trailing dimensions \(4,\)")):
        with pytest.raises(ValueError, match=f"x: block '{block.name}' {match}"):
            block.add_input(stats, wrong)
        right = np.ones((2, 3, 4)) if isinstance(block, LayerNormBlock) else np.ones((2, 4, 3))
        assert block.add_input(stats, right) is right


class FlatWindows(torch.nn.Module):
    """``layer`` on the batch of ``(B, k, T, d)`` flattened to ``(B * k, T, d)`` rows (windows of
    ``T`` positions), a Linear head on the result."""

    def __init__(self, layer: torch.nn.Module, k: int, t: int) -> None:
        super().__init__()
        self.layer, self.head = layer, torch.nn.Linear(k * t * 7, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x.reshape(-1, *x.shape[2:]))).reshape(x.shape[0], -1))


@pytest.mark.parametrize("kind", ["LayerNorm", pytest.param("RMSNorm", marks=needs_rmsnorm), "Linear"])
@pytest.mark.parametrize("positions", [5, 3])
def test_flattened_rows_with_as_many_positions_as_examples_are_named(kind, positions, caplog):
    """``(B * k, T, d)`` rows with ``T = B`` are also a sequence-first ``(T', B, d)`` input, as which
    they are read: a unit-wise block's per-example sums then run over other examples' rows. A
    warning names the layer; none where ``T`` differs from the batch, nor for a Linear, whose
    factors are the same under both readings."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(7, 7) if kind == "Linear" else getattr(torch.nn, kind)(7)  # RMSNorm: torch >= 2.4
    model = FlatWindows(layer, 3, positions).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), skip_layers=["head"])
    x = torch.randn(5, 3, positions, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="hpckfac"):
        model(x).square().sum().backward()
        precond.step()
    named = [r.getMessage() for r in caplog.records if "flattened" in r.getMessage()]
    assert len(named) == (positions == 5 and kind != "Linear")
    assert all("layer layer" in m and "(15, 5, 7)" in m for m in named)


def test_flattened_rows_warning_is_silent_in_a_sequence_first_model(caplog):
    """A model with a ``batch_first=False`` module runs sequence-first by design: the input that
    warns above, ``(B * k, B, d)`` rows into a LayerNorm, is read sequence-first there without one."""
    torch.manual_seed(2)
    model = FlatWindows(torch.nn.LayerNorm(7), 3, 5).double()
    model.batch_first = False
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), skip_layers=["head"])
    x = torch.randn(5, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="hpckfac"):
        model(x).square().sum().backward()
        precond.step()
    assert not [r for r in caplog.records if "flattened" in r.getMessage()]


def test_adjacent_layernorms_with_and_without_bias_each_take_their_own_solve():
    """A LayerNorm without beta (1x1 unit Fishers) beside one with beta (2x2): preconditioned in one
    step, each weight's gradient becomes (F_c + damping I)^-1 grad_c with F_c from per-example
    gradients (autograd, one example at a time), its own k, not batched with the other's."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4, bias=False), torch.nn.Tanh(),
                                torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()
    damping = 1e-2
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), damping=damping, kl_clip=None)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 3, dtype=torch.float64, generator=gen), torch.randint(0, 2, (7,), generator=gen)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = [model[1].weight, model[3].weight, model[3].bias]
    model.eval()  # the oracle's forwards take no statistics
    u = [torch.cat([p.reshape(-1, 1) for p in torch.autograd.grad(
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)], 1).numpy() for i in range(7)]
    u = np.stack(u)  # (examples, units, 3): d gamma of the first, (d gamma, d beta) of the second
    precond.step()
    for cols, got in (([0], model[1].weight.grad[:, None]), ([1, 2], torch.stack([model[3].weight.grad,
                                                                                 model[3].bias.grad], 1))):
        for c in range(4):
            uc = u[:, c, cols]
            want = np.linalg.solve(uc.T @ uc / 7 + damping * np.eye(len(cols)), uc.mean(0))
            np.testing.assert_allclose(got[c].numpy(), want, rtol=1e-9)
