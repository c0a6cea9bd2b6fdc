"""``CaptureHooks`` on their own: which calls reach ``on_input`` and get a tensor hook, by the
pass's state (``quiet``, ``capturing``), with the module in each mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hpckfac.torch.hooks import CaptureHooks


class _KeywordOnly(nn.Module):
    """A layer whose input can only be passed by keyword, under a name the hooks cannot know."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _hooked(module: nn.Module, capturing: bool):
    """``module`` under ``CaptureHooks`` whose callbacks record what they receive."""
    inputs, grads = [], []
    hooks = CaptureHooks([module], lambda i, a, output: inputs.append((i, a)) or "token",
                         lambda i, g, token: grads.append((i, g, token)), [False], lambda: 4, lambda index: capturing)
    return hooks, inputs, grads


@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("capturing", [False, True])
@pytest.mark.parametrize("by_keyword", [False, True])
def test_each_pass_state_reaches_the_callbacks_as_documented(quiet, capturing, by_keyword):
    """A pass that takes statistics always reaches ``on_input`` and its output's gradient
    ``on_output_grad``; one that takes none reaches ``on_input`` unless ``quiet``, and never
    registers a tensor hook; the output is the layer's own in every case."""
    layer = nn.Linear(3, 2)
    hooks, inputs, grads = _hooked(layer, capturing)
    hooks.quiet = quiet
    x = torch.randn(4, 3)
    out = layer(input=x) if by_keyword else layer(x)
    assert torch.equal(out, nn.functional.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    expect_input = capturing or not quiet
    assert [(i, a is x) for i, a in inputs] == ([(0, True)] if expect_input else [])
    assert [(i, token) for i, _, token in grads] == ([(0, "token")] if capturing else [])
    if capturing:
        assert torch.equal(grads[0][1], torch.ones(4, 2))


@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("capturing", [False, True])
def test_calls_outside_training_reach_nothing_whatever_the_pass_state(quiet, capturing):
    """In eval() mode or without autograd a call is not seen, quiet or not."""
    layer = nn.Linear(3, 2)
    hooks, inputs, grads = _hooked(layer, capturing)
    hooks.quiet = quiet
    layer.eval()
    layer(torch.randn(4, 3)).sum().backward()
    layer.train()
    with torch.no_grad():
        layer(torch.randn(4, 3))
    assert inputs == [] and grads == []


@pytest.mark.parametrize("quiet", [False, True])
@pytest.mark.parametrize("capturing", [False, True])
def test_a_training_call_without_its_input_raises_in_every_pass_state(quiet, capturing):
    """The input check runs on quiet passes too: a layer called without a positional input (nor
    under its forward's first parameter name) raises TypeError, and only when the call counts."""
    layer = _KeywordOnly()
    hooks, inputs, _ = _hooked(layer, capturing)
    hooks.quiet = quiet
    with pytest.raises(TypeError, match="was called without its input"):
        layer(x=torch.randn(4, 3))
    layer.eval()
    layer(x=torch.randn(4, 3))  # not a training call: no check
    assert inputs == []


def test_removed_hooks_see_nothing():
    layer = nn.Linear(3, 2)
    hooks, inputs, grads = _hooked(layer, True)
    hooks.remove()
    hooks.remove()  # idempotent
    layer(torch.randn(4, 3)).sum().backward()
    assert inputs == [] and grads == [] and hooks.handles == []


def test_torch_func_transforms_are_told_apart_without_maybe_current_level(monkeypatch):
    """On a torch without ``maybe_current_level`` the level comes from ``current_level``, which
    raises outside a transform: inside vmap and grad a transform runs, outside none does."""
    from hpckfac.torch import hooks

    monkeypatch.setattr(hooks, "_functorch_level", hooks._level_or_none)
    seen = []

    def probe(x):
        seen.append(hooks.in_torch_func())
        return (x * x).sum()

    assert not hooks.in_torch_func()
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.func.vmap(probe)(x)
    torch.func.grad(probe)(x[0])
    probe(x)
    assert seen == [True, True, False]
