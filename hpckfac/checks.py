"""Validation of scalar settings, shared by every layer of the package.

Each check returns the normalised value or raises ValueError naming the setting, so a
bad hyperparameter reads the same wherever it is given (library, trainer, ops).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def check_real(value: Any, name: str, *, above: float | None = None, at_least: float | None = None,
               below: float | None = None, at_most: float | None = None) -> float:
    """``value`` as a float if it is a finite real number within the given bounds."""
    ok = (not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (above is None or value > above) and (at_least is None or value >= at_least)
          and (below is None or value < below) and (at_most is None or value <= at_most))
    if not ok:
        bounds = [f"{sign} {bound}" for bound, sign in ((above, ">"), (at_least, ">="), (below, "<"), (at_most, "<="))
                  if bound is not None]
        raise ValueError(f"{name}: expected a finite real number{' ' if bounds else ''}{' and '.join(bounds)}, "
                         f"got {value!r}")
    return float(value)


def check_integer(value: Any, name: str, at_least: int) -> int:
    """``value`` as an int if it is an integer >= ``at_least``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < at_least:
        raise ValueError(f"{name}: expected an integer >= {at_least}, got {value!r}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool if it is one (Python's or NumPy's)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected a bool, got {value!r}")
    return bool(value)
