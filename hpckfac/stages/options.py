"""Validation of every K-FAC hyperparameter, in one place.

``check_options`` is called by ``KFACEngine`` and by
``hpckfac.torch.KFACPreconditioner``; each invalid value raises ValueError
naming the parameter.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from hpckfac.assignment import ASSIGNMENTS

# Communication dtypes a Communicator accepts (the whole ReduceScatterV buffer travels in one).
FACTOR_DTYPES = ("float64", "float32", "float16")


def _real(name: str, value: Any, *, low: float, low_open: bool, high_open: float | None = None,
          high: float | None = None) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if low_open else value >= low)
          and (high_open is None or value < high_open) and (high is None or value <= high))
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high_open}" if high_open is not None else "")
        bound += f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name}: expected a finite real number {bound}, got {value!r}")
    return float(value)


def _integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _lr(value: Any):
    return value if callable(value) else _real("lr", value, low=0.0, low_open=True)


def _kl_clip(value: Any):
    # 0 and None both switch the clip off, in the library as in ``hpckfac train --kl-clip 0``.
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return None
    return _real("kl_clip", value, low=0.0, low_open=True)


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


def _skip_layers(value: Any) -> tuple:
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
    "lr": _lr,
    "damping": lambda v: _real("damping", v, low=0.0, low_open=True),
    "factor_decay": lambda v: _real("factor_decay", v, low=0.0, low_open=False, high_open=1.0),
    "factor_update_interval": lambda v: _integer("factor_update_interval", v, 1),
    "inverse_update_interval": lambda v: _integer("inverse_update_interval", v, 1),
    "kl_clip": _kl_clip,
    "assignment": _assignment,
    "factor_dtype": _factor_dtype,
    "bucket_bytes": lambda v: _integer("bucket_bytes", v, 1),
    "accumulation_steps": lambda v: _integer("accumulation_steps", v, 1),
    "skip_layers": _skip_layers,
    "statistics_fraction": lambda v: _real("statistics_fraction", v, low=0.0, low_open=True, high=1.0),
    "grad_scaler": _grad_scaler,
}


def check_options(**options: Any) -> dict[str, Any]:
    """Validated (normalised) copies of ``options``; ValueError naming the first bad one.

    Accepted names and rules: ``lr`` > 0 or a callable ``step -> lr``;
    ``damping`` > 0; 0 <= ``factor_decay`` < 1; ``factor_update_interval``,
    ``inverse_update_interval``, ``accumulation_steps``, ``bucket_bytes``
    integers >= 1; ``kl_clip`` None, 0 (both: no clip) or > 0; 0 < ``statistics_fraction`` <= 1; ``assignment`` in ASSIGNMENTS;
    ``factor_dtype`` None or float64/float32/float16 (NumPy or torch dtype or
    name; returned as a NumPy dtype); ``skip_layers`` names or module types;
    ``grad_scaler`` None or an object with ``get_scale()``.
    """
    unknown = sorted(set(options) - set(CHECKS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option (known: {', '.join(CHECKS)})")
    return {name: CHECKS[name](value) for name, value in options.items()}
