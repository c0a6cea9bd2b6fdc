"""What the hooks see of ``nn.MultiheadAttention``: its projections' inputs and outputs.

``nn.MultiheadAttention`` hands its weights to ``F.multi_head_attention_forward``, which applies
them with ``linear`` calls of its own: ``in_proj_weight`` (``E -> 3E``, the query, key and value
rows) on the query, and ``out_proj.weight`` (``E -> E``) on the heads' outputs. Neither is a
module call a hook could see. While an attention layer that takes statistics runs, a
``ProjectionTap`` (a ``TorchFunctionMode``, entered and left by the layer's own hooks) sends its
``F.multi_head_attention_forward`` call to that very function bound to a ``linear`` that also
reports each projection (``tapped_attention``): the same code on the same tensors, so the same
values and gradients. (A mode cannot just re-enter itself around the call: the function would
hand itself to the mode again before running its body.) An unbatched self-attention call,
``(T, E)``, is handed over as the batch of one the function makes of it, with one tensor for
query, key and value (``_as_one_batch``): its in-projection then runs packed, as a batched call's
does, where the function alone would run it as three row-slices, equal to rounding.

A self-attention call (query, key and value the same tensor) applies ``in_proj_weight`` whole to
one input: one ``E -> 3E`` linear layer. A cross-attention call applies row-slices of it to two
or three inputs (query rows on the query, key and value rows on the memory), which one Kronecker
pair does not describe: no block is fed from such a call (``CROSS_ATTENTION``), and the
``multihead_attn`` of an ``nn.TransformerDecoderLayer``, always one, keeps its in-projection
first-order (``cross_attention_layers``). The output projection is the same map in both.

All of this rests on torch's code: ``F.multi_head_attention_forward`` a Python function that
projects through its module's ``linear``, as in each torch run (2.1 to 2.14). A torch where the
tapped function does not report both projections keeps every attention layer and its
``out_proj`` first-order (``untapped_layers``, ``NO_TAP``), rather than leaving blocks without
statistics.
"""
from __future__ import annotations

import inspect
import threading
import types
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

CROSS_ATTENTION = ("cross-attention (the decoder's attention on the memory): in_proj_weight's query rows "
                   "act on the query and its key and value rows on the memory, which one Kronecker pair "
                   "does not describe (out_proj is preconditioned)")

NO_TAP = ("this torch's F.multi_head_attention_forward does not apply the projections through "
          "torch.nn.functional's linear, which the statistics are taken from")

# Per thread: the tap of the attention call running on it, which the tapped linear reports to.
_active = threading.local()
_tapped: Callable | None = None
_taps: bool | None = None  # whether tapped_attention reports both projections; found on first use


def tapped_attention() -> Callable:
    """``F.multi_head_attention_forward`` (with the helpers it projects through) bound to a
    ``linear`` that reports each call to the thread's active ``ProjectionTap``: new function
    objects over torch's own code, with a copy of its module's names, so nothing of torch's is
    changed and every other caller keeps the original."""
    global _tapped
    if _tapped is None:
        names = dict(vars(F))
        names["linear"] = _linear
        for name in ("_in_projection_packed", "_in_projection", "multi_head_attention_forward"):
            if name in names:
                names[name] = _rebound(names[name], names)
        _tapped = names["multi_head_attention_forward"]
    return _tapped


def tap_works() -> bool:
    """Whether ``tapped_attention`` reports both projections of a self-attention call, found once
    per process by running it on constant tensors (no random numbers drawn)."""
    global _taps
    if _taps is None:
        seen: list[int] = []
        probe = types.SimpleNamespace(saw=lambda input, weight, output: seen.append(id(weight)))
        # float32 on the CPU whatever the default dtype and device: a failure must mean no tap.
        w_in, w_out, x = (torch.ones(*shape, dtype=torch.float32, device="cpu")
                          for shape in ((6, 2), (2, 2), (1, 1, 2)))
        outer = getattr(_active, "tap", None)
        _active.tap = probe
        try:
            tapped_attention()(query=x, key=x, value=x, embed_dim_to_check=2, num_heads=1,
                               in_proj_weight=w_in, in_proj_bias=None, bias_k=None, bias_v=None,
                               add_zero_attn=False, dropout_p=0.0, out_proj_weight=w_out,
                               out_proj_bias=None, training=True, need_weights=False)
            _taps = {id(w_in), id(w_out)} <= set(seen)
        # Any failure (a builtin without code to rebind, a changed signature) means the same: no tap.
        except Exception:
            _taps = False
        finally:
            _active.tap = outer
    return _taps


def _rebound(function: types.FunctionType, names: dict) -> types.FunctionType:
    """``function`` with ``names`` as its module's globals."""
    rebound = types.FunctionType(function.__code__, names, function.__name__, function.__defaults__,
                                 function.__closure__)
    rebound.__kwdefaults__ = function.__kwdefaults__
    return rebound


def _as_one_batch(attention: Callable, args: tuple, kwargs: dict) -> tuple:
    """``attention(*args, **kwargs)`` (an ``F.multi_head_attention_forward``) of an unbatched
    self-attention call, ``(T, E)``, made a batch of one as that function makes it itself, but
    with one tensor for the query, key and value: it would unsqueeze each apart, and its
    in-projection, seeing three tensors, would apply row-slices of ``in_proj_weight`` to each
    (its cross-attention branch), which no tap matches. Any other call runs as it is."""
    bound = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    query, key, value = (bound.arguments[name] for name in ("query", "key", "value"))
    if not (query is key is value) or query.dim() != 2:
        return attention(*args, **kwargs)
    one = query.unsqueeze(1)
    bound.arguments.update(query=one, key=one, value=one)
    if bound.arguments.get("key_padding_mask") is not None:
        bound.arguments["key_padding_mask"] = bound.arguments["key_padding_mask"].unsqueeze(0)
    output, weights = attention(*bound.args, **bound.kwargs)
    return output.squeeze(1), None if weights is None else weights.squeeze(0)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    output = F.linear(input, weight, bias)
    tap = getattr(_active, "tap", None)
    if tap is not None:
        tap.saw(input, weight, output)
    return output


class Projection(NamedTuple):
    """A projection call as the statistics take it: the K-FAC block's index, its input
    batch-first, its output, and the view that turns the output's gradient batch-first."""

    index: int
    a: torch.Tensor
    output: torch.Tensor
    batch_first: Callable[[torch.Tensor], torch.Tensor]


class ProjectionTap(TorchFunctionMode):
    """While entered, sends ``F.multi_head_attention_forward`` through ``tapped_attention`` and
    hands each projection of the weights ``indices`` maps (by identity: a cross-attention call
    projects through slices of ``in_proj_weight``, which match nothing) to ``report``.

    ``query`` is the call's query as the layer got it: ``(T, B, E)``, ``(B, T, E)`` with
    ``batch_first``, or unbatched ``(T, E)``, whose rows are then the examples, as for a Linear
    layer called on it."""

    def __init__(self, indices: dict[int, int], query: torch.Tensor, batch_first: bool,
                 report: Callable[[Projection], None]) -> None:
        super().__init__()
        self.indices, self.report = indices, report
        self.batched = query.dim() == 3
        self.positions, self.batch = (query.shape[1], query.shape[0]) if batch_first and self.batched \
            else (query.shape[0], query.shape[1] if self.batched else 1)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        outer = getattr(_active, "tap", None)
        _active.tap = self
        try:
            return _as_one_batch(tapped_attention(), args, kwargs) if not self.batched \
                else tapped_attention()(*args, **kwargs)
        finally:
            _active.tap = outer

    def saw(self, input: torch.Tensor, weight: torch.Tensor, output: torch.Tensor) -> None:
        """Report a ``linear`` call of one of the tapped weights. Inside the attention function the
        in-projection sees ``(T, B, E)`` and the out-projection ``(T * B, E)``, position-major."""
        index = self.indices.get(id(weight))
        if index is None:
            return
        if not self.batched:  # (T, 1, ...) or (T, ...): T rows, as a Linear layer on (T, E) sees them
            flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
            self.report(Projection(index, flat(input), output, flat))
            return
        t, b = self.positions, self.batch
        turn = lambda x: x.reshape(t, b, x.shape[-1]).transpose(0, 1)  # noqa: E731
        self.report(Projection(index, turn(input), output, turn))


class TapIndices(NamedTuple):
    """The indices among the K-FAC layers of an attention layer's in-projection and out-projection
    (None for one that is not a K-FAC layer)."""

    in_proj: int | None
    out_proj: int | None

    def weights(self, layer: nn.MultiheadAttention, modules: Sequence[nn.Module]) -> dict[int, int]:
        """The ids of ``layer``'s projection weights as they are now mapped to their indices among
        the K-FAC layers ``modules``: read at every call, as a parameter replaced since
        (``load_state_dict(..., assign=True)``) is another object, which a mapping made once
        would no longer match. An ``out_proj`` replaced by another module is not the K-FAC layer."""
        weights = {}
        if self.in_proj is not None and layer.in_proj_weight is not None:
            weights[id(layer.in_proj_weight)] = self.in_proj
        if self.out_proj is not None and layer.out_proj is modules[self.out_proj]:
            weights[id(layer.out_proj.weight)] = self.out_proj
        return weights


def attention_taps(modules: list[nn.Module], model: nn.Module
                   ) -> list[tuple[str, nn.MultiheadAttention, TapIndices]]:
    """Each ``nn.MultiheadAttention`` of ``model`` one of whose projections is among the K-FAC
    layers ``modules``: its name, the layer, and those projections' indices in ``modules``."""
    index = {id(m): i for i, m in enumerate(modules)}
    taps = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.MultiheadAttention):
            continue
        found = TapIndices(index.get(id(layer)) if layer.in_proj_weight is not None else None,
                           index.get(id(layer.out_proj)))
        if found != (None, None):
            taps.append((name, layer, found))
    return taps


def untapped_layers(model: nn.Module) -> set[int]:
    """The ids of ``model``'s ``nn.MultiheadAttention`` layers and their ``out_proj`` when this
    torch's attention cannot be tapped (``tap_works``), which then stay first-order; else none."""
    layers = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not layers or tap_works():
        return set()
    return {id(m) for layer in layers for m in (layer, layer.out_proj)}


def cross_attention_layers(model: nn.Module) -> set[int]:
    """The ids of the ``nn.MultiheadAttention`` layers ``model`` uses as cross-attention by
    construction: the ``multihead_attn`` of each ``nn.TransformerDecoderLayer``."""
    return {id(m.multihead_attn) for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)}
