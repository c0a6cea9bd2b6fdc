"""Buffer layouts of the two per-step collectives.

ReduceScatterV buffer (every rank sends the whole buffer, owner ``r`` receives
segment ``r`` averaged over ranks). Segment ``r`` holds, for the blocks ``r``
owns (in model order, except that blocks sharing a ``batch_key`` sit together,
at the first one's place, so that the owner preconditions them with one batched
product: ``owned``):

- on factor-update steps, each owned block's packed statistics
  (``stat_size`` elements), one after another, so that the owner can blend
  them into its running averages in one go; then one *presence* element per
  owned block, 1.0 if this rank has statistics for the block this step, else
  0.0 (None passed: the torch bridge passes it for a rank without examples, for a
  layer in eval() or whose statistics were dropped on this rank, and for a layer
  that no rank's micro-batch reached); after the mean the presence is the
  share of ranks that contributed, and the owner divides by it (or skips the
  update when it is 0);
- then, every step, each owned block's gradient matrix, row-major.

AllGatherV buffer: segment ``r`` holds the preconditioned gradients of the
blocks ``r`` owns followed by ``PARTIAL_SLOTS`` elements, ``r``'s partial sum
``sum_l <V_l, grad_l>`` for the KL clip as a mantissa and a power of two
(``hpckfac.stages.all_gather.encode_partial``), so that a float16 buffer
carries sums beyond its largest value, 65504. A rank that owns nothing has an empty
segment in both collectives (count 0).

A block's packed statistics and gradient matrix are laid out as the block
says (``CurvatureBlock.factor_shapes``, ``grad_shape``); the layout only needs
their sizes and the blocks' ``batch_key``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# Elements of an owner's partial KL-clip sum in its AllGatherV segment: mantissa and exponent.
PARTIAL_SLOTS = 2


def _runs(indices: list[int], blocks: Sequence) -> list[list[int]]:
    """``indices`` in model order, grouped: blocks sharing a ``batch_key`` (not None) form one
    run at the first one's place; every other block is a run of its own."""
    runs: dict = {}
    for l in indices:
        key = blocks[l].batch_key
        runs.setdefault(("alone", l) if key is None else key, []).append(l)
    return list(runs.values())


class SegmentLayout:
    """Offsets of every block in the ReduceScatterV and AllGatherV buffers.

    ``blocks`` are ``CurvatureBlock``s (anything with ``stat_size``, ``grad_size``
    and ``batch_key``); ``owners[l]`` is the rank owning block ``l``. Offsets are into the whole
    buffer; ``segment_start`` converts to offsets inside one rank's segment.
    """

    def __init__(self, blocks: Sequence, owners: list[int], size: int) -> None:
        self.blocks, self.owners, self.size = list(blocks), list(owners), int(size)
        # runs[r]: rank r's blocks grouped by batch_key (the owner preconditions a run at once);
        # owned[r]: the same blocks, run after run, the order of r's segments.
        self.runs = [_runs([l for l, o in enumerate(self.owners) if o == r], self.blocks) for r in range(self.size)]
        self.owned = [[l for run in runs for l in run] for runs in self.runs]
        # reduce[factors]: (counts per rank, stat offset per block, presence offset per block,
        # grad offset per block)
        self.reduce = {factors: self._reduce_layout(factors) for factors in (False, True)}
        self.gather_counts, self.gather_offsets, self.partial_offsets = self._gather_layout()

    def _reduce_layout(self, factors: bool):
        counts = [0] * self.size
        stat_at, presence_at, grad_at = [0] * len(self.blocks), [0] * len(self.blocks), [0] * len(self.blocks)
        start = 0
        for rank, blocks in enumerate(self.owned):
            offset = start
            if factors:
                for l in blocks:
                    stat_at[l] = offset
                    offset += self.blocks[l].stat_size
                for l in blocks:
                    presence_at[l] = offset
                    offset += 1
            for l in blocks:
                grad_at[l] = offset
                offset += self.blocks[l].grad_size
            counts[rank], start = offset - start, offset
        return counts, stat_at, presence_at, grad_at

    def _gather_layout(self):
        counts, at, partial = [0] * self.size, [0] * len(self.blocks), [None] * self.size
        start = 0
        for rank, blocks in enumerate(self.owned):
            offset = start
            for l in blocks:
                at[l] = offset
                offset += self.blocks[l].grad_size
            if blocks:
                partial[rank] = offset
                offset += PARTIAL_SLOTS
            counts[rank], start = offset - start, offset
        return counts, at, partial

    def reduce_counts(self, factors: bool) -> list[int]:
        """ReduceScatterV count of each rank's segment."""
        return self.reduce[factors][0]

    def reduce_total(self, factors: bool) -> int:
        """Length of the whole ReduceScatterV buffer."""
        return sum(self.reduce[factors][0])

    def stat_offset(self, block: int) -> int:
        """Start of block's statistics on factor-update steps."""
        return self.reduce[True][1][block]

    def presence_offset(self, block: int) -> int:
        """Where block's presence element sits on factor-update steps."""
        return self.reduce[True][2][block]

    def grad_offset(self, block: int, factors: bool) -> int:
        """Start of block's gradient in the ReduceScatterV buffer."""
        return self.reduce[factors][3][block]

    def segment_start(self, rank: int, counts: list[int]) -> int:
        """Offset of ``rank``'s segment in a buffer with per-rank ``counts``."""
        return int(np.sum(counts[:rank], dtype=np.int64))
