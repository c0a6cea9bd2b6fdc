"""Which modules of a model get a curvature block, and why the others stay first-order.

``find_blocks`` walks the model once: a module in ``skip_layers``, of a type without a
registered kind (``hpckfac.torch.registry``), or whose kind refuses this instance stays
first-order; so does a module sharing a parameter with another candidate (tied weights,
whose curvature is the sum of both layers', which no single block describes), and every
``nn.MultiheadAttention`` with its ``out_proj`` on a torch whose attention the hooks cannot tap
(``hpckfac.torch.attention.untapped_layers``). Every
module with parameters of its own gets a line saying which, the table that
``print(preconditioner)`` shows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from hpckfac.layers import CurvatureBlock
from hpckfac.torch.attention import CROSS_ATTENTION, NO_TAP, cross_attention_layers, untapped_layers
from hpckfac.torch.registry import block_for, block_params


@dataclass
class Coverage:
    """The result of ``find_blocks``: the K-FAC modules and their blocks in model order, the
    ids of the parameters the blocks cover, and ``(name, type, status)`` of every module with
    parameters of its own."""

    modules: list[nn.Module]
    blocks: list[CurvatureBlock]
    covered: set[int]
    rows: list[tuple[str, str, str]]


def find_blocks(model: nn.Module, skip_layers: Sequence[str | type],
                note: Callable[..., Any]) -> Coverage:
    """The coverage of ``model`` (module docstring); ``note(message, *args)`` says what is
    worth a warning (a layer its kind refuses, tied weights, a name in ``skip_layers`` no module
    has, nothing preconditioned). ValueError for a sparse embedding, whose gradients neither
    path can take, for a K-FAC layer whose parameters are not real floating-point (complex), and
    for trainable complex parameters averaged first-order, which the collectives cannot carry."""
    candidates = []  # (name, module, block) of every module a block could cover
    status: dict[str, str] = {}
    cross, untapped = cross_attention_layers(model), untapped_layers(model)
    if untapped:
        note("every nn.MultiheadAttention and its out_proj stay first-order: %s", NO_TAP)
    for name, module in model.named_modules():
        if getattr(module, "sparse", False) is True and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            raise ValueError(f"model: layer {name} ({type(module).__name__}) has sparse=True; its sparse "
                             "gradients cannot be preconditioned or averaged by the dense collectives (use "
                             "sparse=False)")
        own = any(True for _ in module.parameters(recurse=False))
        if _skipped(name, module, skip_layers):
            if own:
                status[name] = "first-order: in skip_layers"
            continue
        if id(module) in untapped:
            if own:
                status[name] = f"first-order: {NO_TAP}"
            continue
        if id(module) in cross:  # its in_proj; its out_proj is a module of its own
            status[name] = f"first-order: {CROSS_ATTENTION}"
            continue
        try:
            block = block_for(name, module)
        except ValueError as exc:
            note("layer %s (%s) stays first-order: %s", _label(name), type(module).__name__, exc)
            status[name] = f"first-order: {exc}"
            continue
        if block is None:
            if own:  # name the parameters: an nn.LSTM's weight_ih_l0 and the like are easy to miss
                names = ", ".join(n for n, _ in module.named_parameters(recurse=False))
                status[name] = f"first-order: no curvature block for this type (averaged only: {names})"
            continue
        candidates.append((name, module, block))
    users: dict[int, list[str]] = {}  # id of each parameter -> the candidate layers using it
    for name, module, _ in candidates:
        for p in _covered(module):
            users.setdefault(id(p), []).append(name)
    modules, blocks, covered = [], [], set()
    for name, module, block in candidates:
        tied = sorted({other for p in _covered(module) for other in users[id(p)] if other != name})
        if tied:
            note("layer %s (%s) stays first-order: it shares a parameter with %s (tied weights); %s",
                 name, type(module).__name__, ", ".join(tied),
                 _tie_remedy({n: m for n, m, _ in candidates if n == name or n in tied}))
            status[name] = f"first-order: shares a parameter with {', '.join(map(repr, tied))} (tied weights)"
            continue
        wrong = sorted({str(p.dtype).removeprefix("torch.") for p in _covered(module) if not p.is_floating_point()})
        if wrong:  # the statistics and the K-FAC gradient buffer are real: a hook would fail on the input
            raise ValueError(f"model: layer {_label(name)} ({type(module).__name__}) has {', '.join(wrong)} "
                             "parameters; K-FAC layers need real floating-point parameters (float64, float32, "
                             "float16 or bfloat16)")
        modules.append(module)
        blocks.append(block)
        covered.update(id(p) for p in _covered(module))
        frozen = not any(p.requires_grad for p in _covered(module))
        status[name] = f"K-FAC ({block.describe()})" + ("; frozen now: no statistics, .grad stays None"
                                                       if frozen else "")
    complex_params = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered
                      and p.is_complex()]
    if complex_params:  # averaged by the collectives, which carry real floating-point gradients only
        raise ValueError(f"model: trainable complex parameters ({', '.join(complex_params[:3])}"
                         f"{', ...' if len(complex_params) > 3 else ''}) cannot be averaged over ranks: the "
                         "collectives carry real floating-point gradients only (float64, float32, float16, "
                         "bfloat16); freeze them or keep them real")
    rows = [(name, type(module).__name__, status[name]) for name, module in model.named_modules() if name in status]
    names = [name for name, _ in model.named_modules()]
    unmatched = [s for s in skip_layers if isinstance(s, str)
                 and not any(n == s or n.startswith(s + ".") for n in names)]
    if unmatched:  # most likely a typo: the layer meant is preconditioned after all
        note("skip_layers: no module is named %s (the model's names are those of "
             "model.named_modules(), e.g. %s)%s", ", ".join(map(repr, unmatched)),
             ", ".join(repr(n) for n in names[1:4]) or "none", _unmatched_hints(model, unmatched))
    if not blocks:
        note("no layer of the model is preconditioned (see print(preconditioner) for why); every "
             "gradient is only averaged over ranks")
    return Coverage(modules, blocks, covered, rows)


def _label(name: str) -> str:
    """A module's name for messages: the model itself has the empty name."""
    return name or "(model)"


def _unmatched_hints(model: nn.Module, unmatched: list[str]) -> str:
    """What the strings of ``skip_layers`` that name no module may have meant, as text to append
    to the warning ("" when nothing fits): a string that is the class name of some of the model's
    modules (pass the class itself), and one that, read as a regular expression searched in the
    modules' names and class names, would match some (each is taken as one exact name)."""
    named = [(name, type(module).__name__) for name, module in model.named_modules() if name]
    hints = []
    for text in unmatched:
        typed = [name for name, kind in named if kind == text]
        if typed:
            hints.append(f"{text!r} is the class name of {_some(typed)}: to skip every module of that type, "
                         "pass the class itself (a string names one module)")
            continue
        try:
            pattern = re.compile(text)
        except re.error:
            continue
        found = [name for name, kind in named if pattern.search(name) or pattern.search(kind)]
        if found:
            hints.append(f"{text!r} read as a regular expression would match {_some(found)}: skip_layers takes "
                         "exact module names (a name also skips its children) or module types, so list those")
    return "; " + "; ".join(hints) if hints else ""


def _some(names: list[str], shown: int = 4) -> str:
    """Up to ``shown`` of ``names`` quoted, and how many more."""
    text = ", ".join(map(repr, names[:shown]))
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _tie_remedy(layers: dict[str, nn.Module]) -> str:
    """How to precondition a weight tied between ``layers`` (name -> module) by one layer's
    curvature: skip the others. An embedding must be among those skipped: its block's statistics
    hold only the rows the micro-batch looks up, while the other layer (an output head) gives the
    shared weight gradient in every row, which that block would scale by the damping alone."""
    embeddings = sorted(n for n, m in layers.items() if isinstance(m, nn.Embedding))
    if embeddings and len(embeddings) < len(layers):
        return (f"to precondition it by the other layer's curvature, put {', '.join(embeddings)} in skip_layers "
                "(not the other: an embedding's block sees only the rows its batch looks up, while the "
                "other layer gives every row gradient)")
    return "to precondition it by one layer's curvature, put the others in skip_layers"


def _skipped(name: str, module: nn.Module, skip_layers: Sequence[str | type]) -> bool:
    """Whether ``skip_layers`` names ``module`` (or a module it is inside) or its type."""
    return any(isinstance(s, type) and isinstance(module, s) or
               isinstance(s, str) and (name == s or name.startswith(s + ".")) for s in skip_layers)


def _covered(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in block_params(module) if p is not None]
