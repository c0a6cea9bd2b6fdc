"""register_layer: a module type of one's own (a Linear with a transposed weight, as GPT-2's
Conv1D; a convolution whose kernel is stored (kh, kw, C_in, C_out)) preconditioned exactly as its
torch twin; subclasses, bad registrations; a position
embedding shared by the batch gets every example's own statistics."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.layers import ConvBlock, LinearBlock
from hpckfac.torch import KFACPreconditioner, register_layer, registry


class TransposedLinear(nn.Module):
    """Hugging Face's Conv1D in miniature: ``x @ weight + bias`` with ``weight`` of shape (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


register_layer(TransposedLinear, lambda name, m: LinearBlock(name, m.weight.shape[0], m.weight.shape[1],
                                                             bias=m.bias is not None, transposed=True))


def comm():
    return Communicator(MPI.COMM_SELF)


def train(model, steps=4):
    torch.manual_seed(5)
    precond = KFACPreconditioner(model, comm=comm(), lr=0.1, inverse_update_interval=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).mean(1), y).backward()
        precond.step()
        opt.step()
    return precond


def test_registered_type_is_preconditioned_like_its_linear_twin():
    torch.manual_seed(0)
    mine = nn.Sequential(TransposedLinear(4, 5), nn.Tanh(), TransposedLinear(5, 2)).double()
    twin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for a, b in ((mine[0], twin[0]), (mine[2], twin[2])):
            b.weight.copy_(a.weight.T)
            b.bias.copy_(a.bias)
    precond = train(mine)
    train(twin)
    assert len(precond.modules) == 2 and not precond.other_params
    assert "K-FAC (A 5x5, G 5x5)" in repr(precond)
    for a, b in ((mine[0], twin[0]), (mine[2], twin[2])):
        np.testing.assert_allclose(a.weight.detach().T.numpy(), b.weight.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(a.bias.detach().numpy(), b.bias.detach().numpy(), rtol=1e-12, atol=1e-14)


class NamedAffine(nn.Module):
    """A Linear whose parameters are called ``kernel`` (out, in) and ``offset``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_out, n_in) * 0.3)
        self.offset = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return nn.functional.linear(x, self.kernel, self.offset)


def test_parameters_under_other_names_and_blocks_that_do_not_fit(monkeypatch, caplog):
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # registered for this test only
    register_layer(NamedAffine, lambda name, m: LinearBlock(name, m.kernel.shape[1], m.kernel.shape[0], bias=True),
                   params=("kernel", "offset"))
    torch.manual_seed(0)
    mine = nn.Sequential(NamedAffine(4, 5), nn.Tanh(), NamedAffine(5, 2)).double()
    twin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for a, b in ((mine[0], twin[0]), (mine[2], twin[2])):
            b.weight.copy_(a.kernel)
            b.bias.copy_(a.offset)
    precond = train(mine)
    train(twin)
    assert len(precond.modules) == 2 and not precond.other_params
    for a, b in ((mine[0], twin[0]), (mine[2], twin[2])):
        torch.testing.assert_close(a.kernel, b.weight, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.offset, b.bias, rtol=1e-12, atol=1e-14)
    # A builder whose block does not fit the module's parameters: first-order, with the reason.
    register_layer(NamedAffine, lambda name, m: LinearBlock(name, 3, 3, bias=False), params=("kernel", None))
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(nn.Sequential(NamedAffine(4, 5)).double(), comm=comm())
    assert not precond.modules and "do not match the module's kernel/None" in repr(precond)
    for bad in (("kernel",), ("kernel", 3), "kernel"):
        with pytest.raises(ValueError, match="params"):
            register_layer(NamedAffine, lambda name, m: None, params=bad)


class ConvHWIO(nn.Module):
    """A 2-d "same" convolution whose kernel is stored (kh, kw, C_in, C_out), as TensorFlow stores it."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(kernel, kernel, c_in, c_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(c_out) * 0.1)

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight.permute(3, 2, 0, 1), self.bias, padding=self.weight.shape[0] // 2)


class HWIOBlock(ConvBlock):
    """ConvBlock with the gradient matrix read from, and written back to, a (kh, kw, C_in, C_out) kernel."""

    def __init__(self, name: str, module: ConvHWIO) -> None:
        k, _, c_in, c_out = module.weight.shape
        super().__init__(name, c_in, c_out, (k, k), (1, 1), (k // 2, k // 2), (1, 1), bias=True)
        self.weight_shape = tuple(module.weight.shape)  # param_shapes must match the module's weight

    def weight_matrix(self, weight):
        return weight.transpose(3, 2, 0, 1).reshape(self.d_G, -1)

    def weight_from_matrix(self, mat):
        k = self.weight_shape[0]
        return mat.reshape(self.d_G, -1, k, k).transpose(2, 3, 1, 0)


def test_a_convolution_with_its_kernel_stored_otherwise_is_preconditioned_as_conv2d(monkeypatch):
    """Through a ConvBlock subclass (docs/curvature.md, "Adding a kind"): the same statistics and
    the same natural gradient, in float64, as nn.Conv2d on the same weights."""
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    register_layer(ConvHWIO, HWIOBlock)
    torch.manual_seed(0)
    mine = nn.Sequential(ConvHWIO(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 2)).double()
    twin = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 2)).double()
    with torch.no_grad():
        twin[0].weight.copy_(mine[0].weight.permute(3, 2, 0, 1))
        twin[0].bias.copy_(mine[0].bias)
    twin[3].load_state_dict(mine[3].state_dict())
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randint(0, 2, (4,))
    results = []
    for model in (mine, twin):
        precond = KFACPreconditioner(model, comm=comm(), lr=0.1, damping=1e-3)
        assert "K-FAC (A 19x19, G 3x3)" in repr(precond).splitlines()[1]
        nn.functional.cross_entropy(model(x), y).backward()
        stats = precond.local.result()
        precond.step()
        results.append((stats, model[0].weight.grad, model[0].bias.grad))
    # The bridge moves .grad through split_matrix's views alone: grad_matrix must be its inverse.
    block = registry.block_for("0", mine[0])
    mat = np.random.default_rng(1).standard_normal(block.grad_shape)
    np.testing.assert_array_equal(block.grad_matrix(*block.split_matrix(mat)), mat)
    twin_matrix = np.hstack([twin[0].weight.detach().reshape(3, -1).numpy(), twin[0].bias.detach().numpy()[:, None]])
    np.testing.assert_array_equal(block.grad_matrix(mine[0].weight.detach().numpy(), mine[0].bias.detach().numpy()),
                                  twin_matrix)
    (stats, weight, bias), (twin_stats, twin_weight, twin_bias) = results
    for got, want in zip(stats, twin_stats):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(weight.permute(3, 2, 0, 1), twin_weight, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bias, twin_bias, rtol=1e-12, atol=1e-14)


def test_parametrized_layers_stay_first_order_with_the_reason():
    """weight_norm / spectral_norm make a layer's weight a tensor computed from other parameters:
    the layer stays first-order, its entry names the parametrization (not a weight of shape None),
    its trained parameters get the plain gradient, and the plain layer beside it stays K-FAC."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm
    torch.manual_seed(4)
    model = nn.Sequential(weight_norm(nn.Linear(5, 6)), nn.Tanh(), nn.Unflatten(1, (6, 1)),
                          spectral_norm(nn.Conv1d(6, 4, 1)), nn.Flatten(), nn.Linear(4, 3)).double()
    precond = KFACPreconditioner(model, comm=comm())
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    assert "first-order: weight computed by a parametrization" in lines["0"]
    assert "first-order: weight computed by a parametrization" in lines["3"]
    assert "K-FAC (A 5x5, G 3x3)" in lines["5"]
    assert list(precond.modules) == [model[5]]
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    nn.functional.cross_entropy(model(x), y).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if not name.startswith("5.")}
    precond.step()
    for name, p in model.named_parameters():
        if name in plain:
            assert torch.equal(p.grad, plain[name]), name


def test_a_weight_computed_in_forward_by_the_old_weight_norm_is_named():
    """torch.nn.utils.weight_norm (deprecated, still common) leaves the weight a plain tensor set in a
    forward pre-hook: the layer stays first-order with that reason, not a weight of shape None, and
    its weight_g and weight_v get their plain gradient."""
    import warnings
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its deprecation
        layer = nn.utils.weight_norm(nn.Linear(5, 6))
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(6, 3)).double()
    precond = KFACPreconditioner(model, comm=comm())
    lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
    assert "first-order: weight is a tensor, not a parameter of the layer" in lines["0"]
    assert "torch.nn.utils.weight_norm" in lines["0"] and "None" not in lines["0"]
    assert list(precond.modules) == [model[2]]
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    nn.functional.cross_entropy(model(x), y).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if name.startswith("0.")}
    assert set(plain) == {"0.bias", "0.weight_g", "0.weight_v"}
    precond.step()
    for name, p in model.named_parameters():
        if name in plain:
            assert torch.equal(p.grad, plain[name]), name


def test_subclasses_inherit_and_bad_registrations_are_refused():
    class MyLinear(nn.Linear):
        pass

    precond = KFACPreconditioner(nn.Sequential(MyLinear(3, 2)), comm=comm())
    assert len(precond.modules) == 1
    with pytest.raises(ValueError, match="module_type"):
        register_layer(int, lambda n, m: None)
    with pytest.raises(ValueError, match="build"):
        register_layer(MyLinear, "LinearBlock")

    class Odd(nn.Linear):
        pass

    register_layer(Odd, lambda name, m: "not a block")
    precond = KFACPreconditioner(nn.Sequential(Odd(3, 2)), comm=comm())
    assert not precond.modules and "not an hpckfac.layers.CurvatureBlock" in repr(precond)


class Tokens(nn.Module):
    """Token and position embeddings; positions either shared by the batch (1, T) or per example."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.tok, self.pos, self.ln, self.out = nn.Embedding(7, 4), nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        if not self.shared:
            positions = positions.expand(tokens.shape[0], -1)
        return self.out(torch.tanh(self.ln(self.tok(tokens) + self.pos(positions)))).mean(1)


def test_positions_shared_by_the_batch_give_per_example_statistics():
    results = []
    for shared in (True, False):
        torch.manual_seed(3)
        model = Tokens(shared).double()
        precond = KFACPreconditioner(model, comm=comm(), factor_dtype=torch.float64)
        tokens = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(4))
        y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(5))
        nn.functional.cross_entropy(model(tokens), y).backward()
        results.append(([s.copy() for s in precond.local.result()], precond))
        precond.step()
    (shared, p1), (expanded, _) = results
    assert len(p1.modules) == 4
    for a, b in zip(shared, expanded):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_attention_and_unused_layers_are_named(caplog):
    """MultiheadAttention's in-projection and out_proj, applied inside its forward rather than
    called as modules, are K-FAC layers that get statistics; a K-FAC layer the forward never
    calls is named once in a warning."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.used, self.unused = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2), \
                nn.Linear(4, 2)

        def forward(self, x):
            return self.used(self.attn(x, x, x)[0]).mean(1)

    net = Net()
    with caplog.at_level("WARNING", logger="hpckfac"):
        precond = KFACPreconditioner(net, comm=comm())
        lines = {line.split()[0]: line for line in repr(precond).splitlines()[1:]}
        assert "K-FAC (A 5x5, G 12x12)" in lines["attn"] and "K-FAC (A 5x5, G 4x4)" in lines["attn.out_proj"]
        for _ in range(2):
            net(torch.randn(3, 5, 4)).sum().backward()
            precond.step()
    assert caplog.text.count("K-FAC layers without statistics at step 0: unused") == 1
    assert "eval() mode" not in caplog.text  # it is in train() mode, only not called
    # No gradient on any rank: .grad stays None, as a first-order parameter's does.
    assert net.unused.weight.grad is None and net.unused.bias.grad is None


def built_in_kinds() -> list[tuple[nn.Module, object]]:
    """A module of each built-in kind with settings other than torch's defaults, and the block
    written out from those settings that it must get."""
    from hpckfac.layers import (BatchNormBlock, ConvTransposeBlock, EmbeddingBlock, GroupNormBlock,
                                InstanceNormBlock, LayerNormBlock, PReLUBlock, RMSNormBlock)
    kinds = [
        (nn.Linear(3, 2, bias=False), LinearBlock("m", 3, 2, bias=False)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
         ConvBlock("m", 4, 6, (3,), (2,), (2,), (2,), bias=False, groups=2)),
        (nn.ConvTranspose2d(2, 4, (3, 2), stride=3, padding=(2, 1), output_padding=(1, 0), dilation=(2, 1), groups=2),
         ConvTransposeBlock("m", 2, 4, (3, 2), (3, 3), (2, 1), (1, 0), (2, 1), bias=True, groups=2)),
        (nn.BatchNorm1d(3, eps=1e-3), BatchNormBlock("m", 3, 1e-3)),
        (nn.LayerNorm((2, 4), eps=1e-3, bias=False), LayerNormBlock("m", (2, 4), 1e-3, bias=False)),
        (nn.GroupNorm(2, 4, eps=1e-3), GroupNormBlock("m", 2, 4, 1e-3)),
        (nn.Embedding(7, 3, padding_idx=2), EmbeddingBlock("m", 7, 3, 2)),
        (nn.PReLU(3), PReLUBlock("m", 3)),
        (nn.MultiheadAttention(4, 2, bias=False), LinearBlock("m", 4, 12, bias=False)),
    ]
    kinds += [(kind(3, eps=1e-3, affine=True), InstanceNormBlock("m", 3, 1e-3, dims))
              for dims, kind in ((1, nn.InstanceNorm1d), (2, nn.InstanceNorm2d), (3, nn.InstanceNorm3d))]
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        kinds.append((nn.RMSNorm((2, 3), eps=1e-3), RMSNormBlock("m", (2, 3), 1e-3)))
    return kinds


@pytest.mark.parametrize("module, block", built_in_kinds(), ids=lambda k: type(k).__name__)
def test_built_in_kinds_build_their_block_from_the_modules_settings(module, block):
    """eps, bias, padding, output padding, dilation, groups, a padding index and the spatial
    dimensions are the module's own, not defaults."""
    assert vars(registry.block_for("m", module)) == vars(block)


def test_every_built_in_kind_is_in_the_docs():
    """Each public torch module type the registry builds a block for, and each built-in block
    class, appears in docs/preconditioner.md's table; each type in README.md's layer list."""
    import os
    import re

    from hpckfac import layers
    from hpckfac.layers.block import CurvatureBlock
    from hpckfac.torch import registry

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    table = open(os.path.join(root, "docs", "preconditioner.md"), encoding="utf-8").read()
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    public = [t for t in registry._BUILDERS if t.__module__.startswith("torch.nn") and not t.__name__.startswith("_")
              and t is not nn.modules.linear.NonDynamicallyQuantizableLinear]
    assert nn.InstanceNorm2d in public and nn.Embedding in public
    for t in public:
        family = "nn." + re.sub(r"[123]d$", "", t.__name__)
        assert f"`{family}" in table, family
        assert f"`{family}" in readme, family
    blocks = [name for name in layers.__all__ if name.endswith("Block")
              and name not in ("CurvatureBlock", "KronBlock", "UnitWiseBlock")
              and issubclass(getattr(layers, name), CurvatureBlock)]
    assert "InstanceNormBlock" in blocks
    for name in blocks:
        assert f"`{name}`" in table, name
