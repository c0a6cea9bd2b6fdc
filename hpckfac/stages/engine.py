"""``KFACEngine``: stages 2-4 of the distributed K-FAC iteration on arrays.

Per step, given each block's local packed statistics (factor-update steps
only; see ``hpckfac.stages.local_factors``) and each block's local gradient
matrix, the engine

2. packs them into ONE buffer segmented by owner (``hpckfac.stages.layout``)
   and calls ONE ``comm.reduce_scatter_v(..., op="mean")``;
3. on each owner, updates the running averages (non-finite statistics are
   refused and logged), forms the pi-damped inverses on inverse-update steps
   (same-size matrices batched into one ``ops.damped_inverse`` call) and
   preconditions the owned gradients (``hpckfac.stages.owner``);
4. calls ONE ``comm.allgather_v`` of the preconditioned gradients plus each
   owner's partial KL sum, and scales every result by the same KL-clip factor
   on every rank (``hpckfac.stages.gather``).

Ranks owning nothing take part in both collectives with an empty segment. The
whole ReduceScatterV buffer travels in one dtype, ``comm_dtype``.
"""
from __future__ import annotations

import numbers
import time
from typing import Any, Callable, Sequence

import numpy as np

from hpckfac.arrays import to_host
from hpckfac.assignment import assign_owners, block_cost
from hpckfac.log import get_logger
from hpckfac.stages import gather
from hpckfac.stages.layout import SegmentLayout, block_spec
from hpckfac.stages.options import check_options
from hpckfac.stages.owner import OwnerState

_log = get_logger("hpckfac.stages.engine")
# The timed parts of one iteration, in order: stage 1 (local statistics, in the hooks), the
# engine's stages 2-4, and the allreduce of the gradients no block owns. Defined here only.
STAGES = ("reduce_scatter", "inversion", "precondition", "all_gather")
ITERATION_STAGES = ("local_factors",) + STAGES + ("allreduce",)


def _check_block_state(spec, block: dict[str, Any]) -> None:
    """ValueError naming the block unless its saved factors and inverses fit ``spec`` and are finite."""
    factors, inverses = block.get("factors"), block.get("inverses")
    if factors is not None:
        if tuple(np.shape(factors)) != (spec.stat_size,):
            raise ValueError(f"state: block {spec.name!r} has factors of shape {tuple(np.shape(factors))}, "
                             f"expected ({spec.stat_size},)")
        if not np.isfinite(np.asarray(factors, dtype=np.float64)).all():
            raise ValueError(f"state: block {spec.name!r} has non-finite factors")
    if inverses is None:
        return
    if factors is None:
        raise ValueError(f"state: block {spec.name!r} has inverses but no factors")
    want = [(spec.d_A, spec.d_A), (spec.d_G, spec.d_G)] if spec.kind == "kron" else [(spec.channels, 2, 2)]
    shapes = [tuple(np.shape(x)) for x in inverses]
    if shapes != want:
        raise ValueError(f"state: block {spec.name!r} has inverses of shapes {shapes}, expected {want}")
    if not all(np.isfinite(np.asarray(x, dtype=np.float64)).all() for x in inverses):
        raise ValueError(f"state: block {spec.name!r} has non-finite inverses")


class KFACEngine:
    """Distributed K-FAC stages 2-4 for ``blocks`` (``hpckfac.layers`` blocks).

    Args:
        blocks: curvature blocks in model order, identical on every rank
            (KronBlock subclasses and BatchNormBlock).
        comm: an ``hpckfac.comm.Communicator``.
        damping: Tikhonov damping lambda (pi-corrected for Kronecker blocks).
        factor_decay: running-average weight of the old factor value.
        factor_update_interval: statistics are reduced and averaged on steps
            ``k`` with ``k % factor_update_interval == 0`` (``k`` counts from 0).
        inverse_update_interval: inverses are recomputed on steps with
            ``k % inverse_update_interval == 0``.
        kl_clip: kappa of the KL clip, or None to disable it.
        assignment: ``"lpt"`` or ``"contiguous"`` (``hpckfac.assignment``).
        comm_dtype: dtype of the ReduceScatterV buffer (factors and gradients)
            and of the returned gradients: float64, float32 or float16.
        xp: array namespace of every buffer the engine keeps or allocates
            (``numpy``, or ``cupy`` for a model on a GPU): the arrays passed
            to ``step`` must belong to it (``hpckfac.arrays``).

    Attributes:
        specs: ``BlockSpec`` of each block; owners: owning rank of each block;
        layout: the ``SegmentLayout``; steps: completed steps;
        damping, factor_decay, kl_clip: may be changed between steps;
        last_nu: KL-clip factor of the last step (1.0 without clipping; read
            lazily, so a GPU step does not wait for it);
        timings: wall seconds of each stage in ``STAGES`` in the last step;
        synchronize: None, or a function called before each clock reading.
    """

    def __init__(self, blocks: Sequence[Any], comm, *, damping: float = 1e-3,
                 factor_decay: float = 0.95, factor_update_interval: int = 1,
                 inverse_update_interval: int = 1, kl_clip: float | None = None,
                 assignment: str = "lpt", comm_dtype=np.float32, xp=np) -> None:
        opts = check_options(damping=damping, factor_decay=factor_decay,
                             factor_update_interval=factor_update_interval,
                             inverse_update_interval=inverse_update_interval,
                             kl_clip=kl_clip, assignment=assignment, factor_dtype=comm_dtype)
        self.comm = comm
        self.xp = xp
        self.blocks = list(blocks)
        self.specs = [block_spec(b) for b in self.blocks]
        self.damping, self.factor_decay, self.kl_clip = opts["damping"], opts["factor_decay"], opts["kl_clip"]
        self.factor_update_interval = opts["factor_update_interval"]
        self.inverse_update_interval = opts["inverse_update_interval"]
        self.assignment = opts["assignment"]
        self.comm_dtype = opts["factor_dtype"]
        self.owners = assign_owners([block_cost(s) for s in self.specs], comm.size, self.assignment)
        self.layout = SegmentLayout(self.specs, self.owners, comm.size)
        self.owned = self.layout.owned[comm.rank]
        # Running factors in float64 when communicating float64, float32 otherwise.
        state_dtype = np.float64 if self.comm_dtype == np.float64 else np.float32
        self.state = OwnerState([self.blocks[l] for l in self.owned], [self.specs[l] for l in self.owned],
                                state_dtype, xp)
        self._send = {f: xp.zeros(self.layout.reduce_total(f), dtype=self.comm_dtype) for f in (False, True)}
        # Where each owned block's presence share sits in this rank's factor-step segment.
        base = self.layout.segment_start(comm.rank, self.layout.reduce_counts(True))
        self._presence_at = xp.asarray([self.layout.stat_offset(l) + self.specs[l].stat_size - base
                                        for l in self.owned], dtype=np.int64)
        # Where each owner's partial KL sum sits in the AllGatherV buffer (uploaded once, not per step).
        self._partial_at = xp.asarray([at for at in self.layout.partial_offsets if at is not None], dtype=np.int64)
        self.steps = 0
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

    def step(self, grads: Sequence[np.ndarray], stats: Sequence[np.ndarray | None] | None = None,
             lr: float = 1.0) -> list[np.ndarray]:
        """Run stages 2-4 for one step; returns the preconditioned gradients.

        Args:
            grads: local gradient matrix of every block (``spec.grad_shape``;
                Kronecker ``[W.reshape(d_out, -1) | b]``, BatchNorm
                ``[grad_gamma, grad_beta]`` columns), this rank's mean.
            stats: on factor-update steps, every block's local packed
                statistics (``spec.stat_size``, see ``local_factors``), or
                None for a block with no statistics this step on this rank;
                ignored on other steps.
            lr: learning rate used by the KL clip.

        Returns:
            ``nu * V_l`` for every block, shaped like ``grads[l]``, dtype
            ``comm_dtype``, identical on every rank (views of one buffer,
            valid until the next step).
        """
        factors = self.is_factor_step()
        if factors and (stats is None or len(stats) != len(self.specs)):
            raise ValueError(f"stats: a factor-update step needs one entry per block ({len(self.specs)})")
        if len(grads) != len(self.specs):
            raise ValueError(f"grads: expected {len(self.specs)} gradient matrices, got {len(grads)}")
        start = self.clock()
        counts = self.layout.reduce_counts(factors)
        segment = self.comm.reduce_scatter_v(self._fill(grads, stats if factors else None), counts, op="mean")
        base = self.layout.segment_start(self.comm.rank, counts)
        self.timings["reduce_scatter"] = self.clock() - start

        start = self.clock()
        if factors and self.owned:
            # One read of all presence shares: the owner must know on the host which blocks to update.
            presence = to_host(segment[self._presence_at]).tolist()
            for i, l in enumerate(self.owned):
                at = self.layout.stat_offset(l) - base
                self.state.update(i, segment[at:at + self.specs[l].stat_size], presence[i], self.factor_decay)
        if self.is_inverse_step():
            self.state.invert(self.damping)
        self.timings["inversion"] = self.clock() - start

        start = self.clock()
        gcounts = self.layout.gather_counts
        out = self.xp.empty(gcounts[self.comm.rank], dtype=self.comm_dtype)
        if self.owned:
            owned_grads = [segment[self.layout.grad_offset(l, factors) - base:][:self.specs[l].grad_size]
                           .reshape(self.specs[l].grad_shape) for l in self.owned]
            out[-1] = self.state.precondition(owned_grads, out[:-1], self.damping)
        self.timings["precondition"] = self.clock() - start

        start = self.clock()
        whole = self.comm.allgather_v(out, gcounts)
        self._nu = gather.kl_clip_factor(whole, self._partial_at, self.kl_clip, lr)
        if self._nu is not None:
            whole *= self._nu.astype(whole.dtype)
        result = [whole[at:at + s.grad_size].reshape(s.grad_shape)
                  for at, s in zip(self.layout.gather_offsets, self.specs)]
        self.timings["all_gather"] = self.clock() - start
        self.steps += 1
        return result

    def clock(self) -> float:
        """``time.perf_counter()``, after ``synchronize`` when one is set."""
        if self.synchronize is not None:
            self.synchronize()
        return time.perf_counter()

    @property
    def last_nu(self) -> float:
        """KL-clip factor applied at the last step (1.0 without clipping)."""
        return 1.0 if self._nu is None else float(self._nu)

    def _fill(self, grads, stats):
        """The ReduceScatterV send buffer for this step."""
        factors = stats is not None
        buf = self._send[factors]
        for l, spec in enumerate(self.specs):
            if factors:
                at = self.layout.stat_offset(l)
                present = stats[l] is not None
                if present:
                    buf[at:at + spec.stat_size] = stats[l]
                else:
                    buf[at:at + spec.stat_size] = 0.0
                buf[at + spec.stat_size] = float(present)
            at = self.layout.grad_offset(l, factors)
            buf[at:at + spec.grad_size].reshape(spec.grad_shape)[...] = grads[l]
        return buf

    def hyperparameters(self) -> dict[str, Any]:
        """The engine's hyperparameters (part of ``state_dict``)."""
        return {"damping": self.damping, "factor_decay": self.factor_decay,
                "factor_update_interval": self.factor_update_interval,
                "inverse_update_interval": self.inverse_update_interval,
                "kl_clip": self.kl_clip, "assignment": self.assignment}

    def state_dict(self) -> dict[str, Any]:
        """Step count, hyperparameters, and every block's running factors and
        current inverses gathered to every rank (a collective: call on all ranks).

        ``{"steps": int, "hyperparameters": {...}, "blocks": {name: {"factors":
        packed running statistics, "inverses": list of arrays or None}}}``;
        it loads on any number of ranks.
        """
        mine = {self.specs[l].name: self.state.block_state(i) for i, l in enumerate(self.owned)}
        blocks: dict[str, Any] = {}
        for part in self.comm.allgather_object(mine):
            blocks.update(part)
        return {"steps": self.steps, "hyperparameters": self.hyperparameters(),
                "blocks": {s.name: blocks[s.name] for s in self.specs}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (from any rank count): step count,
        hyperparameters, and the owned blocks' factors and inverses.

        Everything is checked on every rank, for every block, before anything
        changes: block names, shapes, finiteness, the step count. A bad state
        raises ValueError on every rank and leaves the engine as it was. The
        checkpoint's hyperparameters win (an exact resume needs them, as with
        ``torch.optim``); a warning names those that differ from the current ones.
        """
        saved = state["blocks"]
        if list(saved) != [s.name for s in self.specs]:
            raise ValueError(f"state: saved blocks {list(saved)} differ from this model's {[s.name for s in self.specs]}")
        for spec in self.specs:  # every block, not only the owned ones, so that all ranks agree
            _check_block_state(spec, saved[spec.name])
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"state: steps must be an integer >= 0, got {steps!r}")
        hyper = check_options(**state["hyperparameters"])
        if hyper.pop("assignment", self.assignment) != self.assignment:
            raise ValueError("state: assignment differs from the engine's (owners are fixed at construction)")
        differ = {name: (getattr(self, name), value) for name, value in hyper.items() if getattr(self, name) != value}
        if differ:
            _log.warning("load_state_dict: the checkpoint's hyperparameters replace the current ones: %s",
                         ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in differ.items()))
        for name, value in hyper.items():
            setattr(self, name, value)
        self.steps = int(steps)
        for i, l in enumerate(self.owned):
            self.state.load_block_state(i, state["blocks"][self.specs[l].name])
