"""``PReLUBlock``: the full Fisher of a PReLU layer's slopes.

``torch.nn.PReLU(num_parameters)`` computes ``y = max(x, 0) + w_c min(x, 0)`` with one
slope per channel (axis 1 of an ``(N, C, *spatial)`` input) or one slope shared by every
element (``num_parameters = 1``). Example ``i``'s gradient of slope ``c`` is
``u_i[c] = Σ_t g_i min(x_i, 0)``, summed over the positions ``t`` of channel ``c`` (over
every element of the example for a shared slope). The slopes are few (one per channel),
so the block keeps their whole ``C x C`` Fisher ``Σ_i u_i u_iᵀ`` rather than a unit-wise
diagonal: the cross-channel terms come from the output gradients' correlations, which
the neighbouring layers' ``G`` keep in full too, and the matrix is no larger than the
``G`` of the layer feeding the PReLU. The gradient is preconditioned by
``(F + λ I)^-1``, plain Tikhonov as for the unit-wise blocks (one matrix, nothing to
split between factors).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hpckfac import ops
from hpckfac.checks import check_integer
from hpckfac.layers.block import Array, CurvatureBlock, array_module, check_name, check_shape
from hpckfac.ops.checks import accumulation_dtype


class PReLUBlock(CurvatureBlock):
    """Curvature block of ``torch.nn.PReLU(num_parameters)``: one ``C x C`` Fisher of the
    ``C = num_parameters`` slopes; the gradient matrix is the slopes' gradient as a column,
    ``(C, 1)``."""

    def __init__(self, name: str, num_parameters: int = 1) -> None:
        self.name = check_name(name)
        self.num_parameters = check_integer(num_parameters, "num_parameters", 1)

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((1, self.num_parameters),)

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        return (self.num_parameters,), None

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.num_parameters, 1)

    def describe(self) -> str:
        c = self.num_parameters
        return f"{c} slopes, {c}x{c}" if c > 1 else "1 slope, 1x1"

    # ------------------------------------------------------------ statistics
    def check_input(self, x: Array, name: str = "x") -> None:
        """ValueError naming ``name`` unless ``x`` is batched, ``(N, C, *spatial)`` (any
        ``(N, ...)`` for a shared slope): PyTorch also takes an unbatched input, whose
        channels or features would be read as examples."""
        if getattr(x, "ndim", -1) < 2:
            raise ValueError(f"{name}: block {self.name!r} expects (N, C, *spatial); an unbatched input of shape "
                             f"{getattr(x, 'shape', None)} is not supported (add a batch dimension)")
        if self.num_parameters > 1 and x.shape[1] != self.num_parameters:
            raise ValueError(f"{name}: block {self.name!r} expects {self.num_parameters} channels on axis 1, "
                             f"got shape {x.shape}")

    def slope_gradients(self, x: Array, g: Array) -> Array:
        """Per-example gradients ``u_i`` of the slopes, ``(N, C)``, from the layer input ``x``
        and the per-example output gradients ``g`` (same shape); float32 (float64 for float64)."""
        self.check_input(x, "x")
        if getattr(g, "shape", None) != x.shape:
            raise ValueError(f"g: shape {getattr(g, 'shape', None)} differs from x's {x.shape}")
        xp = array_module(x)
        dtype = accumulation_dtype(np.result_type(x.dtype, g.dtype))
        negative = xp.minimum(x.astype(dtype, copy=False), dtype.type(0))
        product = negative * g.astype(dtype, copy=False)
        return product.reshape(x.shape[0], self.num_parameters, -1).sum(axis=2)

    def fisher(self, x: Array, g: Array, scale: float = 1.0) -> Array:
        """``scale * Σ_i u_i u_iᵀ``, the dense ``(C, C)`` Fisher of the slopes."""
        return ops.accumulate_factor(self.slope_gradients(x, g), scale)

    def add_input(self, stats: Array, a: Array) -> Array:
        # The slopes' gradients need the input and the output gradient together: kept, and
        # checked now so that a wrong input fails in the forward pass that passed it.
        self.check_input(a)
        return a

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: Array) -> None:
        stats += ops.accumulate_factor(self.slope_gradients(saved, g), scale, packed=True)

    # ------------------------------------------------------------- gradients
    def grad_matrix(self, weight_grad: Array, bias_grad: Array | None = None, out: Array | None = None) -> Array:
        """The slopes' gradient as a ``(C, 1)`` column."""
        self._check_params(weight_grad, bias_grad)
        if out is None:
            return weight_grad.reshape(self.grad_shape)
        check_shape(out, self.grad_shape, "out")
        out[:, 0] = weight_grad
        return out

    def split_matrix(self, mat: Array) -> tuple[Array, Array | None]:
        check_shape(mat, self.grad_shape, "mat")
        return mat[:, 0], None

    # ----------------------------------------------------------------- solve
    def damping(self, factors: Sequence[Array], damping: float) -> list[Array]:
        """Plain Tikhonov ``λ``: the Fisher is one matrix, with no factors to split it between."""
        return [array_module(factors[0]).full(1, float(damping), dtype=np.float64)]

    def precondition(self, grad: Array, inverses: Sequence[Array]) -> Array:
        """``(F + λ I)^-1 grad``."""
        check_shape(grad, self.grad_shape, "grad")
        (inv,) = inverses
        check_shape(inv, (1, self.num_parameters, self.num_parameters), "inverses[0]")
        return inv[0] @ grad
