"""``UnitWiseBlock``: unit-wise Fisher of a normalisation layer's affine parameters.

A normalisation layer's output is ``y = γ_c x̂ + β_c`` per unit ``c`` (a
channel of BatchNorm, GroupNorm and InstanceNorm, an element of LayerNorm's and
RMSNorm's normalised shape; RMSNorm has no ``β``), ``x̂`` the normalised input. Example ``i``'s gradient of
``(γ_c, β_c)`` is ``u_i = (Σ_t g_i x̂_i, Σ_t g_i)``, summed over the positions
``t`` where the unit appears. Each unit gets the ``k x k`` Fisher
``Σ_i u_i u_iᵀ`` (``k = 2``, or 1 without ``β``), unit-wise as in SP-NGD
(Osawa et al.); the gradient is preconditioned by ``(F_c + λ I)^-1`` per unit.
Subclasses say how ``x̂`` is formed (``normalized``).
"""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from hpckfac.checks import check_bool, check_real
from hpckfac.layers.block import (Array, CurvatureBlock, array_module, check_array, check_name, check_shape, pack_stack)
from hpckfac.ops.checks import accumulation_dtype


class UnitWiseBlock(CurvatureBlock):
    """``units`` independent ``k x k`` Fishers of ``(γ_c[, β_c])``.

    ``param_shape`` is the shape of ``γ`` (and ``β``), ``units`` elements;
    ``bias`` says whether ``β`` exists.
    """

    def __init__(self, name: str, param_shape: tuple[int, ...], bias: bool, eps: float) -> None:
        self.name = check_name(name)
        self.param_shape = tuple(int(s) for s in param_shape)
        self.units = int(np.prod(self.param_shape))
        self.has_bias = check_bool(bias, "bias")
        self.eps = check_real(eps, "eps", above=0.0)
        self.k = 1 + self.has_bias

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((self.units, self.k),)

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        return self.param_shape, (self.param_shape if self.has_bias else None)

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.units, self.k)

    def describe(self) -> str:
        return f"{self.units} units, {self.k}x{self.k} each"

    # ----------------------------------------------------------- subclasses
    @abc.abstractmethod
    def normalized(self, x: Array) -> Array:
        """``x̂`` of the layer input ``x`` as ``(N, units, T)`` (float32, or float64 for float64)."""

    def unit_view(self, g: Array) -> Array:
        """Output gradients (shaped like the input) as ``(N, units, T)``; by default the
        units are the channels of a channels-first ``(N, C, *spatial)`` input."""
        check_units(g, 1, self.units, "g", self.name)
        return g.reshape(g.shape[0], self.units, -1)

    # ----------------------------------------------------------- statistics
    def unit_gradients(self, x: Array, g: Array) -> Array:
        """Per-example gradients ``u_i`` of ``(γ_c[, β_c])``, shape ``(N, units, k)``."""
        self._check_pair(x, g)
        x_hat = self.normalized(x)
        g = self.unit_view(g).astype(x_hat.dtype, copy=False)
        parts = [(g * x_hat).sum(axis=2)] + ([g.sum(axis=2)] if self.has_bias else [])
        return array_module(x_hat).stack(parts, axis=-1)

    @staticmethod
    def _check_pair(x: Array, g: Array) -> None:
        for arr, name in ((x, "x"), (g, "g")):
            check_array(arr, name, 2)
        if g.shape != x.shape:
            raise ValueError(f"g: shape {g.shape} differs from x's {x.shape}")

    def fisher(self, x: Array, g: Array, scale: float = 1.0) -> Array:
        """``scale * Σ_i u_i u_iᵀ`` per unit, shape ``(units, k, k)``, order ``(γ, β)``.

        ``x`` is the layer input, ``g`` the per-example loss gradients of its
        output (same shape). Computed in float32 (float64 for float64 input).
        """
        u = self.unit_gradients(x, g).transpose(1, 0, 2)  # (units, N, k)
        # A batched product rather than einsum: the same sums, without einsum's per-call planning.
        fisher = u.transpose(0, 2, 1) @ u
        fisher *= u.dtype.type(scale)
        return fisher

    def check_input(self, x: Array) -> None:
        """ValueError naming the block unless ``x`` fits it; by default a channels-first
        ``(N, units, *spatial)`` input."""
        check_units(x, 1, self.units, "x", self.name)

    def add_input(self, stats: Array, a: Array) -> Array:
        # The Fisher needs the input and the output gradient together: kept, checked now so that
        # a wrong input fails in the forward pass that passed it, not in a backward hook.
        self.check_input(a)
        return a

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: Array) -> None:
        stats += pack_stack(self.fisher(saved, g, scale))

    # ------------------------------------------------------------- gradients
    def grad_matrix(self, weight_grad: Array, bias_grad: Array | None = None, out: Array | None = None) -> Array:
        """Columns ``(grad γ, grad β)`` per unit, ``(units, k)``."""
        self._check_params(weight_grad, bias_grad)
        if out is None:
            dtype = weight_grad.dtype if bias_grad is None else np.result_type(weight_grad.dtype, bias_grad.dtype)
            out = array_module(weight_grad).empty(self.grad_shape, dtype=dtype)
        else:
            check_shape(out, self.grad_shape, "out")
        out[:, 0] = weight_grad.reshape(-1)
        if self.has_bias:
            out[:, 1] = bias_grad.reshape(-1)
        return out

    def split_matrix(self, mat: Array) -> tuple[Array, Array | None]:
        check_shape(mat, self.grad_shape, "mat")
        return mat[:, 0].reshape(self.param_shape), (mat[:, 1].reshape(self.param_shape) if self.has_bias else None)

    # ----------------------------------------------------------------- solve
    def damping(self, factors: Sequence[Array], damping: float) -> list[Array]:
        """Plain Tikhonov ``λ`` for every unit."""
        return [array_module(factors[0]).full(self.units, float(damping), dtype=np.float64)]

    def precondition(self, grad: Array, inverses: Sequence[Array]) -> Array:
        """``(F_c + λ I)^-1 grad_c`` for every unit."""
        check_shape(grad, self.grad_shape, "grad")
        (inv,) = inverses
        check_shape(inv, (self.units, self.k, self.k), "inverses[0]")
        return _apply(inv, grad)

    @property
    def batch_key(self) -> tuple:
        """Units of every unit-wise block with the same ``k`` are independent alike."""
        return ("unit", self.k)

    def precondition_batch(self, grads: Array, inverses: Sequence[Array]) -> Array:
        """``(F_c + λ I)^-1 grad_c`` for the units of several blocks back to back (see
        ``CurvatureBlock.precondition_batch``)."""
        (inv,) = inverses
        units = grads.reshape(-1, self.k)
        if inv.shape != (len(units), self.k, self.k):
            raise ValueError(f"inverses: expected {len(units)} {self.k}x{self.k} inverses, got shape {inv.shape}")
        return _apply(inv, units).reshape(-1)


def _apply(inv: Array, vectors: Array) -> Array:
    """``inv[u] @ vectors[u]`` for every unit, as products and a sum over the short last axis:
    a batched matmul of tiny matrices rounds differently depending on where its operands sit
    in memory, and a resumed run (inverses loaded from a checkpoint) must give the same bits
    as the uninterrupted one."""
    return (inv * vectors[:, None, :]).sum(axis=2)


def normalize(x: Array, axes: tuple[int, ...], eps: float) -> Array:
    """``(x - mean) / sqrt(var + eps)`` over ``axes`` (biased variance, as the layers use in
    training), in float32 (float64 for float64 input)."""
    xp = array_module(x)
    dtype = accumulation_dtype(x.dtype)
    x = x.astype(dtype, copy=False)
    centred = x - x.mean(axis=axes, keepdims=True)
    var = (centred * centred).mean(axis=axes, keepdims=True)
    return centred / xp.sqrt(var + dtype.type(eps))


def check_units(x: Array, axis: int, units: int, name: str, block: str) -> None:
    """ValueError naming ``name`` unless ``x`` has ``units`` entries on ``axis``."""
    check_array(x, name, 2)
    if x.shape[axis] != units:
        raise ValueError(f"{name}: block {block!r} expects {units} units on axis {axis}, got shape {x.shape}")
