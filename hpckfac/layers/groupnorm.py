"""``GroupNormBlock``: unit-wise Fisher of GroupNorm's per-channel ``(γ_c, β_c)``.

The input ``(N, C, *spatial)`` is normalised over each group of
``C / num_groups`` channels and all positions, per example; each channel is a
unit and its gradient sums over the spatial positions.
"""
from __future__ import annotations

from hpckfac.checks import check_integer
from hpckfac.layers.block import Array
from hpckfac.layers.unitwise import UnitWiseBlock, check_units, normalize


class GroupNormBlock(UnitWiseBlock):
    """Curvature block of ``torch.nn.GroupNorm(num_groups, num_channels, eps, affine=True)``."""

    def __init__(self, name: str, num_groups: int, num_channels: int, eps: float) -> None:
        self.num_groups = check_integer(num_groups, "num_groups", 1)
        num_channels = check_integer(num_channels, "num_channels", 1)
        if num_channels % self.num_groups:
            raise ValueError(f"num_groups: {num_groups} does not divide num_channels {num_channels}")
        super().__init__(name, (num_channels,), True, eps)

    def normalized(self, x: Array) -> Array:
        check_units(x, 1, self.units, "x", self.name)
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        return normalize(grouped, (2,), self.eps).reshape(x.shape[0], self.units, -1)
