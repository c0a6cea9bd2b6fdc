"""Learning-rate schedule: linear warmup, then polynomial decay to zero (the shape Osawa,
Tsuji, Ueno et al. 2018 use)."""
from __future__ import annotations

import math


class WarmupPolynomialDecay:
    """``lr(step)`` for steps ``0 .. total_steps-1``.

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps``
    steps; then ``base_lr * (1 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power``,
    which is ``base_lr`` right after warmup and reaches 0 one step after the last.
    A pure function of the step, so it needs no checkpoint state of its own.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, power: float = 2.0) -> None:
        if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {base_lr!r}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {total_steps!r}")
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps: expected an integer in 0..{total_steps - 1} (below the "
                             f"number of steps), got {warmup_steps!r}")
        if not (isinstance(power, (int, float)) and math.isfinite(power) and power >= 0):
            raise ValueError(f"decay_power: expected a finite number >= 0, got {power!r}")
        self.base_lr = float(base_lr)
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.power = float(power)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        remaining = 1.0 - (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.base_lr * max(remaining, 0.0) ** self.power
