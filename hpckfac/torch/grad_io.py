"""Parameter gradients into the pipeline's send buffer, and its results back into ``.grad``.

Each block's gradient matrix holds its parameters' gradients at fixed places
(``CurvatureBlock.split_matrix`` returns views of it). ``GradientIO`` finds, once,
each parameter's place as a strided window of the matrix (offset, shape,
strides), so that a step moves every gradient with one torch copy per
parameter (all of them issued by one ``_foreach_copy_``) between ``.grad``
and a torch view of the whole buffer: one
conversion of the buffer per step instead of one array view (and one copy
launched from Python) per parameter, the host cost that dominated a GPU step
without statistics. A block whose ``split_matrix`` is not a plain window of
the matrix (a flipped kernel: ConvTranspose) goes through
``grad_matrix``/``split_matrix`` instead.
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from hpckfac.torch.bridge import copy_into, to_array


class Window(NamedTuple):
    """Where parameter ``slot`` of a block (0: weight, 1: bias) sits in the block's flattened
    gradient matrix (in elements)."""

    slot: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


Params = Sequence[Sequence[torch.Tensor | None]]


def windows(block: Any, params: Sequence[torch.Tensor | None]) -> list[Window] | None:
    """Each present parameter's window of ``block``'s gradient matrix, found on a NumPy probe;
    None when one of them is not a window with non-negative strides."""
    probe = np.empty(block.grad_size, dtype=np.float32).reshape(block.grad_shape)
    base = probe.__array_interface__["data"][0]
    found = []
    for slot, (param, view) in enumerate(zip(params, block.split_matrix(probe))):
        if param is None:
            continue
        if view is None or not np.shares_memory(view, probe) or min(view.strides, default=0) < 0:
            return None
        found.append(Window(slot, tuple(view.shape), tuple(s // probe.itemsize for s in view.strides),
                            (view.__array_interface__["data"][0] - base) // probe.itemsize))
    return found


class GradientIO:
    """The windows of every block's parameters (None for blocks that need the generic path).
    The parameters themselves are passed at every call, so that a parameter replaced after
    construction (``load_state_dict(assign=True)``) is the one read and written."""

    def __init__(self, blocks: Sequence[Any], params: Params) -> None:
        self.blocks = list(blocks)
        self.windows = [windows(block, ps) for block, ps in zip(self.blocks, params)]
        self._generic = [l for l, found in enumerate(self.windows) if found is None]
        # (block, slot) of every window, in the order ``_views`` yields them.
        self._where = [(l, w.slot) for l, found in enumerate(self.windows) for w in found or ()]
        # The windows of the buffers ``read`` and ``write`` were given, made once per buffer: the
        # engine keeps its two send buffers (``KFACEngine.gradient_buffer``) and its gathered
        # buffer (``KFACEngine.gathered``) from step to step.
        self._kept: dict[int, tuple[torch.Tensor, Sequence[int], list[torch.Tensor]]] = {}

    def read(self, buffer: torch.Tensor, offsets: Sequence[int], params: Params) -> None:
        """``.grad`` of every windowed parameter into ``buffer`` (zeros for a missing
        gradient), block ``l`` starting at ``offsets[l]``; cast to the buffer's dtype."""
        views = self._kept_views(buffer, offsets)
        grads = [params[l][slot].grad for l, slot in self._where]
        with torch.no_grad():
            for view, grad in zip(views, grads):
                if grad is None:
                    view.zero_()
        _copy_each(views, grads)

    def write(self, buffer: torch.Tensor, offsets: Sequence[int], params: Params) -> None:
        """Every windowed parameter's ``.grad`` from ``buffer`` (block ``l`` at ``offsets[l]``),
        cast to the parameter's dtype; frozen parameters keep ``.grad`` None."""
        _copy_each([_grad_to_write(params[l][slot]) for l, slot in self._where], self._kept_views(buffer, offsets))

    def _kept_views(self, buffer: torch.Tensor, offsets: Sequence[int]) -> list[torch.Tensor]:
        """The windows of ``buffer`` (as ``_views`` yields them), kept for the next call with this
        same buffer and offsets."""
        kept = self._kept.get(id(buffer))
        if kept is None or kept[0] is not buffer or kept[1] is not offsets:
            kept = (buffer, offsets, list(self._views(buffer, offsets)))
            if len(self._kept) >= 3:  # the engine's are three; a caller's own buffers are not hoarded
                self._kept.clear()
            self._kept[id(buffer)] = kept
        return kept[2]

    def _views(self, buffer: torch.Tensor, offsets: Sequence[int]) -> Iterator[torch.Tensor]:
        """The window of ``buffer`` of every windowed parameter (in the order of ``_where``),
        block ``l`` starting at ``offsets[l]``."""
        base = buffer.storage_offset()
        for found, at in zip(self.windows, offsets):
            for w in found or ():
                yield buffer.as_strided(w.shape, w.stride, base + at + w.offset)

    def read_generic(self, slots: Sequence[Any], params: Params) -> None:
        """``.grad`` of the generic blocks' parameters (zeros for a missing gradient) into
        their gradient matrices ``slots[l]`` (``CurvatureBlock.grad_matrix``)."""
        for l in self._generic:
            grads = [None if p is None else to_array(p.grad if p.grad is not None else torch.zeros_like(p))
                     for p in params[l]]
            self.blocks[l].grad_matrix(*grads, out=slots[l])

    def write_generic(self, results: Sequence[Any], params: Params) -> None:
        """The generic blocks' parameters' ``.grad`` from their result matrices ``results[l]``
        (``CurvatureBlock.split_matrix``), cast to the parameter's dtype; frozen parameters
        keep ``.grad`` None."""
        for l in self._generic:
            for param, part in zip(params[l], self.blocks[l].split_matrix(results[l])):
                grad = None if param is None else _grad_to_write(param)
                if grad is not None:
                    copy_into(grad, part)


def _copy_each(targets: list[torch.Tensor | None], sources: list[torch.Tensor | None]) -> None:
    """``target.copy_(source)`` for every pair of ``targets`` and ``sources`` where both are
    tensors, in one torch call: ``_foreach_copy_`` runs each pair's ``copy_`` (the same values,
    casts included) without a call from Python per parameter (-0.2 to -0.3 ms a step each way for
    400 parameters on the CPU)."""
    if any(t is None or s is None for t, s in zip(targets, sources)):
        pairs = [(t, s) for t, s in zip(targets, sources) if t is not None and s is not None]
        targets, sources = [t for t, _ in pairs], [s for _, s in pairs]
    if targets:
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)


def _grad_to_write(param: torch.Tensor) -> torch.Tensor | None:
    """``param.grad`` to write a result into, made when missing; None for a frozen parameter,
    whose ``.grad`` stays None."""
    if not param.requires_grad:
        return None
    if param.grad is None:
        param.grad = torch.empty_like(param)
    return param.grad

