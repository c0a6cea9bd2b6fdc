"""Data-parallel helpers on ``hpckfac.comm``: identical starting weights,
gradient averaging for first-order baselines, a GradScaler's overflow agreed by every rank,
BatchNorm statistics averaging."""
from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from hpckfac.comm.dtypes import check_dtype
from hpckfac.torch.bridge import device_scope, to_array

if TYPE_CHECKING:
    from hpckfac.comm import Communicator
    from hpckfac.comm.agreement import ReduceAlgorithm


def _comm(comm: Communicator | None) -> Communicator:
    """``comm``, or the process's Communicator on COMM_WORLD (``world_communicator``: the one
    the script made, else one made on first use and reused)."""
    if comm is not None:
        return comm
    from hpckfac.comm import world_communicator

    return world_communicator()


def _scope(tensors: Sequence[torch.Tensor]):
    """CuPy on the tensors' GPU and torch's stream there (their buffers and kernels are
    made on that device, whichever is current)."""
    return device_scope(tensors[0].device if tensors else torch.device("cpu"))


def check_model(model: Any) -> nn.Module:
    """``model`` if it is an ``nn.Module``, else TypeError naming ``model``: what an optimizer
    takes (``model.parameters()``, a list of tensors) or a ``state_dict`` would otherwise fail
    deep inside with an AttributeError, or, on one rank, compare nothing."""
    if not isinstance(model, nn.Module):
        hint = (" (pass the model itself, not model.parameters() or its state_dict())"
                if isinstance(model, (Iterable, dict)) else "")
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}{hint}")
    return model


def _is_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype in (torch.float64, torch.float32, torch.float16)


def broadcast_parameters(model: nn.Module, comm: Communicator | None = None, root: int = 0) -> None:
    """Copy rank ``root``'s parameters and buffers (BatchNorm statistics
    included) into ``model`` on every rank, in place (a collective).

    Ranks whose models differ in the number, shapes or dtypes of their tensors, or that
    name different roots, raise ``CollectiveMismatchError`` on every rank instead of hanging."""
    from hpckfac.comm import CollectiveMismatchError

    check_model(model)
    comm = _comm(comm)
    named = list(model.named_parameters()) + list(model.named_buffers())
    tensors = [t for _, t in named]
    with comm.calling("broadcast_parameters()"), _scope(tensors):
        # The root too: bfloat16 and integer tensors go by MPI's Bcast, which checks nothing, so
        # ranks naming different roots would keep their own values there.
        what = "the root and the model's parameters and buffers"
        mine = {"root": root, "tensors": [_kind(t) for t in tensors]}
        if not comm.same_everywhere(mine, what):  # one small allreduce when they agree
            # The names only now, to say which tensor differs (the shapes and dtypes are compared,
            # not the names, as the broadcast pairs the tensors by position).
            everyone = comm.allgather_object((root, _named_kinds(named)), what=what)
            raise CollectiveMismatchError(f"ranks disagree on {what}: {_broadcast_difference(everyone)}")
        if isinstance(root, bool) or not isinstance(root, numbers.Integral) or not 0 <= root < comm.size:
            raise ValueError(f"root must be a rank in [0, {comm.size}), got {root!r}")  # alike on every rank
        for tensor in tensors:
            if _is_float(tensor):
                comm.broadcast(to_array(tensor), root=root)
            else:  # integer buffers (BatchNorm's num_batches_tracked), bfloat16: their bytes, through the host
                host = tensor.detach().cpu().contiguous()
                comm.mpi.Bcast(host.reshape(-1).view(torch.uint8).numpy(), root=root)
                with torch.no_grad():
                    tensor.copy_(host)


def _broadcast_difference(everyone: Sequence[tuple[Any, list[tuple[str, str]]]]) -> str:
    """What differs between the ranks' roots, or else their tensors (each rank's root and
    ``_named_kinds``), alike on every rank."""
    roots = [root for root, _ in everyone]
    if any(root != roots[0] for root in roots):
        return "root: " + ", ".join(f"rank {r} has {root!r}" for r, root in enumerate(roots) if r == 0 or root != roots[0])
    return _tensor_difference([tensors for _, tensors in everyone])


def _named_kinds(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str]]:
    """Each tensor's name and ``_kind``, in order."""
    return [(name, _kind(tensor)) for name, tensor in named]


def _tensor_difference(everyone: Sequence[Sequence[tuple[str, str]]]) -> str:
    """The first tensor, by position, of another shape or dtype between the ranks (each rank's
    ``_named_kinds``), or else their numbers of tensors, alike on every rank. Names are shown,
    not compared: collectives pair tensors by position, whatever they are called."""
    for index in range(min(map(len, everyone))):
        if any(theirs[index][1] != everyone[0][index][1] for theirs in everyone):
            held = _ranks_by(f"{name} {kind}" for name, kind in (theirs[index] for theirs in everyone))
            return f"tensor {index} is {_on_ranks(held)}: {DIFFERENT_MODELS}"
    return f"tensors: {_on_ranks(_ranks_by(len(theirs) for theirs in everyone))}: {DIFFERENT_MODELS}"


@contextlib.contextmanager
def _naming_tensors(comm: Communicator, named: Callable[[], Sequence[tuple[str, torch.Tensor]]], call: str,
                    what: str) -> Iterator[None]:
    """Within the block (``call``, e.g. ``"allreduce_gradients()"``), a CollectiveMismatchError
    that every rank raised in the same collective becomes one naming the first of ``named()``
    whose shape or dtype differs between the ranks (an allgather of their names and kinds, only
    then: ``named`` is called there alone): the collective itself can say only
    that the buffers' lengths differ. Other mismatches (different calls, or equal tensors and
    other arguments) pass unchanged."""
    from hpckfac.comm import CollectiveMismatchError

    try:
        yield
    except CollectiveMismatchError as err:
        if not err.same_call:
            raise
        everyone = comm.allgather_object(_named_kinds(named()), what=what)
        if all([kind for _, kind in theirs] == [kind for _, kind in everyone[0]] for theirs in everyone):
            raise
        raise CollectiveMismatchError(f"{call}: ranks disagree on {what}: {_tensor_difference(everyone)}",
                                      same_call=True) from err


def _ranks_by(values: Iterable[Any]) -> dict[Any, list[int]]:
    """Each distinct value of ``values`` (one per rank, in rank order) and the ranks holding it."""
    held: dict[Any, list[int]] = {}
    for rank, value in enumerate(values):
        held.setdefault(value, []).append(rank)
    return held


def _on_ranks(held: dict[Any, list[int]]) -> str:
    """``_ranks_by``'s groups as ``"<value> on ranks [..], <value> on ranks [..]"``."""
    return ", ".join(f"{value} on ranks {ranks}" for value, ranks in held.items())


def _kind(tensor: torch.Tensor) -> str:
    """A tensor's shape and dtype as the mismatch errors show them: ``(4, 3) float32``."""
    return f"{tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')}"


def check_replicas(model: nn.Module, comm: Communicator | None = None, buffers: bool = False) -> None:
    """Confirm that every rank holds the same parameter values (a collective).

    Data-parallel replicas must stay identical; a rank that drifted (a different
    learning rate in its optimizer, a missed step, a nondeterministic update)
    makes every rank raise ``CollectiveMismatchError`` naming the first tensor
    that differs and the ranks holding other values. One digest per tensor
    travels (each tensor is copied to the host and hashed there);
    ``buffers=True`` compares buffers too (BatchNorm statistics differ
    between ranks unless ``sync_batchnorm_stats`` ran)."""
    from hpckfac.comm import CollectiveMismatchError

    found = replica_difference(model, comm, buffers)
    if found is not None:
        raise CollectiveMismatchError(f"replicas differ: {found}")


# The end of ``replica_difference``'s answer when the ranks' models hold different tensors, which
# no broadcast of the weights can mend.
DIFFERENT_MODELS = "the ranks' models differ"


def replica_difference(model: nn.Module, comm: Communicator | None = None, buffers: bool = False) -> str | None:
    """The first difference between the ranks' tensors of ``model``, alike on every rank
    (``"0.weight has 2 different values (ranks [0]; ranks [1])"``), or None when every rank
    holds the same values (a collective; ``check_replicas`` raises on it)."""
    check_model(model)
    comm = _comm(comm)
    if comm.size == 1:  # nothing to compare with: no hashing of every tensor
        return None
    named = list(model.named_parameters()) + (list(model.named_buffers()) if buffers else [])
    # The shape and dtype beside the digest: bytes alone would call a tensor of another shape
    # (a layer of another width on some ranks) one of "different values", to be broadcast.
    digests = [(name, _digest(t), _kind(t)) for name, t in named]
    # buffers=True on some ranks only is a call of its own there, named as such, not models that differ.
    what = "check_replicas(buffers=True)" if buffers else "check_replicas()"
    if comm.same_everywhere(digests, what):  # one small allreduce when they agree
        return None
    everyone = comm.allgather_object(digests, what=what)
    # Tensors that some ranks lack first: compared by position, they would read as other values.
    names = [{name for name, *_ in theirs} for theirs in everyone]
    common = set.intersection(*names)  # one pass over every rank's names, not one per name
    for theirs in everyone:
        for name, *_ in theirs:
            if name not in common:  # e.g. a module added on some ranks only
                having = [rank for rank, held in enumerate(names) if name in held]
                return f"{name} is a tensor of ranks {having} only: {DIFFERENT_MODELS}"
    kinds = [{name: kind for name, _, kind in theirs} for theirs in everyone]
    for name, *_ in everyone[0]:  # tensors of other shapes or dtypes before other values
        held = _ranks_by(theirs[name] for theirs in kinds)
        if len(held) > 1:
            return f"{name} is {_on_ranks(held)}: {DIFFERENT_MODELS}"
    for index, (name, *_) in enumerate(everyone[0]):
        holders = _ranks_by(theirs[index][1] if index < len(theirs) and theirs[index][0] == name else "missing"
                            for theirs in everyone)
        if len(holders) > 1:
            groups = "; ".join(f"ranks {ranks}" for ranks in holders.values())
            return f"{name} has {len(holders)} different values ({groups})"
    return None


def _digest(tensor: torch.Tensor) -> str:
    """A digest of ``tensor``'s bytes, taken on the host."""
    return hashlib.blake2b(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                           digest_size=16).hexdigest()


def gradients_alike(model: nn.Module, comm: Communicator) -> bool:
    """Whether every rank holds the same nonzero local gradients (a collective): with the
    same weights, the sign that every rank took the same batch."""
    grads = [p.grad for p in model.parameters() if p.grad is not None and p.grad.layout == torch.strided]
    mine = [_digest(g) for g in grads] if any(bool(g.any()) for g in grads) else None
    return comm.same_everywhere(mine, "the first step()'s gradient comparison") and mine is not None


def dtype_runs(params: Sequence[torch.Tensor]) -> tuple[tuple[int, str], ...]:
    """The dtypes of ``params`` as runs: ``(index, dtype)`` where a run of one dtype starts
    (``((0, "float32"),)`` for a float32 model), short enough to compare and name every step."""
    runs: list[tuple[int, str]] = []
    last = None
    for i, p in enumerate(params):
        if p.dtype != last:  # named only where a run starts: once for most models
            last = p.dtype
            runs.append((i, str(last).removeprefix("torch.")))
    return tuple(runs)


def allreduce_gradients(model: nn.Module, comm: Communicator | None = None, algorithm: ReduceAlgorithm = "auto",
                        bucket_bytes: int | None = None) -> None:
    """Average every ``.grad`` of ``model`` over ranks in place, with the same
    fused allreduce the K-FAC preconditioner uses for non-K-FAC parameters (a collective:
    call it on every rank): ``algorithm="auto"`` takes hpckfac's ring for each bucket large
    enough that its messages are not bound by latency, MPI's allreduce for the others
    (``Communicator.allreduce``); ``"ring"`` or ``"mpi"`` forces one. A trainable parameter
    without a gradient on some ranks counts as zero there (``average_grads``)."""
    check_model(model)
    comm = _comm(comm)

    def trained() -> list[tuple[str, torch.Tensor]]:
        # Only on the error path: named_parameters() walks the model, a cost on every step.
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    call = "allreduce_gradients()"
    with comm.calling(call), _naming_tensors(comm, trained, call, "the model's trainable parameters"):
        average_grads(model.parameters(), comm, algorithm, bucket_bytes)


def average_grads(params: Iterable[nn.Parameter], comm: Communicator, algorithm: ReduceAlgorithm = "auto",
                  bucket_bytes: int | None = None,
                  presence: Sequence[torch.Tensor] = (), held: Sequence[bool] = ()) -> list[bool]:
    """Average the ``.grad`` of every trainable parameter of ``params`` over the ranks of
    ``comm``, in place, fused into buffers of at most ``bucket_bytes`` (the Communicator's
    default when None); a collective.

    A parameter without a gradient on a rank (a layer its batch did not reach: stochastic
    depth, a branch taken by some examples only) counts as a zero gradient there, so each
    parameter's mean is over every rank, the gradient of the global batch's mean loss; it
    gets a ``.grad`` unless no rank has one. One flag per parameter travels with the
    gradients and says which; ranks that lack none read nothing back. The flags of the
    ``presence`` parameters (the preconditioner's, whose gradients travel elsewhere) travel
    too: returned is, for each of them, whether any rank has a ``.grad`` for it (True for a
    frozen one), followed, for each of ``held`` (whether this rank holds something, the same
    count on every rank), by whether any rank holds it. Under ``algorithm="auto"`` flags with no
    gradient to carry (a model whose every parameter a K-FAC block covers) take MPI's
    allreduce, as any small bucket: a ring's ``2(P-1)`` messages would make a few bytes cost
    milliseconds at a thousand ranks, where MPI's latency-bound algorithms send ``log2 P``."""
    params = [p for p in params if p.requires_grad]
    if comm.size == 1:
        # Each gradient is its own mean: no buffers, views or flags (on a GPU, a CuPy view per
        # gradient and a device fill per missing one, every step of a one-GPU run).
        grads = [p.grad for p in params if p.grad is not None]
        _refuse_sparse(grads)
        _refuse_uncarried(grads)  # as the collectives refuse them at several ranks
        return [p.grad is not None or not p.requires_grad for p in presence] + [bool(h) for h in held]
    flagged = params + list(presence)
    # A frozen ``presence`` parameter counts as present: no read back for it on every step.
    missing = [i for i, p in enumerate(flagged) if p.grad is None and p.requires_grad]
    missing += [len(flagged) + i for i, h in enumerate(held) if not h]
    count = len(flagged) + len(held)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    kwargs = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
    flags = []
    if count:  # every rank calls the collective, with or without parameters (a mismatch is named)
        device = flagged[0].device if flagged else torch.device("cpu")
        flags = [torch.ones(count, dtype=_flag_dtype(params), device=device)]
        for i in missing:
            flags[0][i] = 0  # a fill of one element where it lives: no upload from the host
    carried = _carried(grads)
    with _scope(grads):
        try:
            # A sparse gradient goes in as it is: the collective's argument check refuses it on
            # this rank and the others learn of it there, instead of waiting.
            comm.allreduce_many([to_array(t) if t.layout == torch.strided else t for t in carried + flags],
                                op="mean", algorithm=algorithm, **kwargs)
        except TypeError:
            _refuse_sparse(grads)
            raise
    _write_back(grads, carried)
    present = [True] * count
    if missing:
        anyone = flags[0][missing].cpu().tolist()
        for i, had in zip(missing, anyone):
            present[i] = had > 0
            if had > 0 and i < len(params):
                params[i].grad = grads[i]
    return present[len(params):]


def _refuse_sparse(grads: Iterable[torch.Tensor]) -> None:
    """ValueError if one of ``grads`` is sparse: the dense collectives cannot carry it."""
    if any(g.layout != torch.strided for g in grads):
        raise ValueError("params: a sparse gradient (an nn.Embedding with sparse=True?) cannot be averaged "
                         "by the dense collectives; use sparse=False") from None


# The gradient dtypes the collectives carry (bfloat16 as a float32 copy, ``_carried``).
_CARRIED_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


def _refuse_uncarried(grads: Iterable[torch.Tensor]) -> None:
    """TypeError, the collectives' own, if one of ``grads`` has a dtype they cannot carry (a
    complex gradient)."""
    for g in grads:
        if g.dtype not in _CARRIED_DTYPES:
            check_dtype(torch.empty(0, dtype=g.dtype).numpy().dtype)  # raises, naming the dtype


def _carried(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as a collective carries them: bfloat16 ones (MPI has no bfloat16 sum) as
    float32 copies, to be written back by ``_write_back``, the others as they are."""
    return [t.float() if t.dtype == torch.bfloat16 and t.layout == torch.strided else t for t in tensors]


def _write_back(tensors: Sequence[torch.Tensor], carried: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for tensor, copy in zip(tensors, carried):
            if copy is not tensor:
                tensor.copy_(copy)


def _flag_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """The flags' dtype: the first of the averaged ``params``' where a collective carries it,
    so that they share its fusion bucket (a mean of 0s and 1s over ranks is > 0 in float16
    too); float32 when no gradient travels with them. Alone, float16 flags would take MPI's
    float16 sum, a Python user op on host memory: staged through the host even on a
    CUDA-aware MPI, every step."""
    return params[0].dtype if params and _is_float(params[0]) else torch.float32


def agree_on_overflow(scaler: Any, comm: Communicator, device: torch.device) -> torch.Tensor | None:
    """With a GradScaler, ``scaler.unscale_(optimizer)`` before ``step()`` records in
    ``found_inf`` whether this rank's own gradients overflowed; averaged, the gradients are
    then non-finite on every rank, so every rank must skip the step. Every rank with an
    enabled scaler sends one flag, whatever it recorded (one small allreduce on ``device``,
    which the stream orders, no host read), and every recorded flag takes the sum (a
    collective). The flag is a few bytes, so it takes MPI's latency-bound allreduce (``log2 P``
    messages), not the ring's ``2(P-1)``, which would cost milliseconds every step at a thousand
    ranks.

    Returns the agreed flag (a one-element float32 tensor on ``device``, > 0 when some rank
    overflowed: the same on every rank), or None without an enabled scaler."""
    if scaler is None or not scaler.is_enabled():
        return None
    found = _found_inf(scaler)
    anyone = torch.zeros(1, dtype=torch.float32, device=device)
    for flag in found:  # none when unscale_ found no gradient
        anyone = torch.maximum(anyone, flag.reshape(1).to(device, torch.float32))
    comm.allreduce(to_array(anyone), op="sum", algorithm="mpi")
    for flag in found:
        flag.copy_(anyone.clamp(max=1.0).to(flag.device, flag.dtype).reshape(flag.shape))
    return anyone


def check_unscaled(scaler: Any) -> None:
    """ValueError naming ``grad_scaler`` when an enabled GradScaler has unscaled no optimizer's
    gradients since its last ``update()``: ``step()`` would precondition gradients still
    multiplied by the scale, which the KL clip reads as a step that many times too large (it
    shrinks the update by the scale, 65536 by default), and the overflow flags it agrees on
    would not exist yet."""
    if scaler is not None and scaler.is_enabled() and not any(
            "found_inf_per_device" in state for state in scaler._per_optimizer_states.values()):
        raise ValueError("grad_scaler: step() was called before scaler.unscale_(optimizer), so .grad is still "
                         "multiplied by the scale: call scaler.unscale_(optimizer) after the backward passes and "
                         "before precond.step(), then scaler.step(optimizer) and scaler.update()")


def flag_non_finite(scaler: Any, values: torch.Tensor) -> None:
    """Record in an enabled GradScaler's ``found_inf`` flags (those ``scaler.unscale_`` set) that
    ``values``, the preconditioned gradients, are not finite, so that ``scaler.step`` skips the
    step and ``scaler.update`` lowers the scale. Finite gradients can overflow after ``unscale_``
    checked them: beyond 65504 in a float16 buffer (``factor_dtype``), the KL clip's nu is then
    NaN. ``values`` are the same on every rank, so every rank decides alike; no host read."""
    if scaler is None or not scaler.is_enabled():
        return
    found = _found_inf(scaler)
    if found:
        bad = torch.isfinite(values).all().logical_not()
        for flag in found:
            flag.copy_(torch.maximum(flag, bad.to(flag.device, flag.dtype).reshape(flag.shape)))


def _found_inf(scaler: Any) -> list[torch.Tensor]:
    """The ``found_inf`` flags ``scaler.unscale_`` recorded since the last ``scaler.update()``.
    The scaler keeps them in its per-optimizer state, which has no public accessor."""
    return [flag for state in scaler._per_optimizer_states.values()
            for flag in state.get("found_inf_per_device", {}).values()]


def sync_batchnorm_stats(model: nn.Module, comm: Communicator | None = None,
                         examples: float | None = None) -> None:
    """Average BatchNorm ``running_mean`` and ``running_var`` over ranks in place (a
    collective: call it on every rank).

    Each rank's statistics come from its own shards, so replicas differ after
    training; call this before evaluating or checkpointing. The variance is the
    mean of the ranks' running variances (the spread of the running means
    between ranks is not added).

    ``examples`` (given on every rank or on none): how many examples this rank's statistics
    come from since they were last synchronised; the ranks' statistics are then weighted by
    it, so that a rank whose shard was short counts less and one that saw no example (its
    statistics unchanged) counts not at all. ValueError naming ``examples`` unless it is a
    finite number >= 0, or when every rank passes 0 or their sum is not a finite float64;
    ranks that disagree on whether they pass it raise ``CollectiveMismatchError`` on every
    rank. On failure the statistics are unchanged.
    """
    check_model(model)
    comm = _comm(comm)
    named = [(f"{name}.{stat}", getattr(module, stat)) for name, module in model.named_modules()
             if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
             for stat in ("running_mean", "running_var")]
    tensors = [tensor for _, tensor in named]
    call = "sync_batchnorm_stats()"
    what = "the model's BatchNorm statistics"
    with _scope(tensors), comm.calling(call), _naming_tensors(comm, lambda: named, call, what):
        if examples is None:
            carried = _carried(tensors)
            comm.allreduce_many([to_array(t) for t in carried], op="mean", algorithm="auto")
        else:
            carried = _weighted(tensors, examples, comm)
    _write_back(tensors, carried)


def _finite(value: numbers.Real) -> bool:
    """Whether ``value`` is a finite float64: an int too large for one (``10**400``) is not,
    where ``math.isfinite`` would raise OverflowError on this rank alone, before the collective
    that tells the other ranks."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _weighted(tensors: Sequence[torch.Tensor], examples: Any, comm: Communicator) -> list[torch.Tensor]:
    """The ranks' ``tensors`` averaged with weights ``examples`` (the rank's share of the
    total), in copies, so that a refused collective leaves the statistics as they were. The
    total and a count of invalid ``examples`` travel together, so that a bad value on one rank
    raises on every rank. A rank with no examples sends zeros rather than a zero multiple of
    its statistics (NaN stays NaN)."""
    valid = not isinstance(examples, bool) and isinstance(examples, numbers.Real) and _finite(examples) \
        and examples >= 0
    total = np.array([float(examples) if valid else 0.0, 0.0 if valid else 1.0])
    comm.allreduce(total, op="sum", algorithm="mpi")
    if not valid:
        raise ValueError(f"examples: expected a finite number >= 0 (this rank's examples since the last "
                         f"sync), got {examples!r}")
    if total[1]:
        raise ValueError(f"examples: {int(total[1])} other rank(s) passed an invalid value")
    if total[0] == 0:
        raise ValueError("examples: every rank passed 0, so no rank's statistics can be kept")
    if not math.isfinite(total[0]):  # each share would be 0: every statistic zeroed
        raise ValueError("examples: the ranks' counts add up to more than a float64 holds")
    share = float(examples) / total[0]
    with torch.no_grad():
        # Half-precision statistics weighted in float32, so that the result is rounded once, not
        # each rank's share (bfloat16 would travel as float32 anyway: MPI has no bfloat16 sum).
        carried = [t.float() if t.dtype in (torch.bfloat16, torch.float16) else t.clone() for t in tensors]
        for copy in carried:
            if share:
                copy.mul_(share)
            else:
                copy.zero_()
    comm.allreduce_many([to_array(t) for t in carried], op="sum", algorithm="auto")
    return carried
