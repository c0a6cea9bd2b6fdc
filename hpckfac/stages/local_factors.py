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

import weakref
from typing import Any, Sequence

import numpy as np
from numpy.typing import DTypeLike


_EMPTY = object()  # what an empty batch's call leaves for its backward part


class LocalStatistics:
    """Per-step accumulators of every block's packed local statistics.

    ``blocks`` are ``hpckfac.layers`` blocks in model order; ``dtype`` is the
    accumulation dtype (float32, or float64 for float64 models); ``xp`` the
    array namespace of the accumulators and of the arrays passed in
    (``numpy``, or ``cupy`` for a model on a GPU).

    Examples are counted per forward pass (``add_examples``) and a pass counts
    only once a backward reached one of its calls, so a training forward that
    is never backpropagated adds no examples. A block's input part is added
    when its layer runs; a call whose output gradient never comes leaves that
    part without its pair, and the block's statistics of the step are then
    dropped (``unpaired``) rather than returned with the wrong weight.
    """

    def __init__(self, blocks: Sequence[Any], dtype: DTypeLike = np.float32, xp: Any = np) -> None:
        self.blocks = list(blocks)
        self.dtype = np.dtype(dtype)
        # One buffer, one view per block: ``result`` scales all blocks with one product.
        ends = np.cumsum([0] + [b.stat_size for b in self.blocks]).tolist()
        self._flat = xp.zeros(ends[-1], dtype=self.dtype)
        self._spans = list(zip(ends[:-1], ends[1:]))
        self._sums = [self._flat[a:b] for a, b in self._spans]
        self._samples = any(b.uses_sample for b in self.blocks)
        # A contribution needs both the input and the output-gradient part.
        self._seen = [[False, False] for _ in self.blocks]
        # Per block, call id -> (pass, what its forward part left for its backward part).
        self._saved: list[dict[int, tuple]] = [{} for _ in self.blocks]
        # Call ids whose output gradient was taken this step: a second backward through the same
        # forward brings another gradient for them.
        self._paired: set[int] = set()
        self._calls = 0
        # The latest call's (input key, source, input part), the source's first item held weakly:
        # the next call of a block with that key on the same source adds the part again instead
        # of reducing the input anew.
        self._last_input: tuple | None = None
        # Per forward pass: [examples, sampled examples, whether a backward reached it].
        self._passes: list[list] = []

    @property
    def nbytes(self) -> int:
        """Bytes of the accumulators: every block's packed statistics, in ``dtype``."""
        return int(self._flat.nbytes)

    def reset(self) -> None:
        """Forget everything accumulated (start of a step)."""
        self._passes.clear()
        self._paired.clear()
        self._last_input = None  # the part of an input of the step before
        # Only what was added to: steps without statistics clear nothing; a factor step that
        # reached every block clears them all at once.
        touched = [seen[0] or seen[1] for seen in self._seen]
        if touched and all(touched):
            self._flat[...] = 0.0
        else:
            for total, added in zip(self._sums, touched):
                if added:
                    total[...] = 0.0
        for seen, saved in zip(self._seen, self._saved):
            seen[0] = seen[1] = False
            saved.clear()

    @property
    def examples(self) -> int:
        """Examples of this step's forward passes that a backward reached."""
        return sum(count for count, _, used in self._passes if used)

    @property
    def passes(self) -> int:
        """This step's forward passes that a backward reached, and those of no examples (an
        empty micro-batch among accumulated ones: nothing to reach, its loss maybe left out)."""
        return sum(1 for count, _, used in self._passes if used or not count)

    @property
    def sampled(self) -> int:
        """The part of ``examples`` the statistics of sampling blocks take."""
        return sum(sampled for _, sampled, used in self._passes if used)

    @property
    def unpaired(self) -> list[int]:
        """Blocks whose layer ran in a forward this step without its output gradient coming
        back (their statistics are dropped: ``result`` gives None for them). A call on no
        examples added nothing, so its missing output gradient (an empty micro-batch's NaN
        loss left out of backward) drops nothing."""
        return [i for i, saved in enumerate(self._saved) if any(left is not _EMPTY for _, left in saved.values())]

    def add_examples(self, count: int, sampled: int | None = None) -> None:
        """Start a forward pass of ``count`` examples, of which the statistics of sampling
        blocks take ``sampled`` (default: all of them)."""
        # A new pass shares no input part with the one before: a tensor it takes again may hold new
        # values under the same version (a NumPy buffer refilled under torch.from_numpy).
        self._last_input = None
        self._passes.append([int(count), int(count if sampled is None else sampled), False])

    def add_inputs(self, block: int, a: Any, output_size: Sequence[int] | None = None,
                   source: tuple | None = None) -> int:
        """Add the contribution of block ``block``'s layer input ``a`` (one call, in the
        latest forward pass; ``a``'s first axis holds the examples). ``output_size``: the
        spatial size of the call's output, for a block whose ``A`` depends on it beyond its
        input (``ConvTransposeBlock``: ``forward(x, output_size=...)``). ``source``: what ``a``
        was made from, a tuple whose first item (a tensor or an array, held weakly) is compared
        by identity and the others by ``==``, equal for two calls only when their ``a`` holds
        the same values; a call on the source of the call before in the same forward pass, by
        a block of the same ``input_key``, reuses that call's input part (the same values: the
        same reduction of the same input). Returns the call's id, which ``add_output_grads``
        takes to pair this call's output gradient with it."""
        self._calls += 1
        last, self._last_input = self._last_input, None
        # An empty batch: nothing to add, only the call to pair. So too for rows in a pass of no
        # examples (a batch-shared input, (1, T) positions, beside an empty batch): they stand
        # for no example, and the step's count would not include them.
        if not a.shape[0] or (self._passes and not self._passes[-1][0]):
            self._saved[block][self._calls] = (-1, _EMPTY)
            return self._calls
        extra = {} if output_size is None else {"output_size": output_size}
        target = self.blocks[block]
        key = None if source is None else target.input_key
        if key is None:
            saved = target.add_input(self._sums[block], a, **extra)
        else:
            if last is not None and last[0] == key and _same_source(last[1], source):
                part = last[2]
            else:
                part = target.input_part(a)
            saved = target.add_input_part(self._sums[block], part)
            # Weakly: a tensor held here would keep the autograd graph of a forward never
            # backpropagated, and every activation it saved, after the caller let it go.
            self._last_input = (key, (weakref.ref(source[0]),) + tuple(source[1:]), part)
        self._saved[block][self._calls] = (len(self._passes) - 1, saved)
        self._seen[block][0] = True
        return self._calls

    def add_output_grads(self, block: int, g: Any, scale: float, call: int) -> bool:
        """Add ``scale`` times the contribution of block ``block``'s output gradients ``g``
        (with ``g = g_i / s``, ``scale = s**2`` gives that of the per-example gradients,
        see ``hpckfac.torch``), paired with the input of call ``call`` (an id from
        ``add_inputs``) whatever order the backward passes run in.

        Returns False, adding nothing, when ``call``'s output gradient was already added this
        step: a second backward through the same forward. The statistics need the gradient
        summed over the backward passes before its outer product, which the first one's
        contribution, already added, no longer allows."""
        if call in self._paired:
            return False
        if call not in self._saved[block]:
            # A call from before the last reset (an earlier step): its input part is gone.
            return True
        forward, saved = self._saved[block].pop(call)
        self._paired.add(call)
        if saved is _EMPTY:
            return True
        self.blocks[block].add_output_grad(self._sums[block], g, scale, saved)
        self._seen[block][1] = True
        if forward >= 0:
            self._passes[forward][2] = True
        return True

    def result(self) -> list[Any]:
        """Each block's statistics divided by the examples they came from this step
        (the sampled ones for sampling blocks, all for the others), or None for a
        block without a complete contribution: not called, called only on examples
        that did not count (none), or with a call left ``unpaired``."""
        examples, sampled = self.examples, self.sampled
        unpaired = set(self.unpaired)
        if examples and (sampled == examples or not self._samples):
            # Every block divides by the same count: one product for all of them, each block's
            # result a view of it (elementwise, so the values of one product per block).
            scaled = self._flat * (1.0 / examples)
            return [scaled[a:b] if all(seen) and i not in unpaired else None
                    for i, ((a, b), seen) in enumerate(zip(self._spans, self._seen))]
        out = []
        for i, (total, seen, block) in enumerate(zip(self._sums, self._seen, self.blocks)):
            count = sampled if block.uses_sample else examples
            out.append(total * (1.0 / count) if all(seen) and i not in unpaired and count else None)
        return out


def _same_source(old: tuple, new: tuple) -> bool:
    """Whether an ``add_inputs`` source kept with its first item as a weak reference is
    the same as ``new``: the first items the same object (a freed one matches nothing), the
    others equal."""
    return len(old) == len(new) and old[0]() is new[0] and old[1:] == new[1:]
