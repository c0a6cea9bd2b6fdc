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

from hpckfac.arrays import namespace
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
        # Where each block's statistics start, and each rank's owned blocks with the span their
        # statistics fill (consecutive in the segment): the usual step copies a rank's
        # statistics with one call instead of one assignment per block.
        self._stat_at = [layout.stat_offset(l) for l in range(len(self.blocks))]
        self._stat_shapes = [(b.stat_size,) for b in self.blocks]
        self._stat_spans = [(owned, self._stat_at[owned[0]], self._stat_at[owned[0]] + sum(
            self.blocks[l].stat_size for l in owned)) for owned in layout.owned if owned]
        # The per-rank counts as int64 arrays, made once: the collective reads a list of P
        # Python ints element by element at every call, an array at once.
        self.counts = {f: np.asarray(layout.reduce_counts(f), dtype=np.int64) for f in (False, True)}
        # Over several ranks, where this rank's averaged segment is received, allocated once: the
        # larger one, of factor steps; a step without statistics fills its first part.
        rank = comm.rank
        self.received = None if comm.size == 1 else xp.empty(int(self.counts[True][rank]), dtype=dtype)

    def buffer(self, factors: bool) -> Any:
        """The send buffer of a step with (``factors``) or without statistics."""
        return self._send[factors]

    def __call__(self, grads: Sequence[Any], stats: Sequence[Any] | None) -> Any:
        """This rank's averaged segment (at one rank the send buffer itself, over several a view
        of ``received``; valid until the next call); ``stats`` is None on steps without
        statistics, else one packed array (or None: no statistics here this step) per block."""
        factors = stats is not None
        buf = self._fill(grads, stats)
        if self.comm.size == 1:  # the mean over one rank is the buffer itself, which the owner only reads
            return buf
        mine = self.received[:int(self.counts[factors][self.comm.rank])]
        return self.comm.reduce_scatter_v(buf, self.counts[factors], op="mean", out=mine)

    def _fill(self, grads, stats):
        factors = stats is not None
        buf = self._send[factors]
        if factors:
            self._fill_stats(buf, stats)
        for grad, slot in zip(grads, self.slots[factors]):
            if grad is not slot:  # a slot the caller filled already needs no copy
                slot[...] = grad
        return buf

    def _fill_stats(self, buf, stats) -> None:
        """Every block's statistics (zeros where None) and presence element into ``buf``."""
        # Statistics beyond a float16 buffer's range (65504) become inf, which the owner
        # refuses with its own warning: NumPy's on the cast would only repeat it.
        with np.errstate(over="ignore"):
            if all(getattr(s, "shape", None) == shape for s, shape in zip(stats, self._stat_shapes)):
                # The usual step: every presence is 1 and each rank's statistics are one copy
                # (the cast to the buffer's dtype rounds as an assignment does). Anything else,
                # a wrong size too, goes block by block, where an assignment names the mismatch.
                if self.blocks:
                    buf[self._presence] = 1.0
                xp = namespace(buf)
                for owned, start, stop in self._stat_spans:
                    xp.concatenate([stats[l] for l in owned], out=buf[start:stop])
                return
            for l, (block, at) in enumerate(zip(self.blocks, self._stat_at)):
                present = stats[l] is not None
                buf[at:at + block.stat_size] = stats[l] if present else 0.0
                buf[self.layout.presence_offset(l)] = float(present)
