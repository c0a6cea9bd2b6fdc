"""Running averages that refuse non-finite updates (CPU)."""
from __future__ import annotations

import numpy as np


def ema_update(running: np.ndarray, new: np.ndarray, decay: float, first: bool, check: bool = True) -> bool:
    """``running <- decay*running + (1-decay)*new`` in place (``first``: ``running <- new``).

    Returns False, leaving ``running`` untouched, when ``new`` holds NaN or Inf
    (``check=False``: the caller knows it does not).
    """
    if check and not np.isfinite(new).all():
        return False
    if first:
        np.copyto(running, new, casting="same_kind")
    else:
        running *= decay
        running += (1.0 - decay) * np.asarray(new, dtype=running.dtype)
    return True
