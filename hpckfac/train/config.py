"""The settings of one training run, validated in one place."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np

from hpckfac.checks import check_integer, check_real
from hpckfac.stop import DEFAULT_SIGNALS, parse_signal
from hpckfac.torch.device import DEVICE_CHOICES, DeviceChoice
from hpckfac.torch.options import DEFAULTS, check_options

Optimizer = Literal["kfac", "sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
# Rank 0's progress report: "auto" is a bar on a terminal and one line per evaluation
# otherwise; "bar" draws the bar anyway (mpiexec forwards output through pipes, never a
# terminal, to the terminal it was started from); "lines"; "none".
Progress = Literal["auto", "bar", "lines", "none"]
PROGRESS: tuple[str, ...] = get_args(Progress)
DEFAULT_LR = {"kfac": 0.05, "sgd": 0.1, "adam": 0.003}


def stop_signals(spec: str) -> tuple:
    """The signals of a ``stop_signals`` setting: comma-separated names (``"TERM,USR1"``) or
    numbers, or ``"none"`` (or empty) for none; ValueError naming ``stop_signals`` otherwise."""
    if not isinstance(spec, str):
        raise ValueError(f"stop_signals: expected comma-separated signal names or 'none', got {spec!r}")
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if parts in ([], ["none"]):
        return ()
    return tuple(dict.fromkeys(parse_signal(int(p) if p.isdecimal() else p, "stop_signals") for p in parts))


def progress_mode(progress: str | bool) -> str:
    """``progress`` as one of ``PROGRESS`` (True is ``"auto"``, False ``"none"``); ValueError
    naming ``progress`` otherwise."""
    if isinstance(progress, bool):
        return "auto" if progress else "none"
    if progress not in PROGRESS:
        raise ValueError(f"progress: expected one of {', '.join(PROGRESS)}, got {progress!r}")
    return progress


# Settings the library validates itself (hpckfac.torch.options): one rule for each, everywhere.
LIBRARY_KEYS = ("lr", "damping", "factor_decay", "factor_update_interval", "inverse_update_interval", "kl_clip",
                "statistics_fraction")
# Settings that fix the trajectory: a checkpoint may only be resumed with the same values.
TRAJECTORY_KEYS = ("optimizer", "batch_size", "seed", "width", "momentum", "weight_decay", "damping",
                   "factor_decay", "factor_update_interval", "inverse_update_interval", "kl_clip",
                   "statistics_fraction")


@dataclass
class TrainConfig:
    """Everything ``hpckfac train`` takes; ``validate()`` raises ValueError naming the setting.

    ``lr=None`` picks ``DEFAULT_LR[optimizer]``; ``steps=None`` means ``epochs``
    epochs; ``kl_clip=0`` disables the KL clip; ``progress`` is one of ``PROGRESS`` (True
    is ``"auto"``, False ``"none"``); ``device`` is ``auto`` (a GPU
    per rank when CUDA is present), ``cuda`` or ``cpu``. ``momentum`` is SGD's and
    K-FAC's heavy-ball momentum (Adam keeps its default betas). ``stop_signals`` are
    the signals that stop every rank after the same step, checkpointed with ``out``
    (``hpckfac.stop``): comma-separated names or numbers, or ``"none"``.
    """

    optimizer: Optimizer = "kfac"
    batch_size: int = 128
    epochs: int = 10
    steps: int | None = None
    lr: float | None = None
    warmup_steps: int = 0
    decay_power: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    damping: float = DEFAULTS["damping"]
    factor_decay: float = DEFAULTS["factor_decay"]
    factor_update_interval: int = DEFAULTS["factor_update_interval"]
    inverse_update_interval: int = DEFAULTS["inverse_update_interval"]
    kl_clip: float = DEFAULTS["kl_clip"]
    width: int = 8
    seed: int = 0
    data: str | None = None
    out: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    resume: str | None = None
    eval_every: int = 10
    progress: Progress | bool = "auto"
    device: DeviceChoice = "auto"
    statistics_fraction: float = DEFAULTS["statistics_fraction"]
    stop_signals: str = ",".join(name.removeprefix("SIG") for name in DEFAULT_SIGNALS)

    def validate(self) -> "TrainConfig":
        """Check every value; returns self with ``lr`` filled in."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        self.progress = progress_mode(self.progress)
        stop_signals(self.stop_signals)
        for name in ("data", "out", "resume"):  # paths (a resumed run takes data and out from its checkpoint)
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name}: expected a path, got {value!r}")
        if self.steps is not None:
            check_integer(self.steps, "steps", 1)
        for name, low in (("epochs", 1), ("batch_size", 1), ("warmup_steps", 0), ("width", 1), ("seed", 0),
                          ("checkpoint_every", 0), ("keep_checkpoints", 0), ("eval_every", 1)):
            check_integer(getattr(self, name), name, low)
        if self.seed >= 2**64:  # torch.manual_seed takes an unsigned 64-bit integer
            raise ValueError(f"seed: expected an integer in [0, 2**64), got {self.seed!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        # A number here (the library also takes schedules), one the float32 parameters can take.
        check_real(self.lr, "lr", above=0.0, at_most=float(np.finfo(np.float32).max))
        check_options(**{name: getattr(self, name) for name in LIBRARY_KEYS})
        check_real(self.decay_power, "decay_power", at_least=0.0)
        check_real(self.momentum, "momentum", at_least=0.0, below=1.0)
        # torch's optimizers hold it as a float32 too: a larger one fails their first step.
        check_real(self.weight_decay, "weight_decay", at_least=0.0, at_most=float(np.finfo(np.float32).max))
        # Absolute, as the checkpoint records them: a run resumed from another directory finds them.
        self.out = os.path.abspath(self.out) if self.out else None
        self.data = os.path.abspath(self.data) if self.data else None
        if self.checkpoint_every and not self.out:
            raise ValueError("checkpoint_every: needs --out DIR to write the checkpoints into")
        return self

    def as_dict(self) -> dict:
        """Plain values (for the JSON log and the checkpoint)."""
        return asdict(self)

