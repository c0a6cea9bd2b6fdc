"""Learning-rate schedule: linear warmup, then polynomial decay to zero (the shape Osawa,
Tsuji, Ueno et al. 2018 use)."""
from __future__ import annotations

from hpckfac.checks import check_integer, check_real


class WarmupPolynomialDecay:
    """``lr(step)`` for steps ``0 .. total_steps-1``.

    Warmup: ``base_lr * (step + 1) / warmup_steps`` for the first ``warmup_steps``
    steps; then ``base_lr * (1 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power``,
    which is ``base_lr`` right after warmup and reaches 0 one step after the last.
    A pure function of the step, so it needs no checkpoint state of its own.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, power: float = 2.0) -> None:
        self.base_lr = check_real(base_lr, "lr", above=0.0)
        self.total_steps = check_integer(total_steps, "steps", 1)
        self.warmup_steps = check_integer(warmup_steps, "warmup_steps", 0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps: expected an integer in 0..{total_steps - 1} (below the "
                             f"number of steps), got {warmup_steps!r}")
        self.power = check_real(power, "decay_power", at_least=0.0)

    def __call__(self, step: int) -> float:
        """The learning rate at ``step``."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        remaining = 1.0 - (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.base_lr * max(remaining, 0.0) ** self.power
