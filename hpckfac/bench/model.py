"""Performance model of one distributed K-FAC iteration.

``python -m hpckfac.bench model``. Each stage's time at ``P`` ranks is predicted from the layer shapes
(``hpckfac.bench.shapes``), compute rates and an alpha-beta model of the ring
collectives (``alpha`` seconds per message, ``beta`` seconds per byte):

- local factors: ``sum_l 2 rows_l (d_A^2 + d_G^2)`` flops (``rows = batch * |T|``)
  at the factor GEMM rate;
- ReduceScatterV and AllGatherV of ``n`` bytes: ``(P-1)/P n beta + (P-1) alpha``;
  their sizes are those of the engine's own buffer layout
  (``hpckfac.stages.layout.SegmentLayout``);
- running averages: the most loaded owner's ``3 x`` packed statistic elements
  at the memory rate (elements per second);
- inversion: the most loaded owner's ``sum (d_A^3 + d_G^3)``
  (``CurvatureBlock.cost``) at the inversion rate;
- preconditioning: the most loaded owner's ``sum 2 d_G d_A (d_A + d_G)`` flops
  (``CurvatureBlock.precondition_flops``);
- writing the results into ``.grad``: every block's gradient elements at the
  memory rate;
- allreduce of the gradients no block owns, as ``algorithm="auto"`` runs it: each fusion
  bucket (64 MiB at most) by the ring, ``2(P-1)/P n beta + 2(P-1) alpha``, when each of its
  messages carries at least 128 KiB, else by MPI's (``mpi_allreduce_time``); with none, the
  step's presence flags alone by MPI's allreduce: ``ceil(log2 P) alpha``;
- optionally forward/backward: ``3 x`` the forward flops at a training rate.

Stages do not overlap (the engine runs them one after another), so the
iteration time is their sum. ``calibrate`` fits the rates and ``alpha``,
``beta`` to a scaling run's JSON (``hpckfac.bench.scaling``) and reports the
prediction error at the measured rank counts; the presets extrapolate
ResNet-50 at 32 images per GPU to thousands of GPUs (assumptions in
docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from hpckfac.assignment import assign_owners, owner_loads
from hpckfac.bench import shapes
from hpckfac.bench.report import check_outputs, make_parent, median, one_process, write_json
from hpckfac.comm.communicator import reduction_algorithm
from hpckfac.comm.fusion import DEFAULT_BUCKET_BYTES, plan_buckets
from hpckfac.stages.engine import ITERATION_STAGES
from hpckfac.stages.layout import SegmentLayout
from hpckfac.tables import format_table
from hpckfac.cli import HelpFormatter, RankParser

COLLECTIVES = ("reduce_scatter", "all_gather", "allreduce")
# OTU+18 = Osawa, Tsuji, Ueno et al. 2018 (arXiv 1811.12019): 1024 V100, batch 32,768, 1,760 iterations
# in 10 min.
OTU18 = {"gpus": 1024, "batch": 32768, "iterations": 1760, "minutes": 10.0}


@dataclass(frozen=True)
class Machine:
    """Rates of one rank and of the network between ranks.

    ``inverse_rate`` counts ``n^3`` per inverted ``n x n`` matrix (Cholesky
    factorisation plus inverse); ``memory_rate`` elements per second of the
    streaming stages (running averages, writing ``.grad``). ``train_flops`` (forward+backward, None: not
    modelled). ``cores``: compute is shared when more ranks than this run on
    one machine (the oversubscribed local runs); None for one rank per device.
    """

    name: str
    factor_flops: float
    inverse_rate: float
    gemm_flops: float
    alpha: float
    beta: float
    train_flops: float | None = None
    memory_rate: float = 1e10
    cores: int | None = None


# Assumptions behind each number: docs/scaling.md, "Presets".
PRESETS = {
    "v100-edr": Machine("V100 + 2x IB EDR per 4 GPUs", factor_flops=10e12, inverse_rate=2e12,
                        gemm_flops=10e12, alpha=5e-6, beta=1 / 6.25e9, train_flops=30e12, memory_rate=1e11),
    "h100-ndr": Machine("H100 + IB NDR400 per GPU", factor_flops=50e12, inverse_rate=8e12,
                        gemm_flops=50e12, alpha=3e-6, beta=1 / 50e9, train_flops=75e12, memory_rate=4e11),
}


@dataclass(frozen=True)
class Workload:
    """One iteration's work on one rank.

    ``batch``: examples per rank; ``comm_bytes``: bytes per communicated
    element (the engine's ``comm_dtype``); ``batchnorm``: ``"kfac"`` (unit-wise
    BatchNorm blocks owned like the others) or ``"allreduce"`` (BatchNorm
    gradients averaged by the ring allreduce, no BatchNorm curvature).
    """

    model: shapes.ModelShapes
    batch: int
    comm_bytes: int = 4
    batchnorm: str = "kfac"
    assignment: str = "lpt"
    factor_interval: int = 1
    inverse_interval: int = 1


def ring_allreduce_time(nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """``2(P-1)/P n beta + 2(P-1) alpha`` (0 at one rank)."""
    return 2 * (ranks - 1) / ranks * nbytes * beta + 2 * (ranks - 1) * alpha


def mpi_allreduce_time(nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """MPI's allreduce as MPI libraries choose it: recursive doubling,
    ``ceil(log2 P) (alpha + n beta)``, or for larger buffers reduce-scatter and allgather by
    recursive halving and doubling, ``2 ceil(log2 P) alpha + 2(P-1)/P n beta``; the faster."""
    steps = math.ceil(math.log2(ranks))
    return min(steps * (alpha + nbytes * beta), 2 * steps * alpha + 2 * (ranks - 1) / ranks * nbytes * beta)


def auto_allreduce_time(nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """An allreduce with ``algorithm="auto"`` (``hpckfac.comm.communicator.reduction_algorithm``):
    the ring when its messages carry at least ``RING_MIN_CHUNK_BYTES``, else MPI's."""
    if reduction_algorithm("auto", int(nbytes), ranks) == "ring":
        return ring_allreduce_time(nbytes, ranks, alpha, beta)
    return mpi_allreduce_time(nbytes, ranks, alpha, beta)


def fused_allreduce_time(layer_bytes: Sequence[int], ranks: int, alpha: float, beta: float,
                         bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> float:
    """``allreduce_many(..., algorithm="auto")`` of one array per layer (``layer_bytes``, model
    order, one dtype), as ``allreduce_gradients`` runs it: the fusion buckets of
    ``plan_buckets`` one after another, each by the algorithm its own size calls for."""
    buckets = plan_buckets(list(layer_bytes), [0] * len(layer_bytes), bucket_bytes)
    return sum(auto_allreduce_time(sum(layer_bytes[i] for i in b), ranks, alpha, beta) for b in buckets)


def ring_scatter_gather_time(nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """Reduce-scatter or all-gather of ``n`` bytes in total: ``(P-1)/P n beta + (P-1) alpha``."""
    return (ranks - 1) / ranks * nbytes * beta + (ranks - 1) * alpha


def block_specs(model: shapes.ModelShapes, batchnorm: str = "kfac") -> list:
    """The engine's curvature blocks of ``model``, in model order (``shapes.blocks``)."""
    return shapes.blocks(model, batchnorm)[0]


def imbalance(costs: Sequence[float], owners: Sequence[int], ranks: int) -> float:
    """Load imbalance ``max / mean`` of the owners' total cost (1.0 is perfect)."""
    loads = owner_loads(costs, owners, ranks)
    return max(loads) / (sum(loads) / ranks)


def imbalance_table(model: shapes.ModelShapes, ranks: Sequence[int],
                    batchnorm: str = "kfac") -> list[dict[str, Any]]:
    """Inversion-cost imbalance of ``lpt`` and ``contiguous`` at each rank count,
    with the best any assignment of whole blocks can do (``max(largest block,
    mean) / mean``); computed, not run."""
    costs = [b.cost() for b in block_specs(model, batchnorm)]
    rows = []
    for p in ranks:
        row: dict[str, Any] = {"ranks": p, "owners_max": min(p, len(costs))}
        for method in ("lpt", "contiguous"):
            row[method] = imbalance(costs, assign_owners(costs, p, method), p)
        row["bound"] = max(max(costs), sum(costs) / p) / (sum(costs) / p)
        rows.append(row)
    return rows


def stage_work(work: Workload, ranks: int) -> dict[str, float]:
    """Per-iteration work of the critical rank, amortised over the update intervals:
    flops (or inversion cost units) of the compute stages, bytes of the collectives."""
    model = work.model
    specs = block_specs(model, work.batchnorm)
    owners = assign_owners([b.cost() for b in specs], ranks, work.assignment)
    layout = SegmentLayout(specs, owners, ranks)
    kron = [s for s in model.layers if isinstance(s, shapes.KronShape)]
    factor_flops = sum(2.0 * work.batch * s.positions * (s.d_A ** 2 + s.d_G ** 2) for s in kron)
    if work.batchnorm == "kfac":
        # x_hat, the two per-example sums and the 3 products per channel: ~10 flops an element.
        factor_flops += sum(10.0 * work.batch * s.channels * s.positions for s in model.batchnorm)
    precond = [b.precondition_flops() for b in specs]
    f, i = 1.0 / work.factor_interval, 1.0 / work.inverse_interval
    return {
        "local_factors": f * factor_flops,
        "reduce_scatter": work.comm_bytes * (f * layout.reduce_total(True) + (1 - f) * layout.reduce_total(False)),
        "running_average": f * 3.0 * max(owner_loads([b.stat_size for b in specs], owners, ranks)),
        "inversion": i * max(owner_loads([b.cost() for b in specs], owners, ranks)),
        "precondition": max(owner_loads(precond, owners, ranks)),
        "all_gather": work.comm_bytes * sum(layout.gather_counts),
        "write_grads": float(sum(b.grad_size for b in specs)),
        "allreduce": float(sum(unowned_bytes(work))),
        "forward_backward": 3.0 * work.batch * model.forward_flops,
    }


def predict(work: Workload, machine: Machine, ranks: int) -> dict[str, float]:
    """Seconds of each stage in ``ITERATION_STAGES`` (and ``forward_backward`` when the machine
    has a training rate) at ``ranks`` ranks, plus their sum ``total``."""
    w = stage_work(work, ranks)
    share = 1.0 if machine.cores is None else max(1.0, ranks / machine.cores)
    out = {
        "local_factors": share * w["local_factors"] / machine.factor_flops,
        "reduce_scatter": ring_scatter_gather_time(w["reduce_scatter"], ranks, machine.alpha, machine.beta),
        "running_average": share * w["running_average"] / machine.memory_rate,
        "inversion": share * w["inversion"] / machine.inverse_rate,
        "precondition": share * w["precondition"] / machine.gemm_flops,
        "all_gather": ring_scatter_gather_time(w["all_gather"], ranks, machine.alpha, machine.beta),
        "write_grads": share * w["write_grads"] / machine.memory_rate,
        # Nothing to average (every parameter owned by a block): the presence flags alone, by
        # MPI's allreduce (they ride with the gradients otherwise).
        "allreduce": (fused_allreduce_time(unowned_bytes(work), ranks, machine.alpha, machine.beta) if w["allreduce"]
                      else mpi_allreduce_time(0.0, ranks, machine.alpha, machine.beta)),
    }
    if machine.train_flops:
        out["forward_backward"] = share * w["forward_backward"] / machine.train_flops
    out["total"] = sum(out.values())
    return out


def predict_sgd(work: Workload, machine: Machine, ranks: int) -> float:
    """Seconds of a first-order iteration: forward/backward plus the allreduce of every
    gradient that ``allreduce_gradients`` runs (the baseline K-FAC's cost is compared with)."""
    compute = 3.0 * work.batch * work.model.forward_flops / machine.train_flops if machine.train_flops else 0.0
    every = [work.comm_bytes * s.params for s in work.model.layers]
    return compute + fused_allreduce_time(every, ranks, machine.alpha, machine.beta)


def unowned_bytes(work: Workload) -> list[int]:
    """Bytes of each layer whose gradients no block owns (``stage_work``'s ``allreduce``)."""
    return [work.comm_bytes * s.params for s in work.model.batchnorm] if work.batchnorm == "allreduce" else []


def workload_from_config(config: dict[str, Any], ranks: int) -> Workload:
    """The ``Workload`` of one rank in a scaling run (``hpckfac.bench.scaling`` config)."""
    model = shapes.scaled(shapes.get(config["model"], config["image"]), config["scale"])
    batch = config["batch"] // ranks if config["mode"] == "strong" else config["batch"]
    return Workload(model, batch, comm_bytes=np.dtype(config["comm_dtype"]).itemsize,
                    batchnorm=config["batchnorm"])


def _fit_alpha_beta(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least-squares non-negative ``(alpha, beta)`` for ``t = m*alpha + b*beta`` from
    (messages m, effective bytes b, seconds t) points."""
    if not points:
        return 0.0, 0.0
    x = np.array([[m, b] for m, b, _ in points], dtype=float)
    t = np.array([p[2] for p in points], dtype=float)
    if len(points) >= 2 and np.linalg.matrix_rank(x) == 2:
        alpha, beta = np.linalg.lstsq(x, t, rcond=None)[0]
        if alpha >= 0 and beta >= 0:
            return float(alpha), float(beta)
    # One coefficient clipped at zero: the better of the two one-parameter fits.
    fits = []
    for col in (0, 1):
        denom = float(x[:, col] @ x[:, col])
        coef = max(0.0, float(x[:, col] @ t) / denom) if denom > 0 else 0.0
        pair = (coef, 0.0) if col == 0 else (0.0, coef)
        fits.append((float(np.sum((x @ np.array(pair) - t) ** 2)), pair))
    return min(fits)[1]


def calibrate(config: dict[str, Any], runs: list[dict[str, Any]], cores: int) -> Machine:
    """A ``Machine`` fitted to measured runs (one assignment): compute rates from
    the one-rank run, ``alpha`` and ``beta`` from the collectives of the
    multi-rank runs; ``cores`` as in ``Machine``."""
    one = [r for r in runs if r["ranks"] == 1]
    if not one:
        raise ValueError("runs: calibration needs the one-rank run")
    work1, t1 = stage_work(workload_from_config(config, 1), 1), one[0]["stages"]
    rate = lambda stage: work1[stage] / max(t1[stage], 1e-9)
    points = []
    for run in runs:
        p = run["ranks"]
        if p == 1:
            continue
        w = stage_work(workload_from_config(config, p), p)
        for stage in COLLECTIVES:
            hops = 2 if stage == "allreduce" else 1
            if stage == "allreduce" and reduction_algorithm("auto", int(w[stage]), p) != "ring":
                continue  # MPI's allreduce (the presence flags alone, or small buckets): not a ring
            points.append((hops * (p - 1), hops * (p - 1) / p * w[stage], run["stages"][stage]))
    alpha, beta = _fit_alpha_beta(points)
    streamed = ("running_average", "write_grads")
    memory = sum(work1[s] for s in streamed) / max(sum(t1[s] for s in streamed), 1e-9)
    return Machine("calibrated here", factor_flops=rate("local_factors"), inverse_rate=rate("inversion"),
                   gemm_flops=rate("precondition"), alpha=alpha, beta=beta, cores=cores, memory_rate=memory)


# A fitted network slower than this (10 MB/s) or a fit off by more than this share of the
# measured time means the runs did not pin the parameters down.
MAX_BETA = 1e-7
MAX_ERROR_PCT = 50.0


def calibration_doubts(machine: Machine, rows: list[dict[str, Any]]) -> list[str]:
    """Reasons not to trust a calibration: a collective parameter fitted at zero or at an
    implausible value, or a prediction far from a measured total."""
    doubts = []
    if machine.alpha == 0.0 or machine.beta == 0.0:
        doubts.append(f"alpha={machine.alpha:.3g} s, beta={machine.beta:.3g} s/B: one was fitted at 0, the "
                      f"collectives measured are too small or too noisy to separate latency from bandwidth "
                      f"(use larger layers, e.g. a lower --scale, or more ranks)")
    if machine.beta > MAX_BETA:
        doubts.append(f"beta={machine.beta * 1e9:.1f} s/GB is slower than any network: the collective times "
                      f"are dominated by something else (oversubscribed cores, tiny messages)")
    worst = max((abs(r["error_pct"]) for r in rows), default=0.0)
    if worst > MAX_ERROR_PCT:
        doubts.append(f"the calibrated model misses a measured total by {worst:.0f}%: extrapolations from it "
                      f"are not reliable")
    return doubts


def validation_rows(config: dict[str, Any], runs: list[dict[str, Any]], machine: Machine) -> list[dict[str, Any]]:
    """Predicted against measured time per stage and in total at each measured rank count."""
    rows = []
    for run in sorted(runs, key=lambda r: r["ranks"]):
        p = run["ranks"]
        pred = predict(workload_from_config(config, p), machine, p)
        measured = sum(run["stages"][s] for s in ITERATION_STAGES)
        row: dict[str, Any] = {"ranks": p}
        for stage in ITERATION_STAGES:
            row[f"{stage}_ms"] = f"{1e3 * run['stages'][stage]:.1f}/{1e3 * pred[stage]:.1f}"
        row["measured_ms"] = 1e3 * measured
        row["predicted_ms"] = 1e3 * pred["total"]
        row["error_pct"] = 100.0 * (pred["total"] - measured) / measured
        rows.append(row)
    return rows


def check_strong_batch(batch: int, ranks: Sequence[int]) -> None:
    """ValueError unless the global ``batch`` of a strong-scaling study splits evenly over every
    rank count (``bench scaling --mode strong`` refuses the same)."""
    uneven = [p for p in ranks if batch % p]
    if uneven:
        raise ValueError(f"batch: strong scaling keeps the global batch {batch} fixed; it does not split evenly "
                         f"over {','.join(map(str, uneven))} ranks: choose a --batch divisible by every --ranks "
                         f"count")


def prediction_rows(model: shapes.ModelShapes, machine: Machine, ranks: Sequence[int], batch: int,
                    mode: str = "weak", **workload: Any) -> list[dict[str, Any]]:
    """Predicted ms per stage, iteration and SGD iteration at each rank count;
    ``batch`` is per rank (weak) or global (strong: it must split evenly over every rank
    count, as in ``bench scaling``, or the rows would not share one global batch)."""
    if mode == "strong":
        check_strong_batch(batch, ranks)
    rows = []
    for p in ranks:
        work = Workload(model, batch if mode == "weak" else batch // p, **workload)
        pred = predict(work, machine, p)
        row: dict[str, Any] = {"ranks": p, "batch": work.batch * p}
        row.update({f"{k}_ms": 1e3 * v for k, v in pred.items()})
        row["sgd_ms"] = 1e3 * predict_sgd(work, machine, p)
        row["kfac/sgd"] = pred["total"] / (row["sgd_ms"] / 1e3)
        rows.append(row)
    return rows


def plot_predictions(tables: dict[str, list[dict[str, Any]]], path: str, title: str) -> None:
    """Stacked bars of predicted time per stage against rank count, one panel per machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("forward_backward",) + ITERATION_STAGES
    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables) + 2, 4.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        labels = [str(r["ranks"]) for r in rows]
        bottom = np.zeros(len(rows))
        for stage in stages:
            values = np.array([r.get(f"{stage}_ms", 0.0) for r in rows])
            ax.bar(labels, values, bottom=bottom, label=stage)
            bottom += values
        ax.set_title(name)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("predicted ms / iteration")
        ax.set_ylim(0, 1.08 * max(float(bottom.max()), 1e-9))  # room above the tallest bar
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    # One legend for all panels, outside them, so that it never covers a bar.
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / fig.get_figwidth(), 1))
    make_parent(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend's longest name stays inside the image
    plt.close(fig)


GEMM_ORDER = 1024  # the plain GEMM the measured rates are compared with
MEASURE_BATCH = 32  # examples per factor product in --measure: a realistic per-rank batch


def measure_rates(model: shapes.ModelShapes, batch: int, repeat: int = 5) -> dict[str, float]:
    """This machine's rates on ``model``'s shapes with the CPU core, threads as
    configured: factor products (``ops.accumulate_factor`` on random rows, counted as
    the full ``2 rows d^2``), damped inversion (``ops.damped_inverse``, counted as
    ``n^3``, the flops of a Cholesky factorisation plus a triangular inverse) and the
    preconditioning products ``G^-1 X A^-1``; beside them ``plain_gemm``, a square
    float32 ``torch.mm`` of order ``GEMM_ORDER`` in the same thread pool, the rate the
    others are measured against. Medians of ``repeat`` passes."""
    import torch

    from hpckfac import ops
    from hpckfac.bench.report import time_calls

    rng = np.random.default_rng(0)
    kron = model.kron
    rows = [rng.standard_normal((batch * s.positions, d), dtype=np.float32) for s in kron for d in (s.d_A, s.d_G)]
    spd = {}
    for s in kron:
        for d in (s.d_A, s.d_G):
            if d not in spd:
                x = rng.standard_normal((d, d)).astype(np.float32)
                spd[d] = (x @ x.T / d)[None]
    grads = [(rng.standard_normal((s.d_G, s.d_A), dtype=np.float32), spd[s.d_G][0], spd[s.d_A][0]) for s in kron]
    work = {
        "factor_flops": (sum(2.0 * r.shape[0] * r.shape[1] ** 2 for r in rows),
                         lambda: [ops.accumulate_factor(r, packed=True) for r in rows]),
        "inverse_rate": (sum(float(s.d_A) ** 3 + float(s.d_G) ** 3 for s in kron),
                         lambda: [ops.damped_inverse(spd[d], 1e-3) for s in kron for d in (s.d_A, s.d_G)]),
        "gemm_flops": (sum(2.0 * s.d_G * s.d_A * (s.d_A + s.d_G) for s in kron),
                       lambda: [g_inv @ x @ a_inv for x, g_inv, a_inv in grads]),
    }
    square = torch.from_numpy(rng.standard_normal((GEMM_ORDER, GEMM_ORDER), dtype=np.float32))
    work["plain_gemm"] = (2.0 * GEMM_ORDER ** 3, lambda: torch.mm(square, square))
    # Round-robin passes, so that every rate (the plain GEMM's included) sees the same machine load.
    times: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(repeat):
        for name, (_, fn) in work.items():
            times[name] += time_calls(fn, 1)
    return {name: flops / median(times[name]) for name, (flops, _) in work.items()}


def _load_runs(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--calibrate {path}: {exc.strerror}") from None
    with fh:
        try:
            payload = json.load(fh)
            return payload["config"], payload["results"]["runs"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--calibrate {path}: not a combined scaling JSON of `bench scaling --combine` "
                             f"({type(exc).__name__}: {exc})") from None


def _rate(zero_ok: bool) -> Callable[[str], float]:
    """An argparse type: a finite float > 0 (>= 0 with ``zero_ok``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if zero_ok else '>'} 0, got {text!r}")
        return value
    return parse


def _machine_args(parser: argparse.ArgumentParser) -> None:
    for field in ("factor_flops", "inverse_rate", "gemm_flops", "alpha", "beta", "train_flops"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=_rate(field in ("alpha", "beta")), default=None,
                            help=f"override the presets' {field}")


MAX_RANKS = 2**20  # seconds of work per prediction up to here; minutes and gigabytes beyond


def main(argv: list[str] | None = None, prog: str = "python -m hpckfac.bench model") -> int:
    """CLI: calibrate on a scaling JSON (optional), then predict ResNet-50 at many GPUs."""
    parser = RankParser(prog=prog, description=__doc__.split("\n")[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--calibrate", metavar="JSON", help="combined scaling JSON (bench scaling --combine)")
    parser.add_argument("--measure", metavar="SCALE", type=int, default=None,
                        help="time the NumPy compute rates here on ResNet-50 with channels / SCALE "
                             "(64x64 images, 32 examples per product)")
    parser.add_argument("--cores", type=int, default=None,
                        help="cores the calibration runs shared (default: the CPUs this process may run on, "
                             "as the runs of a study started from the same shell had them)")
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="machines to extrapolate to (default: all)")
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096",
                        help="comma-separated GPU counts")
    parser.add_argument("--batch", type=int, default=None,
                        help="examples per GPU (weak, default 32) or in all (strong, default 32768 as OTU+18: "
                             "divisible by every --ranks count)")
    parser.add_argument("--mode", choices=("weak", "strong"), default="weak",
                        help="weak: --batch examples per GPU; strong: --batch examples in all, split over the GPUs")
    parser.add_argument("--comm-dtype", default="float32", choices=("float32", "float16"),
                        help="element type of the factor and gradient collectives")
    parser.add_argument("--batchnorm", default="kfac", choices=("kfac", "allreduce"),
                        help="BatchNorm parameters preconditioned (kfac) or only allreduced")
    parser.add_argument("--assignment", default="lpt", choices=("lpt", "contiguous"),
                        help="owner assignment of the blocks: balanced by cost (lpt) or in layer order")
    parser.add_argument("--factor-interval", type=int, default=1, help="steps between factor updates")
    parser.add_argument("--inverse-interval", type=int, default=1, help="steps between inversions")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--png", help="stacked-bar plot of the predictions")
    _machine_args(parser)
    args = parser.parse_everywhere(argv)
    one_process(parser)
    check_outputs(parser, files=[("--json", args.json), ("--png", args.png)])
    if args.batch is None:  # a strong study at up to 4096 GPUs needs a global batch that splits over them all
        args.batch = 32 if args.mode == "weak" else 32768
    for name in ("batch", "factor_interval", "inverse_interval", "measure", "cores"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)!r}")
    try:
        ranks = [int(p) for p in args.ranks.split(",")]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--ranks: expected comma-separated integers >= 1, got {args.ranks!r}")
    if max(ranks) > MAX_RANKS:  # the owner assignment and buffer layout are built per rank
        parser.error(f"--ranks: at most {MAX_RANKS} ranks, got {max(ranks)}")
    if args.mode == "strong":
        check_strong_batch(args.batch, ranks)
    results: dict[str, Any] = {}

    if args.calibrate:
        from hpckfac.comm.topology import cpu_set

        config, runs = _load_runs(args.calibrate)
        # Not the machine's count: a study started under taskset or in a job's CPU set had fewer.
        cores = args.cores or len(cpu_set())  # --cores 0 or less was refused above
        for method in sorted({r["assignment"] for r in runs}):
            mine = [r for r in runs if r["assignment"] == method]
            machine = calibrate(config, mine, cores)
            rows = validation_rows(config, mine, machine)
            print(f"calibration on {args.calibrate} ({config['mode']}, {method}): "
                  f"alpha={machine.alpha * 1e6:.1f} us, beta={machine.beta * 1e9:.3f} s/GB, "
                  f"factor {machine.factor_flops / 1e9:.2f} GF/s, inversion {machine.inverse_rate / 1e9:.2f} "
                  f"G/s, preconditioning {machine.gemm_flops / 1e9:.2f} GF/s, {cores} cores")
            # The model predicts a sum of stages, so that is what it is held against: not the
            # scaling table's iter_ms (median of whole iterations), which differs from it.
            print("stage columns: measured/predicted ms; measured_ms: the sum of the measured stage medians "
                  "(not the scaling table's iter_ms)")
            print(format_table(rows, ["ranks"] + [f"{s}_ms" for s in ITERATION_STAGES]
                               + ["measured_ms", "predicted_ms", "error_pct"], ".1f"))
            doubts = calibration_doubts(machine, rows)
            for doubt in doubts:
                print(f"warning: {doubt}")
            results.setdefault("calibration", {})[method] = {"machine": asdict(machine), "rows": rows,
                                                             "warnings": doubts}

    if args.measure:
        rates = measure_rates(shapes.scaled(shapes.resnet50(64), args.measure), batch=MEASURE_BATCH)
        gemm = rates["plain_gemm"]
        names = {"factor_flops": "factor products", "inverse_rate": "inversion", "gemm_flops": "preconditioning"}
        print(f"rates here (ResNet-50/{args.measure}, 64px, {MEASURE_BATCH} examples) against a plain {GEMM_ORDER}^2 float32 "
              f"GEMM at {gemm / 1e9:.2f} GF/s:")
        print(format_table([{"kernel": names[k], "GF/s": rates[k] / 1e9, "of_gemm_pct": 100 * rates[k] / gemm}
                            for k in names], ["kernel", "GF/s", "of_gemm_pct"], ".1f"))
        results["measured_rates"] = rates

    model = shapes.resnet50()
    overrides = {k: v for k in ("factor_flops", "inverse_rate", "gemm_flops", "alpha", "beta", "train_flops")
                 if (v := getattr(args, k)) is not None}
    workload = dict(comm_bytes=np.dtype(args.comm_dtype).itemsize, batchnorm=args.batchnorm,
                    assignment=args.assignment, factor_interval=args.factor_interval,
                    inverse_interval=args.inverse_interval)
    tables = {}
    columns = ["ranks", "batch"] + [f"{s}_ms" for s in ("forward_backward",) + ITERATION_STAGES] \
        + ["total_ms", "sgd_ms", "kfac/sgd"]
    for name in args.preset or sorted(PRESETS):
        machine = replace(PRESETS[name], **overrides)
        rows = prediction_rows(model, machine, ranks, args.batch, args.mode, **workload)
        tables[name] = rows
        print(f"\nResNet-50, {args.mode} scaling, {args.batch} {'per GPU' if args.mode == 'weak' else 'global'}, "
              f"{machine.name} ({args.comm_dtype} communication, intervals "
              f"{args.factor_interval}/{args.inverse_interval})")
        print(format_table(rows, columns, ".1f"))
        results.setdefault("predictions", {})[name] = {"machine": asdict(machine), "rows": rows}
    it_s = OTU18["minutes"] * 60 / OTU18["iterations"]
    print(f"\nOTU+18 (Osawa, Tsuji, Ueno et al. 2018, arXiv 1811.12019): {OTU18['gpus']} V100, "
          f"batch {OTU18['batch']}, {OTU18['iterations']} iterations in {OTU18['minutes']:.0f} min = "
          f"{1e3 * it_s:.0f} ms per iteration on average (everything included)")
    results["otu18"] = dict(OTU18, ms_per_iteration=1e3 * it_s)
    if args.json:
        write_json(args.json, "model", vars(args), results)
    if args.png:
        plot_predictions(tables, args.png, f"ResNet-50 K-FAC iteration, {args.mode} scaling, "
                                           f"batch {args.batch}{' per GPU' if args.mode == 'weak' else ''}")
    return 0
