"""Running averages that refuse non-finite updates (CPU)."""
from __future__ import annotations

import numpy as np


def ema_update(running: np.ndarray, new: np.ndarray, decay: float, first: bool, check: bool = True) -> bool:
    """``running <- decay*running + (1-decay)*new`` in place (``first``: ``running <- new``).

    Returns False, leaving ``running`` untouched, when ``new`` holds NaN or Inf
    in ``running``'s dtype (``check=False``: the caller knows it does not).
    """
    # Checked after the cast: float64 statistics beyond float32's range are finite until cast
    # into a float32 average, where they would become inf.
    with np.errstate(over="ignore"):
        new = np.asarray(new).astype(running.dtype, casting="same_kind", copy=False)
    if check and not np.isfinite(new).all():
        return False
    if first:
        np.copyto(running, new)
    else:
        running *= decay
        running += (1.0 - decay) * new
    return True
