"""One step at P ranks, in float64, against a NumPy oracle of the concatenated global batch (no
hpckfac code in it): each rank's micro-batch sampled by statistics_fraction, the factors the mean
of the ranks' own, and models of one and two K-FAC blocks, so that from two (or three) ranks on
some ranks own no block and call the collectives with nothing of their own."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.torch import KFACPreconditioner

MICRO, TOKENS, DAMPING = 5, 3, 1e-2


class Sequence(nn.Module):
    """A Linear on a (B, T, 5) sequence and, with ``head``, a bias-free Linear on its mean; with
    ``scale``, a first-order float32 factor on the output, registered as the first parameter."""

    def __init__(self, head: bool, scale: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 1.25)) if scale else None
        self.fc = nn.Linear(5, 4 if head else 3)
        self.head = nn.Linear(4, 3, bias=False) if head else None

    def double(self):
        super().double()
        if self.scale is not None:  # stays float32 beside the float64 K-FAC layers
            self.scale.data = self.scale.data.float()
        return self

    def forward(self, x):
        h = self.fc(x)
        out = h.mean(1) if self.head is None else self.head(torch.tanh(h).mean(1))
        return out if self.scale is None else out * self.scale.double()


def global_batch(size):
    gen = torch.Generator().manual_seed(21)
    return (torch.randn(size * MICRO, TOKENS, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (size * MICRO,), generator=gen))


def oracle(model, x, y, ranks, sample):
    """The preconditioned gradients of the global batch: per micro-batch of MICRO examples the
    first ``sample`` examples' rows, A = (1/S) sum a~ a~^T and G = (1/(S |T|)) sum g g^T over the
    S sampled examples of all micro-batches, g each example's own output gradient."""
    seen = {}

    def hook(module, args, out):
        call = seen[module] = {"a": args[0].detach()}
        out.register_hook(lambda g: call.__setitem__("g", g.detach() * len(x)))
    for name in ("fc", "head"):
        if getattr(model, name) is not None:
            getattr(model, name).register_forward_hook(hook)
    nn.functional.cross_entropy(model(x), y).backward()
    updates = {}
    for name in ("fc", "head"):
        module = getattr(model, name)
        if module is None:
            continue
        call = seen[module]
        keep = np.concatenate([np.arange(r * MICRO, r * MICRO + sample) for r in range(ranks)])
        a = call["a"].numpy()[keep].reshape(-1, call["a"].shape[-1])
        g = call["g"].numpy()[keep].reshape(-1, call["g"].shape[-1])
        positions = len(a) // len(keep)
        if module.bias is not None:
            a = np.hstack([a, np.ones((len(a), 1))])
        A, G = a.T @ a / len(keep), g.T @ g / (len(keep) * positions)
        pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
        mat = module.weight.grad.numpy()
        if module.bias is not None:
            mat = np.hstack([mat, module.bias.grad.numpy()[:, None]])
        updates[name] = (np.linalg.inv(G + math.sqrt(DAMPING) / pi * np.eye(len(G))) @ mat
                         @ np.linalg.inv(A + pi * math.sqrt(DAMPING) * np.eye(len(A))))
    return updates


@pytest.mark.mpi
@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("head", [False, True], ids=["one_block", "two_blocks"])
@pytest.mark.parametrize("assignment", ["lpt", "contiguous"])
@pytest.mark.parametrize("scale", [False, True], ids=["float64", "float32_first"])
def test_ranks_equal_the_oracle_of_the_global_batch(comm, fraction, head, assignment, scale):
    """With ``scale`` the model's first parameter is a float32 first-order one: the buffer still
    takes the K-FAC layers' float64, and the ranks meet the oracle to float64's precision."""
    torch.manual_seed(0)
    model = Sequence(head, scale).double()
    reference = Sequence(head, scale).double()
    reference.load_state_dict(model.state_dict())
    x, y = global_batch(comm.size)
    precond = KFACPreconditioner(model, comm=comm, damping=DAMPING, kl_clip=None, statistics_fraction=fraction,
                                 assignment=assignment)
    mine = slice(comm.rank * MICRO, (comm.rank + 1) * MICRO)
    nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
    precond.step()
    assert np.dtype(precond.engine.comm_dtype) == np.float64
    blocks = 1 + head
    if comm.size > blocks:  # the case this test is for: ranks that own nothing
        assert len(set(precond.engine.owners)) == blocks
    want = oracle(reference, x, y, comm.size, math.ceil(fraction * MICRO))
    for name, update in want.items():
        module = getattr(model, name)
        got = module.weight.grad.numpy()
        if module.bias is not None:
            got = np.hstack([got, module.bias.grad.numpy()[:, None]])
        np.testing.assert_allclose(got, update, rtol=1e-11, atol=1e-13 * np.abs(update).max(), err_msg=name)
