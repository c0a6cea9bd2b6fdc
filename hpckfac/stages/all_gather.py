"""Stage 4: the owners' preconditioned gradients to every rank, and the KL clip.

One ``comm.allgather_v`` brings every owner's segment (its blocks'
preconditioned gradients and its partial sum ``sum_{l owned} <V_l, grad_l>``,
the last two elements, see ``hpckfac.stages.layout``) to every rank. Summing the
partial sums in rank order gives the same float on every rank, hence the same
clip factor ``nu`` and the same update everywhere. A partial sum travels as a
mantissa and a power of two (``encode_partial``): in a float16 buffer the sum of
a large model's ``<V_l, grad_l>`` passes 65504 long before any gradient does, and
as one element it would turn into inf, nu into NaN and the update into NaN.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hpckfac.arrays import namespace
from hpckfac.stages.layout import SegmentLayout

if TYPE_CHECKING:
    from hpckfac.comm import Communicator


def encode_partial(partial: Any, out: Any) -> None:
    """Write the float64 0-d ``partial`` into the two elements of ``out`` as its mantissa in
    [0.5, 1) and its power of two (``frexp``): the exponent is an integer within +-1075, exact in
    every buffer dtype, and the mantissa keeps the buffer's precision at any magnitude."""
    xp = namespace(out)
    mantissa, exponent = xp.frexp(partial)
    out[0] = mantissa
    out[1] = exponent


def decode_partials(gathered: Any, partial_at: Any) -> Any:
    """The owners' partial sums (float64) from ``gathered``, each written by ``encode_partial``
    at the index in ``partial_at``."""
    xp = namespace(gathered)
    mantissa = gathered[partial_at].astype(np.float64)
    exponent = gathered[partial_at + 1].astype(np.int32)
    return xp.ldexp(mantissa, exponent)


def kl_clip_factor(gathered: Any, partial_at: Any, kl_clip: float | None, lr: float) -> Any:
    """``nu = min(1, sqrt(kl_clip / (lr^2 * sum_l <V_l, grad_l>)))`` as a float64
    0-d array of ``gathered``'s namespace (computed where the gradients live, so
    a GPU step does not wait for it), or None when ``kl_clip`` is None.
    ``partial_at`` (an index array in that namespace) says where the owners'
    partial sums sit (``SegmentLayout.partial_offsets``, written by ``encode_partial``).

    1 when the sum is not positive or ``lr`` is 0; NaN when the sum is not
    finite (non-finite gradients), so that the update is non-finite too and a
    GradScaler skips the step.
    """
    if kl_clip is None:
        return None
    xp = namespace(gathered)
    total = decode_partials(gathered, partial_at).sum()
    # sqrt(kl_clip / total) / lr rather than sqrt(kl_clip / (lr^2 total)): lr^2 neither
    # overflows (lr = 1e155) nor underflows; lr = 0 gives inf, hence nu 1.
    with np.errstate(all="ignore"):
        nu = xp.minimum(1.0, xp.sqrt(kl_clip / total) / lr)
    nu = xp.where(total > 0, nu, 1.0)
    return xp.where(xp.isfinite(total), nu, np.nan)


class AllGather:
    """The AllGatherV of the preconditioned gradients, then the clip, for ``blocks`` under ``layout``.

    Both buffers are allocated once, in ``dtype`` and ``xp``: ``segment``, where this rank's
    owner writes its results and partial KL sum, and ``gathered``, every owner's segment after
    the collective, scaled in place by the clip. At one rank they are one buffer: the owner's
    results are the whole result.
    """

    def __init__(self, blocks: Sequence[Any], layout: SegmentLayout, comm: Communicator, dtype: Any,
                 xp: Any) -> None:
        self.blocks, self.layout, self.comm = list(blocks), layout, comm
        self.gathered = xp.empty(sum(layout.gather_counts), dtype=dtype)
        self.segment = self.gathered if comm.size == 1 else xp.empty(layout.gather_counts[comm.rank], dtype=dtype)
        # The results' views of the gathered buffer, made once: the caller's views of it (one per
        # parameter in the torch bridge) are made once too.
        self._results = [self.gathered[at:at + b.grad_size].reshape(b.grad_shape)
                         for at, b in zip(layout.gather_offsets, self.blocks)]
        # Where each owner's partial KL sum sits in the gathered buffer (uploaded once, not per step).
        self._partial_at = xp.asarray([at for at in layout.partial_offsets if at is not None], dtype=np.int64)
        # The per-rank counts as an int64 array, made once (not P Python ints read at every step).
        self.counts = np.asarray(layout.gather_counts, dtype=np.int64)

    def __call__(self, kl_clip: float | None, lr: float) -> tuple[list[Any], Any]:
        """``(nu * V_l for every block, nu)`` from every rank's ``segment``; the results are
        views of ``gathered`` shaped like each block's gradient matrix, overwritten by the next
        call (``nu`` None without a clip)."""
        whole = self.gathered
        if self.comm.size > 1:
            self.comm.allgather_v(self.segment, self.counts, out=whole)
        nu = kl_clip_factor(whole, self._partial_at, kl_clip, lr)
        if nu is not None:  # in place: the same products as into another buffer
            namespace(whole).multiply(whole, nu.astype(whole.dtype), out=whole)
        return self._results, nu
