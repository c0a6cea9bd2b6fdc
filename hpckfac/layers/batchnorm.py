"""``BatchNormBlock``: unit-wise Fisher of BatchNorm's ``(γ_c, β_c)`` per channel.

``x̂`` is the input normalised per channel by the batch statistics (biased
variance), as BatchNorm does in training. Because those statistics depend on
the whole micro-batch, the block always takes every example
(``uses_sample = False``).
"""
from __future__ import annotations

from hpckfac.layers.block import Array, check_positive_int
from hpckfac.layers.unitwise import UnitWiseBlock, check_units, normalize


class BatchNormBlock(UnitWiseBlock):
    """Curvature block of ``torch.nn.BatchNorm{1,2,3}d(num_features, eps)`` with affine parameters."""

    uses_sample = False

    def __init__(self, name: str, num_features: int, eps: float) -> None:
        num_features = check_positive_int(num_features, "num_features")
        super().__init__(name, (num_features,), True, eps)
        self.num_features = num_features

    def unit_view(self, g: Array) -> Array:
        check_units(g, 1, self.units, "g", self.name)
        return g.reshape(g.shape[0], self.units, -1)

    def normalized(self, x: Array) -> Array:
        check_units(x, 1, self.units, "x", self.name)
        return normalize(x.reshape(x.shape[0], self.units, -1), (0, 2), self.eps)
