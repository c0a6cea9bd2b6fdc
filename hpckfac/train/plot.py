"""PNG plots of training logs (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from hpckfac.train.files import atomic_write  # noqa: E402


def plot_history(records: Sequence[dict], path: str, title: str = "") -> None:
    """Loss (train and test) and test accuracy against steps (top) and wall seconds (bottom)."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for row, (key, label) in enumerate((("step", "step"), ("wall", "wall time (s)"))):
        xs = [r[key] for r in records]
        loss_ax, acc_ax = axes[row]
        loss_ax.plot(xs, [r["loss"] for r in records], label="train (mean since last eval)")
        loss_ax.plot(xs, [r["test_loss"] for r in records], label="test")
        loss_ax.set_yscale("log")
        loss_ax.set_xlabel(label)
        loss_ax.set_ylabel("cross-entropy loss")
        loss_ax.legend()
        acc_ax.plot(xs, [100 * r["test_acc"] for r in records], color="C2")
        acc_ax.set_xlabel(label)
        acc_ax.set_ylabel("test accuracy (%)")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_curves(panels: Sequence[tuple[str, dict[str, Sequence[Sequence[dict]]]]], path: str,
                targets: Sequence[float] = (), title: str = "") -> None:
    """One column per ``(panel title, {label: [run records, ...]})``: test accuracy (top,
    with dashed lines at the ``targets``, fractions) and training loss (bottom, log scale)
    against steps, one colour per label, one thin line per run (e.g. per seed)."""
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False,
                             constrained_layout=True)
    for column, (panel_title, curves) in enumerate(panels):
        acc_ax, loss_ax = axes[0][column], axes[1][column]
        for colour, (label, runs) in enumerate(curves.items()):
            for i, records in enumerate(runs):
                steps = [r["step"] for r in records]
                style = {"color": f"C{colour}", "alpha": 0.8, "lw": 1.2, "label": label if i == 0 else None}
                acc_ax.plot(steps, [100 * r["test_acc"] for r in records], **style)
                loss_ax.plot(steps, [r["loss"] for r in records], **style)
        for target in targets:
            acc_ax.axhline(100 * target, color="grey", ls="--", lw=0.8)
        # From 50% (the targets' neighbourhood), lower where a run stays below it all the way.
        lowest = min((max(100 * r["test_acc"] for r in records) for runs in curves.values() for records in runs
                      if records), default=50.0)
        acc_ax.set_ylim(max(0.0, min(50.0, lowest - 5.0)), 100)
        acc_ax.set_ylabel("test accuracy (%)")
        acc_ax.set_title(panel_title)
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("training loss (mean since last eval)")
        for ax in (acc_ax, loss_ax):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(loc="best")  # where it covers the fewest points of the curves
    if title:
        fig.suptitle(title)
    _save(fig, path)


def _save(fig, path: str) -> None:
    """Write ``fig`` as a PNG through a fresh temporary file renamed onto ``path``: a symlink
    planted at ``path`` is replaced, never written through, and a reader never sees half a file."""
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)
