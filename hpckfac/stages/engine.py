"""``KFACEngine``: stages 2-4 of the distributed K-FAC iteration on arrays.

Per step, given each block's local packed statistics (factor-update steps
only; see ``hpckfac.stages.local_factors``) and each block's local gradient
matrix, the engine runs

2. ``reduce_scatter``: ONE ``comm.reduce_scatter_v(..., op="mean")`` of one
   buffer segmented by owner (``hpckfac.stages.layout``);
3. ``owner``: on each owner, the running averages (non-finite statistics are
   refused and logged), the damped inverses on inverse-update steps (same-size
   matrices of all owned blocks batched into one ``ops.damped_inverse`` call)
   and the preconditioned gradients;
4. ``all_gather``: ONE ``comm.allgather_v`` of the preconditioned gradients
   plus each owner's partial KL sum, every result scaled by the same KL-clip
   factor on every rank.

The engine only orchestrates: it never asks what kind a block is
(``hpckfac.layers.CurvatureBlock``). Ranks owning nothing take part in both
collectives with an empty segment. The whole ReduceScatterV buffer travels in
one dtype, ``comm_dtype``.
"""
from __future__ import annotations

import numbers
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from numpy.typing import DTypeLike

from hpckfac.assignment import assign_owners
from hpckfac.comm.errors import CollectiveMismatchError
from hpckfac.log import get_logger
from hpckfac.ops.checks import accumulation_dtype
from hpckfac.stages.all_gather import AllGather, encode_partial
from hpckfac.stages.layout import PARTIAL_SLOTS, SegmentLayout
from hpckfac.stages.memory import held_bytes
from hpckfac.stages.options import DEFAULTS, Assignment, CheckedOption, check_options, resolve
from hpckfac.stages.owner import OwnerState
from hpckfac.stages.reduce_scatter import ReduceScatter
from hpckfac.stages.state_buffer import state_elements, unpack_block_state

if TYPE_CHECKING:
    from hpckfac.comm import Communicator

_log = get_logger("hpckfac.stages.engine")
_LOAD_EVERYWHERE = "load_state_dict() must run on every rank"
# The engine's timed parts of one step, in order.
STAGES = ("reduce_scatter", "running_average", "inversion", "precondition", "all_gather")
# Every timed part of one iteration: stage 1 (local statistics, in the hooks), the engine's
# stages, writing the results into .grad, and the allreduce of the gradients no block owns
# (which runs between stage 1 and stage 2). Defined here only.
ITERATION_STAGES = ("local_factors",) + STAGES + ("write_grads", "allreduce")

STATE_KEYS = ("steps", "hyperparameters", "blocks")


def _is_kfac_pytorch_state(state: dict) -> bool:
    """Whether ``state`` has the keys of kfac-pytorch's ``state_dict()``: ``steps``, its update
    intervals (there unless they are callables) or its factors per layer under ``layers`` (there
    unless ``include_factors=False``), each layer's an ``A`` and a ``G``."""
    if "steps" not in state:
        return False
    if {"factor_update_steps", "inv_update_steps"} & set(state):
        return True
    layers = state.get("layers")
    return isinstance(layers, dict) and bool(layers) and all(
        isinstance(layer, dict) and {"A", "G"} <= set(layer) for layer in layers.values())


def check_state_keys(state: Any) -> None:
    """ValueError naming what is missing unless ``state`` is a dict with the keys of a
    ``state_dict()`` (not a model's, an optimizer's, or a checkpoint holding several)."""
    if not isinstance(state, dict):
        raise ValueError(f"state: expected a preconditioner's state_dict() (a dict), got {type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        keys = sorted(str(k) for k in state)
        peer = _is_kfac_pytorch_state(state)
        raise ValueError(f"state: not a preconditioner's state_dict(): no {', '.join(missing)} (its keys: "
                         f"{', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" +
                         ("; these are the keys of kfac-pytorch's state_dict(), whose factors are scaled "
                          "otherwise and which holds no inverses: restore the model and optimizer from that "
                          "checkpoint and let this preconditioner start afresh (docs/migrating.md)" if peer else ""))
    for key in ("hyperparameters", "blocks"):
        if not isinstance(state[key], dict):
            raise ValueError(f"state: {key} must be a dict, got {type(state[key]).__name__}")


def _saved_array(block, value: Any, what: str, dtype) -> np.ndarray:
    """``value`` (a NumPy array or torch tensor, as a checkpoint holds them) as a host array of
    ``dtype``; ValueError naming the block for anything else (complex values too), or for values
    that are not finite in ``dtype`` (a float64 value beyond float32's range is infinite in a
    float32 state)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise ValueError(f"state: block {block.name!r} has {what} of type {type(value).__name__}, expected arrays")
    if np.iscomplexobj(value):  # a cast to real would drop the imaginary parts
        raise ValueError(f"state: block {block.name!r} has complex {what}, expected real numbers")
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"state: block {block.name!r} has {what} that are not numbers: {err}") from None
    if not np.isfinite(array).all():
        raise ValueError(f"state: block {block.name!r} has non-finite {what} (in {np.dtype(dtype).name})")
    return array


def _check_block_state(block, saved: dict[str, Any], dtype) -> None:
    """ValueError naming the block unless its saved factors and inverses fit it, are finite in
    the state's ``dtype``, and the inverses look like inverses of damped SPD matrices
    (symmetric, positive diagonal)."""
    if not isinstance(saved, dict) or set(saved) != {"factors", "inverses"}:
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"state: block {block.name!r} must be a dict with keys 'factors' and 'inverses' "
                         f"(None where absent), got {keys}")
    factors, inverses = saved["factors"], saved["inverses"]
    if factors is not None:
        try:
            shape: tuple | str = tuple(np.shape(factors))
        except ValueError:  # nested lists of unequal lengths
            shape = "(ragged)"
        if shape != (block.stat_size,):
            raise ValueError(f"state: block {block.name!r} has factors of shape {shape}, "
                             f"expected ({block.stat_size},)")
        _saved_array(block, factors, "factors", dtype)
    if inverses is None:
        return
    if factors is None:
        raise ValueError(f"state: block {block.name!r} has inverses but no factors")
    if not isinstance(inverses, (list, tuple)):
        raise ValueError(f"state: block {block.name!r} has inverses of type {type(inverses).__name__}, "
                         "expected a list of arrays")
    arrays = [_saved_array(block, x, "inverses", dtype) for x in inverses]
    shapes = [x.shape for x in arrays]
    if shapes != [tuple(s) for s in block.inverse_shapes]:
        raise ValueError(f"state: block {block.name!r} has inverses of shapes {shapes}, "
                         f"expected {block.inverse_shapes}")
    for x in arrays:
        scale = np.abs(x).max(initial=0.0)
        if not (np.diagonal(x, axis1=1, axis2=2) > 0).all() or \
                np.abs(x - x.swapaxes(1, 2)).max(initial=0.0) > 1e-3 * scale:
            raise ValueError(f"state: block {block.name!r} has inverses that are not symmetric with a positive "
                             "diagonal (not inverses of damped curvature)")


def _with_stack_axes(block, saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with single ``(n, n)`` inverses given their stack axis ``(1, n, n)``: checkpoints
    written before every factor became a stack load as they are."""
    inverses = saved.get("inverses") if isinstance(saved, dict) else None  # malformed: named by the checks
    if not isinstance(inverses, (list, tuple)) or len(inverses) != len(block.inverse_shapes):
        return saved
    fixed = [x.reshape(want) if hasattr(x, "reshape") and tuple(np.shape(x)) == tuple(want[1:]) and want[0] == 1
             else x for x, want in zip(inverses, block.inverse_shapes)]
    return {**saved, "inverses": fixed}


class KFACEngine:
    """Distributed K-FAC stages 2-4 for ``blocks`` (``hpckfac.layers.CurvatureBlock``).

    Args (defaults: ``hpckfac.stages.options.DEFAULTS``):
        blocks: curvature blocks in model order, identical on every rank.
        comm: an ``hpckfac.comm.Communicator``.
        damping: Tikhonov damping lambda (pi-corrected for Kronecker blocks),
            or a callable of the step count returning it.
        factor_decay: running-average weight of the old factor value, or a
            callable of the step count.
        factor_update_interval: statistics are reduced and averaged on steps
            ``k`` with ``k % factor_update_interval == 0`` (``k`` counts from 0).
        inverse_update_interval: inverses are recomputed on steps with
            ``k % inverse_update_interval == 0``.
        kl_clip: kappa of the KL clip, or None (or 0) to disable it.
        assignment: ``"lpt"`` or ``"contiguous"`` (``hpckfac.assignment``).
        comm_dtype: dtype of the ReduceScatterV buffer (factors and gradients)
            and of the returned gradients: float64, float32 or float16.
        xp: array namespace of every buffer the engine keeps or allocates
            (``numpy``, or ``cupy`` for a model on a GPU): the arrays passed
            to ``step`` must belong to it (``hpckfac.arrays``).

    Attributes:
        blocks; owners: owning rank of each block; layout: the
        ``SegmentLayout``; steps: completed steps;
        damping, factor_decay, kl_clip: may be changed between steps (checked, and compared
            across ranks, by the next step);
        factor_update_interval, inverse_update_interval: may be changed between steps
            (checked when assigned, compared across ranks by the next step);
        last_nu: KL-clip factor of the last step (1.0 without clipping; read
            lazily, so a GPU step does not wait for it);
        timings: wall seconds of each stage in ``STAGES`` in the last step;
        synchronize: None, or a function called before each clock reading.
    """

    # The intervals drive the hooks before any step runs: checked when assigned.
    factor_update_interval = CheckedOption(check_options)
    inverse_update_interval = CheckedOption(check_options)

    def __init__(self, blocks: Sequence[Any], comm: Communicator, *,
                 damping: float | Callable[[int], float] = DEFAULTS["damping"],
                 factor_decay: float | Callable[[int], float] = DEFAULTS["factor_decay"],
                 factor_update_interval: int = DEFAULTS["factor_update_interval"],
                 inverse_update_interval: int = DEFAULTS["inverse_update_interval"],
                 kl_clip: float | None = DEFAULTS["kl_clip"], assignment: Assignment = DEFAULTS["assignment"],
                 comm_dtype: DTypeLike = np.float32, xp: Any = np) -> None:
        opts = check_options(damping=damping, factor_decay=factor_decay,
                             factor_update_interval=factor_update_interval,
                             inverse_update_interval=inverse_update_interval,
                             kl_clip=kl_clip, assignment=assignment, factor_dtype=comm_dtype)
        self.comm = comm
        # Its number on the communicator, alike on every rank: the agreement check of its collectives
        # compares it, so ranks that step two engines of the same shapes in another order are told.
        self.instance = comm.new_instance(self)
        self.xp = xp
        self.blocks = list(blocks)
        self.damping, self.factor_decay, self.kl_clip = opts["damping"], opts["factor_decay"], opts["kl_clip"]
        self.factor_update_interval = opts["factor_update_interval"]
        self.inverse_update_interval = opts["inverse_update_interval"]
        self.assignment = opts["assignment"]
        self.comm_dtype = opts["factor_dtype"]
        self.owners = assign_owners([b.cost() for b in self.blocks], comm.size, self.assignment)
        self.layout = SegmentLayout(self.blocks, self.owners, comm.size)
        self.owned = self.layout.owned[comm.rank]
        # Running factors in float64 when communicating float64, float32 otherwise.
        state_dtype = accumulation_dtype(self.comm_dtype)
        self.reduce_scatter = ReduceScatter(self.blocks, self.layout, comm, self.comm_dtype, xp)
        self.state = OwnerState(self.blocks, self.layout, comm.rank, state_dtype, xp)
        # Its segment takes this rank's preconditioned gradients and partial KL sum every step.
        self.all_gather = AllGather(self.blocks, self.layout, comm, self.comm_dtype, xp)
        self.steps = 0
        self._agreed: dict[str, Any] | None = None  # the step settings every rank last agreed on
        self._loaded = False  # a state loaded since then
        self._nu: Any = None  # 0-d float64 array in the engine's namespace, None without clipping
        self.timings = dict.fromkeys(STAGES, 0.0)
        # Called before every clock reading when set (e.g. a device synchronisation, so that
        # the stage times of a GPU step are the stages' own and not their launch times).
        self.synchronize: Callable[[], None] | None = None

    def is_factor_step(self) -> bool:
        """Whether the next ``step()`` reduces and averages statistics."""
        return self.steps % self.factor_update_interval == 0

    def is_inverse_step(self) -> bool:
        """Whether the next ``step()`` recomputes the inverses."""
        return self.steps % self.inverse_update_interval == 0

    def current(self, name: str) -> float:
        """This step's ``damping``, ``factor_decay`` or ``kl_clip`` (a callable evaluated at
        ``steps``), checked: ValueError naming the option for a bad value set between steps."""
        return resolve(name, getattr(self, name), self.steps)

    def current_settings(self, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """This step's ``damping``, ``factor_decay`` and ``kl_clip``, each checked (``current``);
        those in ``given`` (values a caller took from this method at this step) are checked as
        they are, so that a schedule runs once per step."""
        given = given or {}
        return {name: resolve(name, given[name], self.steps) if name in given else self.current(name)
                for name in ("damping", "factor_decay", "kl_clip")}

    def _changes(self, settings: dict[str, Any]) -> str:
        """``settings`` that differ from those every rank last agreed on, as ``name old -> new``."""
        return ", ".join(f"{k} {self._agreed.get(k)!r} -> {v!r}" for k, v in settings.items()
                         if self._agreed.get(k) != v)

    def local_change(self) -> str:
        """What this rank changed alone since every rank last agreed on the step's settings, as
        a clause for an error message ("" for nothing, and before the first agreement): update
        intervals (``changed on rank r: name old -> new``) or a loaded state. Such a rank takes
        statistics at other steps than the rest, which its first collective of the step meets
        before the settings are compared: the caller names the change there."""
        if self._loaded:
            return f"a state loaded on rank {self.comm.rank} since the ranks last agreed? {_LOAD_EVERYWHERE}"
        if self._agreed is None:
            return ""
        changed = self._changes({"factor_update_interval": self.factor_update_interval,
                                 "inverse_update_interval": self.inverse_update_interval})
        return f"changed on rank {self.comm.rank}: {changed}" if changed else ""

    def gradient_slots(self) -> list[Any]:
        """Where the next ``step()`` sends each block's gradient matrix (``grad_shape`` views of
        its send buffer): gradients written there (``block.grad_matrix(..., out=slot)``) and
        passed to ``step`` as these same arrays are not copied again."""
        return self.reduce_scatter.slots[self.is_factor_step()]

    def gradient_buffer(self) -> tuple[Any, list[int]]:
        """The next step's whole send buffer and where each block's gradient matrix starts in
        it: the slots of ``gradient_slots`` as one array, for a caller that fills them in one go."""
        factors = self.is_factor_step()
        return self.reduce_scatter.buffer(factors), self.reduce_scatter.grad_offsets[factors]

    def gathered(self) -> tuple[Any, list[int]]:
        """The last step's whole gathered buffer (the results of ``step`` are views of it) and
        where each block's result starts in it."""
        return self.all_gather.gathered, self.layout.gather_offsets

    def step(self, grads: Sequence[Any], stats: Sequence[Any | None] | None = None,
             lr: float = 1.0, settings: dict[str, Any] | None = None) -> list[Any]:
        """Run stages 2-4 for one step; returns the preconditioned gradients.

        Args:
            grads: local gradient matrix of every block (``block.grad_shape``,
                see ``CurvatureBlock.grad_matrix``), this rank's mean.
            stats: on factor-update steps, every block's local packed
                statistics (``block.stat_size``, see ``local_factors``), or
                None for a block with no statistics this step on this rank;
                ignored on other steps.
            lr: learning rate used by the KL clip.
            settings: further settings every rank must share (the torch bridge's
                ``accumulation_steps``, ``statistics_fraction`` and training
                modes), compared with the step's own whenever they change;
                ``damping``, ``factor_decay`` and ``kl_clip`` among them are this
                step's values (from ``current_settings``), checked, not evaluated again.

        Returns:
            ``nu * V_l`` for every block, shaped like ``grads[l]``, dtype
            ``comm_dtype``, identical on every rank (views of one buffer,
            valid until the next step).
        """
        with self.comm.instance(self.instance):
            return self._step(grads, stats, lr, settings)

    def _step(self, grads: Sequence[Any], stats: Sequence[Any | None] | None, lr: float,
              settings: dict[str, Any] | None) -> list[Any]:
        factors = self.is_factor_step()
        if factors and (stats is None or len(stats) != len(self.blocks)):
            raise ValueError(f"stats: a factor-update step needs one entry per block ({len(self.blocks)})")
        if len(grads) != len(self.blocks):
            raise ValueError(f"grads: expected {len(self.blocks)} gradient matrices, got {len(grads)}")
        settings = settings or {}
        settings = {"lr": lr, **self.current_settings(settings), "factor_update_interval": self.factor_update_interval,
                    "inverse_update_interval": self.inverse_update_interval, **settings}
        if settings != self._agreed:
            # Ranks with different settings would drift apart silently: compared whenever they
            # change (once for constants, every step under a schedule, and after a load, with
            # the step count). A rank whose settings changed alone calls this while the others
            # do not, which the next collective's agreement check reports on every rank.
            try:
                self.comm.check_same({"step": self.steps, **settings}, "the step's settings")
            except CollectiveMismatchError as err:
                if self._agreed is None:
                    # The step counts differ, or this rank compares while the others, whose
                    # settings have not changed, went on: most often a load on some ranks only
                    # (after construction every rank compares at its first step).
                    if "step:" in str(err) or "changed there alone" in str(err):
                        raise CollectiveMismatchError(f"{err}; a checkpoint loaded on some ranks only? "
                                                      f"{_LOAD_EVERYWHERE}") from None
                    raise
                raise CollectiveMismatchError(f"{err}; changed on rank {self.comm.rank}: "
                                              f"{self._changes(settings)}") from None
            self._agreed, self._loaded = settings, False
        damping, decay, kl_clip = settings["damping"], settings["factor_decay"], settings["kl_clip"]

        start = self.clock()
        segment = self.reduce_scatter(grads, stats if factors else None)
        self.timings["reduce_scatter"] = self.clock() - start

        start = self.clock()
        if factors:
            self.state.update_all(segment, decay)
        self.timings["running_average"] = self.clock() - start

        start = self.clock()
        if self.is_inverse_step():
            self.state.invert(damping)
        elif self.state.missing_inverses():
            self.state.invert(damping, missing_only=True)
        self.timings["inversion"] = self.clock() - start

        start = self.clock()
        out = self.all_gather.segment
        if self.owned:
            encode_partial(self.state.precondition(segment, factors, out[:-PARTIAL_SLOTS]), out[-PARTIAL_SLOTS:])
        self.timings["precondition"] = self.clock() - start

        start = self.clock()
        result, self._nu = self.all_gather(kl_clip, lr)
        self.timings["all_gather"] = self.clock() - start
        self.steps += 1
        return result

    def memory(self) -> dict[str, int]:
        """Bytes of the buffers this rank keeps between steps, by kind (``hpckfac.stages.memory``):

        - ``send_buffers``: the ReduceScatterV's two send buffers, every block's gradient in
          each and, in the factor steps' one, every block's statistics and presence element
          (``comm_dtype``);
        - ``received``: this rank's averaged segment of a factor step, over several ranks;
        - ``running_factors``: the owned blocks' running statistics, packed (the state's dtype);
        - ``inverses``: the owned blocks' inverses, full matrices (none before the first inversion);
        - ``gathered``: every block's preconditioned gradient and the owners' partial KL sums;
        - ``results``: this rank's segment of the AllGatherV, over several ranks (at one rank it
          is the gathered buffer).
        """
        state = self.state
        # A run's stacked inverses need no entry: the stack and its blocks' inverses are views of
        # one buffer, which the blocks' reach.
        inverses = [x for inv in state.inverses if inv is not None for x in inv]
        return held_bytes({"send_buffers": [self.reduce_scatter.buffer(f) for f in (False, True)],
                           "received": [self.reduce_scatter.received],
                           "running_factors": [state._running],
                           "inverses": inverses,
                           "gathered": [self.all_gather.gathered],
                           "results": [self.all_gather.segment]})

    def clock(self) -> float:
        """``time.perf_counter()``, after ``synchronize`` when one is set."""
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()

    @property
    def last_nu(self) -> float:
        """KL-clip factor applied at the last step (1.0 without clipping)."""
        return 1.0 if self._nu is None else float(self._nu)

    def hyperparameters(self) -> dict[str, Any]:
        """The engine's hyperparameters (part of ``state_dict``), NumPy scalars (a number assigned
        between steps, an ``np.str_`` assignment) as Python values: ``torch.load(weights_only=True)``
        refuses NumPy scalars, so a checkpoint holding one could not be read back."""
        values = {"damping": None if callable(self.damping) else self.damping,
                  "factor_decay": None if callable(self.factor_decay) else self.factor_decay,
                  "factor_update_interval": self.factor_update_interval,
                  "inverse_update_interval": self.inverse_update_interval,
                  "kl_clip": self.kl_clip, "assignment": self.assignment}
        return {name: value.item() if isinstance(value, np.generic) else value for name, value in values.items()}

    def state_dict(self) -> dict[str, Any]:
        """Step count, hyperparameters, and every block's running factors and
        current inverses gathered to every rank (a collective: call on all ranks).

        ``{"steps": int, "hyperparameters": {...}, "blocks": {name: {"factors":
        packed running statistics, "inverses": list of arrays or None}}}``;
        it loads on any number of ranks. The arrays travel as one AllGatherV of a flat
        buffer in the state's dtype (each owner's blocks packed by ``pack_block_state``, a
        size every rank knows), not as pickles, and the arrays returned are views of it:
        one copy of the state per rank.
        """
        sizes = [state_elements(b) for b in self.blocks]
        counts = [sum(sizes[l] for l in owned) for owned in self.layout.owned]
        with self.comm.instance(self.instance):
            whole = self.comm.allgather_v(self.state.packed_state(), counts, what="state_dict()")
        blocks: dict[str, Any] = {}
        at = 0
        for owned in self.layout.owned:
            for l in owned:
                blocks[self.blocks[l].name] = unpack_block_state(self.blocks[l], whole[at:at + sizes[l]])
                at += sizes[l]
        return {"steps": self.steps, "hyperparameters": self.hyperparameters(),
                "blocks": {b.name: blocks[b.name] for b in self.blocks}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (from any rank count): step count,
        hyperparameters, and the owned blocks' factors and inverses.

        Everything is checked on every rank, for every block, before anything
        changes: block names, shapes, finiteness in the state's dtype, inverses
        symmetric with a positive diagonal, the step count. A bad state
        raises ValueError on every rank and leaves the engine as it was. The
        checkpoint's hyperparameters win (an exact resume needs them, as with
        ``torch.optim``); a warning names those that differ from the current ones.
        """
        check_state_keys(state)
        saved = state["blocks"]
        names = [b.name for b in self.blocks]
        # By name, as torch's own load_state_dict: a model whose layers are declared in another
        # order has the same blocks listed in another order.
        known = set(names)
        missing = [name for name in names if name not in saved]
        unknown = [name for name in saved if name not in known]
        if missing or unknown:
            raise ValueError(f"state: saved blocks {list(saved)} differ from this model's {names}: "
                             + "; ".join(f"{what} {', '.join(map(repr, which))}" for what, which in
                                         (("missing", missing), ("not in this model", unknown)) if which))
        saved = {b.name: _with_stack_axes(b, saved[b.name]) for b in self.blocks}
        for block in self.blocks:  # every block, not only the owned ones, so that all ranks agree
            _check_block_state(block, saved[block.name], self.state.dtype)
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state: steps must be an integer >= 0, got {steps!r}")
        # Only the engine's own hyperparameters: another option's name (factor_dtype is fixed at
        # construction) is a malformed state, named here rather than met as an AttributeError.
        unknown = sorted(str(k) for k in set(state["hyperparameters"]) - set(self.hyperparameters()))
        if unknown:
            raise ValueError(f"state: unknown hyperparameter(s) {', '.join(map(repr, unknown))} (a state_dict() "
                             f"holds {', '.join(self.hyperparameters())})")
        # A schedule (saved as None) stays the caller's.
        hyper = check_options(**{k: v for k, v in state["hyperparameters"].items() if v is not None or k == "kl_clip"})
        if hyper.pop("assignment", self.assignment) != self.assignment:
            raise ValueError("state: assignment differs from the engine's (owners are fixed at construction)")
        hyper = {name: value for name, value in hyper.items() if not callable(getattr(self, name))}
        differ = {name: (getattr(self, name), value) for name, value in hyper.items() if getattr(self, name) != value}
        if differ and self.comm.rank == 0:  # every rank loads the same state: said once
            _log.warning("load_state_dict: the checkpoint's hyperparameters replace the current ones: %s",
                         ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differ.items()))
        for name, value in hyper.items():
            setattr(self, name, value)
        self.steps = int(steps)
        for i, l in enumerate(self.owned):
            self.state.load_block_state(i, saved[self.blocks[l].name])
        self.state.restack()
        self._agreed, self._loaded = None, True  # the loaded step count and settings are compared at the next step
