"""Convergence study: K-FAC vs SGD with momentum vs Adam on the embedded digits.

For each global batch size (moderate and full-batch) and method, a small grid of
learning rates (and dampings for K-FAC) runs with seed 0; the best setting
(fewest steps to 97% test accuracy, then to 95%, then highest final accuracy)
is rerun with the other seeds. Reported per method: steps and training seconds
to first reach 95% and 97% test accuracy, steps to a training loss of 0.05
(optimisation speed apart from generalisation), and final accuracy, mean ± std
over seeds. Runs go through ``hpckfac.train.loop.Trainer``: the same model, data
order, schedule and gradient communication as ``hpckfac train``.

    python -m hpckfac.bench convergence [--quick] [--json PATH] [--out DIR]
"""
from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpckfac.bench.report import check_outputs, write_json
from hpckfac.tables import format_table
from hpckfac.cli import HelpFormatter, RankParser

if TYPE_CHECKING:
    from hpckfac.comm import Communicator

TARGETS = (0.95, 0.97)
LOSS_TARGET = 0.05  # training loss: how fast each method optimises, apart from how well it generalises
FULL_BATCH = 0  # stands for "every training example"


@dataclass(frozen=True)
class Study:
    """One batch size's budget and grids."""

    batch: int            # FULL_BATCH: all training examples
    steps: int            # step cap (the learning-rate schedule decays to 0 there)
    eval_every: int
    warmup: int
    lrs: dict[str, tuple[float, ...]]
    dampings: tuple[float, ...]


FULL = (
    Study(batch=128, steps=100, eval_every=2, warmup=0,
          lrs={"sgd": (0.05, 0.1, 0.2), "adam": (3e-3, 1e-2, 3e-2), "kfac": (0.05, 0.1, 0.2)},
          dampings=(1e-2, 1e-1)),
    Study(batch=FULL_BATCH, steps=50, eval_every=1, warmup=0,
          lrs={"sgd": (0.1, 0.2, 0.4), "adam": (3e-3, 1e-2, 3e-2), "kfac": (0.1, 0.2, 0.4)},
          dampings=(1e-2, 1e-1)),
)
QUICK = (
    Study(batch=128, steps=30, eval_every=2, warmup=0,
          lrs={"sgd": (0.1,), "adam": (1e-2,), "kfac": (0.1,)}, dampings=(1e-2,)),
    Study(batch=FULL_BATCH, steps=6, eval_every=1, warmup=0,
          lrs={"sgd": (0.2,), "adam": (1e-2,), "kfac": (0.2,)}, dampings=(1e-2,)),
)
# method -> (optimizer, its fixed settings): K-FAC twice, with statistics every step and,
# cheaper per step, every 10 steps (inverses every 10 steps in both).
METHODS = {
    "kfac": ("kfac", {"factor_update_interval": 1, "inverse_update_interval": 10}),
    "kfac-10/10": ("kfac", {"factor_update_interval": 10, "inverse_update_interval": 10}),
    "sgd": ("sgd", {}),
    "adam": ("adam", {}),
}


def first_reach(records: list[dict[str, float]], target: float) -> tuple[int | None, float | None]:
    """Step and training seconds of the first evaluation with test accuracy >= ``target``."""
    for record in records:
        if record["test_acc"] >= target:
            return int(record["step"]), float(record["wall"])
    return None, None


def first_loss_below(records: list[dict[str, float]], target: float) -> int | None:
    """Step of the first evaluation whose training loss (mean since the previous one) is <= ``target``."""
    return next((int(r["step"]) for r in records if r["loss"] <= target), None)


def run_one(comm: Communicator, method: str, batch: int, lr: float, damping: float | None, seed: int,
            study: Study) -> dict[str, Any]:
    """One training run; its records and the first-reach figures."""
    from hpckfac.train.config import TrainConfig
    from hpckfac.train.loop import Trainer

    optimizer, fixed = METHODS[method]
    # A signal ends the study as it would any script: a run stopped early and then reported
    # beside complete ones would be a wrong figure (the study writes no checkpoints).
    config = TrainConfig(optimizer=optimizer, batch_size=batch, steps=study.steps, lr=lr,
                         warmup_steps=study.warmup, damping=damping or TrainConfig.damping, seed=seed,
                         eval_every=study.eval_every, progress=False, stop_signals="none", **fixed)
    result = Trainer(config, comm).run()
    run: dict[str, Any] = {"method": method, "batch": batch, "lr": lr, "damping": damping, "seed": seed,
                           "final_acc": result.records[-1]["test_acc"],
                           "best_acc": max(r["test_acc"] for r in result.records),
                           "wall": result.records[-1]["wall"],
                           "step_ms": 1e3 * statistics.median(result.step_seconds), "records": result.records}
    for target in TARGETS:
        steps, wall = first_reach(result.records, target)
        run[f"steps_{target:.0%}"], run[f"wall_{target:.0%}"] = steps, wall
        # contention-robust estimate: steps to the target times the median step time
        run[f"median_wall_{target:.0%}"] = None if steps is None else steps * run["step_ms"] / 1e3
    run["steps_loss"] = first_loss_below(result.records, LOSS_TARGET)
    return run


def _rank_key(run: dict[str, Any]) -> tuple:
    """Fewest steps to 97%, then to 95%, then highest final accuracy."""
    hi, lo = (run[f"steps_{t:.0%}"] for t in reversed(TARGETS))
    return (math.inf if hi is None else hi, math.inf if lo is None else lo, -run["final_acc"])


def _stats(values: list[float | None]) -> dict[str, Any]:
    reached = [v for v in values if v is not None]
    return {"mean": statistics.fmean(reached) if reached else None,
            "std": statistics.pstdev(reached) if len(reached) > 1 else 0.0 if reached else None,
            "reached": len(reached), "runs": len(values)}


def _cell(stats: dict[str, Any], fmt: str) -> str:
    if stats["mean"] is None:
        return f"never (0/{stats['runs']})"
    text = f"{stats['mean']:{fmt}} ± {stats['std']:{fmt}}"
    return text if stats["reached"] == stats["runs"] else f"{text} ({stats['reached']}/{stats['runs']})"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every figure of one method's best setting."""
    keys = [f"{kind}_{t:.0%}" for t in TARGETS for kind in ("steps", "wall", "median_wall")]
    summary = {key: _stats([r[key] for r in runs]) for key in keys + ["steps_loss", "final_acc", "step_ms"]}
    return summary


def main(argv: list[str] | None = None, prog: str = "python -m hpckfac.bench convergence") -> int:
    """Run the study; print the table, write JSON and the plot."""
    parser = RankParser(prog=prog, description=__doc__.split("\n\n")[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one setting per method, short runs (a smoke test)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for each method's best setting")
    parser.add_argument("--json", metavar="PATH", help="write the results here (default OUT/convergence.json)")
    parser.add_argument("--out", metavar="DIR", help="write convergence.json and convergence.png here")
    args = parser.parse_everywhere(argv)
    check_outputs(parser, files=[("--json", args.json)], directories=[("--out", args.out)])
    if args.seeds < 1:
        parser.error("--seeds: expected an integer >= 1")
    import torch

    from hpckfac.comm import Communicator
    from hpckfac.train.data import load_dataset

    comm = Communicator()
    n_train = len(load_dataset().x_train)
    studies = QUICK if args.quick else FULL
    # Every study's global batch must split over the ranks: found here, not after the studies
    # before the one that does not split have run.
    uneven = sorted({study.batch or n_train for study in studies if (study.batch or n_train) % comm.size})
    if uneven:
        fits = [p for p in range(1, comm.size) if all((s.batch or n_train) % p == 0 for s in studies)]
        parser.error(f"the global batches {', '.join(str(s.batch or n_train) for s in studies)} (the last: every "
                     f"training example) do not all split evenly over {comm.size} ranks: run with "
                     f"{' or '.join(map(str, fits))} rank(s)")
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    say(f"convergence study on digits ({n_train} training examples), {comm.size} rank(s), "
        f"{torch.get_num_threads()} torch thread(s) per rank (hpckfac.threads)")
    started = time.perf_counter()
    grid, best, rows, panels, ratios = [], [], [], [], {}
    for study in studies:
        batch = study.batch or n_train
        curves = {}
        for method in METHODS:
            dampings = study.dampings if METHODS[method][0] == "kfac" else (None,)
            tried = []
            for lr, damping in itertools.product(study.lrs[METHODS[method][0]], dampings):
                run = run_one(comm, method, batch, lr, damping, 0, study)
                tried.append(run)
                grid.append({k: v for k, v in run.items() if k != "records"})
                say(f"  batch {batch:5d} {method:10s} lr {lr:<6g} damping {damping or '-':<6} "
                    f"steps to 95/97%: {run['steps_95%']}/{run['steps_97%']}, to loss {run['steps_loss']}, final {run['final_acc']:.4f}, "
                    f"{run['wall']:.1f} s ({run['step_ms']:.1f} ms/step median)", flush=True)
            choice = min(tried, key=_rank_key)
            seeds = [choice] + [run_one(comm, method, batch, choice["lr"], choice["damping"], seed, study)
                                for seed in range(1, args.seeds)]
            summary = summarise(seeds)
            best.append({"batch": batch, "method": method, "lr": choice["lr"], "damping": choice["damping"],
                         "steps": study.steps, "summary": summary,
                         "runs": seeds})
            curves[f"{method} (lr {choice['lr']:g}" + (f", damping {choice['damping']:g})" if choice["damping"]
                                                        else ")")] = [r["records"] for r in seeds]
            rows.append({"batch": batch, "method": method, "lr": f"{choice['lr']:g}",
                         "damping": f"{choice['damping']:g}" if choice["damping"] else "-",
                         "steps→95%": _cell(summary["steps_95%"], ".1f"), "s→95%": _cell(summary["wall_95%"], ".2f"),
                         "steps→97%": _cell(summary["steps_97%"], ".1f"), "s→97%": _cell(summary["wall_97%"], ".2f"),
                         "s→97% (median step)": _cell(summary["median_wall_97%"], ".2f"),
                         f"steps→loss≤{LOSS_TARGET:g}": _cell(summary["steps_loss"], ".1f"),
                         "final acc": _cell(summary["final_acc"], ".4f"),
                         "ms/step": f"{summary['step_ms']['mean']:.1f}"})
        ratios[str(batch)] = _ratios(best[-len(METHODS):])
        panels.append((f"global batch {batch}" + (" (full batch)" if not study.batch else ""), curves))
    columns = ["batch", "method", "lr", "damping", "steps→95%", "s→95%", "steps→97%", "s→97%",
               "s→97% (median step)", f"steps→loss≤{LOSS_TARGET:g}", "final acc", "ms/step"]
    say(format_table(rows, columns))
    for batch, pairs in ratios.items():
        for pair, ratio in pairs.items():
            say(f"batch {batch}: {pair} to 97%: steps {_fmt(ratio['steps_97%'])}, seconds "
                f"{_fmt(ratio['wall_97%'])} (median-step estimate {_fmt(ratio['median_wall_97%'])}); "
                f"steps to training loss <= {LOSS_TARGET:g}: {_fmt(ratio['steps_loss'])}")
    elapsed = time.perf_counter() - started
    say(f"total {elapsed:.0f} s")
    if comm.rank == 0:
        json_path = args.json or (os.path.join(args.out, "convergence.json") if args.out else None)
        config = {"quick": args.quick, "seeds": args.seeds, "ranks": comm.size, "train_examples": n_train,
                  "targets": TARGETS, "studies": [s.__dict__ for s in studies], "elapsed_s": elapsed}
        if json_path:
            write_json(json_path, "convergence", config, {"best": best, "grid": grid, "ratios": ratios})
        if args.out:
            from hpckfac.train.plot import plot_curves

            plot_curves(panels, os.path.join(args.out, "convergence.png"), targets=TARGETS,
                        title="digits: best setting per method, one line per seed")
    return 0


def _ratios(best: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """``{"K/O": {figure: ratio}}``: each K-FAC variant's mean steps and seconds to 97% over
    SGD's and Adam's, both means over every seed (None where a seed of either never got there:
    a mean over the seeds that did leaves out the slowest and would flatter that method)."""
    by = {b["method"]: b["summary"] for b in best}
    everyone = lambda stats: stats["reached"] == stats["runs"]
    out = {}
    for kfac, other in itertools.product([m for m in METHODS if METHODS[m][0] == "kfac"], ("sgd", "adam")):
        out[f"{kfac}/{other}"] = {
            key: by[kfac][key]["mean"] / by[other][key]["mean"] if everyone(by[kfac][key]) and everyone(by[other][key])
            else None
            for key in ("steps_97%", "wall_97%", "median_wall_97%", "steps_loss")}
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"
