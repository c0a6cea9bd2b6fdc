"""The data-parallel training loop behind ``hpckfac train``.

Every rank holds the whole model and takes its slice of each global batch
(``hpckfac.train.data.BatchOrder``). K-FAC: ``KFACPreconditioner.step()``
then SGD with momentum; SGD/Adam: ``allreduce_gradients`` (the same fused
ring-allreduce) then the optimizer. Evaluation and checkpoints first average
the BatchNorm running statistics over ranks. Wall time counts training steps
only (not evaluation or checkpointing).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from hpckfac.log import get_logger
from hpckfac.models import resnet
from hpckfac.stop import StopOnSignal
from hpckfac.train.checkpoint import (CheckpointError, check_compatible, check_history, checkpoint_path,
                                      find_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint)
from hpckfac.train.config import TRAJECTORY_KEYS, TrainConfig, stop_signals
from hpckfac.train.data import BatchOrder, Dataset, load_dataset
from hpckfac.train.files import append_lines, atomic_write, check_output_dir
from hpckfac.train.schedule import WarmupPolynomialDecay

if TYPE_CHECKING:
    from hpckfac.comm import Communicator

_log = get_logger("hpckfac.train")
LOG_NAME, RECORDS_NAME, PLOT_NAME, CHECKPOINT_DIR = "log.json", "records.jsonl", "training.png", "checkpoints"
EVAL_CHUNK = 1024


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or Inf (raised on every rank at the same step)."""


@dataclass
class TrainResult:
    """What a run produced: one record per evaluated step (see ``Trainer.evaluate``)."""

    records: list[dict[str, float]]
    step_seconds: list[float]  # every step this process ran (not those before a resume)
    total_steps: int
    model: nn.Module
    preconditioner: Any = None
    summary: dict[str, Any] = field(default_factory=dict)


def agree(comm: Communicator, fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on every rank; if it raises on any rank, every rank raises the first
    rank's error (same type and message) instead of the others hanging later. ``what``
    names the step in the checked exchange: ranks that reach different steps (configs that
    differ, ``out`` on some ranks only) raise CollectiveMismatchError naming both, not hang."""
    result, error = None, None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001  (re-raised below, on every rank)
        error = exc
    errors = comm.allgather_object(None if error is None else (type(error), str(error)), what=what)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return result
    if error is not None:
        raise error
    try:
        other = first[0](first[1])
    except Exception:  # noqa: BLE001  (an exception type not built from one message)
        other = RuntimeError(first[1])
    raise other


def memory_needed(build: Callable[[], nn.Module], kfac: bool) -> int:
    """Bytes a model from ``build`` needs at least, on every rank, to train, counted on the meta
    device (nothing is allocated): weights, gradients, momentum and the gradient buffers, and
    with ``kfac`` every block's local statistics (its owner keeps a running average and an
    inverse besides, which this lower bound leaves out)."""
    from hpckfac.torch.registry import block_for

    with torch.device("meta"):
        model = build()
    total = 4 * sum(4 * p.numel() for p in model.parameters())
    if kfac:
        for name, module in model.named_modules():
            try:
                block = block_for(name, module)
            except ValueError:
                block = None
            if block is not None:
                total += sum(4 * count * n * n for count, n in block.factor_shapes)
    return total


def check_fits(build: Callable[[], nn.Module], kfac: bool, device: torch.device, width: int) -> None:
    """ValueError naming ``width`` when the model cannot fit in the device's memory at all."""
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
        except (OSError, StopIteration, ValueError):
            return  # no way to tell here: let the allocation say
    needed = memory_needed(build, kfac)
    if needed > available:
        raise ValueError(f"width: {width} needs at least {needed / 2**30:.1f} GiB to train"
                         f"{' with K-FAC' if kfac else ''}, more than the {available / 2**30:.1f} GiB of "
                         f"{'the GPU' if device.type == 'cuda' else 'this machine'} (lower --width)")


def stop_on_signal(config: TrainConfig, comm: Communicator) -> StopOnSignal | None:
    """The handler of ``config.stop_signals`` over ``comm`` (None without any, or outside the
    main thread, where Python cannot handle signals). Not a collective."""
    signals = stop_signals(config.stop_signals)
    if not signals:
        return None
    if threading.current_thread() is not threading.main_thread():
        _log.warning("stop_signals: run() is not in the main thread, where Python handles signals alone; "
                     "%s will end the run without a checkpoint", ", ".join(s.name for s in signals))
        return None
    return StopOnSignal(comm, signals)


class Trainer:
    """One training run: data, model, optimizer (and preconditioner), schedule, state.

    Construction validates ``config`` (ValueError naming the setting), loads the
    data and, with ``config.resume``, the checkpoint (CheckpointError, raised on
    every rank, if it is corrupt or from a different setup).
    """

    def __init__(self, config: TrainConfig, comm: Communicator | None = None) -> None:
        from hpckfac.comm import world_communicator
        from hpckfac.torch import KFACPreconditioner, bind_device, broadcast_parameters

        self.config = config.validate()
        self.comm = comm if comm is not None else world_communicator()
        self.rank, self.size = self.comm.rank, self.comm.size
        self._warned_later = False
        # First, before anything touches CUDA: each rank on its own GPU.
        self.device = agree(self.comm, lambda: bind_device(config.device, self.comm), "binding the device")
        if config.out:  # rank 0 writes there: find a problem before the first step, on every rank
            agree(self.comm, lambda: check_output_dir(config.out, (LOG_NAME, RECORDS_NAME, PLOT_NAME), (CHECKPOINT_DIR,))
                  if self.rank == 0 else None, "checking --out")
        self.data: Dataset = agree(self.comm, lambda: load_dataset(config.data), "loading the data")
        if config.batch_size % self.size:
            raise ValueError(f"batch_size: global batch {config.batch_size} does not split evenly over "
                             f"{self.size} ranks")
        self.order = BatchOrder(len(self.data.x_train), config.batch_size, config.seed)
        self.total_steps = config.steps or config.epochs * self.order.steps_per_epoch
        self.schedule = WarmupPolynomialDecay(config.lr, self.total_steps, config.warmup_steps, config.decay_power)
        # The data sets are small: each rank keeps them on its device and slices batches there.
        self.x_train = torch.from_numpy(self.data.x_train).to(self.device)
        self.y_train = torch.from_numpy(self.data.y_train).to(self.device)
        test = np.array_split(np.arange(len(self.data.x_test)), self.size)[self.rank]
        self.x_test = torch.from_numpy(self.data.x_test[test]).to(self.device)
        self.y_test = torch.from_numpy(self.data.y_test[test]).to(self.device)

        build = lambda: resnet(depth=8, width=config.width, in_channels=self.data.in_channels,  # noqa: E731
                               num_classes=self.data.num_classes)
        agree(self.comm, lambda: check_fits(build, config.optimizer == "kfac", self.device, config.width),
              "sizing the model")
        torch.manual_seed(config.seed)
        self.model = build().to(self.device)
        broadcast_parameters(self.model, self.comm)
        self.optimizer = self._make_optimizer()
        self.precond = None
        if config.optimizer == "kfac":
            self.precond = KFACPreconditioner(
                self.model, lr=self.schedule, damping=config.damping, factor_decay=config.factor_decay,
                factor_update_interval=config.factor_update_interval,
                inverse_update_interval=config.inverse_update_interval,
                kl_clip=config.kl_clip or None, statistics_fraction=config.statistics_fraction, comm=self.comm)
        self.step, self.wall, self.records, self.step_seconds = 0, 0.0, [], []
        self.stopped_by: dict[int, str] = {}  # rank -> signal, when a signal ended the last run()
        self._logged: int | None = None  # records already in records.jsonl (None: not written yet)
        self._interval = np.zeros(3)  # loss sum, correct, examples since the last evaluation (this rank)
        if config.resume:
            agree(self.comm, lambda: self._resume(config.resume), "resuming")
            self._check_resumed_alike()

    # --------------------------------------------------------------- setup
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c, params = self.config, self.model.parameters()
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _identity(self) -> dict[str, Any]:
        return {**self.config.as_dict(), "total_steps": self.total_steps}

    def _resume(self, path: str) -> None:
        path = find_checkpoint(path)
        state = load_checkpoint(path)
        check_history(state, path)
        check_compatible(state, self._identity(), self.data.fingerprint(),
                         TRAJECTORY_KEYS + ("lr", "warmup_steps", "decay_power", "total_steps"), path)
        try:
            self.order.check_state(state["data_order"])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.precond is not None:
                self.precond.load_state_dict(state["preconditioner"])
            torch.set_rng_state(state["torch_rng"])  # another length: RuntimeError, named as the others
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this run ({str(exc).splitlines()[0]})") from None
        self.step, self.wall, self.records = int(state["step"]), float(state["wall"]), list(state["history"])
        _log.info("resumed from %s at step %d", path, self.step)

    def _check_resumed_alike(self) -> None:
        """Raise CollectiveMismatchError on every rank unless every rank resumed the same state.

        ``--resume`` may name another path on each node, and nothing else compares what the
        ranks read there: ranks at different steps run different numbers of steps (the job
        ended only when the first rank left, with no cause named), and SGD/Adam replicas
        resumed from different weights would train apart until the next checkpoint."""
        from hpckfac.comm import CollectiveMismatchError
        from hpckfac.torch.distributed import replica_difference

        steps = self.comm.allgather_object(self.step, what="the resumed step")
        if len(set(steps)) > 1:
            held = ", ".join(f"step {s} on rank {r}" for r, s in enumerate(steps) if r == 0 or s != steps[0])
            raise CollectiveMismatchError(f"--resume: the ranks resumed from different checkpoints ({held}); "
                                          "every rank must resume from the same one")
        found = replica_difference(self.model, self.comm)
        if found is not None:
            raise CollectiveMismatchError(f"--resume: the ranks resumed from different checkpoints of step "
                                          f"{self.step} ({found}); every rank must resume from the same one")

    # ---------------------------------------------------------------- step
    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step on this rank's shard of global batch ``self.step``;
        returns its seconds and this rank's loss and accuracy on its shard."""
        index = torch.from_numpy(self.order.shard(self.step, self.rank, self.size)).to(self.device)
        x, y = self.x_train[index], self.y_train[index]
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule(self.step)
        start = time.perf_counter()
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        if self.precond is not None:
            self.precond.step()
        else:
            from hpckfac.torch import allreduce_gradients

            allreduce_gradients(self.model, self.comm)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's kernels, not only their launches
        seconds = time.perf_counter() - start
        loss, correct = float(loss.detach()), float((logits.detach().argmax(1) == y).sum())
        self._interval += (loss * len(y), correct, len(y))
        self.step += 1
        self.wall += seconds
        self.step_seconds.append(seconds)
        return seconds, loss, correct / len(y)

    def evaluate(self) -> dict[str, float]:
        """Average BatchNorm statistics, then the record of this step: ``step``, ``epoch``,
        ``loss`` and ``train_acc`` (over the global batches since the last evaluation),
        ``test_loss``, ``test_acc``, ``wall`` (training seconds so far), ``lr`` (last step's)."""
        from hpckfac.torch import sync_batchnorm_stats

        sync_batchnorm_stats(self.model, self.comm)
        self.model.eval()
        test = np.zeros(3)
        with torch.no_grad():
            for start in range(0, len(self.y_test), EVAL_CHUNK):
                x, y = self.x_test[start:start + EVAL_CHUNK], self.y_test[start:start + EVAL_CHUNK]
                logits = self.model(x)
                test += (float(nn.functional.cross_entropy(logits, y, reduction="sum")),
                         float((logits.argmax(1) == y).sum()), len(y))
        self.model.train()
        sums = np.concatenate([self._interval, test])
        self.comm.allreduce(sums, op="sum", algorithm="mpi")  # a few numbers: latency-bound
        self._interval[:] = 0
        train_loss = sums[0] / max(sums[2], 1)
        if not math.isfinite(train_loss):
            advice = "a smaller --lr or a larger --damping" if self.config.optimizer == "kfac" else "a smaller --lr"
            raise TrainingDiverged(f"training diverged: loss {train_loss} at step {self.step} (try {advice})")
        record = {"step": self.step, "epoch": self.step / self.order.steps_per_epoch,
                  "loss": float(train_loss), "train_acc": float(sums[1] / max(sums[2], 1)),
                  "test_loss": float(sums[3] / max(sums[5], 1)), "test_acc": float(sums[4] / max(sums[5], 1)),
                  "wall": self.wall, "lr": self.schedule(max(self.step - 1, 0))}
        self.records.append(record)
        return record

    def save(self) -> str:
        """Write the checkpoint of this step (a collective: every rank must call it). The
        replicas are compared first: rank 0 writes the weights for all of them."""
        from hpckfac.torch import check_replicas

        check_replicas(self.model, self.comm)
        state = {"step": self.step, "config": self._identity(), "data": self.data.fingerprint(),
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "preconditioner": None if self.precond is None else self.precond.state_dict(),
                 "data_order": self.order.state_dict(), "history": self.records, "wall": self.wall,
                 "torch_rng": torch.get_rng_state()}
        path = checkpoint_path(os.path.join(self.config.out, CHECKPOINT_DIR), self.step)
        if self.rank == 0:
            save_checkpoint(path, state)
            _log.info("checkpoint %s", path)
            later = prune_checkpoints(os.path.dirname(path), self.step, self.config.keep_checkpoints)
            if later and not self._warned_later:
                self._warned_later = True
                _log.warning("%s holds checkpoints of later steps than this run's (%s): kept; --resume "
                             "picks the latest step", os.path.dirname(path), os.path.basename(later[-1]))
        self.comm.barrier()
        return path

    # ----------------------------------------------------------------- run
    def run(self, stop: StopOnSignal | None = None) -> TrainResult:
        """Train from ``self.step`` to ``total_steps``; evaluate every ``eval_every``
        steps, at checkpoints and at the end; write the log, plot and checkpoints.

        ``config.progress`` is rank 0's report: ``"auto"`` shows a progress bar where stderr
        is a terminal and, elsewhere (a batch job's log file, or under mpiexec, which forwards
        output through pipes), one line per evaluation instead of a bar redrawn with carriage
        returns; ``"bar"`` and ``"lines"`` choose, ``"none"`` is silent. Log records print
        above the bar.

        One of ``config.stop_signals`` on any rank (a batch system's warning before the time
        limit) ends the run after the same step on every rank: with ``--out``, evaluated and
        checkpointed there, so that ``--resume`` continues it; ``stopped_by`` then names the
        ranks and signals. ``stop`` asks another StopOnSignal instead, left installed (one made
        before this Trainer, so that a signal during its setup stops the run too, after its first
        step); by default one for ``config.stop_signals``, from the first step to the last."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        c = self.config
        mode = c.progress  # normalised by TrainConfig.validate()
        if self.rank != 0 or mode == "none":
            mode = "none"
        elif mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        bar = tqdm(total=self.total_steps, initial=self.step, desc=c.optimizer, disable=mode != "bar",
                   dynamic_ncols=True, leave=True)
        own = stop is None
        if own:
            stop = stop_on_signal(self.config, self.comm)
        self.stopped_by = {}
        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger("hpckfac")]):
                self._steps(bar, lines=mode == "lines", stop=stop)
        finally:
            bar.close()
            if own and stop is not None:
                stop.close()
        if not self.records or self.records[-1]["step"] != self.step:
            self.evaluate()
        self._write_log(final=True)
        self._plot()
        return TrainResult(self.records, self.step_seconds, self.total_steps, self.model, self.precond, self.summary())

    def write_missing_outputs(self) -> list[str]:
        """Rank 0 of a run resumed at its last step: ``log.json`` and ``training.png`` from the
        checkpoint where either is missing (a run stopped after its last checkpoint, before
        them; ``stages_ms`` is then empty); returns the paths written."""
        if not self.config.out or self.rank != 0 or not self.records:
            return []
        written = []
        if not os.path.exists(os.path.join(self.config.out, LOG_NAME)):
            self._write_log(final=True)
            written.append(os.path.join(self.config.out, LOG_NAME))
        if not os.path.exists(os.path.join(self.config.out, PLOT_NAME)):
            self._plot()
            written.append(os.path.join(self.config.out, PLOT_NAME))
        return written

    def _plot(self) -> None:
        if self.config.out and self.rank == 0:
            from hpckfac.train.plot import plot_history

            plot_history(self.records, os.path.join(self.config.out, PLOT_NAME), title=self._title())

    def _steps(self, bar, lines: bool, stop: StopOnSignal | None = None) -> None:
        """The steps of ``run``, with their evaluations and checkpoints, until the last step or
        until ``stop`` says every rank stops."""
        c = self.config
        test_acc = self.records[-1]["test_acc"] if self.records else float("nan")
        while self.step < self.total_steps:
            seconds, loss, accuracy = self.train_step()
            # Every rank alike, after every step but the last (a run that reached its end is done).
            stopping = stop is not None and self.step < self.total_steps and stop.should_stop()
            if stopping:
                self.stopped_by = stop.stopping_ranks
            checkpoint = (c.checkpoint_every and (self.step % c.checkpoint_every == 0 or self.step == self.total_steps)
                          or stopping and bool(c.out))
            if self.step % c.eval_every == 0 or self.step == self.total_steps or checkpoint:
                record = self.evaluate()
                test_acc = record["test_acc"]
                self._write_log()
                if lines:
                    print(f"{c.optimizer} step {self.step}/{self.total_steps}: loss {record['loss']:.4f}, "
                          f"test accuracy {test_acc:.4f}, {record['wall']:.1f} s", file=sys.stderr, flush=True)
            if checkpoint:
                self.save()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}",
                            test="-" if math.isnan(test_acc) else f"{test_acc:.3f}",
                            ms=f"{1e3 * seconds:.1f}", refresh=False)
            if stopping:
                return

    def summary(self) -> dict[str, Any]:
        """Final and best test accuracy, steps, epochs, training seconds."""
        last = self.records[-1]
        best = max(self.records, key=lambda r: r["test_acc"])
        return {"optimizer": self.config.optimizer, "ranks": self.size, "device": str(self.device),
                "steps": self.step, "total_steps": self.total_steps,
                "stopped_by": {str(rank): name for rank, name in self.stopped_by.items()},
                "epochs": last["epoch"], "wall": self.wall, "test_acc": last["test_acc"],
                "test_loss": last["test_loss"], "best_test_acc": best["test_acc"], "best_step": best["step"]}

    def stage_means(self) -> dict[str, float]:
        """This rank's mean milliseconds per step of each K-FAC stage (empty for first-order runs,
        and where this process ran no step: a finished run resumed to write its log)."""
        return self.precond.stage_means() if self.precond is not None and self.step_seconds else {}

    def _title(self) -> str:
        c = self.config
        return (f"{c.optimizer} on {self.data.name}: global batch {c.batch_size}, {self.size} rank(s), "
                f"lr {c.lr:g}" + (f", damping {c.damping:g}" if c.optimizer == "kfac" else ""))

    def _write_log(self, final: bool = False) -> None:
        """Rank 0: append the new evaluation records to ``records.jsonl`` (cost: the new lines);
        at the end, ``log.json`` with the run's settings, summary, stage times and every record."""
        if not self.config.out or self.rank != 0:
            return
        os.makedirs(self.config.out, exist_ok=True)
        records = os.path.join(self.config.out, RECORDS_NAME)
        if self._logged is None:  # first write of this process: the history so far (a resumed run's too)
            atomic_write(records, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in self.records)))
        else:
            append_lines(records, [json.dumps(r) for r in self.records[self._logged:]])
        self._logged = len(self.records)
        if not final:
            return
        payload = {"config": self._identity(), "ranks": self.size, "dataset": self.data.name,
                   "train_examples": len(self.data.x_train), "test_examples": len(self.data.x_test),
                   "summary": self.summary(), "stages_ms": self.stage_means(), "records": self.records}
        atomic_write(os.path.join(self.config.out, LOG_NAME), lambda fh: fh.write(json.dumps(payload, indent=1) + "\n"))
