"""Stage 4: the KL-clip factor, computed identically on every rank.

After the AllGatherV every rank holds every owner's partial sum
``sum_{l owned} <V_l, grad_l>`` (the last element of the owner's segment,
see ``hpckfac.stages.layout``); summing them in rank order gives the same
float on every rank, hence the same ``nu`` and the same update everywhere.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from hpckfac.arrays import namespace


def kl_clip_factor(gathered: Any, partial_at: Any, kl_clip: float | None, lr: float) -> Any:
    """``nu = min(1, sqrt(kl_clip / (lr^2 * sum_l <V_l, grad_l>)))`` as a float64
    0-d array of ``gathered``'s namespace (computed where the gradients live, so
    a GPU step does not wait for it), or None when ``kl_clip`` is None.
    ``partial_at`` (an index array in that namespace) says where the owners'
    partial sums sit (``SegmentLayout.partial_offsets``).

    1 when the sum is not positive or ``lr`` is 0; NaN when the sum is not
    finite (non-finite gradients), so that the update is non-finite too and a
    GradScaler skips the step.
    """
    if kl_clip is None:
        return None
    xp = namespace(gathered)
    total = gathered[partial_at].astype(np.float64).sum()
    with np.errstate(all="ignore"):  # lr = 0 or an underflowing product: ratio inf, nu 1
        nu = xp.minimum(1.0, xp.sqrt(kl_clip / (lr * lr * total)))
    nu = xp.where(total > 0, nu, 1.0)
    return xp.where(xp.isfinite(total), nu, np.nan)
