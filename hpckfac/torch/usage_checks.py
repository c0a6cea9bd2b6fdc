"""The misuse checks of ``KFACPreconditioner``: what ``step()`` tells a user whose loop or model
is not what the preconditioner expects, and the warnings' one-per-job bookkeeping.

``UsageChecks`` is the preconditioner's base class: its methods read the preconditioner's
state (communicator, engine, local statistics, modules) and change none of the pipeline's; each
check says what it found once (``_warn_once``), on rank 0 alone where every rank sees the same
(``_note``, ``_note_once``). The first ``step()`` compares the ranks' weights; each step checks
the forwards and statistics that fed it; the first two steps follow the gradients through
hooks to tell a missing or misplaced ``zero_grad()``. docs/preconditioner.md, "Failures", lists
what each says.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch import nn

from hpckfac.arrays import to_host
from hpckfac.comm import CollectiveMismatchError
from hpckfac.log import get_logger
from hpckfac.torch.distributed import DIFFERENT_MODELS, gradients_alike, replica_difference

_log = get_logger("hpckfac.torch")


# Attributes naming the .grad tensors that step() wrote, by which the checks find them again, and
# their tokens: integers, which a tensor saved with them loads with (torch.load(weights_only=True)).
_WRITTEN, _WATCHED = "_hpckfac_written", "_hpckfac_watched"
_tokens = itertools.count(1)


def _mark(grad: torch.Tensor, attribute: str) -> int:
    """A new token, set on ``grad`` as ``attribute``: ``_marked`` tells by it whether a parameter's
    ``.grad`` is still this very tensor. Neither a weak reference, as torch refuses to swap a
    tensor that has one (``torch.__future__.set_swap_module_params_on_conversion(True)`` in
    ``model.to(...)``, ``model.double()``, ``model.load_state_dict(...)``), nor a strong one, which
    would keep the gradient's memory after ``zero_grad()``."""
    token = next(_tokens)
    setattr(grad, attribute, token)
    return token


def _marked(param: torch.Tensor, token: int | None, attribute: str) -> torch.Tensor | None:
    """``param.grad`` when it is the tensor ``_mark`` gave ``token``, else None (also for a
    ``token`` of None: no tensor followed)."""
    grad = param.grad
    return grad if token is not None and grad is not None and getattr(grad, attribute, None) == token else None


def _unmark(param: torch.Tensor, token: int | None, attribute: str) -> None:
    """Remove the mark ``token`` from ``param.grad`` where it still carries it: the check that set
    it reads it no more, and a user's tensor keeps no attribute of ours it does not need."""
    if _marked(param, token, attribute) is not None:
        delattr(param.grad, attribute)


class UsageChecks:
    """The checks and warnings of ``KFACPreconditioner.step()`` (a base class: it holds no state
    of its own beyond what the preconditioner sets up)."""

    def _check_first_step(self) -> None:
        """At the first ``step()``: the ranks' weights compared (``CollectiveMismatchError`` on
        every rank where they differ, naming the likely cause), a warning where the optimizer
        stepped before ``precond.step()``, and a note where every rank took the same batch."""
        changed = self._changed_since_backward()
        early = (f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} changed in place after "
                 "this step's backward: optimizer.step() before precond.step()? The optimizer then applies "
                 "each rank's own plain gradient, and the preconditioned, averaged .grad that step() writes "
                 "comes too late; call precond.step() between backward() and optimizer.step()")
        # Averaged gradients keep replicas apart forever if they start apart: say so now.
        found = replica_difference(self.model, self.comm)
        if found is not None and found.endswith(DIFFERENT_MODELS):
            raise CollectiveMismatchError(f"replicas differ at the first step(): {found}; every rank must build "
                                          "the same model and change it alike (a module added or removed on "
                                          "some ranks only after the KFACPreconditioner was built?)")
        if found is not None and changed:
            raise CollectiveMismatchError(f"replicas differ at the first step(): {found}; {early}")
        if found is not None:
            raise CollectiveMismatchError(f"replicas differ at the first step(): {found}; every rank must "
                                          "start from the same weights: call broadcast_parameters(model, "
                                          "comm) on every rank before training")
        if changed:
            self._warn_once("stepped-early", f"parameters {early}")
        if self.comm.size > 1 and not self._ddp and gradients_alike(self.model, self.comm):
            self._note("every rank has the same gradients at the first step(): the %d ranks took the same "
                       "batch and train as one would; give each rank its own shard of every global batch "
                       "(DistributedSampler(dataset, num_replicas=comm.size, rank=comm.rank); a "
                       "DataLoader(shuffle=True) alone gives ranks seeded alike the same batches)", self.comm.size)

    def _note(self, message: str, *args: Any) -> None:
        """A warning about what every rank has alike (the model, a checkpoint): said by rank 0
        only, not once per rank."""
        if self.comm.rank == 0:
            _log.warning(message, *args)

    def _note_once(self, key: str, message: str) -> None:
        """``_warn_once`` for what every rank has alike: said by rank 0 only."""
        if self.comm.rank == 0:
            self._warn_once(key, message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message)

    def _check_forwards(self) -> None:
        """Warn, once each, about a step() without a training forward, a factor step without
        examples on this rank, and forwards that do not match ``accumulation_steps``."""
        if self._forwards == 0:
            # Either a second step() for one backward (its gradients preconditioned twice) or a model in
            # eval() mode: the hooks cannot tell, so the warning names both.
            self._warn_once("no-forward", "step() without a training forward/backward since the last step(): the "
                            ".grad present are averaged and preconditioned with the current inverses, no "
                            "statistics taken (a second step() for one backward preconditions its gradients "
                            "twice: call step() once per optimizer step; in eval() mode, under torch.no_grad() "
                            "or inside a torch.func transform such as vmap no statistics are taken)")
        elif self.local.examples == 0 and any(self._takes_statistics(i) for i in range(len(self.engine.blocks))):
            # (a model with no K-FAC layer has no statistics to take: construction said so; nor has
            # one whose K-FAC layers are all frozen, fine-tuning only first-order parameters)
            self._warn_once("no-statistics", "a factor-update step without statistics on this rank: no "
                            "examples reached a K-FAC layer in a backpropagated training forward (an empty batch, "
                            "eval() mode, torch.no_grad(), or step() before the loss's backward())")
        passes = self.local.passes
        # Fewer forwards after the first step: an epoch's uneven last group, its losses divided by
        # accumulation_steps all the same in torch's recipe.
        if passes and self.engine.is_factor_step() and (passes > self.accumulation_steps or (
                passes < self.accumulation_steps and self.engine.steps == 0)):
            self._warn_once("passes", (
                f"{passes} backpropagated training forwards before step() {self.engine.steps} with "
                f"accumulation_steps={self.accumulation_steps}: G takes each forward's loss as the mean over its "
                "micro-batch divided by accumulation_steps: if these forwards accumulate micro-batches with "
                "their losses divided by their number, set accumulation_steps to it; forwards whose undivided "
                "losses are added in one backward (a GAN's real and generated batches) are right as they are"))

    def _warn_no_gradient(self, reached: list[bool], covered: list[nn.Parameter],
                          first_order: list[nn.Parameter]) -> None:
        """Warn, once, about a step at which no rank has a gradient for any trained parameter:
        ``step()`` then writes no ``.grad``, and a loop in that order does so at every step
        without any error of torch's, training the replicas apart on their own plain gradients
        (a backward after ``step()``) or not at all (``zero_grad()`` before it). ``reached``
        and the first-order ``.grad`` after their average say what any rank had, so every rank
        sees the same; rank 0 says it."""
        if any(reached) or any(p.grad is not None for p in first_order):
            return
        if not first_order and not any(p.requires_grad for p in covered):
            return  # nothing is trained: no gradient is expected
        self._note_once("no-gradient", "step() found no gradient on any rank: no trained parameter has a .grad, "
                        "so it averaged and preconditioned nothing. Called before loss.backward(), it leaves "
                        "optimizer.step() each rank's own plain gradient, and the replicas train apart; after "
                        "optimizer.zero_grad() between backward() and step(), optimizer.step() leaves the model "
                        "as it is. The order is optimizer.zero_grad(), forward, loss.backward(), precond.step(), "
                        "optimizer.step()")

    def _watch_written(self, params: list[tuple[nn.Parameter | None, nn.Parameter | None]]) -> None:
        """After the first ``step()``: hooks on each K-FAC parameter with a ``.grad`` follow
        whether every backward before the next ``step()`` that adds to ``.grad`` meets it as
        ``step()`` wrote it, or as the backward before added to it (the same tensor, not all
        zeros), i.e. no ``zero_grad()`` ran in between: the backward then adds the new gradient
        to the preconditioned one, and each later ``step()`` preconditions that sum, silently.
        In-place writes in between (``clip_grad_norm_``'s scaling, a GradScaler's unscaling) leave
        it the same tensor with the same sum to come, so only its identity and values decide.
        Checked once, from the first step to the second, so that the hooks cost nothing
        afterwards; ``_check_written`` tells at the second step."""
        seen = set()
        # A frozen parameter gets no backward, and torch refuses a hook on it; its .grad may still
        # be one from before it was frozen (a warm start with zero_grad(set_to_none=False)).
        for p in (p for ps in params for p in ps if p is not None and p.requires_grad and p.grad is not None):
            if id(p) in seen:
                continue
            seen.add(id(p))
            # The .grad followed, whether a backward met it so, and whether the gradient arriving
            # now meets it so: a list, which the hooks update in place. The .grad by a mark
            # (``_mark``): zero_grad() must free it before the next forward, not leave a second
            # copy of the gradients through it.
            watch = [p, _mark(p.grad, _WATCHED), False, False]

            def arriving(incoming: torch.Tensor, watch: list = watch) -> None:
                grad = _marked(*watch[:2], _WATCHED)
                # Zeroed in place (``zero_grad(set_to_none=False)``, through ``.data``), the tensor
                # stays, so the values decide (one read, only where it is still the one followed).
                watch[3] = grad is not None and bool(grad.any())

            def accumulated(p: nn.Parameter, watch: list = watch) -> None:
                # Only a gradient added to .grad counts: torch.autograd.grad(loss, params) runs the
                # hook above too but adds nothing (its gradients may then be copied into .grad).
                if watch[3]:
                    watch[2:] = [True, False]
                else:  # zeroed, in place or to None, since: this parameter's backwards start anew
                    _unmark(p, watch[1], _WATCHED)  # zeroed in place, the tensor is still the one marked
                    watch[1:] = [None, False, False]

            self._written_watch.append(watch)
            self._written_hooks.append(p.register_hook(arriving))
            self._written_hooks.append(p.register_post_accumulate_grad_hook(accumulated))

    def _remove_written_hooks(self) -> None:
        for handle in self._written_hooks:
            handle.remove()
        self._written_hooks = []

    def _check_written(self) -> None:
        """At the second ``step()``: the hooks of ``_watch_written`` removed, and a warning where
        the ``.grad`` this step finds is the one the first ``step()`` wrote with every later
        backward added to it, nonzero. A gradient zeroed after such a backward (to None or in
        place, as a GAN's generator's after a discriminator's backward through it) was zeroed in
        time."""
        if not self._written_hooks:
            return
        self._remove_written_hooks()
        watched, self._written_watch = self._written_watch, []
        kept = any(met and grad is not None and bool(grad.any())
                   for p, token, met, _ in watched for grad in [_marked(p, token, _WATCHED)])
        for p, token, _, _ in watched:  # the marks are read no more
            _unmark(p, token, _WATCHED)
        if kept:
            # A layer left out of the optimizer but still requiring grad is never zeroed by its
            # zero_grad(): the same sum, which the KL clip of every layer then counts, growing.
            self._warn_once("grad-kept", "the .grad that the first step() wrote was still in place when the next "
                            "backward() added to it: optimizer.zero_grad() missing from the loop, or a K-FAC layer "
                            "left out of the optimizer that still requires grad (zero_grad() zeroes only the "
                            "optimizer's parameters)? Each step() then averages and preconditions the new gradient "
                            "plus the last preconditioned one, and the KL clip counts that sum for every layer's "
                            "step; call optimizer.zero_grad() before each step's first backward(), and freeze a "
                            "layer the optimizer does not train with requires_grad_(False)")

    def _note_written(self, covered: list[nn.Parameter]) -> None:
        """After a ``step()``: the first trained K-FAC parameter's ``.grad`` it wrote and that
        tensor's version counter, which any backward adding to it or any zeroing in place advances
        (one read per step, for ``_written_unchanged``). A frozen parameter's ``.grad`` is none that
        ``step()`` wrote: one kept from before it was frozen stays in place whatever the loop does."""
        param = next((p for p in covered if p.requires_grad and p.grad is not None), None)
        # The parameter itself: the model holds it anyway (a removed layer's .grad is set to None).
        self._written_grad = None if param is None else (param, _mark(param.grad, _WRITTEN), param.grad._version)

    def _written_unchanged(self) -> bool:
        """Whether the ``.grad`` the last ``step()`` wrote is still in place and untouched: this
        ``step()`` would precondition it again (a second ``step()`` for one backward). Compared
        across ranks with the model's structure, so that a rank doing so alone raises on every
        rank, rather than pairing its extra step with the others' next one. Zeroed through
        ``.data`` (a version counter of its own), the tensor keeps its version: all zeros is no
        second ``step()`` (one read, only where no forward ran and the version is unchanged)."""
        if self._written_grad is None:
            return False
        param, token, version = self._written_grad
        grad = _marked(param, token, _WRITTEN)
        return (grad is not None and param.requires_grad and grad._version == version
                and bool(grad.any()))

    def _note_accumulated(self, param: nn.Parameter) -> None:
        """A post-accumulate-grad hook on each trained parameter until the first ``step()``: whether
        its ``.grad`` has a nonzero entry once a backward added to it, kept on the device (read only
        where ``_warn_zero_gradient`` finds every gradient zero)."""
        grad = param.grad
        if grad is not None and grad.layout == torch.strided:
            self._accumulated[id(param)] = grad.ne(0).any()

    def _remove_accumulated_hooks(self) -> None:
        for handle in self._accumulated_hooks:
            handle.remove()
        self._accumulated_hooks = []
        self._accumulated = {}

    def _warn_zero_gradient(self, covered: list[nn.Parameter], first_order: list[nn.Parameter]) -> None:
        """After the first ``step()``: a warning, by rank 0, where every gradient it wrote or averaged
        is zero though a backward on rank 0 left a nonzero one, as ``optimizer.zero_grad(
        set_to_none=False)`` between ``backward()`` and ``step()`` does at every step, the model then
        never changing. A loss without any gradient at this step (already met by every rank's
        batch: a margin, a reward no better than its baseline) leaves zeros too, right as they are.
        The gradients are averaged, so every rank reads the same; one read per parameter, at this
        step only. A step without any gradient is ``_warn_no_gradient``'s."""
        grads = [p.grad for p in (*covered, *first_order) if p.requires_grad and p.grad is not None]
        if (grads and self.comm.rank == 0 and not any(bool(g.any()) for g in grads)
                and any(bool(nonzero) for nonzero in self._accumulated.values())):
            self._warn_once("zero-gradient", "every gradient is zero at the first step(), on every rank: "
                            "optimizer.zero_grad(set_to_none=False) between backward() and step()? Then "
                            "optimizer.step() never changes the model. The order is optimizer.zero_grad(), forward, "
                            "loss.backward(), precond.step(), optimizer.step()")

    def _moved(self, device: torch.device) -> ValueError:
        """The error for a model found on ``device`` after the preconditioner was built for it
        on another."""
        return ValueError(f"model: its K-FAC layers are on {device}, but the KFACPreconditioner was built for "
                          f"them on {self.device}, where its buffers and factors live; build it after "
                          f"model.to(device)")

    def _check_statistics(self, stats: list, params: list) -> list[str]:
        """Warn, once each, about trained K-FAC layers whose statistics were dropped (an unpaired
        call) or not taken (in eval() mode) on this rank; returns the names of the trained layers
        in train() mode without statistics here, for ``_absent_as_zeros`` to warn about."""
        # A layer whose parameters are all frozen has no output gradient to take: not worth a word;
        # nor has one no longer in the model, which ``StructureAgreement.agree`` has named already.
        gone = set(self._structure.gone)
        trained = [i not in gone and any(p is not None and p.requires_grad for p in ps) for i, ps in enumerate(params)]
        unpaired = [self.engine.blocks[i].name for i in self.local.unpaired if trained[i]]
        fresh = self._first_mentions("unpaired", unpaired)
        if fresh:
            _log.warning(f"K-FAC statistics of {', '.join(fresh)} dropped at step {self.engine.steps}: they ran in "
                         "a training forward whose output got no backward (a forward not backpropagated: run those "
                         "under model.eval() or torch.no_grad(); an exception between forward and backward; the "
                         "recomputation of torch.utils.checkpoint(use_reentrant=False): pass it "
                         "context_fn=hpckfac.torch.checkpoint_context_fn (checkpoint_sequential takes none: use "
                         "use_reentrant=True there); or an output outside the loss)")
        without = [(b.name, m.training) for b, st, m, t in zip(self.engine.blocks, stats, self.modules, trained)
                   if st is None and t and b.name not in unpaired]
        # A layer put in eval() inside a training model (a frozen BatchNorm while fine-tuning):
        # its hooks take nothing by design, which is not the mistake ``_absent_as_zeros`` suspects.
        evaluated = [name for name, training in without if not training]
        missing = [name for name, training in without if training]
        fresh = self._first_mentions("eval", evaluated)
        if fresh:
            _log.warning(f"K-FAC layers in eval() mode at step {self.engine.steps}: {', '.join(fresh)}; statistics "
                         "are taken in train() mode only, so until they have some their gradients are only averaged "
                         "(freeze their parameters, or list them in skip_layers, to say so)")
        return missing

    def _first_mentions(self, kind: str, names: list[str]) -> list[str]:
        """Those of ``names`` not yet named in a warning of ``kind``, noted as named now: once per
        layer, not per set of layers, which may differ from step to step (layers skipped at random)
        and would make a warning, and an entry of ``_warned``, at nearly every step."""
        fresh = [name for name in names if f"{kind}:{name}" not in self._warned]
        self._warned.update(f"{kind}:{name}" for name in fresh)
        return fresh

    def _check_outside_statistics(self, stats: list, slots: list) -> None:
        """Warn, once, about layers whose gradient the statistics of their own calls cannot
        explain (``CurvatureBlock.outside_statistics``): one host read, at the first factor step
        with examples on this rank; not with statistics from part of the batch, whose gradient
        comes from all of it, nor under DistributedDataParallel, whose gradients come from every
        rank's batch."""
        self._outside_checked = True
        if self.statistics_fraction < 1 or self._ddp:
            return
        found = [(block.name, flag) for block, st, slot in zip(self.engine.blocks, stats, slots) if st is not None
                 for flag in [block.outside_statistics(st, slot)] if flag is not None]
        if not found:
            return
        flags = to_host(self.xp.stack([flag for _, flag in found]))
        names = [name for (name, _), flag in zip(found, flags) if flag]
        if names:
            self._warn_once("outside", f"K-FAC layers {', '.join(names)}: their weights get gradient the layers' "
                            "own calls cannot give (a token's row with no lookup in the batch): something else "
                            "reads the weight (an output head tied through F.linear, a penalty on the weight in "
                            "the loss), whose share of the curvature their blocks do not have, or gradients kept "
                            "from an earlier step (no zero_grad()); for the first two, put them in skip_layers to "
                            "average their gradients instead")

    def _warn_added(self, added: list[str]) -> None:
        """A warning, once, naming the parameters ``added``: averaged first-order but not at
        construction (a layer added, or a K-FAC layer replaced by a new module, since), so not
        preconditioned."""
        if added and self.comm.rank == 0:  # a fact of the model, alike on every rank: said once
            self._warn_once("added:" + ",".join(added), "parameters added to the model after the preconditioner "
                            f"was built are averaged first-order, not preconditioned: {', '.join(added)} (build "
                            "the KFACPreconditioner once the model is complete)")

    def _warn_narrow_buffer(self, params: list[tuple[nn.Parameter | None, nn.Parameter | None]]) -> None:
        """A warning, once, naming the K-FAC layers whose parameters are float64 while the
        buffer is narrower because its dtype was taken from the parameters at construction
        (``factor_dtype=None``) and the model was cast after it: their factors, inverses and
        preconditioned gradients then carry float32's relative error (~1e-7), not float64's."""
        if not self._dtype_chosen or np.dtype(self.engine.comm_dtype) == np.float64 or self.comm.rank != 0:
            return  # a fact of the model, compared across ranks with the step's settings: said once
        names = [b.name for b, ps in zip(self.engine.blocks, params)
                 if any(p is not None and p.dtype == torch.float64 for p in ps)]
        if names:
            dtype = np.dtype(self.engine.comm_dtype).name
            self._warn_once("narrow-buffer", (
                f"K-FAC layers {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} have float64 parameters "
                f"but the preconditioner's buffer is {dtype} (factor_dtype=None takes the parameters' dtype as it "
                f"was when the preconditioner was built): their factors, inverses and preconditioned gradients "
                f"carry {dtype} precision; build the KFACPreconditioner after model.double(), or pass "
                "factor_dtype=torch.float64"))
