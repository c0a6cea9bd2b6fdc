"""Stage 4: the KL-clip factor, computed identically on every rank.

After the AllGatherV every rank holds every owner's partial sum
``sum_{l owned} <V_l, grad_l>`` (the last element of the owner's segment,
see ``hpckfac.stages.layout``); summing them in rank order gives the same
float on every rank, hence the same ``nu`` and the same update everywhere.
"""
from __future__ import annotations

import math

import numpy as np

from hpckfac.stages.layout import SegmentLayout


def kl_clip_factor(gathered: np.ndarray, layout: SegmentLayout, kl_clip: float | None, lr: float) -> float:
    """``nu = min(1, sqrt(kl_clip / (lr^2 * sum_l <V_l, grad_l>)))``.

    1.0 when ``kl_clip`` is None or the sum is not positive; NaN when the sum
    is not finite (non-finite gradients), so that the update is non-finite
    too and a GradScaler skips the step.
    """
    if kl_clip is None:
        return 1.0
    total = math.fsum(float(gathered[at]) for at in layout.partial_offsets if at is not None)
    if not math.isfinite(total):
        return math.nan
    if total <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / (lr * lr * total)))
