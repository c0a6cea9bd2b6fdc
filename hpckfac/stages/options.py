"""The K-FAC hyperparameters: one set of defaults, one validation.

``DEFAULTS`` are the defaults of ``KFACEngine``, ``hpckfac.torch.KFACPreconditioner``
and ``hpckfac train`` alike (docs/preconditioner.md, "Options", lists them).
``check_options`` validates the engine's options; ``hpckfac.torch.options``
adds the checks of the options only the PyTorch bridge has. Every invalid
value raises ValueError naming the parameter. ``damping`` and
``factor_decay``, like the bridge's ``lr``, may also be callables of the step
count; their values are then checked at every step (``resolve``).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Literal

import numpy as np

from hpckfac.assignment import ASSIGNMENTS

Assignment = Literal["lpt", "contiguous"]
# Communication dtypes a Communicator accepts (the whole ReduceScatterV buffer travels in one).
FACTOR_DTYPES = ("float64", "float32", "float16")

DEFAULTS: dict[str, Any] = {
    "damping": 1e-2,
    "factor_decay": 0.95,
    "factor_update_interval": 1,
    "inverse_update_interval": 10,
    "kl_clip": 1e-2,
    "assignment": "lpt",
}


def check_real(name: str, value: Any, *, low: float, low_open: bool, high_open: float | None = None,
               high: float | None = None) -> float:
    """``value`` as a float if it is a finite real number within the bounds; ValueError naming ``name``."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (high_open is None or value < high_open) and (high is None or value <= high))
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high_open}" if high_open is not None else "")
        bound += f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}: expected a finite real number {bound}, got {value!r}")
    return float(value)


def check_integer(name: str, value: Any, low: int) -> int:
    """``value`` as an int if it is an integer >= ``low``; ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _damping(value: Any) -> float:
    return check_real("damping", value, low=0.0, low_open=True)


def _factor_decay(value: Any) -> float:
    return check_real("factor_decay", value, low=0.0, low_open=False, high_open=1.0)


def _scheduled(check: Callable[[Any], float]) -> Callable[[Any], Any]:
    """A check that also accepts a callable of the step (checked when ``resolve``d)."""
    return lambda value: value if callable(value) else check(value)


def _kl_clip(value: Any):
    # 0 and None both switch the clip off, in the library as in ``hpckfac train --kl-clip 0``.
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return None
    return check_real("kl_clip", value, low=0.0, low_open=True)


def _assignment(value: Any) -> str:
    if value not in ASSIGNMENTS:
        raise ValueError(f"assignment: expected one of {ASSIGNMENTS}, got {value!r}")
    return value


def _factor_dtype(value: Any):
    if value is None:
        return None
    name = str(value).replace("torch.", "")
    try:
        name = np.dtype(name if name in FACTOR_DTYPES else value).name
    except TypeError:
        pass
    if name not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype: expected None or one of {FACTOR_DTYPES}, got {value!r}")
    return np.dtype(name)


CHECKS: dict[str, Callable[[Any], Any]] = {
    "damping": _scheduled(_damping),
    "factor_decay": _scheduled(_factor_decay),
    "factor_update_interval": lambda v: check_integer("factor_update_interval", v, 1),
    "inverse_update_interval": lambda v: check_integer("inverse_update_interval", v, 1),
    "kl_clip": _kl_clip,
    "assignment": _assignment,
    "factor_dtype": _factor_dtype,
}
# The values a callable option must return at every step.
STEP_CHECKS: dict[str, Callable[[Any], float]] = {"damping": _damping, "factor_decay": _factor_decay}


def check_options(checks: dict[str, Callable[[Any], Any]] | None = None, **options: Any) -> dict[str, Any]:
    """Validated (normalised) copies of ``options``; ValueError naming the first bad one.

    Rules: ``damping`` > 0 and 0 <= ``factor_decay`` < 1, or callables of the
    step; ``factor_update_interval``, ``inverse_update_interval`` integers
    >= 1; ``kl_clip`` None, 0 (both: no clip) or > 0; ``assignment`` in
    ASSIGNMENTS; ``factor_dtype`` None or float64/float32/float16 (NumPy or
    torch dtype or name; returned as a NumPy dtype). ``checks`` replaces the
    table of rules (``hpckfac.torch.options`` passes a larger one).
    """
    checks = CHECKS if checks is None else checks
    unknown = sorted(set(options) - set(checks))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(checks)})")
    return {name: checks[name](value) for name, value in options.items()}


def resolve(name: str, value: Any, step: int) -> float:
    """The value of option ``name`` at ``step``: ``value(step)`` for a callable, checked."""
    if not callable(value):
        return value
    try:
        return STEP_CHECKS[name](value(step))
    except ValueError as exc:
        raise ValueError(f"{exc} (at step {step})") from None
