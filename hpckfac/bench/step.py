"""Iteration time of SGD + ring-allreduce vs K-FAC.

``python -m hpckfac.bench step``, under ``mpiexec -n N``. Every configuration trains its own copy of a
model on random data -- CIFAR's ResNet-20 (``--model cifar``, 32x32), ImageNet's ResNet-50
(``--model resnet50``, 224x224), both with BatchNorm, or a deep, narrow causal transformer LM
(``--model transformer``: ``--depth`` blocks of ``--width`` features, ``--seq`` tokens, many small
layers) -- and the configurations take turns step by step, so that they are
measured side by side under the same machine load. ``--device cuda`` puts
each rank on its GPU (``bind_device``) and ends every timed step with a device
synchronisation. Reported per configuration: median and mean milliseconds per
iteration, the ratios to SGD (its median, and its mean over the same steps), and
the mean per-stage time of the preconditioner (rank 0's view; iteration times
are the max over ranks), under a line with each rank's torch pool that says when the
ranks' threads outnumber a host's cores (``hpckfac.bench.placement``). Means cover whole update periods (``period``: 10 steps
for 1/10, 100 for 10/100), the first ``mean_steps`` timed steps, so that they
amortise the factor and inverse updates; with ``--steps`` under one period they
cover every step, and the table says that they do not amortise. With
``--stage-sync`` the stages of a GPU step are timed with a synchronisation at
each boundary (a separate run: it costs overlap).
``--profile PATH`` then runs a few more steps of every configuration under
``torch.profiler`` and ``cProfile`` and writes the tables to PATH
(``hpckfac.bench.profile``).
Memory: each K-FAC configuration's buffers per rank (``KFACPreconditioner.memory``, by kind;
the largest rank's), and the process's peak resident set (on a GPU also the device's peak;
``hpckfac.bench.memory``), which covers every configuration the process ran: run one
configuration per process to compare them.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
from torch import nn

from hpckfac.bench.memory import peak_device_bytes, peak_host_bytes
from hpckfac.bench.placement import placement, placement_note
from hpckfac.bench.profile import profile_steps
from hpckfac.bench.report import (check_memory, check_outputs, make_parent, median, progress, time_calls,
                                  write_json)
from hpckfac.comm import Communicator
from hpckfac.models import resnet, resnet50, transformer
from hpckfac.stages.engine import ITERATION_STAGES
from hpckfac.tables import format_table
from hpckfac.torch import KFACPreconditioner, allreduce_gradients, bind_device, broadcast_parameters
from hpckfac.cli import HelpFormatter, RankParser

CONFIGS = {"sgd": None, "kfac_1_10": (1, 10), "kfac_10_100": (10, 100)}
VOCAB = 512  # the transformer's tokens


PROG = "python -m hpckfac.bench step"


def parse(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    """The parsed command line ``argv`` (None: ``sys.argv[1:]``; argparse exits with a usage
    message on bad input)."""
    parser = RankParser(prog=prog, description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--batch", type=int, default=128, help="examples per rank per iteration")
    parser.add_argument("--model", choices=("cifar", "resnet50", "transformer"), default="cifar",
                        help="CIFAR ResNet (--depth, --width), ImageNet ResNet-50, or a causal transformer LM "
                             "(--depth blocks, --width features, --seq tokens)")
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth (6n+2); transformer: blocks")
    parser.add_argument("--width", type=int, default=16,
                        help="channels of the CIFAR ResNet's first stage; transformer: features (4 heads)")
    parser.add_argument("--seq", type=int, default=32, help="transformer: tokens per sequence (at most 128)")
    parser.add_argument("--image", type=int, default=None, help="input height and width (32 cifar, 224 resnet50)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="cuda: one GPU per rank (local rank %% visible GPUs); auto: CUDA when present")
    parser.add_argument("--statistics-fraction", type=float, default=1.0,
                        help="K-FAC statistics from this fraction of each batch (KFACPreconditioner option)")
    parser.add_argument("--threads", type=int, default=0,
                        help="pin torch to this many threads (default 0: the process's own setting, as users run)")
    parser.add_argument("--stage-sync", action="store_true",
                        help="synchronise the GPU at every stage boundary (per-stage times on a GPU)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--profile", default=None, metavar="PATH",
                        help="after the timed steps, profile each configuration (torch.profiler and cProfile; "
                             "rank 0's view) and write the tables to PATH")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps per configuration under each profiler")
    args = parser.parse_everywhere(argv)
    check_outputs(parser, files=[("--json", args.json), ("--profile", args.profile)])
    args.configs = args.configs.split(",")
    if args.image is None:
        args.image = 224 if args.model == "resnet50" else 32
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad or args.steps < 1 or args.batch < 1:
        parser.error(f"invalid --configs {bad}" if bad else "--steps and --batch must be positive")
    if args.image < 1:
        parser.error(f"--image must be positive, got {args.image}")
    cores = os.cpu_count() or 1
    if not 0 <= args.threads <= cores:
        parser.error(f"--threads must be in [0, {cores}] (0: the process's own setting; this machine has "
                     f"{cores} cores)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.profile_steps < 1:
        parser.error("--profile-steps must be positive")
    if args.model == "cifar" and (args.depth < 8 or (args.depth - 2) % 6):
        parser.error(f"--depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {args.depth}")
    if args.width < 1:
        parser.error(f"--width must be positive, got {args.width}")
    if not 0 < args.statistics_fraction <= 1:  # NaN fails too
        parser.error(f"--statistics-fraction must be in (0, 1], got {args.statistics_fraction}")
    if args.model == "transformer":
        if args.depth < 1 or args.width % 4 or not 1 <= args.seq <= 128:
            parser.error(f"--model transformer needs --depth >= 1, --width a multiple of 4 (heads) and --seq in "
                         f"[1, 128], got {args.depth}, {args.width}, {args.seq}")
        # Every configuration keeps its batch's activations for the backward pass: the logits
        # and about 16 tensors of width features per block, per token.
        check_memory(parser, len(args.configs) * 4 * args.batch * args.seq * (VOCAB + 16 * args.depth * args.width),
                     "--batch, --seq, --depth, --width")
        return args
    # Training-mode BatchNorm needs two values per channel: the last stage's map (the input
    # halved 2 times by the CIFAR ResNet, 5 by ResNet-50) times the batch.
    last = -(-args.image // (4 if args.model == "cifar" else 32))
    if args.batch * last ** 2 < 2:
        parser.error(f"--batch {args.batch} with --image {args.image} leaves BatchNorm one value per channel "
                     f"in the last stage: use --batch >= 2 or a larger --image")
    # Every configuration keeps its own batch (and the activations of its first convolution
    # for the backward pass), drawn on the host first: a lower bound of what a rank needs.
    first = args.width * args.image ** 2 if args.model == "cifar" else 64 * ((args.image + 1) // 2) ** 2
    check_memory(parser, len(args.configs) * 4 * args.batch * (3 * args.image ** 2 + first + 2), "--batch, --image")
    return args


def period(name: str) -> int:
    """Steps after which configuration ``name``'s factor and inverse updates repeat (1: SGD)."""
    return math.lcm(*CONFIGS[name]) if CONFIGS[name] else 1


class Runner:
    """One configuration: model, optimizer, optional preconditioner, per-step timings."""

    def __init__(self, name: str, args: argparse.Namespace, comm: Communicator, device: torch.device) -> None:
        torch.manual_seed(0)
        self.name, self.comm, self.device = name, comm, device
        if args.model == "transformer":
            model = transformer(depth=args.depth, width=args.width)
        else:
            model = resnet50() if args.model == "resnet50" else resnet(depth=args.depth, width=args.width)
        self.model = model.to(device)
        broadcast_parameters(self.model, comm)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        intervals = CONFIGS[name]
        self.precond = None
        if intervals:
            self.precond = KFACPreconditioner(self.model, lr=0.01, comm=comm, factor_update_interval=intervals[0],
                                              inverse_update_interval=intervals[1],
                                              statistics_fraction=args.statistics_fraction)
            if args.stage_sync:
                self.precond.synchronize_timings()
        gen = torch.Generator().manual_seed(comm.rank)
        if args.model == "transformer":  # next-token targets: one class per position
            self.x = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen).to(device)
            self.y = torch.randint(0, VOCAB, (args.batch, args.seq), generator=gen).to(device)
        else:
            classes = 1000 if args.model == "resnet50" else 10
            self.x = torch.randn(args.batch, 3, args.image, args.image, generator=gen).to(device)
            self.y = torch.randint(0, classes, (args.batch,), generator=gen).to(device)
        self.times: list[float] = []
        self.stages: dict[str, list[float]] = {k: [] for k in ("forward_backward",) + ITERATION_STAGES}

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU), so a step's time is its own."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> None:
        """One training iteration of this configuration: forward, backward, allreduce or K-FAC, update."""
        start = time.perf_counter()
        self.opt.zero_grad()
        logits = self.model(self.x)  # (batch, classes), or (batch, positions, tokens)
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1)).backward()
        self.sync()
        self.fb = time.perf_counter() - start
        if self.precond is None:
            allreduce_gradients(self.model, self.comm)
        else:
            self.precond.step()
        self.opt.step()
        self.sync()

    def timed_step(self) -> None:
        """``step`` timed between barriers, with the per-stage times it recorded."""
        self.times += time_calls(self.step, repeat=1, warmup=0, barrier=self.comm.barrier)
        self.stages["forward_backward"].append(self.fb)
        if self.precond is not None:
            for name in ITERATION_STAGES:
                self.stages[name].append(self.precond.timings[name])


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the configurations in turns on every rank; rank 0 prints the tables and writes the JSON. Exit status."""
    args = parse(argv, prog)
    comm = Communicator()
    if args.threads:  # after the Communicator, which sizes torch's pool when no thread variable is set
        torch.set_num_threads(args.threads)
    device = bind_device(args.device, comm)
    runners = [Runner(name, args, comm, device) for name in args.configs]
    for _ in range(args.warmup):
        for runner in runners:
            runner.step()
    for _ in progress(range(args.steps), "timed steps", enabled=comm.rank == 0):
        for runner in runners:
            runner.timed_step()
    # The iteration time of a data-parallel step is the slowest rank's.
    slowest = {r.name: np.max(np.array(comm.allgather_object(r.times)), axis=0) for r in runners}
    placed = {"ranks": comm.size, **placement(comm)}
    # Memory: each configuration's K-FAC buffers, kind by kind the largest rank's; the process's peaks per rank.
    held = {r.name: comm.allgather_object(r.precond.memory()) for r in runners if r.precond is not None}
    peaks = comm.allgather_object((peak_host_bytes(), peak_device_bytes(device)))
    placed["peak_rss_bytes"] = [host for host, _ in peaks]
    if device.type == "cuda":
        placed["peak_device_bytes"] = [dev for _, dev in peaks]
    results = []
    for runner in runners:
        times, cycle = slowest[runner.name], period(runner.name)
        span = len(times) // cycle * cycle or len(times)
        row = {"config": runner.name, "median_ms": 1e3 * median(times), "mean_ms": 1e3 * float(np.mean(times[:span])),
               "period": cycle, "mean_steps": span}
        row.update({f"{k}_ms": 1e3 * float(np.mean(v[:span])) for k, v in runner.stages.items() if v})
        if "sgd" in slowest:
            row["median_vs_sgd"] = median(times) / median(slowest["sgd"])
            row["mean_vs_sgd"] = float(np.mean(times[:span]) / np.mean(slowest["sgd"][:span]))
        if runner.name in held:
            kinds = {k: max(rank[k] for rank in held[runner.name]) for k in held[runner.name][0]}
            row["state_bytes"] = kinds
            row["state_mib"] = max(sum(rank.values()) for rank in held[runner.name]) / 2**20
            row.update({f"{k}_mib": v / 2**20 for k, v in kinds.items()})
        results.append(row)
    if comm.rank == 0:
        model = {"resnet50": f"resnet50 image={args.image}",
                 "transformer": f"transformer depth={args.depth} width={args.width} seq={args.seq}"}.get(
                     args.model, f"resnet{args.depth} width={args.width} image={args.image}")
        print(f"ranks={comm.size} device={device} batch/rank={args.batch} {model} steps={args.steps}")
        print(placement_note([placed]))
        peak = f"peak resident set per rank (all configurations of this process): " \
               f"{', '.join(f'{b / 2**20:.0f}' for b in placed['peak_rss_bytes'])} MiB"
        if "peak_device_bytes" in placed:
            peak += f"; device peak: {', '.join(f'{b / 2**20:.0f}' for b in placed['peak_device_bytes'])} MiB"
        print(peak)
        print(format_table(results, ["config", "median_ms", "mean_ms", "mean_steps", "median_vs_sgd", "mean_vs_sgd",
                                     "state_mib"]))
        for row in results:
            if row["mean_steps"] < row["period"]:
                print(f"{row['config']}: --steps {args.steps} is under one update period ({row['period']} steps): "
                      f"its means do not amortise the updates")
        stage_cols = ["config", "forward_backward_ms"] + [f"{k}_ms" for k in ITERATION_STAGES]
        kfac_rows = [r for r in results if "local_factors_ms" in r]
        if kfac_rows:
            print(format_table(kfac_rows, stage_cols))
            kinds = list(kfac_rows[0]["state_bytes"])
            print("K-FAC buffers per rank, MiB (each kind the largest rank's; state_mib: the largest rank's sum)")
            print(format_table(kfac_rows, ["config"] + [f"{k}_mib" for k in kinds] + ["state_mib"]))
        if args.json:
            write_json(args.json, "step", {**vars(args), **placed}, results)
    if args.profile:
        write_profiles(args.profile, runners, args.profile_steps, comm)
    return 0


def write_profiles(path: str, runners: list[Runner], steps: int, comm: Communicator) -> None:
    """Profile ``steps`` steps of every runner (every rank steps; rank 0 profiles and writes)."""
    reports = []
    for runner in runners:
        if comm.rank == 0:
            report = profile_steps(runner.step, steps, runner.device.type == "cuda", runner.sync)
            reports.append(f"== {runner.name} (rank 0 of {comm.size}, device {runner.device})\n{report}")
        else:
            for _ in range(2 * steps):  # the same collectives as rank 0's two profiled passes
                runner.step()
    if comm.rank == 0:
        make_parent(path)
        with open(path, "w") as out:
            out.write("\n\n".join(reports))
        print(f"profiles: {path}")
