"""A transposed convolution called with ``output_size`` (a U-Net matching an odd-sized skip
connection) at P ranks, in float64, against one process (COMM_SELF) training a twin whose
module has the ``output_padding`` that gives that size, on the global batch."""
import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner

MICRO, STEPS = 4, 3


class OddUNet(nn.Module):
    """Down by a stride-2 convolution, up by a stride-2 transposed one to the skip's odd size:
    by ``output_size`` in forward, or (``padded``) by the module's ``output_padding``."""

    def __init__(self, padded: bool) -> None:
        super().__init__()
        self.padded = padded
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=(0, 1) if padded else 0)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        skip = torch.tanh(self.stem(x))
        low = torch.tanh(self.down(skip))
        up = self.up(low) if self.padded else self.up(low, output_size=skip.shape[2:])
        return self.head(torch.cat([up, skip], 1))


def train(model, comm, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(model, lr=0.1, damping=1e-2, inverse_update_interval=2, comm=comm)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        optimizer.step()
    state = precond.state_dict()
    precond.remove_hooks()
    return state


@pytest.mark.mpi
def test_output_size_at_p_ranks_equals_output_padding_in_one_process(comm):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(MICRO * comm.size, 1, 7, 8, generator=gen, dtype=torch.float64)  # 7 rows: odd
    y = torch.randint(0, 2, (MICRO * comm.size, 7, 8), generator=gen)
    torch.manual_seed(0)
    model = OddUNet(padded=False).double()
    twin = OddUNet(padded=True).double()
    twin.load_state_dict(model.state_dict())
    mine = slice(comm.rank * MICRO, (comm.rank + 1) * MICRO)
    state = train(model, comm, x[mine], y[mine])
    reference = train(twin, Communicator(MPI.COMM_SELF), x, y)
    for name, p in twin.named_parameters():
        np.testing.assert_allclose(dict(model.named_parameters())[name].detach().numpy(), p.detach().numpy(),
                                   rtol=1e-12, atol=1e-14, err_msg=name)
    factors = state["blocks"]["up"]["factors"].numpy()
    np.testing.assert_allclose(factors, reference["blocks"]["up"]["factors"].numpy(), rtol=1e-12, atol=1e-14)
