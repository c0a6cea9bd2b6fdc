"""Stage 3: what an owner does with the blocks it owns.

Running averages of the packed statistics (``ops.ema_update``, which refuses
non-finite values), pi-damped inverses on inverse-update steps with all
matrices of the same order inverted in one ``ops.damped_inverse`` call, and
the preconditioned gradients ``V = G^-1 grad A^-1`` (Kronecker blocks) or
``(F_c + lambda I)^-1 grad_c`` per channel (BatchNorm blocks).

A block whose factors were never set (every update so far refused) passes its
gradient through unpreconditioned; a block with factors but no inverse yet is
inverted at the step that first needs it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hpckfac import arrays, ops
from hpckfac.layers import pi_damping_terms
from hpckfac.log import get_logger
from hpckfac.stages.layout import BlockSpec

_log = get_logger("hpckfac.stages.owner")


def unpack_batchnorm(packed, channels: int):
    """(C, 2, 2) symmetric Fishers from the (F00, F01, F11)-per-channel layout."""
    tri = packed.reshape(channels, 3)
    mats = arrays.namespace(packed).empty((channels, 2, 2), dtype=packed.dtype)
    mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1] = tri[:, 0], tri[:, 1], tri[:, 1], tri[:, 2]
    return mats


class OwnerState:
    """Running statistics and inverses of the blocks one rank owns.

    ``blocks``/``specs`` are the owned blocks in model order; block ``i`` here
    is the ``i``-th owned block. ``dtype`` is the dtype of the running
    statistics, the inverses and the preconditioning arithmetic; ``xp`` the
    array namespace (``numpy``, ``cupy``) they live in.
    """

    def __init__(self, blocks: Sequence[Any], specs: Sequence[BlockSpec], dtype, xp=np) -> None:
        self.blocks, self.specs, self.dtype, self.xp = list(blocks), list(specs), np.dtype(dtype), xp
        self.running = [xp.zeros(s.stat_size, dtype=self.dtype) for s in self.specs]
        self.initialized = [False] * len(self.specs)
        self.inverses: list[list | None] = [None] * len(self.specs)
        self.refused = 0

    def update(self, i: int, received, presence: float, decay: float) -> bool:
        """Blend block ``i``'s reduced packed statistics into its running average;
        ``presence`` is the share of ranks that contributed them. Returns False
        when nothing changed: no rank had statistics, or they were not finite (logged)."""
        if presence <= 0.0:
            return False
        new = received.astype(self.dtype)
        if presence != 1.0:
            new /= presence
        if not ops.ema_update(self.running[i], new, decay, first=not self.initialized[i]):
            self.refused += 1
            _log.warning("block %s: non-finite statistics refused; the running average keeps its old value",
                         self.specs[i].name)
            return False
        self.initialized[i] = True
        return True

    def invert(self, damping: float, missing_only: bool = False) -> None:
        """Damped inverses of every initialized block (or only of those without
        one), same-order matrices batched into one ``damped_inverse`` call.

        The pi-damping of all Kronecker blocks is formed in one vectorised
        pass where the factors live (no read-back of traces)."""
        xp = self.xp
        chosen = [i for i in range(len(self.specs))
                  if self.initialized[i] and not (missing_only and self.inverses[i] is not None)]
        kron = [i for i in chosen if self.specs[i].kind == "kron"]
        factors = {i: ops.unpack_sym(self.running[i], [self.specs[i].d_A, self.specs[i].d_G]) for i in kron}
        if kron:
            mean_a = xp.stack([factors[i][0].trace() for i in kron]).astype(np.float64)
            mean_g = xp.stack([factors[i][1].trace() for i in kron]).astype(np.float64)
            mean_a /= xp.asarray([self.specs[i].d_A for i in kron], dtype=np.float64)
            mean_g /= xp.asarray([self.specs[i].d_G for i in kron], dtype=np.float64)
            damp_a, damp_g = pi_damping_terms(mean_a, mean_g, damping, xp)
        groups: dict[int, list] = {}  # order -> [(matrices (k,n,n), damping (k,), block, slot)]
        for i in chosen:
            spec = self.specs[i]
            if spec.kind == "kron":
                k = kron.index(i)
                a, g = factors[i]
                groups.setdefault(spec.d_A, []).append((a[None], damp_a[k:k + 1], i, 0))
                groups.setdefault(spec.d_G, []).append((g[None], damp_g[k:k + 1], i, 1))
                self.inverses[i] = [None, None]
            else:
                fisher = unpack_batchnorm(self.running[i], spec.channels)
                groups.setdefault(2, []).append((fisher, xp.full(spec.channels, damping), i, 0))
                self.inverses[i] = [None]
        for items in groups.values():
            mats = xp.concatenate([m for m, _, _, _ in items]).astype(self.dtype, copy=False)
            damp = xp.concatenate([d for _, d, _, _ in items]).astype(self.dtype)
            result = ops.damped_inverse(mats, damp).inverse
            start = 0
            for m, _, i, slot in items:
                inv = result[start:start + len(m)]
                self.inverses[i][slot] = inv[0] if self.specs[i].kind == "kron" else inv
                start += len(m)

    def precondition(self, grads: Sequence[Any], out, damping: float):
        """Write each owned block's preconditioned gradient into consecutive
        slices of ``out`` and return ``sum_i <V_i, grad_i>`` as a float64 0-d
        array of the state's namespace (it stays on the device)."""
        if any(ok and inv is None for ok, inv in zip(self.initialized, self.inverses)):
            self.invert(damping, missing_only=True)
        xp = self.xp
        partial, at = xp.zeros((), dtype=np.float64), 0
        for i, (spec, grad) in enumerate(zip(self.specs, grads)):
            grad = grad.astype(self.dtype, copy=False)
            inv = self.inverses[i]
            if inv is None:
                v = grad
            elif spec.kind == "kron":
                v = self.blocks[i].precondition(grad, inv[0], inv[1])
            else:
                v = xp.einsum("cij,cj->ci", inv[0], grad)
            out[at:at + spec.grad_size] = v.reshape(-1)
            partial += xp.vdot(v, grad).astype(np.float64)
            at += spec.grad_size
        return partial

    def block_state(self, i: int) -> dict[str, Any]:
        """Block ``i``'s running statistics (None if never set) and inverses, as host (NumPy) copies."""
        return {"factors": arrays.to_host(self.running[i]).copy() if self.initialized[i] else None,
                "inverses": None if self.inverses[i] is None else [arrays.to_host(x).copy() for x in self.inverses[i]]}

    def load_block_state(self, i: int, state: dict[str, Any]) -> None:
        """Restore block ``i`` from ``block_state`` output (shapes checked by the engine)."""
        factors, inverses = state["factors"], state["inverses"]
        self.initialized[i] = factors is not None
        self.running[i][...] = 0.0 if factors is None else arrays.from_host(np.asarray(factors, dtype=self.dtype), self.xp)
        self.inverses[i] = None if inverses is None else [
            arrays.from_host(np.array(x, dtype=self.dtype), self.xp) for x in inverses]
