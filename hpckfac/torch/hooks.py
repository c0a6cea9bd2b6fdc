"""Forward/backward hooks that hand each K-FAC module's input and output
gradient to callbacks.

A forward hook passes the module's input ``a``, a full backward hook the
gradient of its output. Nothing is captured in ``eval()`` mode or with
autograd disabled. A module called several times in a step fires once per
call; a module not called fires nothing.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import nn

InputCallback = Callable[[int, torch.Tensor], None]
GradCallback = Callable[[int, torch.Tensor], None]

# The first layer's input (the data) needs no gradient; torch then warns on every backward that
# the full backward hook still fires with the output gradient -- which is exactly what we use.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")


class CaptureHooks:
    """Hooks on ``modules``; callbacks receive the module's index in ``modules``."""

    def __init__(self, modules: Sequence[nn.Module], on_input: InputCallback, on_output_grad: GradCallback) -> None:
        self.handles = []
        for index, module in enumerate(modules):
            self.handles.append(module.register_forward_hook(self._forward(index, on_input)))
            self.handles.append(module.register_full_backward_hook(self._backward(index, on_output_grad)))

    @staticmethod
    def _forward(index: int, callback: InputCallback):
        def hook(module: nn.Module, inputs, output) -> None:
            if module.training and torch.is_grad_enabled():
                callback(index, inputs[0])
        return hook

    @staticmethod
    def _backward(index: int, callback: GradCallback):
        def hook(module: nn.Module, grad_input, grad_output) -> None:
            if module.training and grad_output[0] is not None:
                callback(index, grad_output[0])
        return hook

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
