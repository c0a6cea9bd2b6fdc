"""A training script written for kfac-pytorch, ported to hpckfac (docs/migrating.md).

    mpiexec -n 2 python examples/kfac_pytorch_port.py
    mpiexec -n 2 python examples/kfac_pytorch_port.py --kfac-skip-layers BatchNorm2d  # kfac-pytorch's coverage

The command-line flags keep kfac-pytorch's example names, so that each line of
the port reads against the original: ``--kfac-factor-update-steps`` becomes
``factor_update_interval``, ``--kfac-inv-update-steps`` ``inverse_update_interval``,
``--batches-per-allreduce`` ``accumulation_steps``, and ``--kfac-skip-layers``
class names become the classes themselves (hpckfac's ``skip_layers`` takes module
names or types, not patterns). What changes besides the names: launched by
``mpiexec`` (an ``hpckfac.comm.Communicator``, no ``init_process_group``), no
DistributedDataParallel wrapper (``precond.step()`` averages every gradient),
``broadcast_parameters`` for the starting weights, BatchNorm statistics averaged
with ``sync_batchnorm_stats``, and ``state_dict()`` called on every rank.
The data are generated: 8x8 images whose class is the quadrant of a bright blob.
"""
import argparse
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from hpckfac.comm import Communicator
from hpckfac.torch import KFACPreconditioner, bind_device, broadcast_parameters, sync_batchnorm_stats
from hpckfac.train.files import atomic_write


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` generated images of 3x8x8 and their classes (0-3: the quadrant of a bright blob)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 0.5
    return TensorDataset(x, y)


def layer_types(names: list[str]) -> list[type]:
    """kfac-pytorch's ``--kfac-skip-layers`` class names as the ``torch.nn`` classes hpckfac takes."""
    return [getattr(nn, name) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank and micro-batch, as kfac-pytorch's")
    parser.add_argument("--batches-per-allreduce", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--base-lr", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--kfac-factor-update-steps", type=int, default=1)
    parser.add_argument("--kfac-inv-update-steps", type=int, default=5)
    parser.add_argument("--kfac-damping", type=float, default=3e-2)
    parser.add_argument("--kfac-damping-alpha", type=float, default=0.5)
    parser.add_argument("--kfac-damping-decay", type=int, nargs="*", default=[3], help="epochs to scale damping at")
    parser.add_argument("--kfac-factor-decay", type=float, default=0.95)
    parser.add_argument("--kfac-kl-clip", type=float, default=1e-3)
    parser.add_argument("--kfac-skip-layers", nargs="*", default=[], help="torch.nn class names")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out/kfac_pytorch_port")
    args = parser.parse_args()

    # kfac-pytorch: torch.distributed.init_process_group(...) under torchrun.
    comm = Communicator()
    device = bind_device(args.device, comm)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 4)).to(device)
    # kfac-pytorch: model = DistributedDataParallel(model). hpckfac averages the gradients in
    # precond.step(), so the model stays unwrapped; the ranks start from rank 0's weights instead.
    broadcast_parameters(model, comm)

    train_set, test_set = make_data(2048, seed=1), make_data(512, seed=2)
    sampler = DistributedSampler(train_set, num_replicas=comm.size, rank=comm.rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    steps_per_epoch = len(loader) // args.batches_per_allreduce

    optimizer = torch.optim.SGD(model.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=5e-4)
    warmup = args.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    def damping(step: int) -> float:
        """kfac-pytorch's LambdaParamScheduler(damping_lambda=...) as a schedule of the K-FAC step."""
        epoch = step // steps_per_epoch
        return args.kfac_damping * args.kfac_damping_alpha ** sum(epoch >= e for e in args.kfac_damping_decay)

    precond = KFACPreconditioner(
        model,
        factor_update_interval=args.kfac_factor_update_steps,    # factor_update_steps
        inverse_update_interval=args.kfac_inv_update_steps,      # inv_update_steps
        damping=damping,
        factor_decay=args.kfac_factor_decay,
        kl_clip=args.kfac_kl_clip,
        lr=lambda step: optimizer.param_groups[0]["lr"],         # as kfac-pytorch's examples; lr=scheduler works too
        accumulation_steps=args.batches_per_allreduce,
        skip_layers=layer_types(args.kfac_skip_layers),
        comm=comm)
    if comm.rank == 0:
        print(precond)                                            # which layers are preconditioned, and why not

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        batches, total = iter(loader), 0.0
        now = precond.current_settings()                          # the settings this epoch starts with
        for _ in range(steps_per_epoch):
            optimizer.zero_grad()
            for _ in range(args.batches_per_allreduce):
                x, y = next(batches)
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                (loss / args.batches_per_allreduce).backward()   # mean over the micro-batch, / the count
                total += loss.item()
            precond.step()                                        # every rank; writes the averaged K-FAC .grad
            optimizer.step()
            scheduler.step()
        if comm.rank == 0:
            mean = total / (steps_per_epoch * args.batches_per_allreduce)  # rank 0's micro-batches
            print(f"epoch {epoch}  loss {mean:.4f}  lr {now['lr']:.4f}  damping {now['damping']:.4f}  "
                  f"nu {precond.last_nu:.3f}")

    sync_batchnorm_stats(model, comm)                             # DDP broadcasts rank 0's buffers instead
    model.eval()
    x_test, y_test = test_set.tensors
    with torch.no_grad():
        accuracy = (model(x_test.to(device)).argmax(1).cpu() == y_test).float().mean().item()

    # kfac-pytorch: state_dict() on rank 0 alone. Here it is a collective: every rank calls it.
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "preconditioner": precond.state_dict()}
    path = os.path.join(args.out, "checkpoint.pt")
    if comm.rank == 0:
        atomic_write(path, lambda fh: torch.save(state, fh), binary=True)
    comm.barrier()                                                # the file is whole before any rank reads it
    precond.remove_hooks()                                        # one preconditioner per layer at a time
    resumed = KFACPreconditioner(model, factor_update_interval=args.kfac_factor_update_steps,
                                 inverse_update_interval=args.kfac_inv_update_steps, damping=damping,
                                 factor_decay=args.kfac_factor_decay, kl_clip=args.kfac_kl_clip,
                                 lr=lambda step: optimizer.param_groups[0]["lr"],
                                 accumulation_steps=args.batches_per_allreduce,
                                 skip_layers=layer_types(args.kfac_skip_layers), comm=comm)
    resumed.load_state_dict(torch.load(path, weights_only=True)["preconditioner"])  # every rank
    if comm.rank == 0:
        print(f"test accuracy {accuracy:.3f}; checkpoint {path} resumes at step {resumed.steps}")


if __name__ == "__main__":
    main()
