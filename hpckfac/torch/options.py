"""Defaults and validation of the options only ``KFACPreconditioner`` has, on top of the
engine's (``hpckfac.stages.options``)."""
from __future__ import annotations

from typing import Any

import torch

from hpckfac.checks import check_integer, check_real
from hpckfac.stages.options import CHECKS as ENGINE_CHECKS
from hpckfac.stages.options import DEFAULTS as ENGINE_DEFAULTS
from hpckfac.stages.options import check_options as _check
from hpckfac.stages.options import check_schedule

# The preconditioner's defaults: the engine's, and those of the options only it has
# (``bucket_bytes``: None takes the Communicator's fusion size).
DEFAULTS: dict[str, Any] = {**ENGINE_DEFAULTS, "lr": 0.1, "accumulation_steps": 1, "statistics_fraction": 1.0,
                            "skip_layers": (), "factor_dtype": None, "grad_scaler": None, "bucket_bytes": None}


class SchedulerRate:
    """A torch LR scheduler as a schedule of the step: its optimizer's current rate (first
    parameter group), the rate that group's ``optimizer.step()`` applies after ``precond.step()``."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def __call__(self, step: int) -> float:
        """The scheduler's current rate of the first parameter group (``step`` unused: the
        scheduler keeps its own count)."""
        return float(self.scheduler.get_last_lr()[0])

    def __repr__(self) -> str:
        return f"SchedulerRate({type(self.scheduler).__name__})"


def _lr(value: Any):
    if callable(value):
        return check_schedule("lr", value)
    if callable(getattr(value, "get_last_lr", None)):  # torch.optim.lr_scheduler.LRScheduler
        return SchedulerRate(value)
    try:
        return check_real(value, "lr", above=0.0)
    except ValueError:
        if isinstance(value, torch.optim.Optimizer):  # its repr is a page long
            raise ValueError(f"lr: got the optimizer (torch.optim.{type(value).__name__}); pass its learning "
                             "rate, or the LR scheduler that drives it") from None
        text = repr(value)
        raise ValueError(f"lr: expected a number > 0, a callable step -> rate, or a torch LR scheduler, "
                         f"got {text if len(text) <= 80 else type(value).__name__}") from None


def _skip_layers(value: Any) -> tuple:
    if value is None:  # as for the other optional options: nothing skipped
        return ()
    items = (value,) if isinstance(value, (str, type)) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"skip_layers: expected layer names or module types, got {value!r}") from None
    if not all(isinstance(item, (str, type)) for item in items):
        raise ValueError(f"skip_layers: expected layer names or module types, got {value!r}")
    return items


def _grad_scaler(value: Any):
    if value is not None and not callable(getattr(value, "get_scale", None)):
        raise ValueError(f"grad_scaler: expected None or a torch.amp.GradScaler, got {value!r}")
    return value


CHECKS = {
    **ENGINE_CHECKS,
    "lr": _lr,
    # None, the default, takes the Communicator's fusion size.
    "bucket_bytes": lambda v: None if v is None else check_integer(v, "bucket_bytes", 1),
    "accumulation_steps": lambda v: check_integer(v, "accumulation_steps", 1),
    "skip_layers": _skip_layers,
    "statistics_fraction": lambda v: check_real(v, "statistics_fraction", above=0.0, at_most=1.0),
    "grad_scaler": _grad_scaler,
}


def check_options(**options: Any) -> dict[str, Any]:
    """Validated copies of the engine's and the bridge's options (ValueError naming the
    first bad one): ``lr`` > 0, a callable of the step or a torch LR scheduler;
    ``accumulation_steps`` an integer >= 1, ``bucket_bytes`` one or None (the Communicator's
    fusion size); 0 < ``statistics_fraction`` <= 1;
    ``skip_layers`` names or module types; ``grad_scaler`` None or an object with
    ``get_scale()``; the engine's options as ``hpckfac.stages.options.check_options``."""
    return _check(CHECKS, **options)
