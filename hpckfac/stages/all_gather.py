"""Stage 4: the owners' preconditioned gradients to every rank, and the KL clip.

One ``comm.allgather_v`` brings every owner's segment (its blocks'
preconditioned gradients and its partial sum ``sum_{l owned} <V_l, grad_l>``,
the last element, see ``hpckfac.stages.layout``) to every rank. Summing the
partial sums in rank order gives the same float on every rank, hence the same
clip factor ``nu`` and the same update everywhere.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hpckfac.arrays import namespace
from hpckfac.stages.layout import SegmentLayout

if TYPE_CHECKING:
    from hpckfac.comm import Communicator


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
    # sqrt(kl_clip / total) / lr rather than sqrt(kl_clip / (lr^2 total)): lr^2 neither
    # overflows (lr = 1e155) nor underflows; lr = 0 gives inf, hence nu 1.
    with np.errstate(all="ignore"):
        nu = xp.minimum(1.0, xp.sqrt(kl_clip / total) / lr)
    nu = xp.where(total > 0, nu, 1.0)
    return xp.where(xp.isfinite(total), nu, np.nan)


class AllGather:
    """The AllGatherV of the preconditioned gradients, then the clip, for ``blocks`` under ``layout``."""

    def __init__(self, blocks: Sequence[Any], layout: SegmentLayout, comm: Communicator, xp: Any) -> None:
        self.blocks, self.layout, self.comm = list(blocks), layout, comm
        self.gathered: Any = None  # the last step's whole gathered buffer
        # Where each owner's partial KL sum sits in the gathered buffer (uploaded once, not per step).
        self._partial_at = xp.asarray([at for at in layout.partial_offsets if at is not None], dtype=np.int64)
        # The per-rank counts as an int64 array, made once (not P Python ints read at every step).
        self.counts = np.asarray(layout.gather_counts, dtype=np.int64)

    def __call__(self, out: Any, kl_clip: float | None, lr: float) -> tuple[list[Any], Any]:
        """``(nu * V_l for every block, nu)`` from this rank's segment ``out``; the results are
        views of one buffer shaped like each block's gradient matrix (``nu`` None without a clip)."""
        whole = self.gathered = self.comm.allgather_v(out, self.counts)
        nu = kl_clip_factor(whole, self._partial_at, kl_clip, lr)
        if nu is not None:
            whole *= nu.astype(whole.dtype)
        return [whole[at:at + b.grad_size].reshape(b.grad_shape)
                for at, b in zip(self.layout.gather_offsets, self.blocks)], nu
