"""Distributed K-FAC on a small CNN with BatchNorm: the whole recipe in one script.

    mpiexec -n 2 python examples/cnn_batchnorm.py            # CPU or one GPU per rank
    mpiexec -n 3 python examples/cnn_batchnorm.py --batch 66 # --batch (global) splits over the ranks
    python examples/cnn_batchnorm.py --steps 50              # one process

Shows: binding each rank to its device, identical starting weights, each rank
drawing its own shard of every global batch, a learning-rate schedule passed
to the preconditioner, BatchNorm statistics averaged before evaluating, the
per-stage report, and a checkpoint (a collective: every rank calls
``state_dict``, rank 0 writes). hpckfac averages the gradients itself: do not
wrap the model in DistributedDataParallel.
"""
import argparse
import os

import torch
from torch import nn

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner, bind_device, broadcast_parameters, sync_batchnorm_stats
from hpckfac.train.files import atomic_write


def make_data(n: int, seed: int):
    """Generated images: the class decides where a bright blob sits (learnable in a few dozen steps)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 3, 16, 16, generator=gen)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 8 * r:8 * r + 8, 8 * q:8 * q + 8] += 0.3
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out/example_cnn")
    args = parser.parse_args()

    comm = Communicator()
    device = bind_device(args.device, comm)          # first: before anything touches CUDA
    if args.batch % comm.size:                        # every rank exits, rank 0 says why
        if comm.rank == 0:
            fit = -(-args.batch // comm.size) * comm.size
            parser.error(f"--batch {args.batch} does not split over {comm.size} ranks: "
                         f"give a multiple of {comm.size}, e.g. --batch {fit}")
        raise SystemExit(2)
    local = args.batch // comm.size

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 4)).to(device)
    broadcast_parameters(model, comm)                 # rank 0's weights on every rank

    peak = 0.05
    schedule = lambda step: peak * min(1.0, (step + 1) / 10)  # noqa: E731  (warmup over 10 steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=peak, momentum=0.9)
    precond = KFACPreconditioner(model, lr=schedule, damping=1e-2, factor_update_interval=1,
                                 inverse_update_interval=5, kl_clip=1e-2, comm=comm)
    if comm.rank == 0:
        print(precond)                                # which layers K-FAC covers

    x_all, y_all = make_data(args.steps * args.batch, seed=1)
    for step in range(args.steps):
        # This rank's shard of global batch `step`: every rank sees different examples.
        start = step * args.batch + comm.rank * local
        x, y = x_all[start:start + local].to(device), y_all[start:start + local].to(device)
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)   # mean over this rank's shard
        loss.backward()
        precond.step()                                # K-FAC gradients, averaged over ranks, in .grad
        optimizer.step()
        if step % 20 == 0 and comm.rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    sync_batchnorm_stats(model, comm)                 # before evaluating or saving
    model.eval()
    x_test, y_test = make_data(512, seed=2)
    with torch.no_grad():
        accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()
    precond.report(gather=True)                       # collective: every rank calls it
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "preconditioner": precond.state_dict()}  # collective: every rank calls it
    if comm.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        # A temporary file renamed over the old one: a job killed mid-save keeps the previous file.
        atomic_write(os.path.join(args.out, "checkpoint.pt"), lambda fh: torch.save(state, fh), binary=True)
        print(f"test accuracy {accuracy:.3f}; checkpoint in {args.out}/checkpoint.pt")


if __name__ == "__main__":
    main()
