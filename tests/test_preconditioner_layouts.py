"""One step of KFACPreconditioner in float64 against an oracle built here without hpckfac code,
for what the other end-to-end oracles do not feed the layers: a channels_last model and input,
non-contiguous inputs (a permuted view, a strided slice), the lag-product route of a convolution
on such inputs, and layers called twice in one forward.

The oracle takes each call's input and per-example output gradient from torch's own hooks, a
convolution's patches by running the layer on unit weights (no im2col), the per-example
gradients of a normalisation layer's (gamma, beta) from torch.func (BatchNorm from its x_hat,
which the batch shares), and the damped inverses from np.linalg."""
import copy
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn
from torch.func import functional_call, grad, vmap

from hpckfac.comm import Communicator
from hpckfac.layers import conv, conv_lags
from hpckfac.torch import KFACPreconditioner

DAMPING = 1e-2
CONVS = (nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def capture(model):
    """Every call's input and output gradient, per K-FAC module, in call order; and the hooks'
    handles."""
    seen, handles = {}, []
    for module in model.modules():
        if isinstance(module, (nn.Linear,) + CONVS + NORMS):
            def forward(mod, args, out):
                # Contiguous copies: the oracle does not depend on the layout it is checking.
                record = {"a": args[0].detach().contiguous().clone()}
                seen.setdefault(mod, []).append(record)
                out.register_hook(lambda g: record.__setitem__("g", g.detach().contiguous().clone()))
            handles.append(module.register_forward_hook(forward))
    return seen, handles


def patches(module, a):
    """Rows (N * T, C_in * prod(kernel)) with out[n, o, t] = sum_col W[o, col] rows[(n, t), col]:
    the layer's output on each unit weight in turn (one group)."""
    columns = []
    with torch.no_grad():
        for col in range(module.weight[0].numel()):
            unit = torch.zeros_like(module.weight).reshape(len(module.weight), -1)
            unit[:, col] = 1.0
            columns.append(module._conv_forward(a, unit.reshape(module.weight.shape), None)[:, 0])
    return torch.stack(columns, -1).reshape(-1, len(columns)).numpy()


def kron_update(module, calls, examples):
    """G^-1 [W | b] A^-1 with pi-damping, A = (1/B) sum a~ a~^T, G = (1/(B |T|)) sum g g^T over
    every call; the result reshaped as the weight and the bias."""
    a_sum, g_sum = 0.0, 0.0
    for call in calls:
        a, g = call["a"], call["g"]
        if isinstance(module, nn.Linear):
            rows, g_rows = a.reshape(-1, a.shape[-1]).numpy(), g.reshape(-1, g.shape[-1]).numpy()
        else:
            rows, g_rows = patches(module, a), g.movedim(1, -1).reshape(-1, g.shape[1]).numpy()
        positions = len(g_rows) // len(g)
        rows = np.hstack([rows, np.ones((len(rows), 1))]) if module.bias is not None else rows
        a_sum = a_sum + rows.T @ rows
        g_sum = g_sum + g_rows.T @ g_rows / positions
    A, G = a_sum / examples, g_sum / examples
    pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    mat = module.weight.grad.reshape(len(module.weight), -1).numpy()
    if module.bias is not None:
        mat = np.hstack([mat, module.bias.grad.numpy()[:, None]])
    v = (np.linalg.inv(G + math.sqrt(DAMPING) / pi * np.eye(len(G))) @ mat
         @ np.linalg.inv(A + pi * math.sqrt(DAMPING) * np.eye(len(A))))
    if module.bias is None:
        return [v.reshape(module.weight.shape)]
    return [v[:, :-1].reshape(module.weight.shape), v[:, -1]]


def unit_gradients(module, a, g):
    """u_i = d <module(a_i), g_i> / d(gamma, beta), example by example: (N, units, 2)."""
    if isinstance(module, nn.BatchNorm2d):
        x = a.reshape(len(a), a.shape[1], -1)
        mean, var = x.mean((0, 2), keepdim=True), x.var((0, 2), unbiased=False, keepdim=True)
        x_hat, g = (x - mean) / torch.sqrt(var + module.eps), g.reshape(x.shape)
        return torch.stack([(g * x_hat).sum(2), g.sum(2)], -1).numpy()
    params = {name: p.detach() for name, p in module.named_parameters()}

    def inner(p, a_i, g_i):
        return (functional_call(module, p, (a_i[None],))[0] * g_i).sum()
    per = vmap(grad(inner), in_dims=(None, 0, 0))(params, a, g)
    return torch.stack([per["weight"].reshape(len(a), -1), per["bias"].reshape(len(a), -1)], -1).numpy()


def unit_update(module, calls, examples):
    """(F_c + lambda I)^-1 (grad gamma_c, grad beta_c), F_c = (1/B) sum of every call's u u^T."""
    fisher = sum(np.einsum("nci,ncj->cij", u, u) for u in (unit_gradients(module, c["a"], c["g"]) for c in calls))
    grads = np.stack([module.weight.grad.reshape(-1).numpy(), module.bias.grad.reshape(-1).numpy()], -1)
    v = np.einsum("cij,cj->ci", np.linalg.inv(fisher / examples + DAMPING * np.eye(2)), grads)
    return [v[:, 0].reshape(module.weight.shape), v[:, 1].reshape(module.weight.shape)]


def oracle(model, x, y, parts):
    """Every K-FAC module's preconditioned (weight, bias) after one step on ``parts`` equal
    micro-batches of (x, y), the losses divided by their number."""
    seen, handles = capture(model)
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        (nn.functional.cross_entropy(model(xs), ys) / parts).backward()
    for handle in handles:  # the per-example gradients below call the modules again
        handle.remove()
    for calls in seen.values():
        for call in calls:
            call["g"] = call["g"] * len(x)  # the mean losses undone: each example's own gradient
    out = {}
    for module, calls in seen.items():
        update = unit_update if isinstance(module, NORMS) else kron_update
        out[module] = update(module, calls, len(x))
    return out


def preconditioned(model, x, y, parts):
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF), damping=DAMPING, kl_clip=None,
                                 accumulation_steps=parts)
    for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
        (nn.functional.cross_entropy(model(xs), ys) / parts).backward()
    precond.step()
    precond.remove_hooks()


def check(make, x, y, parts=1):
    torch.manual_seed(0)
    model = make().double()
    with torch.no_grad():  # affine parameters away from their (1, 0) start
        for module in model.modules():
            if isinstance(module, NORMS):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    reference = copy.deepcopy(model)
    want = oracle(reference, x, y, parts)
    preconditioned(model, x, y, parts)
    ref_modules = dict(reference.named_modules())
    checked = 0
    for name, module in model.named_modules():
        if ref_modules[name] in want:
            got = [module.weight.grad] + ([module.bias.grad] if module.bias is not None else [])
            for g, w in zip(got, want[ref_modules[name]]):
                np.testing.assert_allclose(g.numpy(), w, rtol=1e-9, atol=1e-12 * np.abs(w).max(), err_msg=name)
            checked += 1
    return checked


class Image(nn.Module):
    """An unpadded 3x3 convolution (its windows read straight from a channels-last input),
    BatchNorm, a strided 1x1 convolution, GroupNorm, InstanceNorm and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.point, self.gn = nn.Conv2d(4, 6, 1, stride=(1, 2)), nn.GroupNorm(3, 6)
        self.inorm, self.head = nn.InstanceNorm2d(6, affine=True), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = torch.tanh(self.inorm(torch.tanh(self.gn(self.point(h)))))
        return self.head(h.mean((2, 3)))


def draw(shape, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randint(0, classes, (shape[0],), generator=gen)


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "strided"])
def test_memory_layouts_of_the_input_against_the_oracle(layout):
    if layout == "channels_last":
        x, y = draw((5, 3, 5, 7))
        x = x.contiguous(memory_format=torch.channels_last)
        make = lambda: Image().to(memory_format=torch.channels_last)  # noqa: E731
    elif layout == "permuted":  # (N, C, H, W) as a view of (N, W, H, C)
        x, y = draw((5, 7, 5, 3))
        x, make = x.permute(0, 3, 2, 1), Image
    else:  # every other column and row of a larger image
        x, y = draw((5, 3, 10, 14), seed=1)
        x, make = x[:, :, ::2, 1::2], Image
    assert not x.is_contiguous()
    assert check(make, x, y) == 6


@pytest.mark.parametrize("method", ["fft", "gemm"])
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_lag_route_on_non_contiguous_inputs_against_the_oracle(monkeypatch, method, layout):
    """The stride-1 3x3 convolution takes its A from lag products, each method in turn."""
    calls = []
    monkeypatch.setattr(conv, "lags_pay", lambda *a: True)
    monkeypatch.setattr(conv_lags, "lag_method", lambda *a: calls.append(method) or method)
    x, y = draw((4, 3, 6, 5), seed=2)
    make = Image
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        make = lambda: Image().to(memory_format=torch.channels_last)  # noqa: E731
    else:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert check(make, x, y) == 6
    assert calls


class Twice(nn.Module):
    """A Linear, a LayerNorm and a Conv1d each called twice per forward, the Linear on inputs of
    two shapes (a sequence, then its first position)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.ln, self.conv = nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(torch.tanh(self.fc(x))))            # (B, T, 4), twice
        h = self.ln(2 * self.ln(h) + 1)
        z = torch.tanh(self.conv(torch.tanh(self.conv(h.transpose(1, 2)))))
        return self.head(torch.cat([z.mean(2), torch.tanh(self.fc(x[:, 0]))], 1))


@pytest.mark.parametrize("parts", [1, 2])
def test_layers_called_twice_sum_their_calls(parts):
    """Each call adds its own statistics: the Kronecker factors sum (and average) over the
    calls as over positions, the LayerNorm's Fisher is the sum of each call's u u^T (not the
    outer product of the summed per-example gradient)."""
    x, y = draw((6, 5, 4), seed=3)
    assert check(Twice, x, y, parts) == 4
