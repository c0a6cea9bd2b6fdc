"""Stage 1: one rank's local statistics of one step, packed.

``LocalStatistics`` sums, over every call of every block during one step
(micro-batches, modules called several times), the unnormalised factors
``sum_i sum_t a a^T`` and ``(1/|T|) sum_i sum_t g g^T`` (Kronecker blocks,
via ``block.a_factor``/``block.g_factor``, accumulated in float32 or float64)
and the BatchNorm Fishers ``sum_i u_i u_i^T``; ``result()`` divides by the
number of examples the rank processed this step, giving the ``A``,
``G`` and ``F`` of docs/design.md for the local batch in the packed layout of
``hpckfac.stages.layout``. The output gradients passed in must be the
per-example loss gradients (see ``hpckfac.torch``).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hpckfac.stages.layout import BN_PACKED, block_spec

_BN_TRIU = ((0, 0), (0, 1), (1, 1))  # (F00, F01, F11)


class LocalStatistics:
    """Per-step accumulators of every block's packed local statistics.

    ``blocks`` are ``hpckfac.layers`` blocks in model order; ``dtype`` is the
    accumulation dtype (float32, or float64 for float64 models); ``xp`` the
    array namespace of the accumulators and of the arrays passed in
    (``numpy``, or ``cupy`` for a model on a GPU).
    """

    def __init__(self, blocks: Sequence[Any], dtype=np.float32, xp=np) -> None:
        self.blocks = list(blocks)
        self.specs = [block_spec(b) for b in self.blocks]
        self.dtype = np.dtype(dtype)
        self.examples = self.sampled = 0
        self._sums = [xp.zeros(s.stat_size, dtype=self.dtype) for s in self.specs]
        # Kronecker blocks need both an input and an output-gradient contribution.
        self._seen = [[False, False] for _ in self.specs]

    def reset(self) -> None:
        """Forget everything accumulated (start of a step)."""
        self.examples = self.sampled = 0
        for total, seen in zip(self._sums, self._seen):
            total[...] = 0.0
            seen[0] = seen[1] = False

    def add_examples(self, count: int, sampled: int | None = None) -> None:
        """Count ``count`` more examples processed by this rank this step, of which the
        Kronecker blocks' statistics take ``sampled`` (default: all of them)."""
        self.examples += int(count)
        self.sampled += int(count if sampled is None else sampled)

    def add_inputs(self, block: int, a) -> None:
        """Add ``sum a~ a~^T`` of a Kronecker block's layer input ``a``."""
        spec = self.specs[block]
        self._sums[block][:spec.d_A * (spec.d_A + 1) // 2] += self.blocks[block].a_factor(a, packed=True)
        self._seen[block][0] = True

    def add_output_grads(self, block: int, g, scale: float = 1.0) -> None:
        """Add ``scale * (1/|T|) sum g g^T`` of a Kronecker block's output
        gradients ``g`` (with ``g = g_i / s``, ``scale = s**2`` gives the factor of the
        per-example gradients, see ``hpckfac.torch``)."""
        spec = self.specs[block]
        self._sums[block][spec.d_A * (spec.d_A + 1) // 2:] += self.blocks[block].g_factor(g, scale, packed=True)
        self._seen[block][1] = True

    def add_batchnorm(self, block: int, x, g, scale: float = 1.0) -> None:
        """Add ``scale`` times the per-channel Fishers of a BatchNorm block from
        its input ``x`` and the gradients ``g`` of its output (``scale`` as in
        ``add_output_grads``)."""
        fisher = self.blocks[block].fisher(x, g, scale)
        packed = self._sums[block].reshape(-1, BN_PACKED)
        for k, (i, j) in enumerate(_BN_TRIU):
            packed[:, k] += fisher[:, i, j]
        self._seen[block][0] = self._seen[block][1] = True

    def result(self) -> list[Any]:
        """Each block's statistics divided by the examples they came from this step
        (the sampled ones for Kronecker blocks, all for BatchNorm), or None for a
        block without a complete contribution (not called)."""
        scales = {"kron": 1.0 / max(self.sampled, 1), "bn": 1.0 / max(self.examples, 1)}
        return [total * scales[spec.kind] if all(seen) else None
                for total, seen, spec in zip(self._sums, self._seen, self.specs)]
