"""The K-FAC hyperparameters: one set of defaults, one validation.

``DEFAULTS`` are the defaults of ``KFACEngine``, ``hpckfac.torch.KFACPreconditioner``
and ``hpckfac train`` alike (docs/preconditioner.md, "Options", lists them).
``check_options`` validates the engine's options; ``hpckfac.torch.options``
adds the checks of the options only the PyTorch bridge has. Every invalid
value raises ValueError naming the parameter. ``damping`` and
``factor_decay``, like the bridge's ``lr``, may also be callables of the step
count (``check_schedule``); their values are then checked at every step (``resolve``).
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable, Literal

import numpy as np

from hpckfac.assignment import ASSIGNMENTS
from hpckfac.checks import check_integer, check_real

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


# Above this the damped diagonals (and pi-split terms sqrt(damping) * pi) leave float32's range,
# in which the factors of float32 and half-precision models are kept.
MAX_DAMPING = 1e18


def _damping(value: Any) -> float:
    return check_real(value, "damping", above=0.0, at_most=MAX_DAMPING)


def _factor_decay(value: Any) -> float:
    return check_real(value, "factor_decay", at_least=0.0, below=1.0)


def _scheduled(name: str, check: Callable[[Any], float]) -> Callable[[Any], Any]:
    """A check that also accepts a callable of the step (its values checked when ``resolve``d)."""
    return lambda value: check_schedule(name, value) if callable(value) else check(value)


def _schedule_error(name: str, problem: str) -> ValueError:
    return ValueError(f"{name}: a schedule must be a callable(step) -> number, called with the step count "
                      f"alone; {problem}")


def _label(schedule: Callable[..., Any]) -> str:
    return getattr(schedule, "__name__", None) or type(schedule).__name__


def check_schedule(name: str, schedule: Callable[..., Any]) -> Callable[..., Any]:
    """``schedule``, the callable given for option ``name``, unless its signature says that it
    cannot be called with the step alone (``lambda: 0.1``): then ValueError naming ``name``, at
    construction rather than at the first step. The signature is read as declared, not through
    ``__wrapped__``: a decorator may change it. A callable without one (some builtins, a
    ``functools.lru_cache`` wrapper) is checked when called (``call_schedule``)."""
    try:
        signature = inspect.signature(schedule, follow_wrapped=False)
    except (TypeError, ValueError):
        return schedule
    try:
        signature.bind(0)
    except TypeError:
        raise _schedule_error(name, f"got {_label(schedule)}{signature}") from None
    return schedule


def call_schedule(name: str, schedule: Callable[[int], Any], step: int) -> Any:
    """``schedule(step)``, the value of option ``name``'s schedule at ``step``. A TypeError of
    the call itself (no frame of the schedule's own ran: a signature ``check_schedule`` could
    not read) is a ValueError naming ``name``; exceptions raised inside the schedule are its
    own and propagate unchanged, their type and traceback into its code kept."""
    try:
        return schedule(step)
    except TypeError as exc:
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            raise
        problem = f"calling {_label(schedule)} with step {step} raised TypeError: {exc}"
    raise _schedule_error(name, problem)


def _kl_clip(value: Any):
    # 0 (of any real type: NumPy's too) and None both switch the clip off, in the library as in
    # ``hpckfac train --kl-clip 0``.
    if value is None or (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and value == 0):
        return None
    try:
        return check_real(value, "kl_clip", above=0.0)
    except ValueError:  # check_real's "> 0" alone would hide the two ways to switch the clip off
        raise ValueError(f"kl_clip: expected a finite real number > 0, or None or 0 for no clip, "
                         f"got {value!r}") from None


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


# The options a step reads, checked at every step: a callable's value, or a constant assigned
# to the engine's attribute between steps.
STEP_CHECKS: dict[str, Callable[[Any], Any]] = {"damping": _damping, "factor_decay": _factor_decay,
                                                "kl_clip": _kl_clip}
# The step options that may be schedules (callables of the step); kl_clip is a number or None
# (a callable one would also leave an unsaveable state_dict()).
SCHEDULED = ("damping", "factor_decay")


def _unscheduled(name: str, kind: str, check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``check`` for option ``name``, which takes ``kind``, not a schedule: a callable (a
    schedule, as other K-FAC libraries take for it) is refused with a ValueError that says so and
    how to change the value during training, rather than the check's "expected a number"."""

    def checked(value: Any) -> Any:
        if callable(value):
            raise ValueError(f"{name}: expected {kind}, not a schedule (got {_label(value)}); to change it "
                             f"during training, assign a new value between steps (precond.{name} = value, "
                             "checked when assigned)")
        return check(value)

    return checked


CHECKS: dict[str, Callable[[Any], Any]] = {
    **{name: _scheduled(name, STEP_CHECKS[name]) for name in SCHEDULED},
    "factor_update_interval": _unscheduled("factor_update_interval", "an integer >= 1",
                                           lambda v: check_integer(v, "factor_update_interval", 1)),
    "inverse_update_interval": _unscheduled("inverse_update_interval", "an integer >= 1",
                                            lambda v: check_integer(v, "inverse_update_interval", 1)),
    "kl_clip": _unscheduled("kl_clip", "a number > 0, or None or 0 for no clip", _kl_clip),
    "assignment": _assignment,
    "factor_dtype": _factor_dtype,
}


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


class CheckedOption:
    """A class attribute for a setting users may reassign between steps: every assignment,
    the constructor's included, goes through ``check(name=value)`` (a ``check_options``), so a
    bad value raises ValueError naming the setting at once and the old value stays, rather than
    failing later inside a hook or silently scaling the statistics."""

    def __init__(self, check: Callable[..., dict[str, Any]]) -> None:
        self._check = check

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self._name]
        except KeyError:  # not assigned yet: what getattr(obj, name, default) and hasattr expect
            raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self._name!r}") from None

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._name] = self._check(**{self._name: value})[self._name]


def _held_number(value: Any) -> Any:
    """A schedule's ``value`` as the number it holds when it is a one-element tensor or array (a
    schedule computed with torch or NumPy; a bool one as a bool, which the checks refuse), else
    ``value`` itself, for the checks to accept or name."""
    if isinstance(value, numbers.Number) or not callable(getattr(value, "item", None)):
        return value
    try:
        return value.item()
    except (ValueError, RuntimeError):  # several elements (NumPy's error, torch's), or none
        return value


def resolve(name: str, value: Any, step: int) -> Any:
    """The value of option ``name`` at ``step`` (``value(step)`` for a schedule of ``SCHEDULED``,
    a one-element tensor or array read as its number), checked."""
    if callable(value) and name in SCHEDULED:
        value = _held_number(call_schedule(name, value, step))
    try:
        return STEP_CHECKS[name](value)
    except ValueError as exc:
        raise ValueError(f"{exc} (at step {step})") from None
