"""``hpckfac train``: data-parallel training of a small ResNet with K-FAC, SGD or Adam.

Launch with ``mpiexec -n N hpckfac train [options]`` (or plainly, as one rank).
Bad arguments, data or checkpoints give one line on stderr and exit status 2;
a diverged run exits with 1; a run that one of ``--stop-signals`` stopped (a batch
system's warning before its time limit) exits with 75 after its checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, NoReturn

from hpckfac.cli import HelpFormatter, RankParser, job_rank_and_size
from hpckfac.torch.device import DEVICE_CHOICES
from hpckfac.train.config import DEFAULT_LR, OPTIMIZERS, PROGRESS, TrainConfig, stop_signals

if TYPE_CHECKING:
    from hpckfac.comm import Communicator
    from hpckfac.stop import StopOnSignal

PROG = "hpckfac train"
# EX_TEMPFAIL of sysexits.h: stopped by a signal with a checkpoint, to be resumed.
STOPPED = 75


class _UsageError(Exception):
    pass


class _Parser(RankParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block, raised to main()
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``hpckfac train`` argument parser (defaults from ``TrainConfig``)."""
    d = TrainConfig()
    p = _Parser(prog=PROG, description="Train a small ResNet with BatchNorm on the embedded handwritten "
                "digits (or --data FILE.npz) with distributed K-FAC, SGD or Adam.",
                formatter_class=HelpFormatter)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="kfac: K-FAC preconditioner + SGD with momentum")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split evenly over ranks")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    p.add_argument("--decay-power", type=float, default=d.decay_power,
                   help="power of the polynomial decay to 0 after warmup (0: constant)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD/K-FAC momentum (not Adam)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 weight decay of the optimizer")
    p.add_argument("--damping", type=float, default=d.damping, help="K-FAC Tikhonov damping (pi-corrected)")
    p.add_argument("--factor-decay", type=float, default=d.factor_decay, help="K-FAC running-average weight")
    p.add_argument("--factor-update-interval", type=int, default=d.factor_update_interval,
                   help="K-FAC statistics every that many steps")
    p.add_argument("--inverse-update-interval", type=int, default=d.inverse_update_interval,
                   help="K-FAC inverses recomputed every that many steps")
    p.add_argument("--kl-clip", type=float, default=d.kl_clip, help="K-FAC KL clip kappa (0 disables)")
    p.add_argument("--width", type=int, default=d.width, help="channels of the first ResNet stage")
    p.add_argument("--seed", type=int, default=d.seed, help="weights and data order")
    p.add_argument("--data", metavar="FILE.npz", default=None,
                   help="arrays x (N,H,W) or (N,C,H,W), y (N,), optional x_test, y_test (default: digits)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write records.jsonl, log.json, training.png and checkpoints/ here")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="K",
                   help="checkpoint every K steps and at the end (0: never; needs --out)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="N",
                   help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue from the latest checkpoint in DIR (or DIR/checkpoints), or from a file")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="K",
                   help="evaluate on the test set every K steps")
    p.add_argument("--progress", choices=PROGRESS, default=d.progress,
                   help="rank 0's report: auto (a bar on a terminal, one line per evaluation otherwise), bar "
                        "(the bar anyway: mpiexec's output is never a terminal), lines, none")
    p.add_argument("--no-progress", dest="progress", action="store_const", const="none", help="as --progress none")
    p.add_argument("--statistics-fraction", type=float, default=d.statistics_fraction, metavar="F",
                   help="K-FAC statistics from the first F of each rank's batch (0 < F <= 1)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default=d.device,
                   help="auto: one GPU per rank (local rank %% visible GPUs) when CUDA is present, else CPU")
    p.add_argument("--stop-signals", metavar="LIST", default=d.stop_signals,
                   help="signals (comma-separated, or none) on which every rank stops after the same step, "
                        f"checkpoints into --out and exits with status {STOPPED}; --resume continues")
    return p


def _fail(message: str, code: int = 2) -> int:
    """Print one line on rank 0 and return the exit status."""
    if job_rank_and_size()[0] == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _cli_message(exc: Exception) -> str:
    """The error's first line, with a leading setting name spelled as its option."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name, sep, rest = message.partition(":")
    if sep and name in {f.name for f in fields(TrainConfig)}:
        return f"--{name.replace('_', '-')}:{rest}"
    return message


# Settings of the machine running the resumed job, not of the run: never taken from a checkpoint.
_LOCAL_SETTINGS = ("resume", "progress", "device", "stop_signals")


def _explicit(argv: list[str] | None) -> set[str]:
    """The settings given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:  # a default of SUPPRESS leaves the setting out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _resumed_settings(path: str, explicit: set[str], settings: dict) -> tuple[dict, str | None]:
    """The run's own settings from its checkpoint, for every setting not given on the
    command line, so that ``--resume DIR`` alone continues the run as it was started, and
    why none could be read (None when they were). A missing or unreadable checkpoint is
    reported by ``_settings_disagree``, before any other check: the settings then left at
    their defaults are not the run's, and an error about one of them would hide the cause."""
    from hpckfac.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint

    try:
        found = find_checkpoint(path)
        saved = load_checkpoint(found)["config"]
    except (CheckpointError, KeyError, TypeError) as exc:
        return {}, str(exc) or type(exc).__name__
    resumed = {key: value for key, value in saved.items()
               if key in settings and key not in explicit and key not in _LOCAL_SETTINGS}
    folder = os.path.dirname(os.path.abspath(found))
    if "out" not in explicit and os.path.basename(folder) == "checkpoints":
        resumed["out"] = os.path.dirname(folder)  # the run goes on where its checkpoints are
    return resumed, None


def _settings_disagree(config: TrainConfig, unreadable: str | None) -> str | None:
    """Why the ranks cannot start together, or None: every rank must run with the same
    settings (``--out``, ``--data`` and ``--resume`` may be other paths on other nodes, but
    given on all or none), or they call the setup's collectives a different number of times and wait
    forever. With ``--resume`` they differ when only some ranks can read the checkpoint
    (a path on a node-local disk): that rank's reason is the message; when no rank can
    read it, rank 0's reason (``unreadable``), since the defaults taken in place of the
    checkpoint's settings (``--batch-size 128`` at 3 ranks, say) would fail first and
    mislead. A collective of ``COMM_WORLD``, before anything else is communicated."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() == 1:
        return None if unreadable is None else _cli_message(ValueError(unreadable))
    mine = {key: repr(bool(value) if key in ("out", "data") else value)  # repr: a NaN equals itself
            for key, value in config.as_dict().items() if key not in _LOCAL_SETTINGS}
    # Ranks with and without stop signals would call StopOnSignal's per-step allreduce apart.
    mine["stop_signals"] = _signal_names(config.stop_signals)
    mine["resume"] = repr(bool(config.resume))
    everyone = world.allgather((mine, unreadable))
    # Before the settings a checkpoint gave some ranks, and before its readers' reasons: the
    # others resume from nothing.
    resuming = [rank for rank, (theirs, _) in enumerate(everyone) if theirs["resume"] == "True"]
    if 0 < len(resuming) < len(everyone):
        return (f"the ranks were started with different settings: --resume is given on rank(s) {resuming} only; "
                "give it to every rank, or to none")
    for rank, (theirs, reason) in enumerate(everyone):
        if theirs == everyone[0][0]:
            continue
        for r, why in ((rank, reason), (0, everyone[0][1])):
            if why is not None:
                return f"--resume: rank {r} of {world.Get_size()} cannot read the checkpoint the others resume from ({why})"
        key = next(k for k in mine if theirs.get(k) != everyone[0][0].get(k))
        return (f"the ranks were started with different settings: --{key.replace('_', '-')} is "
                f"{everyone[0][0].get(key)} on rank 0, {theirs.get(key)} on rank {rank}")
    if all(reason is not None for _, reason in everyone):
        return _cli_message(ValueError(everyone[0][1]))
    return None


def _signal_names(spec: str) -> str:
    """The signals of a ``--stop-signals`` value by name (``TERM,USR1`` for ``15,SIGUSR1``), or
    the value itself when it names none validly (its own error follows)."""
    try:
        return ",".join(s.name.removeprefix("SIG") for s in stop_signals(spec)) or "none"
    except ValueError:
        return repr(spec)


def _rank_failure(comm, exc: BaseException) -> int:
    """An error that may strike this rank alone: one line, then the whole job ends
    (``MPI_Abort`` with several ranks, so that no rank waits forever); returns 1."""
    from hpckfac.comm.abort import abort_job

    if isinstance(exc, BrokenPipeError) and comm.size == 1:
        raise exc  # stdout's reader went away (`| head`): the entry point ends quietly
    cause = _cli_message(exc)
    if not isinstance(exc, (OSError, ValueError)) and str(exc).strip():  # a bare "'test_acc'" names nothing
        cause = f"{type(exc).__name__}: {cause}"
    message = f"{PROG}: error: {cause}"
    if comm.size > 1:
        abort_job(message)
    print(message, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``hpckfac train`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        # The outcome alike on every rank; the settings are compared below, where --out and
        # --data may be other paths on other nodes.
        args = build_parser().parse_everywhere(argv, compare=False)
    except _UsageError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    settings, unreadable = vars(args), None
    if args.resume:
        resumed, unreadable = _resumed_settings(args.resume, _explicit(argv), settings)
        settings.update(resumed)
    config = TrainConfig(**settings)
    disagree = _settings_disagree(config, unreadable)  # before any rank can return alone
    if disagree:
        return _fail(disagree)
    try:
        config.validate()
    except ValueError as exc:
        return _fail(_cli_message(exc))

    import logging

    from hpckfac.comm import world_communicator
    from hpckfac.log import get_logger
    from hpckfac.train.loop import stop_on_signal

    comm = world_communicator()
    if "HPCKFAC_LOG_LEVEL" not in os.environ:
        get_logger("hpckfac.train").setLevel(logging.INFO if comm.rank == 0 else logging.WARNING)
    # Installed before the setup and kept until the end, so that a batch system's signal while
    # the Trainer loads its data or checkpoint stops the run after its first step, and one after
    # the last step leaves the finished run to write its log, rather than ending the process.
    stop = stop_on_signal(config, comm)
    try:
        return _train(config, comm, stop)
    finally:
        if stop is not None:
            stop.close()


def _train(config: TrainConfig, comm: "Communicator", stop: "StopOnSignal | None") -> int:
    """``main`` from the Trainer's setup on, with ``stop`` (None: no stop signals) installed."""
    from hpckfac.comm import CollectiveMismatchError
    from hpckfac.train.loop import LOG_NAME, PLOT_NAME, Trainer, TrainingDiverged

    try:
        trainer = Trainer(config, comm)
    except ValueError as exc:  # data, checkpoint, batch split: the same on every rank
        return _fail(_cli_message(exc))
    except CollectiveMismatchError as exc:  # raised on every rank together
        return _fail(_cli_message(exc), code=1)
    except (Exception, KeyboardInterrupt) as exc:  # e.g. the model does not fit in memory
        return _rank_failure(comm, exc)
    if trainer.step >= trainer.total_steps:
        try:
            written = trainer.write_missing_outputs()
        except (Exception, KeyboardInterrupt) as exc:  # rank 0 alone writes: a full disk, say
            return _rank_failure(comm, exc)
        if comm.rank == 0:
            print(f"{PROG}: the run in {config.resume} already finished (step {trainer.step} of "
                  f"{trainer.total_steps}); nothing to train" + (f"; wrote {', '.join(written)}" if written else ""))
        return 0
    try:
        result = trainer.run(stop)
    except (TrainingDiverged, CollectiveMismatchError) as exc:  # raised on every rank together
        return _fail(_cli_message(exc), code=1)
    except (Exception, KeyboardInterrupt) as exc:  # this rank alone: the others would wait forever
        return _rank_failure(comm, exc)
    s = result.summary
    if comm.rank == 0:
        if trainer.stopped_by:
            held = ", ".join(f"{name} on rank {rank}" for rank, name in trainer.stopped_by.items())
            print(f"{PROG}: stopped after step {trainer.step} of {trainer.total_steps} ({held}); " + (
                f"continue with --resume {config.out}" if config.out else "no --out: no checkpoint to resume from"))
        print(f"{PROG}: {s['optimizer']} on {trainer.data.name}, {s['ranks']} rank(s) on {s['device']}, global batch "
              f"{config.batch_size}: {s['steps']} steps ({s['epochs']:.1f} epochs) in {s['wall']:.1f} s of training\n"
              f"test accuracy {100 * s['test_acc']:.2f}% (loss {s['test_loss']:.4f}), "
              f"best {100 * s['best_test_acc']:.2f}% at step {s['best_step']}")
        if config.out:
            print(f"log: {os.path.join(config.out, LOG_NAME)}  plot: {os.path.join(config.out, PLOT_NAME)}")
    if result.preconditioner is not None:
        result.preconditioner.report(gather=True)  # collective; prints the per-stage table on rank 0
    return STOPPED if trainer.stopped_by else 0
