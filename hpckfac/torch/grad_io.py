"""Parameter gradients into the pipeline's send buffer, and its results back into ``.grad``.

Each block's gradient matrix holds its parameters' gradients at fixed places
(``CurvatureBlock.split_matrix`` returns views of it). ``GradientIO`` finds, once,
each parameter's place as a strided window of the matrix (offset, shape,
strides), so that a step moves every gradient with one torch copy per
parameter between ``.grad`` and a torch view of the whole buffer: one
conversion of the buffer per step instead of one array view (and one copy
launched from Python) per parameter, the host cost that dominated a GPU step
without statistics. A block whose ``split_matrix`` is not a plain window of
the matrix (a flipped kernel: ConvTranspose) goes through
``grad_matrix``/``split_matrix`` as before.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch


class Window(NamedTuple):
    """A parameter's gradient inside its block's flattened gradient matrix (in elements)."""

    param: torch.Tensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def windows(block: Any, params: Sequence[torch.Tensor | None]) -> list[Window] | None:
    """Each present parameter's window of ``block``'s gradient matrix, found on a NumPy probe;
    None when one of them is not a window with non-negative strides."""
    probe = np.empty(block.grad_size, dtype=np.float32).reshape(block.grad_shape)
    base = probe.__array_interface__["data"][0]
    found = []
    for param, view in zip(params, block.split_matrix(probe)):
        if param is None:
            continue
        if view is None or not np.shares_memory(view, probe) or min(view.strides, default=0) < 0:
            return None
        found.append(Window(param, tuple(view.shape), tuple(s // probe.itemsize for s in view.strides),
                            (view.__array_interface__["data"][0] - base) // probe.itemsize))
    return found


class GradientIO:
    """The windows of every block's parameters (None for blocks that need the generic path)."""

    def __init__(self, blocks: Sequence[Any], params: Sequence[Sequence[torch.Tensor | None]]) -> None:
        self.windows = [windows(block, ps) for block, ps in zip(blocks, params)]

    def read(self, buffer: torch.Tensor, offsets: Sequence[int]) -> None:
        """``.grad`` of every windowed parameter into ``buffer`` (zeros for a missing
        gradient), block ``l`` starting at ``offsets[l]``; cast to the buffer's dtype."""
        base = buffer.storage_offset()
        with torch.no_grad():
            for found, at in zip(self.windows, offsets):
                for w in found or ():
                    view = buffer.as_strided(w.shape, w.stride, base + at + w.offset)
                    if w.param.grad is None:
                        view.zero_()
                    else:
                        view.copy_(w.param.grad)

    def write(self, buffer: torch.Tensor, offsets: Sequence[int]) -> None:
        """Every windowed parameter's ``.grad`` from ``buffer`` (block ``l`` at ``offsets[l]``),
        cast to the parameter's dtype; frozen parameters keep ``.grad`` None."""
        base = buffer.storage_offset()
        with torch.no_grad():
            for found, at in zip(self.windows, offsets):
                for w in found or ():
                    if not w.param.requires_grad:
                        continue
                    if w.param.grad is None:
                        w.param.grad = torch.empty_like(w.param)
                    w.param.grad.copy_(buffer.as_strided(w.shape, w.stride, base + at + w.offset))

    def generic(self) -> list[int]:
        """Indices of the blocks that take the generic path."""
        return [l for l, found in enumerate(self.windows) if found is None]

