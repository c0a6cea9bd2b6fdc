"""Stage 2: every block's statistics and gradient to its owner, in one ReduceScatterV.

``ReduceScatter`` fills the send buffer laid out by
``hpckfac.stages.layout.SegmentLayout`` (on factor-update steps the packed
statistics with their presence element, every step the gradient matrices)
and calls one ``comm.reduce_scatter_v(..., op="mean")``; the owner of each
block receives the average over ranks of its own blocks only. ``slots`` are the
gradient matrices' places in the send buffers: a caller that writes the
gradients there (``CurvatureBlock.grad_matrix(..., out=slot)``) saves a copy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from numpy.typing import DTypeLike

from hpckfac.stages.layout import SegmentLayout

if TYPE_CHECKING:
    from hpckfac.comm import Communicator


class ReduceScatter:
    """Send buffers (one per step kind, allocated once in ``xp``) and the collective.

    ``dtype`` is the dtype the whole buffer travels in (``comm_dtype``).
    """

    def __init__(self, blocks: Sequence[Any], layout: SegmentLayout, comm: Communicator, dtype: DTypeLike,
                 xp: Any) -> None:
        self.blocks, self.layout, self.comm = list(blocks), layout, comm
        self._send = {f: xp.zeros(layout.reduce_total(f), dtype=dtype) for f in (False, True)}
        # Each block's gradient matrix inside each send buffer, made once.
        self.grad_offsets = {f: [layout.grad_offset(l, f) for l in range(len(self.blocks))] for f in (False, True)}
        self.slots = {f: [self._send[f][at:at + b.grad_size].reshape(b.grad_shape)
                          for at, b in zip(self.grad_offsets[f], self.blocks)] for f in (False, True)}
        # Every presence element of the factor-step buffer, so that the usual step (statistics
        # for every block) sets them all with one assignment.
        self._presence = xp.asarray([layout.presence_offset(l) for l in range(len(self.blocks))], dtype=np.int64)
        # The per-rank counts as int64 arrays, made once: the collective reads a list of P
        # Python ints element by element at every call, an array at once.
        self.counts = {f: np.asarray(layout.reduce_counts(f), dtype=np.int64) for f in (False, True)}

    def buffer(self, factors: bool) -> Any:
        """The send buffer of a step with (``factors``) or without statistics."""
        return self._send[factors]

    def __call__(self, grads: Sequence[Any], stats: Sequence[Any] | None) -> Any:
        """This rank's averaged segment; ``stats`` is None on steps without statistics,
        else one packed array (or None: no statistics here this step) per block."""
        factors = stats is not None
        return self.comm.reduce_scatter_v(self._fill(grads, stats), self.counts[factors], op="mean")

    def _fill(self, grads, stats):
        factors = stats is not None
        buf = self._send[factors]
        everywhere = factors and all(s is not None for s in stats)
        if everywhere and self.blocks:
            buf[self._presence] = 1.0
        for l, block in enumerate(self.blocks):
            if factors:
                at = self.layout.stat_offset(l)
                present = stats[l] is not None
                if present:
                    # Statistics beyond a float16 buffer's range (65504) become inf, which the owner
                    # refuses with its own warning: NumPy's on the cast would only repeat it.
                    with np.errstate(over="ignore"):
                        buf[at:at + block.stat_size] = stats[l]
                else:
                    buf[at:at + block.stat_size] = 0.0
                if not everywhere:
                    buf[self.layout.presence_offset(l)] = float(present)
            slot = self.slots[factors][l]
            if grads[l] is not slot:  # a slot the caller filled already needs no copy
                slot[...] = grads[l]
        return buf
