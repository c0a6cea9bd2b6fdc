"""Strong/weak scaling of one K-FAC iteration.

``python -m hpckfac.bench scaling``, under ``mpiexec -n P``. Every rank builds the curvature blocks of a model's
real layer shapes (``hpckfac.bench.shapes``: ResNet-50, or the trainer's small
CNN), draws random activations and output gradients of those shapes, and runs
stages 1-4 of an iteration: stage 1 with ``hpckfac.stages.local_factors``
(im2col and factor GEMMs on the synthetic tensors), stages 2-4 with
``KFACEngine``, and the allreduce (``algorithm="auto"``) of any gradient no block owns (the
BatchNorm gradients with ``--batchnorm allreduce``) with the torch bridge's
presence flags (alone, by MPI's allreduce, when every gradient is owned). No forward/backward pass
and no data set are needed; ``--device cuda`` runs the workload on each rank's
GPU (CuPy buffers, the CUDA kernels, collectives on device memory), the host
otherwise.

To fit a 2-core CPU, ``--scale S`` divides every channel count by S (the
inversions shrink by S^3; ResNet-50's 4608x4608 ones take ~1 s each here at
S=1) and ``--image`` shrinks the input (fewer positions per example). Full-size
figures come from the performance model (``python -m hpckfac.bench model``).

Per stage, the time of one iteration is the maximum over ranks for compute
stages (the others wait for that rank) and the minimum over ranks for
collectives (the last rank to arrive waits least, so its time is the
collective's own cost); the iteration time is the maximum over ranks of the
whole step. Medians over ``--repeat`` iterations (after ``--warmup`` untimed
ones) are reported; the JSON also keeps every timed iteration's time, each
rank's median iteration and compute time, each rank's host and its cores, and the threads
per rank; the table notes every rank count whose ranks oversubscribe a host. With them go bytes
sent per rank (by the ring algorithms of the model), the load imbalance
(max/mean inversion cost over ranks) of the owner assignment, and, for
ResNet-50, the imbalance of ``lpt`` vs ``contiguous`` at 2..1024 ranks
computed without running. ``--combine`` merges the JSON of the runs at
different rank counts into one table with scaling efficiency against the
fewest ranks ``P0`` (strong: ``P0 T0 / (P T_P)``, weak: ``T0 / T_P``; ``P0`` is 1
where a one-rank run is among them) and a stacked-bar PNG; each merged run
keeps its file's environment (versions, host, time).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from hpckfac.bench import model as perf
from hpckfac.bench import shapes
from hpckfac.bench.placement import placement, placement_note
from hpckfac.bench.report import check_memory, check_outputs, make_parent, median, one_process, progress, write_json
from hpckfac.stages.engine import ITERATION_STAGES
from hpckfac.tables import format_table
from hpckfac.cli import HelpFormatter, RankParser

if TYPE_CHECKING:
    from hpckfac.comm import Communicator

COMPUTE = ("local_factors", "running_average", "inversion", "precondition", "write_grads")
DEFAULT_SCALE = {"resnet50": 8, "small": 1}
IMBALANCE_RANKS = (2, 4, 8, 16, 32, 64, 107, 128, 256, 512, 1024)


def synthetic_tensors(model: shapes.ModelShapes, batch: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(layer input, output gradient) of every layer, float32, for ``batch`` examples."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    out = []
    for s in model.layers:
        if isinstance(s, shapes.BatchNormShape):
            out.append((draw(batch, s.channels, s.h, s.h), draw(batch, s.channels, s.h, s.h)))
        elif s.linear:
            out.append((draw(batch, s.c_in), draw(batch, s.c_out)))
        else:
            out.append((draw(batch, s.c_in, s.h_in, s.h_in), draw(batch, s.c_out, s.h_out, s.h_out)))
    return out


def ring_bytes_sent(counts: Sequence[int], itemsize: int) -> tuple[list[int], list[int]]:
    """Bytes each rank sends in a ring reduce-scatter (all segments but its own)
    and a ring all-gather (all but its successor's) of segments ``counts``."""
    total, size = sum(counts), len(counts)
    if size == 1:
        return [0], [0]
    scatter = [itemsize * (total - counts[r]) for r in range(size)]
    gather = [itemsize * (total - counts[(r + 1) % size]) for r in range(size)]
    return scatter, gather


class Iteration:
    """One rank's workload: blocks, synthetic tensors and the engine, every array in ``xp``
    (NumPy, or CuPy on the rank's GPU); ``sync`` waits for the device (None on the host)."""

    def __init__(self, comm: Communicator, args: argparse.Namespace, assignment: str, xp: Any = np,
                 sync: Callable[[], None] | None = None) -> None:
        from hpckfac.arrays import from_host
        from hpckfac.stages import KFACEngine
        from hpckfac.stages.local_factors import LocalStatistics

        self.comm, self.sync = comm, sync
        self.model = shapes.scaled(shapes.get(args.model, args.image), args.scale)
        self.batch = local_batch(args, comm.size)
        self.blocks, bn_reduced = shapes.blocks(self.model, args.batchnorm)
        # Every stage in every timed iteration: statistics and inverses each step.
        self.engine = KFACEngine(self.blocks, comm, damping=1e-3, assignment=assignment,
                                 comm_dtype=np.dtype(args.comm_dtype), factor_update_interval=1,
                                 inverse_update_interval=1, xp=xp)
        self.engine.synchronize = sync  # each stage's own time, not its launches
        self.stats = LocalStatistics(self.blocks, xp=xp)
        tensors = synthetic_tensors(self.model, self.batch, seed=1000 + comm.rank)
        kinds = [not isinstance(s, shapes.BatchNormShape) or args.batchnorm == "kfac" for s in self.model.layers]
        self.tensors = [(from_host(x, xp), from_host(g, xp)) for (x, g), engine in zip(tensors, kinds) if engine]
        rng = np.random.default_rng(comm.rank)
        self.grads = [from_host(rng.standard_normal(b.grad_shape).astype(args.comm_dtype), xp)
                      for b in self.engine.blocks]
        self.reduced = [from_host(rng.standard_normal(2 * b.num_features).astype(args.comm_dtype), xp)
                        for b in bn_reduced]
        # The torch bridge's presence flags, one per block parameter (weight and bias): they ride
        # the ring with the gradients no block owns, or go alone by MPI's allreduce.
        self.flags = xp.ones(2 * len(self.blocks), dtype=args.comm_dtype)
        self.timings = dict.fromkeys(ITERATION_STAGES, 0.0)

    def clock(self) -> float:
        """``time.perf_counter()`` once the device has finished what was queued."""
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def local_statistics(self) -> list:
        """Stage 1 on this rank's synthetic tensors."""
        self.stats.reset()
        self.stats.add_examples(self.batch)
        for i, (x, g) in enumerate(self.tensors):
            self.stats.add_output_grads(i, g, 1.0, self.stats.add_inputs(i, x))
        return self.stats.result()

    def __call__(self) -> None:
        """One timed iteration: stage 1, the engine's stages, the allreduce; times in ``timings``."""
        start = self.clock()
        stats = self.local_statistics()
        self.timings["local_factors"] = self.clock() - start
        self.engine.step(self.grads, stats)
        self.timings.update(self.engine.timings)
        start = self.clock()
        self.comm.allreduce_many(self.reduced + [self.flags], op="mean", algorithm="auto")
        self.timings["allreduce"] = self.clock() - start

    def bytes_sent(self) -> dict[str, int]:
        """Most bytes any rank sends per iteration, per collective (ring algorithms; the
        allreduce's gradients, as the performance model counts them, without the flags), and
        ``rank_most``: the most one rank sends in all three (the collectives' maxima may fall on
        different ranks, so it can be less than their sum)."""
        itemsize, layout, size = np.dtype(self.engine.comm_dtype).itemsize, self.engine.layout, self.comm.size
        scatter, _ = ring_bytes_sent(layout.reduce_counts(True), itemsize)
        _, gather = ring_bytes_sent(layout.gather_counts, itemsize)
        n = itemsize * sum(r.size for r in self.reduced)
        allreduce = int(round(2 * (size - 1) / size * n))
        return {"reduce_scatter": max(scatter), "all_gather": max(gather), "allreduce": allreduce,
                "rank_most": max(s + g for s, g in zip(scatter, gather)) + allreduce}


def local_batch(args: argparse.Namespace, size: int) -> int:
    """Examples per rank: ``--batch`` split over ranks (strong) or ``--batch`` (weak)."""
    if args.mode == "weak":
        return args.batch
    if args.batch % size:
        raise ValueError(f"batch: strong scaling needs a global batch divisible by {size} ranks, got {args.batch}")
    return args.batch // size


def measure(comm: Communicator, args: argparse.Namespace, assignment: str, xp: Any = np,
            sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Median stage and iteration times of ``args.repeat`` iterations (collective)."""
    it = Iteration(comm, args, assignment, xp, sync)
    for _ in range(args.warmup):
        it()
    per_iteration = []
    for _ in progress(range(args.repeat), f"{assignment} iterations", enabled=comm.rank == 0):
        it.clock()
        comm.barrier()
        start = time.perf_counter()
        it()
        per_iteration.append((it.clock() - start, dict(it.timings)))
    everyone = comm.allgather_object(per_iteration)
    placed = placement(comm)
    stages, totals = {s: [] for s in ITERATION_STAGES}, []
    for k in range(args.repeat):
        totals.append(max(rank[k][0] for rank in everyone))
        for s in ITERATION_STAGES:
            values = [rank[k][1][s] for rank in everyone]
            stages[s].append(max(values) if s in COMPUTE else min(values))
    inversion = [median([rank[k][1]["inversion"] for k in range(args.repeat)]) for rank in everyone]
    costs = [b.cost() for b in it.engine.blocks]
    return {
        "ranks": comm.size, "assignment": assignment, "batch_per_rank": it.batch,
        "iteration": median(totals), "stages": {s: median(v) for s in ITERATION_STAGES for v in [stages[s]]},
        # The spread behind the medians: every timed iteration (max over ranks), each rank's own
        # median iteration (the collectives make them wait for each other), where each rank ran.
        "iteration_samples": totals,
        "rank_iteration": [median([t for t, _ in rank]) for rank in everyone],
        # Each rank's own compute (its collectives' waits excluded): where a straggler shows.
        "rank_compute": [median([sum(st[s] for s in COMPUTE) for _, st in rank]) for rank in everyone],
        "warmup": args.warmup,
        # How the ranks sat on the cores: each rank's host, the cores the job has there, and each
        # rank's torch pool, where the compute stages' products run.
        **placed,
        "bytes_sent": it.bytes_sent(),
        "imbalance": perf.imbalance(costs, it.engine.owners, comm.size),
        "inversion_time_imbalance": max(inversion) / max(np.mean(inversion), 1e-12),
        "owners": comm.size - sum(1 for r in range(comm.size) if not it.engine.layout.owned[r]),
        "blocks": len(costs),
    }


def add_efficiency(runs: list[dict[str, Any]], mode: str) -> None:
    """Scaling efficiency of each run against the run of its assignment at the fewest ranks
    ``P0`` (one rank where there is one; a study on nodes of several GPUs may start at a node):
    strong ``P0 T0 / (P T_P)``, weak ``T0 / T_P``; ``efficiency_base`` records ``P0``."""
    for run in runs:
        same = [r for r in runs if r["assignment"] == run["assignment"]]
        base = min(same, key=lambda r: r["ranks"])
        ratio = base["iteration"] / run["iteration"]
        run["efficiency"] = ratio * base["ranks"] / run["ranks"] if mode == "strong" else ratio
        run["efficiency_base"] = base["ranks"]


def table_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One printable row per run: ms per stage, shares, bytes, imbalance, efficiency."""
    rows = []
    for run in sorted(runs, key=lambda r: (r["assignment"], r["ranks"])):
        total = sum(run["stages"].values())
        row: dict[str, Any] = {"assign": run["assignment"], "P": run["ranks"], "B/rank": run["batch_per_rank"],
                               "iter_ms": 1e3 * run["iteration"]}
        for s in ITERATION_STAGES:
            row[s] = f"{1e3 * run['stages'][s]:.1f} ({100 * run['stages'][s] / max(total, 1e-12):.0f}%)"
        sent = run["bytes_sent"]
        # Files written before rank_most was kept: the collectives' maxima summed, an upper bound.
        row["MB_sent"] = sent.get("rank_most", sent["reduce_scatter"] + sent["all_gather"] + sent["allreduce"]) / 1e6
        row["imbalance"] = run["imbalance"]
        row["efficiency"] = run.get("efficiency", "")
        rows.append(row)
    return rows


COLUMNS = ["assign", "P", "B/rank", "iter_ms"] + list(ITERATION_STAGES) + ["MB_sent", "imbalance", "efficiency"]


def print_table(title: str, runs: list[dict[str, Any]]) -> None:
    """The runs' table under ``title``, with what its columns count."""
    print(title)
    print("stage columns: median ms (share of the stages' sum); MB_sent: the most any rank sends per iteration "
          "(10^6 bytes); imbalance: max/mean inversion cost of the owners")
    print(placement_note(runs))
    print(format_table(table_rows(runs), COLUMNS, ".2f"))


def plot(runs: list[dict[str, Any]], path: str, title: str) -> None:
    """Stacked bars of median time per stage against rank count, one column per assignment,
    with the scaling efficiency beneath (where the runs have it: ``add_efficiency``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["assignment"] for r in runs})
    fig, axes = plt.subplots(2, len(methods), figsize=(5.5 * len(methods) + 2.8, 6.5), squeeze=False,
                             sharey="row", gridspec_kw={"height_ratios": (3, 1.2)})
    for ax, eff, method in zip(axes[0], axes[1], methods):
        mine = sorted((r for r in runs if r["assignment"] == method), key=lambda r: r["ranks"])
        labels = [str(r["ranks"]) for r in mine]
        bottom = np.zeros(len(mine))
        for s in ITERATION_STAGES:
            values = np.array([1e3 * r["stages"][s] for r in mine])
            ax.bar(labels, values, bottom=bottom, label=s)
            bottom += values
        ax.plot(labels, [1e3 * r["iteration"] for r in mine], "k_", markersize=30, label="iteration (max over ranks)")
        ax.set_title(f"assignment {method}")
        ax.set_ylabel("ms per iteration (median)")
        known = [(label, r["efficiency"]) for label, r in zip(labels, mine) if "efficiency" in r]
        eff.plot([labels.index(label) for label, _ in known], [e for _, e in known], "o-", color="k")
        eff.set_xticks(range(len(labels)), labels)
        eff.set_xlim(ax.get_xlim())  # each point under its bar
        eff.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        eff.set_ylim(0, max([1.1] + [1.1 * e for _, e in known]))
        eff.set_xlabel("ranks")
        base = {r["efficiency_base"] for r in mine if "efficiency_base" in r}
        eff.set_ylabel(f"efficiency vs {base.pop()} rank(s)" if len(base) == 1 else "efficiency")
    # Beside the panels, not over the first bars.
    handles, names = axes[0][0].get_legend_handles_labels()
    # markerscale: the iteration's wide tick, drawn at full size, would run over its own label.
    fig.legend(handles, names, loc="center right", fontsize=8, markerscale=0.5)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    make_parent(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define a workload (equal across the runs to be combined)."""
    return {"mode": args.mode, "model": args.model, "scale": args.scale, "image": args.image,
            "batch": args.batch, "comm_dtype": args.comm_dtype, "batchnorm": args.batchnorm,
            "repeat": args.repeat, "device": args.device, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def title_of(config: dict[str, Any]) -> str:
    """The plot title: model, channel scale, image size, scaling mode and batch of a run."""
    batch = "per rank" if config["mode"] == "weak" else "global"
    return (f"{config['model']} channels/{config['scale']}, {config['image']}px, {config['mode']} scaling, "
            f"batch {config['batch']} {batch}")


def combine(paths: Sequence[str], json_path: str | None, png_path: str | None) -> int:
    """Merge the runs of several JSON files (same workload, different rank counts)."""
    payloads = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                payload = json.load(fh)
        except OSError as exc:
            raise ValueError(f"combine: cannot read {path} ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise ValueError(f"combine: {path} is not JSON ({exc})") from None
        if not (isinstance(payload, dict) and payload.get("benchmark") == "scaling"
                and isinstance(payload.get("results"), dict) and isinstance(payload["results"].get("runs"), list)
                and "config" in payload):
            raise ValueError(f"combine: {path} is not the JSON of a `bench scaling` run")
        payloads.append(payload)
    config = payloads[0]["config"]
    for path, payload in zip(paths, payloads):
        if payload["config"] != config:
            raise ValueError(f"combine: {path} ran another workload ({payload['config']} vs {config})")
    # Each run keeps where and with what it was measured (the merged file's own environment is
    # that of the machine that merged them).
    runs = [dict(run, source=path, environment=run.get("environment", payload.get("environment")))
            for path, payload in zip(paths, payloads) for run in payload["results"]["runs"]]
    seen: dict[tuple[int, str], str] = {}
    for run in runs:
        key = (run["ranks"], run["assignment"])
        if key in seen:
            raise ValueError(f"combine: {run['source']} and {seen[key]} both hold the {key[1]} run at "
                             f"{key[0]} ranks: give each rank count once")
        seen[key] = run["source"]
    add_efficiency(runs, config["mode"])
    print_table(title_of(config), runs)
    results = {"runs": runs, "imbalance_table": payloads[0]["results"].get("imbalance_table")}
    if json_path:
        write_json(json_path, "scaling", config, results)
    if png_path:
        plot(runs, png_path, title_of(config))
    return 0


PROG = "python -m hpckfac.bench scaling"


def parse(argv: list[str], prog: str = PROG) -> argparse.Namespace:
    """The parsed command line (argparse exits with a usage message on bad input)."""
    parser = RankParser(prog=prog, description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--mode", choices=("strong", "weak"), default="strong",
                        help="strong: --batch is global, split over ranks; weak: --batch per rank")
    parser.add_argument("--model", choices=sorted(shapes.MODELS), default="resnet50",
                        help="layer shapes to run")
    parser.add_argument("--scale", type=int, default=None,
                        help="divide every channel count by this (default: 8 for resnet50, 1 for small)")
    parser.add_argument("--image", type=int, default=None,
                        help="input height/width (default: the model's, "
                             + ", ".join(f"{image} for {name}" for name, (_, image) in sorted(shapes.MODELS.items()))
                             + ")")
    parser.add_argument("--batch", type=int, default=4, help="examples: global (strong) or per rank (weak)")
    parser.add_argument("--assignment", choices=("lpt", "contiguous", "both"), default="both",
                        help="owner assignment: balanced by cost (lpt), in layer order, or both side by side")
    parser.add_argument("--batchnorm", choices=("kfac", "allreduce"), default="kfac",
                        help="BatchNorm as unit-wise curvature blocks, or its gradients only allreduced")
    parser.add_argument("--comm-dtype", choices=("float32", "float64"), default="float32",
                        help="element type of the factor and gradient collectives")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="where the workload runs: the host (NumPy), or each rank's GPU (CuPy; auto: "
                             "the GPU when there is one)")
    parser.add_argument("--repeat", type=int, default=5, help="timed iterations (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--png", default=None, help="stacked-bar plot of the per-stage times")
    parser.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                        help="merge these results (runs at different rank counts); no MPI run")
    args = parser.parse_everywhere(argv)
    if args.combine:
        one_process(parser, "--combine")
    check_outputs(parser, files=[("--json", args.json), ("--png", args.png)])
    if args.scale is None:
        args.scale = DEFAULT_SCALE[args.model]
    for name in ("scale", "batch", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)!r}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected an integer >= 0, got {args.warmup!r}")
    if args.image is None:
        args.image = shapes.MODELS[args.model][1]
    if args.image < 1:
        parser.error(f"--image must be positive, got {args.image}")
    if args.combine:
        return args
    from mpi4py import MPI

    ranks = MPI.COMM_WORLD.Get_size()
    if args.mode == "strong" and args.batch % ranks:
        parser.error(f"--batch: strong scaling splits the global batch over the ranks; {args.batch} does not "
                     f"split evenly over {ranks}")
    try:
        model = shapes.scaled(shapes.get(args.model, args.image), args.scale)
    except RuntimeError as exc:  # a map shrunk below a kernel on the way through the model
        parser.error(f"--image {args.image} is too small for {args.model} ({str(exc).splitlines()[0]})")
    # The synthetic inputs and output gradients, drawn on the host first: a lower bound of a rank's needs.
    check_memory(parser, 4 * local_batch(args, ranks) * sum(tensor_elements(s) for s in model.layers),
                 "--batch, --image, --scale")
    return args


def tensor_elements(layer: shapes.KronShape | shapes.BatchNormShape) -> int:
    """Elements per example of ``layer``'s input and output gradient (``synthetic_tensors``)."""
    if isinstance(layer, shapes.BatchNormShape):
        return 2 * layer.channels * layer.h * layer.h
    return layer.c_in * layer.h_in ** 2 + layer.c_out * layer.h_out ** 2


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the benchmark on COMM_WORLD (or combine earlier results)."""
    args = parse(list(argv or []), prog)
    if args.combine:
        return combine(args.combine, args.json, args.png)
    from hpckfac.comm import Communicator

    comm = Communicator()
    config = config_of(args)
    comm.check_same(config, "scaling benchmark settings")
    methods = ("lpt", "contiguous") if args.assignment == "both" else (args.assignment,)
    if args.device == "cpu":
        runs = [measure(comm, args, method) for method in methods]
    else:  # one rank per GPU, the whole workload in device memory
        import torch

        from hpckfac.torch import bind_device
        from hpckfac.torch.bridge import device_scope, namespace_for

        device = bind_device(args.device, comm)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        with device_scope(device):
            runs = [measure(comm, args, method, namespace_for(device), sync) for method in methods]
    if comm.rank != 0:
        return 0
    add_efficiency(runs, args.mode)
    print_table(f"{title_of(config)}, {comm.size} ranks", runs)
    results: dict[str, Any] = {"runs": runs}
    if args.model == "resnet50":
        table = perf.imbalance_table(shapes.resnet50(), IMBALANCE_RANKS, args.batchnorm)
        print("\nResNet-50 (full size) owner imbalance, max/mean inversion cost, computed:")
        print(format_table(table, ["ranks", "owners_max", "lpt", "contiguous", "bound"], ".3f"))
        results["imbalance_table"] = table
    if args.json:
        write_json(args.json, "scaling", config, results)
    if args.png:
        plot(runs, args.png, f"{title_of(config)}, {comm.size} ranks")
    return 0
