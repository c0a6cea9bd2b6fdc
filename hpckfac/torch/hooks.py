"""Forward hooks that hand each K-FAC module's input, and (through a hook on
its output tensor) the gradient of its output, to callbacks.

A forward hook passes the module's input ``a`` and registers a tensor hook on
the output, which autograd calls with the gradient of the loss with respect
to that output. Tensor hooks, unlike module backward hooks, leave the output
as it is, so ``nn.ReLU(inplace=True)`` after a preconditioned layer works: a
hook registered before an in-place change still receives the gradient with
respect to the value the layer produced. Nothing is captured in ``eval()``
mode or with autograd disabled, and on steps without statistics no tensor
hook is registered at all. A module called several times in a step
fires once per call; a module not called fires nothing.

A module marked ``broadcast`` whose input has batch size 1 while the
micro-batch has more examples returns its output expanded to the micro-batch
(a view with the same values) and reports the input expanded the same way, so
that the tensor hook receives every example's own gradient
(``hpckfac.torch.register_layer``, ``broadcast_batch``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

InputCallback = Callable[[int, torch.Tensor], None]
GradCallback = Callable[[int, torch.Tensor], None]


class CaptureHooks:
    """Hooks on ``modules``; callbacks receive the module's index in ``modules``.

    ``broadcast[i]`` marks module ``i`` as above; ``micro_batch()`` returns the
    current micro-batch's size; ``capturing()`` says whether this pass takes
    statistics: when it does not, ``on_input`` still sees every input (it
    counts examples) but no tensor hook is registered and nothing is expanded.
    """

    def __init__(self, modules: Sequence[nn.Module], on_input: InputCallback, on_output_grad: GradCallback,
                 broadcast: Sequence[bool] = (), micro_batch: Callable[[], int] = lambda: 0,
                 capturing: Callable[[], bool] = lambda: True) -> None:
        broadcast = list(broadcast) or [False] * len(modules)
        self.handles = [module.register_forward_hook(self._forward(index, on_input, on_output_grad,
                                                                   broadcast[index], micro_batch, capturing))
                        for index, module in enumerate(modules)]

    @staticmethod
    def _forward(index: int, on_input: InputCallback, on_output_grad: GradCallback, broadcast: bool,
                 micro_batch: Callable[[], int], capturing: Callable[[], bool]):
        def hook(module: nn.Module, inputs, output):
            if not (module.training and torch.is_grad_enabled()):
                return None
            a, replaced = inputs[0], None
            if not capturing():
                on_input(index, a)
                return None
            batch = micro_batch()
            if broadcast and isinstance(output, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 < batch:
                a = a.expand(batch, *a.shape[1:])
                output = replaced = output.expand(batch, *output.shape[1:])
            on_input(index, a)
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: on_output_grad(index, grad))
            return replaced
        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
