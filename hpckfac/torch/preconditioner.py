"""``KFACPreconditioner``: distributed K-FAC on a PyTorch model.

Which layers get a curvature block is decided once (``hpckfac.torch.coverage``).
Stage 1 runs in module hooks (``hpckfac.torch.hooks``) on factor-update steps,
with the examples counted from the model's inputs (``hpckfac.torch.micro_batch``);
``step()`` runs stages 2-4 through ``hpckfac.stages.engine.KFACEngine`` and the
allreduce of the remaining gradients, then overwrites ``.grad``
(``hpckfac.torch.grad_io``). ``state_dict()`` holds torch tensors
(``hpckfac.torch.state``). What ``step()`` checks of the user's loop and model is in
``hpckfac.torch.usage_checks`` (the base class) and ``hpckfac.torch.structure``. Conventions (per-example gradients, accumulation,
GradScaler, dtypes) are in docs/preconditioner.md.
"""
from __future__ import annotations

import math
import sys
import time
import weakref
from typing import Any, Callable, Iterable

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch import nn

from hpckfac.comm import CollectiveMismatchError, Communicator, world_communicator
from hpckfac.layers import ConvTransposeBlock
from hpckfac.log import get_logger
from hpckfac.ops.checks import accumulation_dtype
from hpckfac.stages.engine import ITERATION_STAGES, KFACEngine, check_state_keys
from hpckfac.stages.local_factors import LocalStatistics
from hpckfac.stages.options import Assignment, CheckedOption, call_schedule
from hpckfac.tables import format_table
from hpckfac.torch.attention import attention_taps
from hpckfac.torch.bridge import device_scope, namespace_for, to_array, to_tensor
from hpckfac.torch.coverage import find_blocks
from hpckfac.torch.device import model_device
from hpckfac.torch.distributed import (agree_on_overflow, average_grads, check_model, check_unscaled, dtype_runs,
                                      flag_non_finite)
from hpckfac.torch.grad_io import GradientIO
from hpckfac.torch.hooks import CaptureHooks, OwnedHook, counts_call
from hpckfac.torch.micro_batch import batch_candidates, batch_size, tensors_in
from hpckfac.torch.options import DEFAULTS, check_options
from hpckfac.torch.registry import block_params, broadcasts_batch, param_names
from hpckfac.torch.state import blocks_as_arrays, blocks_as_tensors
from hpckfac.torch.structure import StructureAgreement
from hpckfac.torch.usage_checks import UsageChecks

_log = get_logger("hpckfac.torch")

# Preconditioners whose hooks are registered. The hooks keep their preconditioner alive as long
# as the model: one replaced without remove_hooks() would go on taking statistics at every forward.
_HOOKED: weakref.WeakSet[KFACPreconditioner] = weakref.WeakSet()

# The id of the backward pass running on this thread, -1 outside one (torch >= 2.0; None: not known).
_graph_task = getattr(torch._C, "_current_graph_task_id", None)


def _compiled_code_exists() -> bool:
    """Whether ``torch.compile`` holds compiled code, which may run module calls without looking at
    their hooks: dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``,
    True by default), so code it compiled before a hook was registered (for this model, or for
    another instance of its classes) runs without it. True when that cannot be told (a torch
    whose internals differ)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return False
    try:
        if not dynamo.config.skip_nnmodule_hook_guards:
            return False  # dynamo guards on the hooks and recompiles when they change
        from torch._dynamo.convert_frame import input_codes
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        codes = [ref() for ref in input_codes.seen]
        return any(code is not None and _debug_get_cache_entry_list(code) for code in codes)
    except Exception:  # noqa: BLE001 (private internals: assume the worst)
        return True


class EngineSetting:
    """A class attribute of ``KFACPreconditioner`` for a setting its engine holds (``damping``,
    ``factor_decay``, ``kl_clip`` and the two update intervals): reading it gives the engine's
    value as given (a number, or the schedule for ``damping`` and ``factor_decay``; a ``kl_clip``
    of 0 as None, the clip off), and an assignment is checked at once (ValueError naming the
    setting, the old value kept) before it reaches the engine. Without it, ``precond.damping =
    0.1`` would make a new attribute that nothing reads."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.engine, self._name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.engine, self._name, check_options(**{self._name: value})[self._name])


def _refuse_renormalised_embeddings(model: nn.Module) -> None:
    """ValueError naming an ``nn.Embedding``/``nn.EmbeddingBag`` with ``max_norm``, over several ranks.

    Its forward renormalises, in place, the rows its input looks up: each rank those of its own
    micro-batch, so the ranks' weights drift apart (one process on the global batch renormalises
    the rows of every rank's examples), frozen tables included. The first ``step()`` would see the
    replicas differ and blame a missing ``broadcast_parameters``."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            raise ValueError(f"model: layer {name or '(model)'} ({type(module).__name__}) has "
                             f"max_norm={module.max_norm}: its forward renormalises, in place, the rows each "
                             "rank's micro-batch looks up, so the ranks' weights drift apart; use max_norm=None "
                             "over several ranks (renormalising the whole table alike on every rank, e.g. after "
                             "optimizer.step(), keeps the replicas equal)")


class KFACPreconditioner(UsageChecks):
    """Replace each ``.grad`` of ``model`` by its distributed K-FAC natural gradient.

    Call ``step()`` after the backward pass(es) of a step and before
    ``optimizer.step()``; every rank must call it. Modules of every registered
    kind (``hpckfac.torch.register_layer``; the built-in kinds are listed in
    ``hpckfac.torch.registry`` and docs/preconditioner.md) are preconditioned unless in ``skip_layers``; all
    other parameters are averaged over ranks (``allreduce_gradients``'s fused allreduce). A parameter
    shared by two such modules (tied weights) is preconditioned by neither:
    its curvature is the sum of both layers', which no single block describes
    (skip one of them to let the other's block take it). ``print(precond)``
    lists every module and why it is or is not preconditioned.

    Args (all validated here, ValueError naming the parameter; defaults
    ``hpckfac.torch.options.DEFAULTS``, which extends the engine's
    ``hpckfac.stages.options.DEFAULTS``, shared with ``hpckfac train``):
        model: the model, identical on every rank (its layers checked at construction,
            its weights at the first ``step()``).
        lr: learning rate for the KL clip, a float, a ``callable(step) -> float`` or
            a torch LR scheduler (read as its optimizer's current rate).
        damping: Tikhonov damping lambda (pi-corrected for Kronecker factors),
            a float or ``callable(step) -> float``.
        factor_decay: running-average weight of the old factors, a float or
            ``callable(step) -> float``.
        factor_update_interval: statistics are taken every that many steps.
        inverse_update_interval: inverses are recomputed every that many steps.
        kl_clip: kappa of the KL clip, None or 0 to disable.
        skip_layers: module names (a name also skips its children) or module
            types to leave first-order.
        factor_dtype: dtype of the ReduceScatterV buffer (factors and the
            K-FAC gradients travel together): float64/float32/float16; None
            takes float64 if any K-FAC layer's parameters are float64 at
            construction, else float32 (half-precision models too); a model cast
            to float64 later keeps float32, with a warning.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale is undone in G.
        assignment: owner assignment, ``"lpt"`` or ``"contiguous"``.
        bucket_bytes: fusion bucket size of that allreduce (None: the
            Communicator's default).
        accumulation_steps: forward/backward micro-batches per ``step()``.
        statistics_fraction: the statistics of a factor-update step come from
            the first ``ceil(fraction * n)`` examples of each micro-batch of
            ``n`` (1: all); their cost shrinks in proportion, the gradients are
            untouched. BatchNorm statistics always use the whole micro-batch.
        comm: an ``hpckfac.comm.Communicator`` (default: the process's first one on
            COMM_WORLD, ``hpckfac.comm.world_communicator()``); anything else raises TypeError.

    Device: the pipeline runs where the model's parameters are (construct the
    preconditioner after ``model.to(device)``): NumPy buffers for a CPU model,
    CuPy buffers on the same GPU for a CUDA model (CuPy required), sharing
    memory with the tensors (zero-copy views) and running on torch's current
    stream. ``hpckfac.torch.bind_device`` picks each rank's GPU.

    Between steps, ``lr``, ``damping``, ``factor_decay``, ``kl_clip``, the two update intervals,
    ``accumulation_steps`` and ``statistics_fraction`` may be reassigned on the preconditioner
    (each checked when assigned); ``current_settings()`` gives this step's values as numbers.
    """

    # Settings users reassign between steps, checked when assigned: accumulation_steps 0 would
    # scale every G to 0, and a bad lr would surface only at the next step.
    lr = CheckedOption(check_options)
    accumulation_steps = CheckedOption(check_options)
    statistics_fraction = CheckedOption(check_options)
    # The engine's settings, read and assigned here as there (``precond.engine.damping``).
    damping = EngineSetting()
    factor_decay = EngineSetting()
    kl_clip = EngineSetting()
    factor_update_interval = EngineSetting()
    inverse_update_interval = EngineSetting()

    def __init__(self, model: nn.Module, *, lr: float | Callable[[int], float] = DEFAULTS["lr"],
                 damping: float | Callable[[int], float] = DEFAULTS["damping"],
                 factor_decay: float | Callable[[int], float] = DEFAULTS["factor_decay"],
                 factor_update_interval: int = DEFAULTS["factor_update_interval"],
                 inverse_update_interval: int = DEFAULTS["inverse_update_interval"],
                 kl_clip: float | None = DEFAULTS["kl_clip"],
                 skip_layers: str | type | Iterable[str | type] = DEFAULTS["skip_layers"],
                 factor_dtype: DTypeLike | torch.dtype | None = DEFAULTS["factor_dtype"],
                 grad_scaler: torch.amp.GradScaler | None = DEFAULTS["grad_scaler"],
                 assignment: Assignment = DEFAULTS["assignment"], bucket_bytes: int | None = DEFAULTS["bucket_bytes"],
                 accumulation_steps: int = DEFAULTS["accumulation_steps"],
                 statistics_fraction: float = DEFAULTS["statistics_fraction"],
                 comm: Communicator | None = None) -> None:
        check_model(model)
        opts = check_options(lr=lr, damping=damping, factor_decay=factor_decay,
                             factor_update_interval=factor_update_interval,
                             inverse_update_interval=inverse_update_interval, kl_clip=kl_clip,
                             skip_layers=skip_layers, factor_dtype=factor_dtype, grad_scaler=grad_scaler,
                             assignment=assignment, accumulation_steps=accumulation_steps,
                             statistics_fraction=statistics_fraction, bucket_bytes=bucket_bytes)
        if comm is not None and not isinstance(comm, Communicator):
            raise TypeError(f"comm: expected an hpckfac.comm.Communicator, got {type(comm).__name__} (wrap an "
                            "mpi4py communicator as Communicator(mpi_comm))")
        lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:  # their shapes, hence the blocks, exist only after the first forward
            raise ValueError(f"model: lazy parameters not yet initialised ({', '.join(lazy[:3])}"
                             f"{', ...' if len(lazy) > 3 else ''}): run one forward before building the "
                             "preconditioner")
        self.model = model
        self.comm = comm if comm is not None else world_communicator()
        if self.comm.size > 1:
            _refuse_renormalised_embeddings(model)
        # Gradients averaged in backward are no rank's own: the first step's checks of them
        # (every rank alike, a gradient the statistics cannot give) would misread them.
        self._ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if self._ddp:
            self._note("model: wrapped in DistributedDataParallel, which averages every gradient in backward; "
                       "step() averages them again (the same result at twice the traffic): hpckfac averages "
                       "the gradients itself, so pass the model without the wrapper")
        self.lr = opts["lr"]
        self.grad_scaler = grad_scaler
        self.accumulation_steps = opts["accumulation_steps"]
        self.statistics_fraction = opts["statistics_fraction"]
        self._sample = 0
        self._scaler_scale: float | None = None  # the GradScaler's scale, read once per step
        # False, or the candidate batch sizes waiting for the first K-FAC layer's input.
        self._count_pending: list[int] | bool = False
        self._forwards = 0  # training forwards since the last step()
        # The backward pass the hooks last ran in, the training forwards counted when it began,
        # and how many of them had not been counted by the backward pass before it.
        self._task, self._forwards_then, self._forwards_new = -1, 0, 0
        self._root_seen = False  # whether the model's own forward ran since the last step()
        self._fired: set[int] = set()  # K-FAC layers called since the last count
        self._warned: set[str] = set()
        self._replicas_checked = False  # the weights are compared across ranks at the first step()
        # Until then: each trainable parameter's in-place version as the last backward pass left
        # it, and that pass's id (_note_versions).
        self._versions: dict[str, int] = {}
        self._versions_task: int | None = None
        self._outside_checked = False  # gradients against the statistics, at the first factor step
        # A module running sequence-first (nn.LSTM, nn.MultiheadAttention, nn.Transformer with
        # batch_first=False) makes an input of as many positions as examples ambiguous (_batch_first).
        self._sequence_first_model = any(getattr(m, "batch_first", None) is False for m in model.modules())
        # An RNN's final state is (num_layers, batch, hidden) whatever its batch_first: with one layer,
        # a head on it sees (1, batch, ...), which reads as an input shared by the batch.
        self._layer_first_model = self._sequence_first_model or any(isinstance(m, nn.RNNBase)
                                                                   for m in model.modules())
        self.bucket_bytes = opts["bucket_bytes"]
        self.skip_layers = opts["skip_layers"]
        self.device = model_device(model)
        self.xp = namespace_for(self.device)
        found = find_blocks(model, self.skip_layers, self._note)
        self.modules, blocks, self.coverage = found.modules, found.blocks, found.rows
        # By name: a parameter object replaced later (load_state_dict(assign=True)) keeps its name,
        # while the id of the one it replaced may by then be another tensor's.
        self._first_order_names = {name for name, p in model.named_parameters() if id(p) not in found.covered}
        # float64 if any K-FAC layer is: the model's first parameter may be a first-order float32
        # one (a scale, a frozen stem) beside float64 layers, whose precision the buffer must keep.
        wide = any(p.dtype == torch.float64 for p in model.parameters() if id(p) in found.covered)
        comm_dtype = opts["factor_dtype"] or (np.float64 if wide else np.float32)
        # With the buffer's dtype taken from the parameters, a later cast to float64 is worth a word.
        self._dtype_chosen = opts["factor_dtype"] is None
        self._dtypes_seen: tuple | None = None  # the parameters' dtypes at the last step()
        self._check_agreement(opts)
        with device_scope(self.device):  # the stages' buffers on the model's GPU, whichever is current
            self.engine = KFACEngine(blocks, self.comm, damping=damping, factor_decay=factor_decay,
                                     factor_update_interval=factor_update_interval,
                                     inverse_update_interval=inverse_update_interval, kl_clip=kl_clip,
                                     assignment=assignment, comm_dtype=comm_dtype, xp=self.xp)
            self.local = LocalStatistics(blocks, accumulation_dtype(comm_dtype), self.xp)
        self._micro_batch = 0
        self._hook_seconds = 0.0
        self.timings = dict.fromkeys(ITERATION_STAGES, 0.0)
        self._totals = dict.fromkeys(ITERATION_STAGES, 0.0)
        self._timed_steps = 0
        self._broadcast = [broadcasts_batch(m) for m in self.modules]
        self._take_over_layers()
        self._removed: str | None = None  # why the hooks were removed (remove_hooks), None while in place
        self._hooks = CaptureHooks(self.modules, self._on_input, self._on_output_grad,
                                   self._broadcast, lambda: self._micro_batch, self._takes_statistics,
                                   attention_taps(self.modules, model))
        self._root_hook = model.register_forward_pre_hook(OwnedHook(model, self._on_model_input), with_kwargs=True)
        _HOOKED.add(self)  # once its hooks are in place: a later preconditioner may remove them
        self._discard_compiled_code()
        # The parameter slots each block covers: a bias given to a bias-free K-FAC layer later is
        # not the block's (it is averaged first-order, and named as added).
        # The attribute names are those of the kind each module was registered as, looked up once.
        self._param_names = [param_names(m) for m in self.modules]
        self._slots = [tuple(p is not None for p in block_params(m, names))
                       for m, names in zip(self.modules, self._param_names)]
        # The block of each covered parameter, in the order ``_block_params`` lists them: a slot
        # covered at construction is covered at every step (or ``_block_params`` raises).
        self._covered_block = [l for l, slots in enumerate(self._slots) for kept in slots if kept]
        # The shapes each block was built for, per slot: a layer resized later is named, not met by
        # a shape error deep in a hook or the gradient copy.
        self._shapes = [tuple(None if p is None else tuple(p.shape) for p in block_params(m, names))
                        for m, names in zip(self.modules, self._param_names)]
        self._structure = StructureAgreement(self.comm, [b.name for b in self.engine.blocks])
        self._io = GradientIO(self.engine.blocks, self._block_params())
        self._kept_views: dict[int, tuple[Any, torch.Tensor]] = {}
        # Hooks on the K-FAC parameters between the first step() and the second, and what each
        # follows: whether backwards met the .grad the first wrote still in place (``_watch_written``).
        self._written_hooks: list[Any] = []
        self._written_watch: list[list] = []
        # One .grad the last step() wrote, its parameter and its version then (_note_written).
        self._written_grad: tuple[Any, Any, int] | None = None
        # Until the first step(), whether each trained parameter's .grad had a nonzero entry after
        # the last backward that added to it (``_note_accumulated``): zeros that a zero_grad()
        # between backward() and step() left are told from a loss without any gradient.
        self._accumulated: dict[int, torch.Tensor] = {}
        self._accumulated_hooks = [p.register_post_accumulate_grad_hook(self._note_accumulated)
                                   for p in model.parameters() if p.requires_grad]

    # ----------------------------------------------------------------- setup
    def __reduce_ex__(self, protocol: Any) -> Any:
        """Refused (``pickle``, ``torch.save``, ``copy.copy``, ``copy.deepcopy``), with the remedy:
        a preconditioner holds its communicator, hooks on the model's modules and each block's
        running factors on its owner rank only, none of which a copy could carry."""
        raise TypeError("a KFACPreconditioner cannot be pickled or copied (torch.save(precond), "
                        "copy.deepcopy): it holds hooks on the model, a communicator and the running factors "
                        "of the blocks this rank owns; save precond.state_dict() (a collective: on every rank) and "
                        "load_state_dict() it into a new KFACPreconditioner built on the model")

    def __repr__(self) -> str:
        width = max([len(n or "(model)") for n, _, _ in self.coverage] + [6])
        lines = [f"KFACPreconditioner(device={self.device}, ranks={self.comm.size}, "
                 f"{len(self.modules)} of {len(self.coverage)} layers with parameters preconditioned)"]
        kinds = max([len(k) for _, k, _ in self.coverage] + [12])
        lines += [f"  {name or '(model)':<{width}}  {kind:<{kinds}} {status}" for name, kind, status in self.coverage]
        return "\n".join(lines)

    def _check_agreement(self, opts: dict[str, Any]) -> None:
        """One digest allreduce of every rank's layer list and options; on a difference, an
        allgather of them, and every rank raises CollectiveMismatchError naming the first
        differing layer (or option)."""
        kfac = {id(m) for m in self.modules}
        layers = [(name, type(m).__name__, "kfac" if id(m) in kfac else "first-order",
                   [(tuple(p.shape), str(p.dtype).removeprefix("torch.")) for p in m.parameters(recurse=False)])
                  for name, m in self.model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        # Schedules (callables) compare by kind only: their reprs hold per-process addresses.
        options = {k: "<callable>" if callable(v) else repr(v) for k, v in opts.items()
                   if k not in ("lr", "grad_scaler")}
        # A scaler's scale is undone in G: one rank with it and one without take other factors.
        options["grad_scaler"] = "enabled" if self.grad_scaler is not None and self.grad_scaler.is_enabled() \
            else "none"
        what = "KFACPreconditioner(...) construction"
        if self.comm.same_everywhere((layers, options), what):  # P lists per rank only to name a difference
            return
        everyone = self.comm.allgather_object((layers, options), what=what)
        for rank, (other_layers, other_options) in enumerate(everyone):
            for i in range(max(len(layers), len(other_layers))):
                mine = layers[i] if i < len(layers) else None
                theirs = other_layers[i] if i < len(other_layers) else None
                if mine != theirs:
                    first = everyone[0][0][i] if i < len(everyone[0][0]) else theirs
                    raise CollectiveMismatchError(
                        f"ranks disagree on the model at layer {i} ({first[0] if first else mine[0]!r}): "
                        f"rank {self.comm.rank} has {mine}, rank {rank} has {theirs}")
            if other_options != options:
                name = next(k for k in sorted(set(options) | set(other_options))
                            if options.get(k) != other_options.get(k))
                raise CollectiveMismatchError(f"ranks disagree on option {name}: rank {self.comm.rank} has "
                                              f"{options.get(name)}, rank {rank} has {other_options.get(name)}")

    def remove_hooks(self) -> None:
        """Remove every hook this preconditioner registered. It then sees no forward, and its
        ``step()`` raises RuntimeError; ``state_dict()`` and ``report()`` still work."""
        self._remove_hooks("remove_hooks() was called")

    def _remove_hooks(self, why: str) -> None:
        self._remove_written_hooks()
        self._remove_accumulated_hooks()
        self._hooks.remove()
        self._root_hook.remove()
        _HOOKED.discard(self)
        if self._removed is None:
            self._removed = why

    def _discard_compiled_code(self) -> None:
        """Discard ``torch.compile``'s compiled code when there is any (``torch.compiler.reset()``):
        compiled before the hooks were registered, it would go on running without them, every
        K-FAC layer silently first-order."""
        if not _compiled_code_exists():
            return
        torch.compiler.reset()
        self._note("torch.compile had compiled code from before this preconditioner's hooks were registered, "
                   "which would run the model without them (dynamo does not guard on module hooks): discarded "
                   "with torch.compiler.reset(), so compiled models compile again at their next call")

    def _take_over_layers(self) -> None:
        """Remove the hooks of earlier preconditioners on any of this one's layers, with a
        warning: left in place, each would take its statistics at every forward, for good."""
        mine = {id(m) for m in self.modules}
        for earlier in [p for p in _HOOKED if any(id(m) in mine for m in p.modules)]:
            shared = [b.name for b, m in zip(earlier.engine.blocks, earlier.modules) if id(m) in mine]
            self._note("a KFACPreconditioner built earlier on the same layers (%s%s) still had its hooks: "
                       "removed, so that it stops taking statistics at every forward (call remove_hooks() "
                       "on a preconditioner before replacing it)", ", ".join(shared[:3]),
                       ", ..." if len(shared) > 3 else "")
            earlier._remove_hooks("a KFACPreconditioner built later on the same layers took them over")

    # ----------------------------------------------------------------- hooks
    def _on_model_input(self, module: nn.Module, args, kwargs) -> None:
        # A checkpoint of the whole model recomputes it in backward: not a forward of its own.
        if not counts_call(module):
            return
        self._forwards += 1
        self._root_seen = True
        sizes = batch_candidates(list(tensors_in((args, kwargs))))
        if len(sizes) == 1:
            self._count(sizes[0])
        else:  # none, or several: the first K-FAC layer's input decides
            self._count_pending = sizes
            self._hooks.quiet = False
            if sizes:  # the likeliest until then: what a batch-shared layer firing first expands to
                self._micro_batch = sizes[0]

    def _count(self, examples: int) -> None:
        """Count a micro-batch of ``examples`` (and the sample its statistics use)."""
        self._count_pending = False
        # Until the next step(), a layer's call without statistics neither counts a pass (the
        # model's own forward counted it) nor settles a count: its hook need not report it.
        self._hooks.quiet = self._root_seen
        self._micro_batch = examples
        self._sample = math.ceil(self.statistics_fraction * examples)  # >= 1 unless the batch is empty
        self.local.add_examples(examples, self._sample)

    def _grad_scale(self, batch: int) -> float:
        """Factor turning the output gradients of a micro-batch of ``batch`` examples, with any
        GradScaler's scale undone (``_unscaled``), into per-example ones."""
        return batch * self.accumulation_steps

    def _unscaled(self, g: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(g', f)``: the output gradient ``g`` and the factor still to apply to its statistics
        to undo an enabled GradScaler's scale ``s`` (``(g, 1)`` without one). float16 ``g`` is
        kept, ``f = 1/s²``: its values are below 65504, so their Gram fits float32, and the
        kernels read half the bytes. Any other ``g`` is divided by ``s`` before the factor's
        product, in a float32 (float64) copy, ``f = 1``: a scale grown to 2^70 (under float32 or
        bf16 nothing overflows to stop its growth) makes the Gram of the scaled gradients
        overflow float32 and ``1/s²`` underflow, where the Gram of the true ones fits. The
        scaler keeps a power of two: either way the division is exact."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return g, 1.0
        if self._scaler_scale is None:
            # get_scale() reads the scale back from the GPU, waiting for its queue: once per
            # step, not once per layer in backward. The scale changes only in scaler.update(),
            # after step(), which forgets this reading.
            self._scaler_scale = float(self.grad_scaler.get_scale())
        if g.dtype == torch.float16:
            return g, self._scaler_scale ** -2
        dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
        return g.to(dtype, copy=True).mul_(1.0 / self._scaler_scale), 1.0

    def _on_input(self, index: int, a: torch.Tensor, output: Any = None, batch_first: bool = False
                  ) -> tuple[int, int, int, bool] | None:
        """Take a call's input ``a`` (``batch_first``: known to be batch-first, as an attention
        layer's projections hand it over); returns the token its output gradient comes with."""
        if a.dim() == 0:  # an Embedding takes one index without a batch axis; no rows to count
            raise ValueError(f"a: layer {self.engine.blocks[index].name} got a 0-d input: an unbatched input is "
                             "not supported (add a batch dimension)")
        if self._count_pending is not False:
            candidates = self._count_pending
            size, guessed = batch_size(candidates, int(a.shape[0]), self._broadcast[index])
            if guessed:
                self._warn_once("batch-guessed", (
                    f"model(...) was passed tensors of leading sizes {', '.join(map(str, candidates))} and the "
                    f"first K-FAC layer, {self.engine.blocks[index].name}, sees {int(a.shape[0])} rows, which do "
                    f"not say which is the batch: counted {size} examples per micro-batch, which scales the K-FAC "
                    "statistics wrong if it is not the batch size; pass the batch's tensors first and keep "
                    "tensors that are not per example (masks, settings) off the model's arguments (as buffers, "
                    "or built in forward)"))
            self._count(size)
        elif not self._root_seen and (not self._fired or index in self._fired):
            # Submodules called directly (the model's own forward never ran): a pass starts when
            # the first K-FAC layer fires, and again when a layer that already fired fires again.
            self._forwards += 1
            self._count(int(a.shape[0]))
            self._fired = set()
        self._fired.add(index)
        if not self._takes_statistics(index):
            return None
        if self._in_backward() and self._forwards_new > 1:
            # A reentrant checkpoint's recomputation: its forward ran without autograd, so the call is
            # seen only now, after every forward of the backward, and is counted with the latest.
            self._warn_once("recomputed-after-forwards", (
                f"layer {self.engine.blocks[index].name} was first seen in a backward pass that follows "
                f"{self._forwards_new} training forwards (torch.utils.checkpoint(use_reentrant=True) runs a "
                "block without autograd and calls it again in backward): its statistics are counted with the "
                "latest forward's examples, which is wrong when the forwards differ in size or the layers of "
                "an earlier one are all checkpointed; backpropagate each forward before the next, or use "
                "use_reentrant=False with context_fn=hpckfac.torch.checkpoint_context_fn"))
        if self._broadcast[index] and a.dim() == 1 and 0 < self._micro_batch != a.shape[0]:
            # (T,) ids shared by the batch (nanoGPT's wpe(torch.arange(T))) and the batch flattened
            # to (B * k,) ids look alike; read as the latter, shared ids count once, not per example.
            self._warn_once("one-dimensional-shared", (
                f"layer {self.engine.blocks[index].name} sees a 1-D input of shape {tuple(a.shape)} in a "
                f"micro-batch of {self._micro_batch} examples: read as the examples' indices flattened "
                f"({int(a.shape[0])} / {self._micro_batch} per example); if it is one input shared by the whole "
                "batch (position ids torch.arange(T)), its K-FAC statistics are wrong: pass it as ids[None], "
                "(1, T), which is expanded to the batch"))
        if a.device != self.device:  # torch's forward ran, so the layer's weights are there too
            raise self._moved(a.device)
        start = time.perf_counter()
        batch, sample = self._micro_batch, self._sample
        # The rows below are a function of the call's tensor, its contents (version) and these;
        # an inference tensor keeps no version, so it shares nothing.
        source = None if a.is_inference() else (a, a._version, batch, sample, batch_first)
        with device_scope(self.device):
            try:
                a = a if batch_first else self._batch_first(index, a, 0, batch)
                call = self.local.add_inputs(index, to_array(self._sampled(index, a, batch, sample)),
                                             output_size=self._output_size(index, output), source=source)
            except (ValueError, RuntimeError) as err:
                self._raise_if_resized(index, err)
                raise
        self._hook_seconds += time.perf_counter() - start
        # The call's micro-batch goes with it to its output gradient: forwards of several sizes
        # may all run before one backward (two batches whose losses are added), and the later
        # forwards have changed the count by then.
        return call, batch, sample, batch_first

    def _output_size(self, index: int, output: Any) -> tuple[int, ...] | None:
        """The spatial size of a transposed convolution's output, which its ``A`` needs: a call
        ``forward(x, output_size=...)`` pads the output beyond what the module's
        ``output_padding`` gives (a U-Net matching an odd-sized skip connection). None for
        other blocks."""
        if isinstance(self.engine.blocks[index], ConvTransposeBlock) and isinstance(output, torch.Tensor):
            return tuple(output.shape[2:])
        return None

    def _note_versions(self) -> None:
        """Before the first ``step()``, once per backward pass: each trainable parameter's
        in-place version counter, which ``step()`` compares with its own reading
        (``_changed_since_backward``)."""
        if self._task == -1 or self._versions_task != self._task:  # -1: the pass's id is not known
            self._versions_task = self._task
            self._versions = {name: p._version for name, p in self.model.named_parameters() if p.requires_grad}

    def _changed_since_backward(self) -> list[str]:
        """The parameters changed in place since the last backward pass the hooks saw (none when
        they saw none): an ``optimizer.step()`` run before ``step()`` has applied each rank's own
        gradient, and the preconditioned one this step writes comes too late."""
        named = dict(self.model.named_parameters())
        return [name for name, version in self._versions.items()
                if name in named and named[name]._version != version]

    def _takes_statistics(self, index: int) -> bool:
        """Whether a call of K-FAC layer ``index`` takes statistics now: on a factor-update step,
        unless every parameter its block covers is frozen. A pass that gives a layer's parameters
        no gradient is no part of their curvature: a GAN's generator step through a discriminator
        frozen for it would otherwise add the generator's loss to the discriminator's next step."""
        return self.engine.is_factor_step() and any(
            kept and p is not None and p.requires_grad
            for p, kept in zip(block_params(self.modules[index], self._param_names[index]), self._slots[index]))

    def _in_backward(self) -> bool:
        """Whether a backward pass is running on this thread. At the first hook of each backward
        pass it notes how many training forwards were counted since the one before began
        (``_forwards_new``)."""
        task = -1 if _graph_task is None else _graph_task()
        if task != -1 and task != self._task:
            self._task = task
            self._forwards_new, self._forwards_then = self._forwards - self._forwards_then, self._forwards
        return task != -1

    def _batch_first(self, index: int, t: torch.Tensor, side: int, batch: int) -> torch.Tensor:
        """``t`` (a layer's input, ``side`` 0, or output gradient, 1) with the batch axis first.

        A layer inside a ``batch_first=False`` module (``nn.TransformerEncoderLayer``, an
        ``nn.LSTM`` output) sees ``(positions, batch, ..., features)``; read as batch-first,
        its positions would count as examples and the examples as positions, so ``G`` (and a
        LayerNorm's per-example sums) would depend on the micro-batch size. Only blocks whose
        leading axes are all batch or positions (``feature_axes``) are moved; a leading size 1
        is a batch-shared input (``(1, T)`` position ids), not a sequence. As many positions
        as examples cannot be told apart: read batch-first, with a warning when the model has
        a ``batch_first=False`` module, where that reading may be the wrong one. Nor can
        ``(batch * k, batch, ...)`` rows: read sequence-first, with a warning for a block whose
        statistics differ between the two readings (unit-wise ones) unless the model has a
        ``batch_first=False`` module.
        """
        axes = self.engine.blocks[index].feature_axes
        if axes is None or t.ndim < 2 + axes[side] or t.shape[1] != batch:
            return t
        if t.shape[0] == 1:
            if batch > 1 and self._layer_first_model:
                self._warn_once("one-position", (
                    f"layer {self.engine.blocks[index].name} sees {tuple(t.shape)}: a leading axis of size 1, "
                    "read as one input shared by the whole batch (its examples as positions); if it is a "
                    "sequence-first input of one position, such as an RNN's final state h_n (num_layers, "
                    "batch, hidden), its G is scaled by 1/batch: pass the layer h_n[-1] or h_n.squeeze(0)"))
            return t
        if t.shape[0] == batch:
            if self._sequence_first_model:
                self._warn_once("ambiguous-layout", (
                    f"layer {self.engine.blocks[index].name} sees {tuple(t.shape)}: as many positions as "
                    "examples, read batch-first; if it runs sequence-first (inside or after a "
                    "batch_first=False module) its statistics take the wrong axis: make the micro-batch "
                    "size differ from the sequence length, or run the model batch_first=True"))
            return t
        if (t.shape[0] % batch == 0 and not self._sequence_first_model
                and not self.engine.blocks[index].averages_positions):
            # The batch flattened to (batch * k, positions, ...) rows with as many positions as
            # examples looks the same; a Kronecker block's factors agree under both readings, a
            # unit-wise block's per-example sums do not. A model with a batch_first=False module
            # runs sequence-first by design, where lengths that are multiples of the batch are
            # common and the warning would be noise.
            self._warn_once("flattened-or-sequence-first", (
                f"layer {self.engine.blocks[index].name} sees {tuple(t.shape)}: axis 1 has the micro-batch's "
                "size, read as a sequence-first input (positions, batch, ...); if it sees the batch flattened "
                "to (batch * k, positions, ...) rows with as many positions as examples, its statistics mix "
                "the examples: make the micro-batch size differ from the positions' count, or flatten the "
                "positions into the rows too"))
        return t.transpose(0, 1).contiguous()

    def _sampled(self, index: int, t: torch.Tensor, batch: int, sample: int) -> torch.Tensor:
        """The leading rows of a layer's input or output gradient ``t`` that its statistics
        take: all of them unless ``statistics_fraction`` < 1, then the same share of the rows
        as of the micro-batch of ``batch`` examples (``sample`` of them, ``ceil``): the first
        examples' rows where the layer sees the batch flattened example-major,
        ``(batch * positions, ...)``."""
        if sample >= batch or not self.engine.blocks[index].uses_sample:
            return t
        rows = int(t.shape[0])
        return t[:-(-rows * sample // batch)]

    def _on_output_grad(self, index: int, g: torch.Tensor, token: tuple[int, int, int, bool]) -> None:
        if not self.engine.is_factor_step():
            return
        call, batch, sample, batch_first = token  # from the call's forward (_on_input)
        self._in_backward()
        if not self._replicas_checked:
            self._note_versions()
        start = time.perf_counter()
        scale = self._grad_scale(batch) ** 2
        g = g if batch_first else self._batch_first(index, g, 1, batch)
        rows = int(g.shape[0])
        if self.engine.blocks[index].averages_positions and rows > batch > 0:
            # The micro-batch flattened to (batch * k, ...) rows: G averages each example's k rows
            # as the positions of a sequence, so the factors are those of the unflattened layer.
            scale *= batch / rows
        with device_scope(self.device):
            g, unscale = self._unscaled(self._sampled(index, g, batch, sample))
            try:
                taken = self.local.add_output_grads(index, to_array(g), scale * unscale, call)
            except (ValueError, RuntimeError) as err:
                self._raise_if_resized(index, err)
                raise
        self._hook_seconds += time.perf_counter() - start
        if not taken:
            self._warn_once("backward-twice", (
                f"layer {self.engine.blocks[index].name} got a second output gradient from one forward "
                "(backward() called more than once through its graph, e.g. one per loss with "
                "retain_graph=True): its K-FAC statistics take the first backward's gradient only, not "
                "the sum the parameters get; add the losses and call backward() once. A forward "
                "differentiated by torch.autograd.grad(..., create_graph=True) before its backward (a gradient "
                "penalty, as WGAN-GP's on interpolates) took that gradient, which is no loss's: run such a "
                "forward under hpckfac.torch.recomputing(), where K-FAC layers' calls are not seen"))

    # ------------------------------------------------------------------ step
    def current_lr(self) -> float:
        """The learning rate the KL clip uses at this step (ValueError naming ``lr`` unless
        it is a finite number >= 0: a warmup may start at 0, which leaves the clip at 1; or when
        its schedule cannot be called with the step, ``call_schedule``)."""
        lr = call_schedule("lr", self.lr, self.engine.steps) if callable(self.lr) else self.lr
        try:
            # A number (a one-element tensor too), not text or a bool that float() would read.
            value = math.nan if isinstance(lr, (str, bytes, bool, np.bool_)) else float(lr)
        except (TypeError, ValueError, RuntimeError):
            value = math.nan
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"lr: expected a finite number >= 0 at step {self.engine.steps}, got {lr!r}")
        return value

    def current_settings(self) -> dict[str, float | None]:
        """This step's ``lr``, ``damping``, ``factor_decay`` and ``kl_clip`` as numbers (a
        schedule evaluated at ``steps``; ``kl_clip`` None when the clip is off), e.g. to log
        them; ValueError naming a setting whose value is invalid at this step, as ``step()``
        would raise."""
        return {"lr": self.current_lr(), **self.engine.current_settings()}

    def _kept_tensor(self, buffer) -> torch.Tensor:
        """The torch view of one of the engine's buffers, made once: it keeps its send buffers
        and its gathered buffer from step to step."""
        if self._kept_views.get(id(buffer), (None,))[0] is not buffer:
            self._kept_views[id(buffer)] = (buffer, to_tensor(buffer))
        return self._kept_views[id(buffer)][1]

    def step(self) -> None:
        """Stages 1-4 and the allreduce of the other gradients; overwrites ``.grad``
        (a collective: call it on every rank, once per optimizer step)."""
        if self._removed is not None:
            # Before any collective: every rank removed the hooks alike (and one alone ends the job).
            raise RuntimeError(f"step() of a KFACPreconditioner whose hooks are removed ({self._removed}): it "
                               f"sees no forward, so it would average the gradients and precondition them with "
                               f"the factors it had, taking no statistics; step the preconditioner that holds "
                               f"the layers now, or build a new one")
        with device_scope(self.device), self.comm.calling("step()"), self.comm.instance(self.engine.instance):
            self._step()

    def _step(self) -> None:
        self._check_written()
        check_unscaled(self.grad_scaler)
        self._scaler_scale = None  # this step's hooks have run; the next ones read the scale anew
        lr = self.current_lr()  # validated before anything is reduced or written,
        current = self.engine.current_settings()  # as are the engine's schedules (run once a step)
        if not self._replicas_checked:
            self._check_first_step()
            self._replicas_checked = True
        self._check_forwards()
        again = self._forwards == 0 and self._written_unchanged()
        self._restart_forward_counts()
        start = self.engine.clock()
        named = list(self.model.named_parameters())  # one walk of the modules per step serves all below
        now = self._current_params()
        removed = self._structure.agree(named, now, self.engine.steps, again)  # before this rank alone can raise
        if removed:
            names = ", ".join(self.engine.blocks[i].name for i in removed)
            self._note_once("removed:" + names, (
                f"K-FAC layers no longer in the model: {names} (removed, or replaced by a new module, since "
                "the preconditioner was built): their blocks precondition nothing from now on and their "
                ".grad is set to None (a module in their place is averaged first-order)"))
        # The buffers, the inverses and the hooks' arrays live where the model was at construction:
        # a K-FAC layer moved since would fail in the gradient copy with torch's "can't convert".
        moved = next((p.device for ps in now for p in ps if p is not None and p.device != self.device), None)
        if moved is not None:
            raise self._moved(moved)
        params = self._block_params(now)
        for i in self._structure.gone:  # a removed layer's last gradient, kept, would be preconditioned again
            for p in params[i]:
                if p is not None:
                    p.grad = None
        stats = self.local.result() if self.engine.is_factor_step() else None
        missing = self._check_statistics(stats, params) if stats is not None and self.local.examples else []
        slots = self.engine.gradient_slots()
        buffer, offsets = self.engine.gradient_buffer()
        self._io.read(self._kept_tensor(buffer), offsets, params)
        self._io.read_generic(slots, params)
        if stats is not None and self.local.examples and not self._outside_checked:
            self._check_outside_statistics(stats, slots)
        self.timings["local_factors"] = self._hook_seconds + self.engine.clock() - start

        start = self.engine.clock()
        covered = [p for ps in params for p in ps if p is not None]  # covered[i] is block _covered_block[i]'s
        first_order, added = self._classify(named, covered)
        self._warn_added(added)
        dtypes = dtype_runs([p for _, p in named])
        if dtypes != self._dtypes_seen:  # the first step, or a cast since the last one
            self._dtypes_seen = dtypes
            self._warn_narrow_buffer(params)
        # Which K-FAC layers some rank's backward reached: the others keep .grad None below, as
        # first-order parameters do (an optimizer skips a None gradient, but decays a zero one).
        # Frozen ones send a flag too: the same count on every rank, whatever each rank froze.
        try:
            present = average_grads(first_order, self.comm, "auto", self.bucket_bytes, presence=covered,
                                    held=[] if stats is None else [st is not None for st in stats])
        except CollectiveMismatchError as err:
            changed = self.engine.local_change()
            if changed:  # this rank's statistics flags made the lengths differ: name the cause
                raise CollectiveMismatchError(f"{err}; {changed}") from None
            raise
        if stats is not None:
            self._absent_as_zeros(stats, present[len(covered):], missing)
        # A frozen parameter's flag says present whatever was reached: only the trained ones tell.
        reached = [False] * len(params)
        for block, p, had in zip(self._covered_block, covered, present):
            if had and p.requires_grad:
                reached[block] = True
        unreached = [p for block, p in zip(self._covered_block, covered) if not reached[block] and p.requires_grad]
        self._warn_no_gradient(reached, covered, first_order)
        overflow = agree_on_overflow(self.grad_scaler, self.comm, self.device)
        if stats is not None and overflow is not None and bool(overflow.item()):
            # scaler.step() skips this step on every rank: its statistics are left out too (every
            # block's, on every rank alike; finite ones as well, e.g. a layer whose output gradient
            # fitted while its weight gradient overflowed), so that the running averages and the
            # inverses stay those of the last step taken. One host read, on factor steps only.
            stats = [None] * len(stats)
        self.timings["allreduce"] = self.engine.clock() - start

        # A model, or one of its K-FAC layers, in eval() on one rank only takes no statistics there
        # and runs other forwards; a layer cast on one rank only (its gradient travels in the
        # buffer's dtype, a bfloat16 one as float32) runs another forward there and its optimizer
        # rounds the weights otherwise.
        training = self.model.training
        other_mode = tuple(b.name for b, m in zip(self.engine.blocks, self.modules) if m.training != training)
        updates = self.engine.step(slots, stats, lr=lr, settings={
            "accumulation_steps": self.accumulation_steps, "statistics_fraction": self.statistics_fraction,
            "parameter dtypes": dtypes, "training mode": training,
            "K-FAC layers not in the model's mode": other_mode, **current})
        start = self.engine.clock()
        whole, offsets = self.engine.gathered()
        gathered = self._kept_tensor(whole)
        self._io.write(gathered, offsets, params)
        self._io.write_generic(updates, params)
        flag_non_finite(self.grad_scaler, gathered)
        for param in unreached:
            param.grad = None
        self._note_written(covered)
        self.timings.update(self.engine.timings)
        self.timings["write_grads"] = self.engine.clock() - start
        self.local.reset()
        self._hook_seconds = 0.0
        for name in ITERATION_STAGES:
            self._totals[name] += self.timings[name]
        self._timed_steps += 1
        if self._timed_steps == 1:
            self._watch_written(params)
            self._warn_zero_gradient(covered, first_order)
            self._remove_accumulated_hooks()

    def _absent_as_zeros(self, stats: list, anyone: list[bool], missing: list[str]) -> None:
        """Where another rank has statistics for a block that this rank's examples never reached
        (a branch its micro-batch did not take), this rank's are zeros, not absent: one process
        taking every rank's micro-batches divides each layer's sums by all the examples, those
        that bypassed the layer included. Ranks without examples, and blocks whose statistics
        were dropped here or that are in eval() mode, stay absent. ``anyone[i]``: whether some
        rank has block ``i``'s statistics; ``missing``: the names of the blocks without
        statistics here, warned about when no rank has them."""
        if self.local.examples:
            dropped = set(self.local.unpaired)
            for i, (block, module) in enumerate(zip(self.engine.blocks, self.modules)):
                if stats[i] is None and anyone[i] and module.training and i not in dropped:
                    stats[i] = self.xp.zeros(block.stat_size, dtype=self.local.dtype)
        names = {b.name: had for b, had in zip(self.engine.blocks, anyone)}
        # Once per layer: a model that skips layers at random (LayerDrop) misses another set at nearly every step.
        missing = self._first_mentions("missing", [name for name in missing if not names[name]])
        if missing:
            _log.warning(f"K-FAC layers without statistics at step "
                         f"{self.engine.steps}: {', '.join(missing)} (not called in this training forward on "
                         "any rank, their weights used without calling them, an nn.MultiheadAttention's "
                         "projections run under torch.compile or in cross-attention, or inside a "
                         "checkpoint(use_reentrant=True) whose inputs do not require grad, where they get "
                         "no gradient either, or only inside a torch.func transform such as vmap, whose "
                         "calls are not seen); their running factors keep what earlier steps gave them, and a layer "
                         "with none yet has its gradient only averaged until it gets some (said once per layer)")

    @property
    def other_params(self) -> list[nn.Parameter]:
        """The model's trainable parameters that no K-FAC block covers, as they are now (a
        parameter unfrozen or a layer added after construction among them): ``step()``
        averages their gradients over ranks."""
        covered = [p for ps in self._block_params() for p in ps if p is not None]
        return self._classify(list(self.model.named_parameters()), covered)[0]

    def _current_params(self) -> list[tuple[nn.Parameter | None, nn.Parameter | None]]:
        """Each K-FAC layer's parameters as they are now (one replaced since construction, as
        by ``load_state_dict(assign=True)``, is the new one), in the slots its block covers (None
        elsewhere, and where the layer no longer has one: ``_block_params`` refuses that)."""
        out = []
        for module, names, (keep_weight, keep_bias) in zip(self.modules, self._param_names, self._slots):
            weight, bias = block_params(module, names)
            out.append((weight if keep_weight else None, bias if keep_bias else None))
        return out

    def _block_params(self, current: list[tuple[nn.Parameter | None, nn.Parameter | None]] | None = None
                      ) -> list[tuple[nn.Parameter | None, nn.Parameter | None]]:
        """``current`` (default ``_current_params()``), checked: ValueError naming a layer that
        lost a covered parameter, or whose parameters no longer have the shapes its block was
        built for, since construction."""
        current = self._current_params() if current is None else current
        for i, (params, slots) in enumerate(zip(current, self._slots)):
            if any(kept and p is None for p, kept in zip(params, slots)):
                raise ValueError(f"model: K-FAC layer {self.engine.blocks[i].name} no longer has every parameter "
                                 "its block covers as an nn.Parameter (one set to None, or replaced by a plain "
                                 "tensor or a parametrization, since the preconditioner was built): build the "
                                 "KFACPreconditioner once the model is complete")
            if any(p is not None and p.shape != shape for p, shape in zip(params, self._shapes[i])):
                raise ValueError(self._resized(i))
        return current

    def _resized(self, index: int) -> str | None:
        """The message naming K-FAC layer ``index``'s parameters whose shapes differ from those
        its block was built for, None when they do not."""
        module, names = self.modules[index], self._param_names[index]
        changed = [f"{name} has shape {tuple(p.shape)}, its block was built for {shape}"
                   for name, p, shape in zip(names, block_params(module, names), self._shapes[index])
                   if p is not None and shape is not None and p.shape != shape]
        if not changed:
            return None
        return (f"model: K-FAC layer {self.engine.blocks[index].name} ({type(module).__name__}) was resized after "
                f"the preconditioner was built: {'; '.join(changed)}; its curvature block has the old shapes: "
                "build the KFACPreconditioner once the model has its final shapes (a new one after resizing)")

    def _raise_if_resized(self, index: int, err: Exception) -> None:
        """ValueError from ``err`` (a hook's failure on K-FAC layer ``index``'s tensors) when
        that layer was resized since construction: the shape error alone names the block's
        sizes, not the change that caused it."""
        resized = self._resized(index)
        if resized is not None:
            raise ValueError(resized) from err

    def _classify(self, named: list[tuple[str, nn.Parameter]], covered: list[nn.Parameter]
                  ) -> tuple[list[nn.Parameter], list[str]]:
        """One pass over the model's ``named_parameters()``: the trainable parameters that no
        K-FAC block covers (``covered``: the blocks' parameters), and the names of those that
        were not first-order at construction (``_warn_added``)."""
        kfac = {id(p) for p in covered}
        first_order, added = [], []
        for name, p in named:
            if p.requires_grad and id(p) not in kfac:
                first_order.append(p)
                if name not in self._first_order_names:
                    added.append(name)
        return first_order, added

    def synchronize_timings(self, enabled: bool = True) -> None:
        """Wait for the device at every stage boundary of ``step()`` so that ``timings`` and
        ``report()`` give each stage's own time on a GPU (costs the overlap; for profiling)."""
        sync = None
        if enabled and self.device.type == "cuda":
            sync = lambda: torch.cuda.synchronize(self.device)  # noqa: E731
        self.engine.synchronize = sync

    @property
    def steps(self) -> int:
        """Completed ``step()`` calls."""
        return self.engine.steps

    @property
    def last_nu(self) -> float:
        """KL-clip factor applied at the last step (read on torch's current stream, after the
        step's kernels queued there: a side stream of torch's does not wait for CuPy's default one)."""
        with device_scope(self.device):
            return self.engine.last_nu

    # ---------------------------------------------------------------- report
    def stage_means(self) -> dict[str, float]:
        """This rank's mean milliseconds per ``step()`` of each stage since construction."""
        return {k: 1e3 * v / max(self._timed_steps, 1) for k, v in self._totals.items()}

    def memory(self) -> dict[str, int]:
        """Bytes of the buffers K-FAC keeps on this rank between steps, by kind:
        ``local_statistics`` (every block's statistics of a factor step, summed by the hooks),
        then ``KFACEngine.memory``'s kinds (send buffers, the received segment, the owned
        blocks' running factors and inverses, the gathered results). Each buffer counts once.
        Not collective; on a GPU they are device bytes. docs/design.md, "Memory per rank"."""
        return {"local_statistics": self.local.nbytes, **self.engine.memory()}

    def report(self, gather: bool = False) -> str:
        """Per-stage mean milliseconds per step since construction, as a table.

        By default this rank's own times (``stage``, ``mean_ms``), printed here and returned:
        safe to call on one rank (``if rank == 0: precond.report()``). With ``gather=True`` it is a
        collective (call it on every rank): the table shows the mean and max over
        ranks, printed on rank 0 and returned on every rank."""
        mean = self.stage_means()
        with self.comm.instance(self.engine.instance):
            everyone = self.comm.allgather_object(mean, what="report(gather=True)") if gather else [mean]
        rows = [{"stage": name, "mean_ms": float(np.mean([m[name] for m in everyone])),
                 "max_ms": float(np.max([m[name] for m in everyone]))} for name in ITERATION_STAGES]
        rows.append({"stage": "total", "mean_ms": sum(r["mean_ms"] for r in rows),
                     "max_ms": float(np.max([sum(m.values()) for m in everyone]))})
        # One rank's table has no spread over ranks to show: its max would repeat the mean.
        table = format_table(rows, ["stage", "mean_ms", "max_ms"] if gather else ["stage", "mean_ms"])
        if self.comm.rank == 0 or not gather:
            print(table)
        return table

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Step count, hyperparameters, layer names, and every block's running
        factors and inverses gathered to every rank (a collective), as torch
        tensors, so it ``torch.save``s and loads on any number of ranks: call it on every
        rank, then save on one (a rank that calls it alone gets ``CollectiveMismatchError``
        from the others' next collective, or waits, with a logged notice, if there is none)."""
        with device_scope(self.device):
            state = self.engine.state_dict()
        state["hyperparameters"].update(lr=None if callable(self.lr) else self.lr,
                                        accumulation_steps=self.accumulation_steps)
        state["blocks"] = blocks_as_tensors(state["blocks"])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` (saved at any rank count); each rank keeps its owned blocks.

        Validated on every rank before anything changes (ValueError naming the
        problem, see ``KFACEngine.load_state_dict``). The checkpoint's
        hyperparameters win, with a warning naming those that differ; a
        callable ``lr`` (a schedule) and ``accumulation_steps`` stay the caller's."""
        check_state_keys(state)
        hyper = dict(state["hyperparameters"])
        lr, saved = hyper.pop("lr", None), hyper.pop("accumulation_steps", self.accumulation_steps)
        saved = check_options(accumulation_steps=saved)["accumulation_steps"]
        lr = None if lr is None or callable(self.lr) else check_options(lr=lr)["lr"]
        blocks = blocks_as_arrays(state["blocks"])
        steps = state["steps"]
        with device_scope(self.device):
            # A tensor step count is read as the number it holds (a float one is then refused).
            self.engine.load_state_dict({"steps": steps.item() if isinstance(steps, torch.Tensor)
                                         and steps.numel() == 1 else steps,
                                         "hyperparameters": hyper, "blocks": blocks})
        # The micro-batches per step() are how this script's loop runs (at another rank count the
        # same global batch takes another number of them), not a state to restore: the loss
        # divided by the caller's count would meet G scaled by the checkpoint's.
        if saved != self.accumulation_steps:
            self._note("load_state_dict: keeping accumulation_steps %r (the checkpoint was saved with %r): "
                       "it must match this script's micro-batches per step()", self.accumulation_steps, saved)
        if lr is not None and self.lr != lr:
            self._note("load_state_dict: the checkpoint's lr %r replaces %r", lr, self.lr)
            self.lr = lr
        self._discard_pending()

    def _restart_forward_counts(self) -> None:
        """Forget the forwards counted since the last ``step()``: a new step's begin."""
        self._forwards, self._root_seen = 0, False
        self._forwards_then = self._forwards_new = 0
        self._hooks.quiet = False
        self._fired = set()

    def _discard_pending(self) -> None:
        """Forget the statistics of forwards taken since the last ``step()`` (micro-batches of a
        step the loaded state replaces): kept, the next factor step would add them to its own."""
        if self._forwards or self.local.passes:
            self._note("load_state_dict: dropping the statistics of %d training forward(s) taken since the last "
                       "step(); zero the gradients as well (optimizer.zero_grad()) and run the loaded step's "
                       "micro-batches from the first", max(self._forwards, self.local.passes))
        self.local.reset()
        self._restart_forward_counts()
        self._hook_seconds = 0.0
        # A GradScaler's scale read by those backwards: the caller may restore the scaler's saved
        # state with the preconditioner's, and the next backward must read the scale it sets.
        self._scaler_scale = None

