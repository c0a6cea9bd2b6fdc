"""Forward hooks that hand each K-FAC module's input, and (through a hook on
its output tensor) the gradient of its output, to callbacks.

A forward hook passes the module's input ``a`` and registers a tensor hook on
the output, which autograd calls with the gradient of the loss with respect
to that output. Tensor hooks, unlike module backward hooks, leave the output
as it is, so ``nn.ReLU(inplace=True)`` after a preconditioned layer works: a
hook registered before an in-place change still receives the gradient with
respect to the value the layer produced. Nothing is captured in ``eval()``
mode or with autograd disabled. A module called several times in a step
fires once per call; a module not called fires nothing.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

InputCallback = Callable[[int, torch.Tensor], None]
GradCallback = Callable[[int, torch.Tensor], None]


class CaptureHooks:
    """Hooks on ``modules``; callbacks receive the module's index in ``modules``."""

    def __init__(self, modules: Sequence[nn.Module], on_input: InputCallback, on_output_grad: GradCallback) -> None:
        self.handles = [module.register_forward_hook(self._forward(index, on_input, on_output_grad))
                        for index, module in enumerate(modules)]

    @staticmethod
    def _forward(index: int, on_input: InputCallback, on_output_grad: GradCallback):
        def hook(module: nn.Module, inputs, output) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return
            on_input(index, inputs[0])
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda grad: on_output_grad(index, grad))
        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
