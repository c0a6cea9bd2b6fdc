"""Forward hooks that hand each K-FAC module's input, and (through a hook on
its output tensor) the gradient of its output, to callbacks.

A forward hook passes the module's input ``a`` (its first argument, positional
or by keyword; further arguments are not captured) and registers a tensor hook on
the output, which autograd calls with the gradient of the loss with respect
to that output. It runs before the module's other forward hooks, so that it sees the
output of the module's ``forward`` whatever they return in its place. Tensor hooks, unlike module backward hooks, leave the output
as it is, so ``nn.ReLU(inplace=True)`` after a preconditioned layer works: a
hook registered before an in-place change still receives the gradient with
respect to the value the layer produced. ``on_input`` returns a token for the
call (or None), which the tensor hook hands to ``on_output_grad`` with the
gradient, so each gradient meets its own call's input whatever order the
backward passes run in. Nothing is captured in ``eval()``
mode or with autograd disabled, and on calls that take no statistics (steps
without them, a layer whose parameters are all frozen) no tensor hook is
registered at all. A module called several times in a step
fires once per call; a module not called fires nothing.
Inside ``recomputing()`` (activation checkpointing's recomputation, through
``checkpoint_context_fn``) or a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``) no
call is seen at all. A hook acts on the calls of the
module it was registered on only (``OwnedHook``): a deep copy of the model (an EMA or
``AveragedModel`` copy) carries the hook along but is not seen.

An ``nn.MultiheadAttention`` applies its projections inside one function call, not as module
calls: its hooks enter a ``ProjectionTap`` (``hpckfac.torch.attention``) for the length of the
call, which hands each projection's input and output to the same callbacks as a module's hook
would, batch-first (``on_input(..., batch_first=True)``). Under ``torch.compile`` these hooks do
nothing (the attention runs as compiled code, where a mode entered by a hook has no place): its
projections take no statistics.

A module marked ``broadcast`` whose input has batch size 1 while the
micro-batch has more examples returns its output expanded to the micro-batch
(a view with the same values) and reports the input expanded the same way, so
that the tensor hook receives every example's own gradient
(``hpckfac.torch.register_layer``, ``broadcast_batch``).
"""
from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import nn

from hpckfac.log import get_logger
from hpckfac.torch.attention import Projection, ProjectionTap, TapIndices

_log = get_logger("hpckfac.torch")

# Per thread: the autograd engine may run a backward, and so a recomputation, on a thread of its own.
_recompute = threading.local()


class _Recomputing:
    """``recomputing()``'s context manager. A class, not a generator: torch enters a checkpoint's
    recomputation context once per recomputation, and a second backward through the same
    checkpoint (``retain_graph=True``) recomputes, and enters it, again."""

    def __enter__(self) -> None:
        _recompute.depth = recomputing_now() + 1

    def __exit__(self, *exc: object) -> None:
        _recompute.depth -= 1


def recomputing() -> ContextManager[None]:
    """Within the block, K-FAC layers' calls are not seen at all: activation checkpointing's
    recomputation repeats calls whose statistics the original forward already took."""
    return _Recomputing()


def recomputing_now() -> int:
    """How many ``recomputing()`` blocks this thread is inside (0: none)."""
    return getattr(_recompute, "depth", 0)


# The level of the innermost torch.func transform (vmap, grad, jacrev, jvp, ...) running, None
# outside them, and the tests for its wrapper tensors and for the batched tensors of autograd's
# own vmap (torch.autograd.grad(..., is_grads_batched=True), jacobian(..., vectorize=True)); a
# torch without them has none of these to meet.
_functorch = getattr(torch._C, "_functorch", None)


def _level_or_none() -> int | None:
    """The innermost transform's level, None outside them, from ``current_level`` on a torch
    without ``maybe_current_level`` (it raises outside a transform there)."""
    try:
        return _functorch.current_level()
    except RuntimeError:
        return None


_functorch_level = getattr(_functorch, "maybe_current_level",
                           _level_or_none if hasattr(_functorch, "current_level") else None)
_wrapper_tests = [test for test in (getattr(_functorch, "is_functorch_wrapped_tensor", None),
                                    getattr(_functorch, "is_legacy_batchedtensor", None)) if test is not None]


def in_torch_func() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``, ``jvp``, ...) is running:
    the tensors a module gets there are functorch's wrappers, with no storage to read, and the
    transform's own derivatives never reach the hooks' tensor hooks."""
    return _functorch_level is not None and _functorch_level() is not None


def batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a batch of tensors seen as one (a vmap's), as the output gradients of a
    vectorized backward are (``torch.autograd.grad(..., is_grads_batched=True)``,
    ``torch.autograd.functional.jacobian(..., vectorize=True)``): rows of a Jacobian, no loss's
    gradient, and nothing a statistic could read (``detach()`` has no batching rule)."""
    return any(test(t) for test in _wrapper_tests)


def counts_call(module: nn.Module) -> bool:
    """Whether a call of ``module`` is a training call the statistics see: in ``train()`` mode,
    with autograd enabled, not inside ``recomputing()`` and not inside a ``torch.func``
    transform (``in_torch_func``)."""
    return (module.training and torch.is_grad_enabled() and not recomputing_now()
            and not in_torch_func())


def checkpoint_context_fn() -> tuple[ContextManager, ContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    forward runs as usual, the recomputation in backward under ``recomputing()``, so each
    checkpointed K-FAC layer's call counts once. (A reentrant checkpoint needs nothing: its
    forward runs without autograd, so only the recomputation is seen.)"""
    return contextlib.nullcontext(), recomputing()


InputCallback = Callable[[int, torch.Tensor, Any], Any]
GradCallback = Callable[[int, torch.Tensor, Any], None]


class CaptureHooks:
    """Hooks on ``modules``; callbacks receive the module's index in ``modules``, and
    ``on_input(index, input, output)`` the call's output too (a transposed convolution's
    depends on more than its input: ``forward(x, output_size=...)``).

    ``broadcast[i]`` marks module ``i`` as above; ``micro_batch()`` returns the
    current micro-batch's size; ``capturing(i)`` says whether module ``i``'s call takes
    statistics: when it does not, ``on_input`` still sees every input (it
    counts examples) but no tensor hook is registered and nothing is expanded.
    While the caller sets ``quiet``, calls that take no statistics skip ``on_input``
    as well: it says that until it is cleared such a call would change nothing
    ``on_input`` keeps (the examples of the pass already counted).

    ``attention``: ``(name, layer, indices)`` of each ``nn.MultiheadAttention`` whose projections
    are among ``modules`` (``hpckfac.torch.attention.attention_taps``), ``indices`` those
    projections' indices; such a layer gets a tap, not the module hook.
    """

    def __init__(self, modules: Sequence[nn.Module], on_input: InputCallback, on_output_grad: GradCallback,
                 broadcast: Sequence[bool], micro_batch: Callable[[], int], capturing: Callable[[int], bool],
                 attention: Sequence[tuple[str, nn.MultiheadAttention, TapIndices]] = ()) -> None:
        self.quiet = False
        self._on_input, self._on_output_grad, self._capturing = on_input, on_output_grad, capturing
        self._micro_batch, self._modules = micro_batch, list(modules)
        # Attention layers are seen through their tap only: their own call's input is the query,
        # its output a tuple, neither the in-projection's.
        tapped = {id(layer) for _, layer, _ in attention}
        # First among the module's forward hooks: one registered before that returns another
        # output (a scaled or masked activation) would otherwise hand its output, not the layer's,
        # to the tensor hook, whose gradient G would then take. The input is forward's either way.
        self.handles = [module.register_forward_hook(OwnedHook(module, self._forward(
                            index, broadcast[index], _input_name(module))), with_kwargs=True, prepend=True)
                        for index, module in enumerate(modules) if id(module) not in tapped]
        self._open = threading.local()  # per thread, the taps entered and not yet left
        self._told: set[int] = set()  # the attention layers a warning named as called for cross-attention
        for name, layer, indices in attention:
            self.handles.append(layer.register_forward_pre_hook(
                OwnedHook(layer, self._enter(name, indices), compiled=False), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(OwnedHook(layer, self._leave, compiled=False),
                                                            with_kwargs=True, always_call=True))

    def _forward(self, index: int, broadcast: bool, input_name: str | None):
        def hook(module: nn.Module, args, kwargs, output):
            # Most calls first: a quiet pass that takes no statistics, its input present, returns
            # None whatever the mode (1.5 -> 0.7 us per call, measured alone; once per layer per forward).
            if self.quiet and (args or input_name in kwargs) and not self._capturing(index):
                return None
            if not counts_call(module):
                return None
            if args:
                a = args[0]
            elif input_name in kwargs:  # called as ``layer(input=x)``
                a = kwargs[input_name]
            else:
                raise TypeError(f"K-FAC layer {type(module).__name__} was called without its input "
                                f"(expected it as the first argument{f' or {input_name}=' if input_name else ''})")
            return self._seen(index, a, output, broadcast)
        return hook

    def _seen(self, index: int, a: torch.Tensor, output: Any, broadcast: bool = False,
              batch_first: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Any:
        """Hand one call of K-FAC layer ``index`` to the callbacks; returns the output that replaces
        the call's (a ``broadcast`` layer's batch-shared one, expanded), or None. ``batch_first``:
        the view turning the output's gradient batch-first, ``a`` being batch-first already."""
        layout = {} if batch_first is None else {"batch_first": True}
        if not self._capturing(index):
            if not self.quiet:  # quiet: this pass is counted already, on_input would do nothing
                self._on_input(index, a, output, **layout)
            return None
        replaced = None
        batch = self._micro_batch()
        if broadcast and isinstance(output, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1 < batch:
            a = a.expand(batch, *a.shape[1:])
            output = replaced = output.expand(batch, *output.shape[1:])
        token = self._on_input(index, a, output, **layout)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            on_output_grad, view = self._on_output_grad, batch_first or (lambda grad: grad)
            # A vectorized backward's gradients are left for the call's loss backward to come.
            output.register_hook(lambda grad: None if batched(grad) else on_output_grad(index, view(grad), token))
        return replaced

    def _enter(self, name: str, indices: TapIndices):
        """The pre-hook of an attention layer: enters its tap when the call is seen at all."""
        def hook(module: nn.MultiheadAttention, args, kwargs):
            if not counts_call(module) or self.quiet and not any(
                    self._capturing(i) for i in indices if i is not None):
                return None
            query, key, value = (args[i] if len(args) > i else kwargs.get(n)
                                 for i, n in enumerate(("query", "key", "value")))
            if not isinstance(query, torch.Tensor):
                return None
            weights = indices.weights(module, self._modules)
            if not (query is key is value) and id(module.in_proj_weight) in weights \
                    and id(module) not in self._told:
                self._told.add(id(module))
                _log.warning(f"attention layer {name or '(model)'} is called as cross-attention (query, key and "
                             "value not one tensor), whose in-projection K-FAC does not model: such calls give "
                             f"in_proj_weight no statistics (out_proj takes them); put {name!r} in "
                             "skip_layers to keep the in-projection first-order")
            tap = ProjectionTap(weights, query, module.batch_first, self._projection)
            tap.__enter__()
            self._stack().append((module, tap))
            return None
        return hook

    def _leave(self, module: nn.Module, args, kwargs, output) -> None:
        """The forward hook of an attention layer (also when its forward raised): leaves its tap."""
        stack = self._stack()
        if stack and stack[-1][0] is module:
            stack.pop()[1].__exit__(None, None, None)

    def _stack(self) -> list:
        if not hasattr(self._open, "taps"):
            self._open.taps = []
        return self._open.taps

    def _projection(self, call: Projection) -> None:
        self._seen(call.index, call.a, call.output, batch_first=call.batch_first)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


class OwnedHook:
    """A module hook, ``hook(module, ...)``, that acts on calls of the module it was registered on
    only, and runs as Python under ``torch.compile`` (``_eager``), or with ``compiled=False`` not
    at all there (``_outside_compilation``).

    ``copy.deepcopy(model)`` (``torch.optim.swa_utils.AveragedModel``, an EMA or best-so-far copy)
    copies every module's hooks with it. A deep copy of this hook is the hook itself, not a copy of
    the preconditioner it calls (with its communicator and NumPy state, which cannot be copied),
    and the copy's calls are ignored: they are another model's, whose statistics would otherwise
    be added to this one's. A pickled one (``torch.save(model)``) loads as a hook that does nothing.
    """

    def __init__(self, module: nn.Module, hook: Callable, compiled: bool = True) -> None:
        self._owner = weakref.ref(module)
        self._run = _eager(hook) if compiled else _outside_compilation(hook)

    def __call__(self, module: nn.Module, *args: Any) -> Any:
        if module is not self._owner():
            return None
        return self._run(module, *args)

    def __copy__(self) -> OwnedHook:
        return self

    def __deepcopy__(self, memo: dict) -> OwnedHook:
        return self

    def __reduce__(self) -> tuple[type, tuple]:
        return (_Inert, ())


class _Inert:
    """What a pickled ``OwnedHook`` loads as: the preconditioner it called is not the model's to
    save, so the loaded model's hook does nothing."""

    def __call__(self, *args: Any) -> None:
        return None


def _eager(hook: Callable) -> Callable:
    """``hook``, run as Python under ``torch.compile`` rather than traced: it keeps host state
    (NumPy sums, counters) that dynamo would trace into, recompiling for every layer until its
    limit. Outside compilation ``hook`` itself runs, without the disabling wrapper's cost. The
    wrapper is made at the first call under compilation: making it imports dynamo, seconds of
    start-up (and a storm of file reads on a parallel file system) a run that never compiles
    need not pay."""
    # torch.compiler.is_compiling is torch >= 2.3. Before, torch._utils.is_compiling, which dynamo
    # also reads as True while it traces, without importing dynamo: a check it cannot trace breaks
    # the graph, and dynamo then traces the rest of this function, the hook included.
    compiling = getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling
    disabled = None

    def run(*args):
        nonlocal disabled
        if not compiling():
            return hook(*args)
        if disabled is None:
            disabled = torch.compiler.disable(hook)
        return disabled(*args)
    return run


def _outside_compilation(hook: Callable) -> Callable:
    """``hook``, not run at all under ``torch.compile``: dynamo traces the check to nothing, with
    neither a graph break nor a recompilation per hook."""
    compiling = getattr(torch.compiler, "is_compiling", None) or torch._utils.is_compiling

    def run(*args):
        return None if compiling() else hook(*args)
    return run


def _input_name(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module.forward`` (``input`` for torch's layers),
    under which a call by keyword passes the input."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    first = next((p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)
    return None if first is None or first.kind == first.POSITIONAL_ONLY else first.name
