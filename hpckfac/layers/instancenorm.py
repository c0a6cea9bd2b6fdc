"""``InstanceNormBlock``: unit-wise Fisher of InstanceNorm's per-channel ``(γ_c, β_c)``.

The input ``(N, C, *spatial)`` is normalised per example and channel over its
spatial positions (biased variance, as ``nn.InstanceNorm{1,2,3}d`` does in
training): GroupNorm with one channel per group, whose block this is. It also
knows the layer's number of spatial dimensions, so that an unbatched input
(``(C, L)`` for ``InstanceNorm1d``, which PyTorch accepts) is refused in the
forward pass instead of being read as ``C`` examples.
"""
from __future__ import annotations

from hpckfac.checks import check_integer
from hpckfac.layers.block import Array
from hpckfac.layers.groupnorm import GroupNormBlock


class InstanceNormBlock(GroupNormBlock):
    """Curvature block of ``torch.nn.InstanceNorm{1,2,3}d(num_features, eps, affine=True)``.

    ``spatial_dims``: the layer's number of spatial dimensions (1, 2 or 3), or None to take
    inputs ``(N, C, *spatial)`` of any rank >= 3.
    """

    def __init__(self, name: str, num_features: int, eps: float, spatial_dims: int | None = None) -> None:
        self.num_features = check_integer(num_features, "num_features", 1)
        self.spatial_dims = None if spatial_dims is None else check_integer(spatial_dims, "spatial_dims", 1)
        super().__init__(name, self.num_features, self.num_features, eps)

    def _check_rank(self, x: Array, name: str) -> None:
        ndim = getattr(x, "ndim", -1)
        if (ndim < 3) if self.spatial_dims is None else (ndim != self.spatial_dims + 2):
            want = "at least 3" if self.spatial_dims is None else str(self.spatial_dims + 2)
            raise ValueError(f"{name}: block {self.name!r} expects {want} dimensions (N, C, *spatial) "
                             f"(an unbatched input is not supported), got shape {getattr(x, 'shape', None)}")

    def check_input(self, x: Array) -> None:
        self._check_rank(x, "x")
        super().check_input(x)

    def normalized(self, x: Array) -> Array:
        self._check_rank(x, "x")
        return super().normalized(x)

    def unit_view(self, g: Array) -> Array:
        self._check_rank(g, "g")
        return super().unit_view(g)
