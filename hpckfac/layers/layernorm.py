"""``LayerNormBlock``: unit-wise Fisher of LayerNorm's elementwise ``(γ, β)``.

The input ``(N, ..., *normalized_shape)`` is normalised over its trailing
``normalized_shape`` dimensions at every example and position; each element
of ``normalized_shape`` is a unit, and the dimensions between the batch and
``normalized_shape`` (a sequence) are the positions its gradient sums over.
"""
from __future__ import annotations

from typing import Sequence

from hpckfac.checks import check_integer
from hpckfac.layers.block import Array, array_module, check_array
from hpckfac.layers.unitwise import UnitWiseBlock, normalize


class LayerNormBlock(UnitWiseBlock):
    """Curvature block of ``torch.nn.LayerNorm(normalized_shape, eps, elementwise_affine=True, bias)``."""

    def __init__(self, name: str, normalized_shape: Sequence[int], eps: float, bias: bool = True) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if not shape:
            raise ValueError("normalized_shape: expected at least one dimension")
        shape = tuple(check_integer(n, "normalized_shape", 1) for n in shape)
        super().__init__(name, shape, bias, eps)

    @property
    def feature_axes(self) -> tuple[int, int]:
        """The normalised dimensions, on both the input and the output."""
        return len(self.param_shape), len(self.param_shape)

    def _rows(self, x: Array, name: str) -> Array:
        """``x`` as ``(N, T, units)``."""
        k = len(self.param_shape)
        check_array(x, name, k + 1)
        if tuple(x.shape[-k:]) != self.param_shape:
            raise ValueError(f"{name}: block {self.name!r} expects trailing dimensions {self.param_shape}, "
                             f"got shape {x.shape}")
        return x.reshape(x.shape[0], -1, self.units)

    def check_input(self, x: Array) -> None:
        self._rows(x, "x")

    def unit_view(self, g: Array) -> Array:
        return array_module(g).swapaxes(self._rows(g, "g"), 1, 2)

    def normalized(self, x: Array) -> Array:
        return array_module(x).swapaxes(normalize(self._rows(x, "x"), (2,), self.eps), 1, 2)
