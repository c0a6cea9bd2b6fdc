"""Stage 1: one rank's local statistics of one step, packed.

``LocalStatistics`` sums, over every call of every block during one step
(micro-batches, modules called several times), each block's unnormalised
statistics (``CurvatureBlock.add_input`` / ``add_output_grad``, accumulated in
float32 or float64); ``result()`` divides by the number of examples the rank
processed this step, giving the ``A``, ``G`` and ``F`` of docs/design.md for
the local batch, packed as each block lays them out. The output gradients
passed in must be the per-example loss gradients (see ``hpckfac.torch``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class LocalStatistics:
    """Per-step accumulators of every block's packed local statistics.

    ``blocks`` are ``hpckfac.layers`` blocks in model order; ``dtype`` is the
    accumulation dtype (float32, or float64 for float64 models); ``xp`` the
    array namespace of the accumulators and of the arrays passed in
    (``numpy``, or ``cupy`` for a model on a GPU).
    """

    def __init__(self, blocks: Sequence[Any], dtype=np.float32, xp=np) -> None:
        self.blocks = list(blocks)
        self.dtype = np.dtype(dtype)
        self.examples = self.sampled = 0
        self._sums = [xp.zeros(b.stat_size, dtype=self.dtype) for b in self.blocks]
        # A contribution needs both the input and the output-gradient part.
        self._seen = [[False, False] for _ in self.blocks]
        # What each block's forward part left for its backward part, last call last (backward runs in reverse).
        self._saved: list[list] = [[] for _ in self.blocks]

    def reset(self) -> None:
        """Forget everything accumulated (start of a step)."""
        self.examples = self.sampled = 0
        for total, seen, saved in zip(self._sums, self._seen, self._saved):
            if seen[0] or seen[1]:  # only what was added to: steps without statistics clear nothing
                total[...] = 0.0
            seen[0] = seen[1] = False
            saved.clear()

    def add_examples(self, count: int, sampled: int | None = None) -> None:
        """Count ``count`` more examples processed by this rank this step, of which the
        statistics of sampling blocks take ``sampled`` (default: all of them)."""
        self.examples += int(count)
        self.sampled += int(count if sampled is None else sampled)

    def add_inputs(self, block: int, a) -> None:
        """Add the contribution of block ``block``'s layer input ``a`` (one call)."""
        self._saved[block].append(self.blocks[block].add_input(self._sums[block], a))
        self._seen[block][0] = True

    def add_output_grads(self, block: int, g, scale: float = 1.0) -> None:
        """Add ``scale`` times the contribution of block ``block``'s output gradients ``g``
        (with ``g = g_i / s``, ``scale = s**2`` gives that of the per-example gradients,
        see ``hpckfac.torch``), paired with the latest call's input not yet paired."""
        if not self._saved[block]:
            return  # an output gradient without a captured input (e.g. the input came from a no-grad pass)
        self.blocks[block].add_output_grad(self._sums[block], g, scale, self._saved[block].pop())
        self._seen[block][1] = True

    def result(self) -> list[Any]:
        """Each block's statistics divided by the examples they came from this step
        (the sampled ones for sampling blocks, all for the others), or None for a
        block without a complete contribution (not called)."""
        sampled, every = 1.0 / max(self.sampled, 1), 1.0 / max(self.examples, 1)
        return [total * (sampled if block.uses_sample else every) if all(seen) else None
                for total, seen, block in zip(self._sums, self._seen, self.blocks)]
