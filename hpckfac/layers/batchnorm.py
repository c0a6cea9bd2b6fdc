"""``BatchNormBlock``: unit-wise Fisher of BatchNorm's ``(γ_c, β_c)`` per channel.

``x̂`` is the input normalised per channel by the batch statistics (biased
variance), as BatchNorm does in training. Because those statistics depend on
the whole micro-batch, the block always takes every example
(``uses_sample = False``).
"""
from __future__ import annotations

from hpckfac.layers.block import Array, array_module, check_positive_int
from hpckfac.layers.unitwise import UnitWiseBlock, centred_and_scale, check_units, normalize


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

    def unit_gradients(self, x: Array, g: Array) -> Array:
        """As ``UnitWiseBlock.unit_gradients``, without forming ``x̂``: a channel's scale
        ``sqrt(var + eps)`` is the same at every example and position, so
        ``Σ_t g x̂ = Σ_t g (x - mean) / scale`` (one pass over the input fewer, and no
        ``x̂``-sized temporary)."""
        self._check_pair(x, g)
        check_units(x, 1, self.units, "x", self.name)
        centred, scale = centred_and_scale(x.reshape(x.shape[0], self.units, -1), (0, 2), self.eps)
        g = self.unit_view(g).astype(centred.dtype, copy=False)
        return array_module(x).stack([(g * centred).sum(axis=2) / scale[:, :, 0], g.sum(axis=2)], axis=-1)
