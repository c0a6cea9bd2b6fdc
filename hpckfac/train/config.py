"""The settings of one training run, validated in one place."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from hpckfac.stages.options import DEFAULTS, check_integer, check_real

OPTIMIZERS = ("kfac", "sgd", "adam")
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_LR = {"kfac": 0.05, "sgd": 0.1, "adam": 0.003}

# Settings that fix the trajectory: a checkpoint may only be resumed with the same values.
TRAJECTORY_KEYS = ("optimizer", "batch_size", "seed", "width", "momentum", "weight_decay", "damping",
                   "factor_decay", "factor_update_interval", "inverse_update_interval", "kl_clip",
                   "statistics_fraction")


@dataclass
class TrainConfig:
    """Everything ``hpckfac train`` takes; ``validate()`` raises ValueError naming the setting.

    ``lr=None`` picks ``DEFAULT_LR[optimizer]``; ``steps=None`` means ``epochs``
    epochs; ``kl_clip=0`` disables the KL clip; ``device`` is ``auto`` (a GPU
    per rank when CUDA is present), ``cuda`` or ``cpu``. ``momentum`` is SGD's and
    K-FAC's heavy-ball momentum (Adam keeps its default betas).
    """

    optimizer: str = "kfac"
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
    progress: bool = True
    device: str = "auto"
    statistics_fraction: float = 1.0

    def validate(self) -> "TrainConfig":
        """Check every value; returns self with ``lr`` filled in."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.steps is not None:
            _integer("steps", self.steps, 1)
        _integer("epochs", self.epochs, 1)
        _integer("batch_size", self.batch_size, 1)
        _integer("warmup_steps", self.warmup_steps, 0)
        _integer("factor_update_interval", self.factor_update_interval, 1)
        _integer("inverse_update_interval", self.inverse_update_interval, 1)
        _integer("width", self.width, 1)
        _integer("seed", self.seed, 0)
        _integer("checkpoint_every", self.checkpoint_every, 0)
        _integer("keep_checkpoints", self.keep_checkpoints, 0)
        _integer("eval_every", self.eval_every, 1)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        _real("lr", self.lr, low=0.0, strict=True)
        _real("decay_power", self.decay_power, low=0.0)
        _real("momentum", self.momentum, low=0.0, below=1.0)
        _real("weight_decay", self.weight_decay, low=0.0)
        _real("damping", self.damping, low=0.0, strict=True)
        _real("factor_decay", self.factor_decay, low=0.0, below=1.0)
        _real("kl_clip", self.kl_clip, low=0.0)
        _real("statistics_fraction", self.statistics_fraction, low=0.0, strict=True)
        if self.statistics_fraction > 1.0:
            raise ValueError(f"statistics_fraction: expected a number in (0, 1], got {self.statistics_fraction!r}")
        if self.checkpoint_every and not self.out:
            raise ValueError("checkpoint_every: needs --out DIR to write the checkpoints into")
        return self

    def as_dict(self) -> dict:
        """Plain values (for the JSON log and the checkpoint)."""
        return asdict(self)


def _integer(name: str, value, low: int) -> None:
    check_integer(name, value, low)


def _real(name: str, value, *, low: float, strict: bool = False, below: float | None = None) -> None:
    check_real(name, value, low=low, low_open=strict, high_open=below)
