"""``InstanceNormBlock``: unit-wise Fisher of InstanceNorm's per-channel ``(γ_c, β_c)``.

The input ``(N, C, *spatial)`` is normalised per example and channel over its
spatial positions (biased variance, as ``nn.InstanceNorm{1,2,3}d`` does in
training); each channel is a unit and its gradient sums over the spatial
positions. The statistics are per example, so a sub-sample of the batch is fine
(``uses_sample``), unlike BatchNorm's. This is GroupNorm with one channel per
group; the block also knows the layer's number of spatial dimensions, so that an
unbatched input (``(C, L)`` for ``InstanceNorm1d``, which PyTorch accepts) is
refused instead of being read as ``C`` examples.
"""
from __future__ import annotations

from hpckfac.checks import check_integer
from hpckfac.layers.block import Array
from hpckfac.layers.unitwise import UnitWiseBlock, check_units, normalize


class InstanceNormBlock(UnitWiseBlock):
    """Curvature block of ``torch.nn.InstanceNorm{1,2,3}d(num_features, eps, affine=True)``.

    ``spatial_dims``: the layer's number of spatial dimensions (1, 2 or 3), or None to take
    inputs ``(N, C, *spatial)`` of any rank >= 3.
    """

    def __init__(self, name: str, num_features: int, eps: float, spatial_dims: int | None = None) -> None:
        num_features = check_integer(num_features, "num_features", 1)
        self.spatial_dims = None if spatial_dims is None else check_integer(spatial_dims, "spatial_dims", 1)
        super().__init__(name, (num_features,), True, eps)
        self.num_features = num_features

    def _check_rank(self, x: Array, name: str) -> None:
        ndim = getattr(x, "ndim", -1)
        want = "at least 3" if self.spatial_dims is None else str(self.spatial_dims + 2)
        if (ndim < 3) if self.spatial_dims is None else (ndim != self.spatial_dims + 2):
            raise ValueError(f"{name}: block {self.name!r} expects {want} dimensions (N, C, *spatial) "
                             f"(an unbatched input is not supported), got shape {getattr(x, 'shape', None)}")
        check_units(x, 1, self.units, name, self.name)

    def add_input(self, stats: Array, a: Array) -> Array:
        # UnitWiseBlock.add_input only keeps ``a``: check it here, so that a wrong input fails in
        # the forward pass that passed it rather than in a backward hook.
        self._check_rank(a, "x")
        return a

    def normalized(self, x: Array) -> Array:
        self._check_rank(x, "x")
        return normalize(x.reshape(x.shape[0], self.units, -1), (2,), self.eps)

    def unit_view(self, g: Array) -> Array:
        self._check_rank(g, "g")
        return g.reshape(g.shape[0], self.units, -1)
