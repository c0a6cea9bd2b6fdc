"""Gradient accumulation and checkpoint/resume with distributed K-FAC.

    mpiexec -n 2 python examples/accumulate_and_resume.py

Each optimizer step takes ``--micro`` forward/backward passes per rank (the
loss of each divided by the count, as for any accumulation), and the
preconditioner is told so (``accumulation_steps``). Halfway the script saves a
checkpoint; it then trains to the end, starts a fresh model from the
checkpoint, trains the second half again and checks that both runs end with
the same weights. A checkpoint from P ranks loads on any number of ranks.
"""
import argparse
import io

import torch
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner, bind_device, broadcast_parameters


def build(device, comm, micro):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(device)
    broadcast_parameters(model, comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    precond = KFACPreconditioner(model, lr=0.05, damping=1e-2, factor_update_interval=2,
                                 inverse_update_interval=4, accumulation_steps=micro, comm=comm)
    return model, optimizer, precond


def batch(step, micro_index, rank, size, device):
    """Micro-batch ``micro_index`` of this rank at ``step``: a pure function of its position."""
    gen = torch.Generator().manual_seed(((step * 8 + micro_index) * size + rank) * 7919)
    x = torch.randn(16, 10, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x.to(device), y.to(device)


def train(model, optimizer, precond, steps, comm, micro, device):
    for step in steps:
        optimizer.zero_grad()
        for m in range(micro):
            x, y = batch(step, m, comm.rank, comm.size, device)
            (nn.functional.cross_entropy(model(x), y) / micro).backward()
        precond.step()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--micro", type=int, default=2, help="micro-batches per step and rank")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    comm = Communicator()
    device = bind_device(args.device, comm)
    half = args.steps // 2

    model, optimizer, precond = build(device, comm, args.micro)
    train(model, optimizer, precond, range(half), comm, args.micro, device)
    buffer = io.BytesIO()  # a file on rank 0 in a real job, written there only (README: atomic_write)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "preconditioner": precond.state_dict()}, buffer)   # state_dict(): on every rank
    train(model, optimizer, precond, range(half, args.steps), comm, args.micro, device)

    resumed, optimizer2, precond2 = build(device, comm, args.micro)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(state["model"])
    optimizer2.load_state_dict(state["optimizer"])
    precond2.load_state_dict(state["preconditioner"])
    train(resumed, optimizer2, precond2, range(half, args.steps), comm, args.micro, device)

    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    if comm.rank == 0:
        print(f"{args.steps} steps of {args.micro} micro-batches on {comm.size} rank(s); "
              f"resumed run matches the uninterrupted one: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
