"""``KronBlock``: Kronecker-factored curvature ``A ⊗ G``, one pair per group.

A block sees a layer as ``W~ = [W | b]`` of shape ``(d_G, d_A)`` acting on
rows ``a~ = [a, 1]`` (docs/design.md, "Math conventions"). Subclasses say how
the captured layer input becomes rows (``input_rows``), how the output
gradients become rows (``output_rows``), how many positions ``|T|`` one
example has, and how the weight maps onto ``W`` (``weight_matrix``).

A layer with ``groups > 1`` (grouped and depthwise convolutions) is
block-diagonal: group ``j`` maps input columns ``j`` to output rows ``j``, so
it gets its own pair ``(A_j, G_j)``; the pairs are accumulated, inverted and
applied batched. The gradient matrix is ``(groups * d_G, d_A)``, group after
group.

Vectorisation: ``vec`` stacks the columns of a ``(d_G, d_A)`` gradient matrix
(column-major), so the Fisher block is ``A ⊗ G`` and
``(A ⊗ G)^-1 vec(M) = vec(G^-1 M A^-1)``.
"""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from hpckfac import ops
from hpckfac.checks import check_bool, check_integer
from hpckfac.layers.block import Array, CurvatureBlock, array_module, check_name, check_shape, pack_stack
from hpckfac.layers.damping import pi_damping_terms
from hpckfac.ops.checks import accumulation_dtype
from hpckfac.ops.kron_apply import kron_apply


class KronBlock(CurvatureBlock):
    """Curvature ``A_j ⊗ G_j`` for each of ``groups`` groups.

    Attributes: ``name``; ``d_A`` (a group's input-row width, +1 with a bias);
    ``d_G`` (a group's output-row width); ``groups``; ``has_bias``;
    ``weight_shape`` (the layer's weight shape).
    """

    averages_positions = True

    def __init__(self, name: str, d_in: int, d_out: int, bias: bool, weight_shape: tuple[int, ...],
                 groups: int = 1) -> None:
        self.name = check_name(name)
        self.has_bias = check_bool(bias, "bias")
        self.groups = check_integer(groups, "groups", 1)
        self.d_A = int(d_in) + self.has_bias
        self.d_G = int(d_out)
        self.weight_shape = tuple(int(s) for s in weight_shape)

    # ---------------------------------------------------------------- shapes
    @property
    def factor_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((self.groups, self.d_A), (self.groups, self.d_G))

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        return self.weight_shape, ((self.groups * self.d_G,) if self.has_bias else None)

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.groups * self.d_G, self.d_A)

    def describe(self) -> str:
        pair = f"A {self.d_A}x{self.d_A}, G {self.d_G}x{self.d_G}"
        return pair if self.groups == 1 else f"{self.groups} groups of {pair}"

    # ----------------------------------------------------------- subclasses
    @abc.abstractmethod
    def input_rows(self, a: Array, ones: bool = False) -> Array:
        """Input rows ``(rows, groups * (d_A - has_bias))``, group after group; with ``ones``
        (one-group blocks only) a trailing column of ones as well."""

    @abc.abstractmethod
    def output_rows(self, g: Array) -> Array:
        """Output-gradient rows ``(rows, groups * d_G)``, in the same row order as ``input_rows``."""

    @abc.abstractmethod
    def positions(self, g: Array) -> int:
        """``|T|``: positions per example (spatial or extra dimensions; 1 for a plain batch)."""

    def weight_matrix(self, weight: Array) -> Array:
        """The layer's weight (or its gradient) as ``(groups * d_G, d_A - has_bias)``."""
        return weight.reshape(self.groups * self.d_G, -1)

    def weight_from_matrix(self, mat: Array) -> Array:
        """Inverse of ``weight_matrix``."""
        return mat.reshape(self.weight_shape)

    # ------------------------------------------------------------------ rows
    def a_rows(self, a: Array) -> Array:
        """Input rows ``(rows, d_A)`` of a one-group block, a trailing 1 with a bias."""
        self._one_group("a_rows")
        return self.input_rows(a, ones=self.has_bias)

    def g_rows(self, g: Array) -> Array:
        """Output-gradient rows ``(rows, d_G)`` of a one-group block."""
        self._one_group("g_rows")
        return self.output_rows(g)

    def _one_group(self, what: str) -> None:
        if self.groups != 1:
            raise ValueError(f"{what}: block {self.name!r} has {self.groups} groups; use a_factor/g_factor")

    def _with_ones(self, rows: Array) -> Array:
        """``rows`` with a column of ones appended if the layer has a bias."""
        if not self.has_bias:
            return rows
        xp = array_module(rows)
        out = xp.empty((rows.shape[0], self.d_A), dtype=rows.dtype)
        out[:, :-1] = rows
        out[:, -1] = 1
        return out

    def _gram(self, rows: Array, width: int, bias: bool, scale: float, packed: bool) -> Array:
        """``scale * R_j^T R_j`` of each group's columns ``R_j`` of ``rows`` (a ones column
        appended per group with ``bias``, unless one group's rows have it already);
        float32 accumulation (float64 for float64)."""
        if self.groups == 1:
            return ops.accumulate_factor(rows, scale, packed=packed)
        xp = array_module(rows)
        dtype = accumulation_dtype(rows.dtype)
        grouped = xp.empty((self.groups, rows.shape[0], width), dtype=dtype)
        source = rows.reshape(rows.shape[0], self.groups, -1)
        # Half inputs are widened (exactly) before the product, as accumulate_factor does.
        grouped[:, :, :source.shape[2]] = source.astype(dtype).transpose(1, 0, 2)
        if bias:
            grouped[:, :, -1] = 1
        mats = xp.matmul(grouped.transpose(0, 2, 1), grouped)
        mats *= dtype.type(scale)
        return pack_stack(mats) if packed else mats

    def a_factor(self, a: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """``scale * sum_i sum_t a~ a~^T``: the ``A`` of docs/design.md with ``scale = 1/B``.

        Dense ``(d_A, d_A)`` (``(groups, d_A, d_A)`` with groups) or, with
        ``packed``, the upper triangles in ``hpckfac.ops.pack_sym`` order; float32
        (float64 for float64 input).
        """
        one = self.groups == 1
        return self._gram(self.input_rows(a, ones=one and self.has_bias), self.d_A, self.has_bias, scale, packed)

    def g_factor(self, g: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """``scale / |T| * sum_i sum_t g g^T``: the ``G`` of docs/design.md with ``scale = 1/B``.

        ``g`` must be the gradients of the *per-example* losses with respect
        to the layer output (undo a mean reduction). Layout as ``a_factor``.
        """
        # No positions (an empty sequence, which PyTorch's layers take): no rows, a zero G whatever it is divided by.
        return self._gram(self.output_rows(g), self.d_G, False, scale / max(self.positions(g), 1), packed)

    # ------------------------------------------------------------ statistics
    def add_input(self, stats: Array, a: Array) -> None:
        self.add_input_part(stats, self.input_part(a))

    def input_part(self, a: Array) -> Array:
        """The packed ``A`` of input ``a``: what ``add_input`` adds to the statistics."""
        return self.a_factor(a, packed=True)

    def add_input_part(self, stats: Array, part: Array) -> None:
        """Add an input part (``input_part``) to the statistics."""
        stats[:self.groups * self.d_A * (self.d_A + 1) // 2] += part

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: None) -> None:
        stats[self.groups * self.d_A * (self.d_A + 1) // 2:] += self.g_factor(g, scale, packed=True)

    # ------------------------------------------------------------- gradients
    def grad_matrix(self, weight_grad: Array, bias_grad: Array | None = None, out: Array | None = None) -> Array:
        """``[W | b]`` of shape ``(groups * d_G, d_A)`` from the parameter gradients."""
        self._check_params(weight_grad, bias_grad)
        weight = self.weight_matrix(weight_grad)
        if out is None:
            if not self.has_bias:
                return weight
            out = array_module(weight).empty(self.grad_shape, dtype=np.result_type(weight.dtype, bias_grad.dtype))
        else:
            check_shape(out, self.grad_shape, "out")
        if self.has_bias:
            out[:, :-1] = weight
            out[:, -1] = bias_grad
        else:
            out[...] = weight
        return out

    def split_matrix(self, mat: Array) -> tuple[Array, Array | None]:
        check_shape(mat, self.grad_shape, "mat")
        if not self.has_bias:
            return self.weight_from_matrix(mat), None
        return self.weight_from_matrix(mat[:, :-1]), mat[:, -1]

    # ----------------------------------------------------------------- solve
    def damping(self, factors: Sequence[Array], damping: float) -> list[Array]:
        """pi-corrected Tikhonov damping of each group's pair (``hpckfac.layers.damping``)."""
        a, g = factors
        xp = array_module(a)
        # Summed in float64: a float32 factor's trace passes float32's range long before its entries do.
        mean_a = xp.trace(a, axis1=1, axis2=2, dtype=np.float64) / np.float64(self.d_A)
        mean_g = xp.trace(g, axis1=1, axis2=2, dtype=np.float64) / np.float64(self.d_G)
        return list(pi_damping_terms(mean_a, mean_g, damping, xp))

    def precondition(self, grad: Array, inverses: Sequence[Array]) -> Array:
        """``G_j^-1 grad_j A_j^-1`` per group: ``(A ⊗ G)^-1 vec(grad)`` for each group's rows.

        ``inverses`` are the damped ``(groups, d_A, d_A)`` and
        ``(groups, d_G, d_G)`` inverses (``inverses()`` or the owner's batched ones).
        """
        check_shape(grad, self.grad_shape, "grad")
        inv_a, inv_g = inverses
        check_shape(inv_a, (self.groups, self.d_A, self.d_A), "inverses[0]")
        check_shape(inv_g, (self.groups, self.d_G, self.d_G), "inverses[1]")
        if self.groups == 1:
            return inv_g[0] @ grad @ inv_a[0]
        grouped = grad.reshape(self.groups, self.d_G, self.d_A)
        return (inv_g @ grouped @ inv_a).reshape(self.grad_shape)

    @property
    def batch_key(self) -> tuple:
        """Every group of every Kronecker block is one ``G^-1 X A^-1`` of the same shape."""
        return ("kron", self.d_G, self.d_A)

    def precondition_batch(self, grads: Array, inverses: Sequence[Array]) -> Array:
        """``G_j^-1 grad_j A_j^-1`` for every group of several blocks: ``grads`` is their
        ``(groups * d_G, d_A)`` matrices back to back, the inverses their ``(groups, ...)``
        stacks back to back (see ``CurvatureBlock.precondition_batch``)."""
        inv_a, inv_g, grouped = self._batch_operands(grads, inverses)
        out = array_module(grouped).empty(grouped.size, dtype=np.result_type(inv_g.dtype, grouped.dtype,
                                                                               inv_a.dtype))
        self.precondition_batch_into(grads, inverses, out)
        return out

    def precondition_batch_into(self, grads: Array, inverses: Sequence[Array], out: Array) -> None:
        """``precondition_batch`` into ``out``: the second product writes there when ``out``
        has its dtype (the same product, so the same values), instead of into a new array
        copied over. On the CPU both products run in torch's thread pool
        (``hpckfac.ops.kron_apply``): NumPy's would run on its BLAS's one thread."""
        inv_a, inv_g, grouped = self._batch_operands(grads, inverses)
        if isinstance(grouped, np.ndarray):
            kron_apply(inv_g, grouped, inv_a, out.reshape(grouped.shape))
            return
        left = inv_g @ grouped
        if out.dtype == np.result_type(left.dtype, inv_a.dtype):
            array_module(left).matmul(left, inv_a, out=out.reshape(grouped.shape))
        else:
            out[...] = (left @ inv_a).reshape(-1)

    def _batch_operands(self, grads: Array, inverses: Sequence[Array]) -> tuple[Array, Array, Array]:
        """``inverses`` (A's, then G's stack) and ``grads`` as ``(groups, d_G, d_A)`` matrices,
        their shapes checked."""
        inv_a, inv_g = inverses
        grouped = grads.reshape(-1, self.d_G, self.d_A)
        if inv_a.shape != (len(grouped), self.d_A, self.d_A) or inv_g.shape != (len(grouped), self.d_G, self.d_G):
            raise ValueError(f"inverses: expected {len(grouped)} pairs of {self.d_A}x{self.d_A} and "
                             f"{self.d_G}x{self.d_G}, got shapes {inv_a.shape} and {inv_g.shape}")
        return inv_a, inv_g, grouped
