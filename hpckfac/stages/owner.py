"""Stage 3: what an owner does with the blocks it owns.

Running averages of the packed statistics (``ops.ema_update``, which refuses
non-finite values); on inverse-update steps the damped inverses of every
owned block's factor stacks (``CurvatureBlock.factors`` and ``damping``), with
all matrices of the same order, from all blocks, inverted in one
``ops.damped_inverse`` call; every step the preconditioned gradients
(``CurvatureBlock.precondition``) and the owner's share of the KL-clip sum.

A block whose factors were never set (every update so far refused) passes its
gradient through unpreconditioned; a block with factors but no inverse yet is
inverted at the step that first needs it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numpy.typing import DTypeLike

from hpckfac import arrays, ops
from hpckfac.log import get_logger
from hpckfac.stages.layout import SegmentLayout
from hpckfac.stages.state_buffer import pack_block_state, state_elements

_log = get_logger("hpckfac.stages.owner")


def float64_dot(x: Any, y: Any) -> Any:
    """``sum(x * y)`` of two 1-D arrays as a float64 0-d array of their namespace, the products
    taken in float64 too: in float32 a product of finite elements beyond 3.4e38 (gradients of
    1e20) is inf, and the KL clip would make the update NaN."""
    xp = arrays.namespace(x)
    if xp is np:  # casts through NumPy's small buffers: no float64 copy of the gradients
        return np.asarray(np.einsum("i,i->", x, y, dtype=np.float64))
    return xp.multiply(x, y, dtype=np.float64).sum()


class OwnerState:
    """Running statistics and inverses of the blocks ``rank`` owns under ``layout``.

    Block ``i`` here is the ``i``-th owned block in the layout's order
    (``SegmentLayout.owned``). ``dtype`` is the dtype of the running statistics,
    the inverses and the preconditioning arithmetic; ``xp`` the array namespace
    (``numpy``, ``cupy``) they live in.
    """

    def __init__(self, blocks: Sequence[Any], layout: SegmentLayout, rank: int, dtype: DTypeLike,
                 xp: Any = np) -> None:
        self.layout, self.rank = layout, rank
        self.owned = layout.owned[rank]
        self.blocks = [blocks[l] for l in self.owned]
        self.dtype, self.xp = np.dtype(dtype), xp
        # One buffer, one view per block: the usual factor step blends all of them at once.
        sizes = [b.stat_size for b in self.blocks]
        self._running = xp.zeros(sum(sizes), dtype=self.dtype)
        ends = np.cumsum([0] + sizes)
        self.running = [self._running[a:b] for a, b in zip(ends[:-1], ends[1:])]
        self.initialized = [False] * len(self.blocks)
        self.inverses: list[list | None] = [None] * len(self.blocks)
        self.refused = 0
        # The layout's runs (blocks sharing a batch_key, side by side) as (first, last + 1) here.
        # A run whose blocks all have inverses keeps them as one stack per slot (views of the
        # inversion's result, or of a copy when they came from different steps or a checkpoint)
        # and is preconditioned with one batched product.
        ends = np.cumsum([0] + [len(run) for run in layout.runs[rank]])
        self._runs = list(zip(ends[:-1].tolist(), ends[1:].tolist()))
        self._run_of = {i: r for r, (lo, hi) in enumerate(self._runs) for i in range(lo, hi)}
        # Elements of each run's gradients, summed once rather than at every step.
        self._run_sizes = [sum(b.grad_size for b in self.blocks[lo:hi]) for lo, hi in self._runs]
        self._stacks: dict[int, list] = {}
        # Where this rank's segment starts in each kind of step's buffer: a sum over the ranks
        # before it, taken once here rather than at every step (thousands of ranks).
        self._base = {factors: layout.segment_start(rank, layout.reduce_counts(factors))
                      for factors in (False, True)}
        # Where the owned statistics (consecutive) and each block's presence share sit in this
        # rank's factor-step segment.
        base = self._base[True]
        self._stats_at = layout.stat_offset(self.owned[0]) - base if self.owned else 0
        self._presence_at = xp.asarray([layout.presence_offset(l) - base for l in self.owned], dtype=np.int64)

    def update_all(self, segment: Any, decay: float) -> None:
        """Blend the averaged statistics of a factor-update step's ``segment`` into the running
        averages (``decay``: the weight of the old value)."""
        if not self.blocks:
            return
        xp = self.xp
        base = self._base[True]
        # Two reads per step, whatever the number of blocks: the presence shares (which blocks
        # to update, and by what to divide), then the updates' finiteness at once (so the
        # updates are held until then: one copy of the owned statistics).
        presence = arrays.to_host(segment[self._presence_at]).tolist()
        if all(p == 1.0 for p in presence) and all(self.initialized):
            # The usual step: every rank had every block's statistics, every block has a running
            # average: one check and one blend for all blocks (a few launches on a GPU instead of
            # a few per block). Elementwise, so the same values as block by block. The blend only
            # reads the statistics: a view of the segment, cast only where its dtype differs.
            new = segment[self._stats_at:self._stats_at + self._running.size].astype(self.dtype, copy=False)
            if bool(arrays.to_host(xp.isfinite(new).all())):
                ops.ema_update(self._running, new, decay, finite=True)
                return
        updates = {}
        for i, (l, block) in enumerate(zip(self.owned, self.blocks)):
            if presence[i] > 0.0:
                at = self.layout.stat_offset(l) - base
                updates[i] = self._averaged(segment[at:at + block.stat_size], presence[i])
        if not updates:
            return
        finite = arrays.to_host(xp.stack([xp.isfinite(new).all() for new in updates.values()])).tolist()
        refused = [self.blocks[i].name for (i, new), ok in zip(updates.items(), finite)
                   if not self._blend(i, new, decay, bool(ok))]
        if refused:  # one line per update, not one per block: a diverged model refuses them all
            _log.warning("non-finite statistics refused for blocks %s; the running averages keep their old "
                         "values", ", ".join(map(str, refused)))

    def _averaged(self, received, presence: float):
        """The mean over the ranks that contributed (the reduction averaged over all ranks)."""
        new = received.astype(self.dtype)
        if presence != 1.0:
            new /= presence
        return new

    def _blend(self, i: int, new, decay: float, finite: bool) -> bool:
        """Block ``i``'s running average takes ``new`` unless it is not finite (refused, counted);
        whether it took it."""
        if not ops.ema_update(self.running[i], new, decay, first=not self.initialized[i], finite=finite):
            self.refused += 1
            return False
        self.initialized[i] = True
        return True

    def invert(self, damping: float, missing_only: bool = False) -> None:
        """Damped inverses of every initialized block (or only of those without
        one), same-order matrices of all blocks batched into one ``damped_inverse`` call.

        Memory: each order's matrices are unpacked straight into that order's batch (no
        unpacked stacks and a concatenation of them), the inversion forms the damped matrices in
        that batch, and each batch is released once inverted, before the next order's; the
        inverses being replaced are released before the new ones are formed."""
        xp = self.xp
        chosen = [i for i in range(len(self.blocks))
                  if self.initialized[i] and not (missing_only and self.inverses[i] is not None)]
        groups: dict[int, list] = {}  # order -> [(slot, block, count)]
        for i in chosen:
            for slot, (count, n) in enumerate(self.blocks[i].factor_shapes):
                groups.setdefault(n, []).append((slot, i, count))
            self.inverses[i] = [None] * len(self.blocks[i].factor_shapes)
            self._stacks.pop(self._run_of[i], None)  # replaced below, or the run restacked
        batches, spans = {}, {}  # order -> its matrices; (block, slot) -> (order, start, stop)
        for n, items in groups.items():
            # Slot by slot, blocks in order: a run's matrices of one slot end up consecutive.
            items.sort(key=lambda item: (item[0], item[1]))
            batches[n] = xp.empty((sum(count for _, _, count in items), n, n), dtype=self.dtype)
            start = 0
            for slot, i, count in items:
                spans[(i, slot)] = (n, start, start + count)
                start += count
        damps = self._unpack(chosen, batches, spans, damping)
        placed = {}  # (block, slot) -> (the inversion's result, start, stop)
        for n, items in groups.items():
            damp = [damps.pop((i, slot)) for slot, i, _ in items]
            damp = xp.concatenate(damp) if len(damp) > 1 else damp[0]
            # The batch is ours (unpacked above): the inversion may overwrite it. C order
            # whatever the solver returned (LAPACK's are column-major per matrix): inverses
            # loaded from a checkpoint are C-ordered, and the products must round the same way
            # for a resumed run to follow the uninterrupted one bit for bit. The damping is passed
            # as the blocks give it (float64): a term beyond the state's dtype (pi*sqrt(l) of 1e39
            # in float32) is the inversion's to take (its float64 eigen fallback), where the cast
            # would make it an inf that the inversion refuses.
            result = xp.ascontiguousarray(ops.damped_inverse(batches.pop(n), damp, overwrite_mats=True).inverse)
            for slot, i, count in items:
                _, start, stop = spans[(i, slot)]
                self.inverses[i][slot] = result[start:stop]
                placed[(i, slot)] = (result, start, stop)
        for r in {self._run_of[i] for i, _ in placed}:
            stacks = self._run_stack(r, placed)
            if stacks is not None:
                self._stacks[r] = stacks
            else:  # not all inverted now: stacked if the others have inverses from earlier steps
                self._stacks.pop(r, None)
                self._restack_run(r)

    def _unpack(self, chosen: list[int], batches: dict, spans: dict, damping: float) -> dict:
        """Unpack the running statistics of the ``chosen`` blocks into their places in
        ``batches`` (``spans``: (block, slot) -> (order, start, stop)) and return each stack's
        damping by (block, slot). Keeps no views of the batches: each is released once inverted."""
        damps = {}
        for i in chosen:
            block = self.blocks[i]
            where = [spans[(i, slot)] for slot in range(len(block.factor_shapes))]
            stacks = block.factors(self.running[i], [batches[n][a:b] for n, a, b in where])
            for slot, damp in enumerate(block.damping(stacks, damping)):
                damps[(i, slot)] = damp
        return damps

    def _run_stack(self, r: int, placed: dict) -> list | None:
        """Run ``r``'s inverses as one stack per slot (views), if this inversion placed them
        back to back; else None (its blocks are then preconditioned one by one)."""
        lo, hi = self._runs[r]
        if self.blocks[lo].batch_key is None:
            return None
        stacks = []
        for slot in range(len(self.blocks[lo].factor_shapes)):
            spans = [placed.get((i, slot)) for i in range(lo, hi)]
            if any(span is None for span in spans):
                return None
            whole, start, stop = spans[0][0], spans[0][1], spans[-1][2]
            if any(a[0] is not whole or a[2] != b[1] for a, b in zip(spans, spans[1:])):
                return None
            stacks.append(whole[start:stop])
        return stacks

    def missing_inverses(self) -> bool:
        """Whether a block has running statistics but no inverse yet (its first statistics
        came on a step that does not invert)."""
        return any(ok and inv is None for ok, inv in zip(self.initialized, self.inverses))

    def precondition(self, segment: Any, factors: bool, out: Any) -> Any:
        """Write each owned block's preconditioned gradient (read from ``segment``, the
        step's averaged segment; a block without an inverse passes its gradient on) into
        consecutive slices of ``out`` and return
        ``sum_i <V_i, grad_i>`` as a float64 0-d array of the state's namespace
        (it stays on the device)."""
        base = self._base[factors]
        # The owned gradients are consecutive in the segment, in the order ``out`` takes them.
        first = self.layout.grad_offset(self.owned[0], factors) - base if self.owned else 0
        grads = segment[first:first + out.size].astype(self.dtype, copy=False)  # one cast for all blocks
        # Non-finite gradients (a GradScaler's overflow step) give non-finite products on purpose.
        with np.errstate(invalid="ignore", over="ignore"):
            self._precondition_runs(grads, out)
            # One sum for all blocks rather than a dot per block (a few launches instead of
            # hundreds on a GPU). Non-finite gradients make it NaN: the KL clip then passes them on.
            return float64_dot(out, grads)

    def _precondition_runs(self, grads, out) -> None:
        """Each owned run's preconditioned gradients (read from ``grads``) into ``out``."""
        at = 0
        for r, (lo, hi) in enumerate(self._runs):
            stacks = self._stacks.get(r)
            if stacks is not None:  # one batched product for the whole run
                size = self._run_sizes[r]
                self.blocks[lo].precondition_batch_into(grads[at:at + size], stacks, out[at:at + size])
                at += size
                continue
            for i in range(lo, hi):
                block = self.blocks[i]
                grad = grads[at:at + block.grad_size].reshape(block.grad_shape)
                inv = self.inverses[i]
                v = grad if inv is None else block.precondition(grad, inv)
                out[at:at + block.grad_size] = v.reshape(-1)
                at += block.grad_size

    def restack(self) -> None:
        """After loading inverses block by block: each run whose blocks all have inverses gets
        them back as one stack per slot (``_restack_run``)."""
        for r in range(len(self._runs)):
            self._restack_run(r)

    def _restack_run(self, r: int) -> None:
        """Run ``r``'s inverses as one stack per slot (copied together; the blocks' inverses
        become views of it) when every block of the run has them, whether they were loaded or
        inverted in different steps: a run is stacked exactly when its blocks all have inverses,
        so that a resumed run is preconditioned as the uninterrupted one (batched products can
        round differently from single ones)."""
        lo, hi = self._runs[r]
        if self.blocks[lo].batch_key is None or any(self.inverses[i] is None for i in range(lo, hi)):
            return
        stacks = []
        for slot in range(len(self.inverses[lo])):
            stack = self.xp.concatenate([self.inverses[i][slot] for i in range(lo, hi)])
            start = 0
            for i in range(lo, hi):
                count = len(self.inverses[i][slot])
                self.inverses[i][slot] = stack[start:start + count]
                start += count
            stacks.append(stack)
        self._stacks[r] = stacks

    def packed_state(self) -> np.ndarray:
        """Every owned block's running statistics (absent if never set) and inverses one after
        another in one new host array (``state_elements`` each, ``pack_block_state``): this
        rank's segment of the gathered state, the values' only copy."""
        out = np.zeros(sum(state_elements(b) for b in self.blocks), dtype=self.dtype)
        at = 0
        for i, block in enumerate(self.blocks):
            state = {"factors": arrays.to_host(self.running[i]) if self.initialized[i] else None,
                     "inverses": None if self.inverses[i] is None else [arrays.to_host(x) for x in self.inverses[i]]}
            size = state_elements(block)
            pack_block_state(block, state, out[at:at + size])
            at += size
        return out

    def load_block_state(self, i: int, state: dict[str, Any]) -> None:
        """Restore block ``i`` from a ``state_dict`` entry (shapes checked by the engine)."""
        factors, inverses = state["factors"], state["inverses"]
        self._stacks.pop(self._run_of[i], None)  # loaded inverses are not views of one stack
        self.initialized[i] = factors is not None
        self.running[i][...] = 0.0 if factors is None else arrays.from_host(np.asarray(factors, dtype=self.dtype), self.xp)
        self.inverses[i] = None if inverses is None else [
            arrays.from_host(np.array(x, dtype=self.dtype), self.xp) for x in inverses]
