"""``BatchNormBlock``: unit-wise Fisher of BatchNorm's ``(γ_c, β_c)`` per channel.

``x̂`` is the input normalised per channel by the batch statistics (biased
variance), as BatchNorm does in training. Because those statistics depend on
the whole micro-batch, the block always takes every example
(``uses_sample = False``).
"""
from __future__ import annotations

from hpckfac import ops
from hpckfac.checks import check_integer
from hpckfac.layers.block import Array, array_module, unpack_stack
from hpckfac.layers.unitwise import UnitWiseBlock, check_units, normalize
from hpckfac.ops.checks import accumulation_dtype


class BatchNormBlock(UnitWiseBlock):
    """Curvature block of ``torch.nn.BatchNorm{1,2,3}d(num_features, eps)`` with affine parameters."""

    uses_sample = False

    def __init__(self, name: str, num_features: int, eps: float) -> None:
        num_features = check_integer(num_features, "num_features", 1)
        super().__init__(name, (num_features,), True, eps)
        self.num_features = num_features

    def normalized(self, x: Array) -> Array:
        check_units(x, 1, self.units, "x", self.name)
        return normalize(x.reshape(x.shape[0], self.units, -1), (0, 2), self.eps)

    def fisher(self, x: Array, g: Array, scale: float = 1.0) -> Array:
        """As ``UnitWiseBlock.fisher``, computed as the pipeline computes it
        (``hpckfac.ops.batchnorm_fisher``, without forming ``x̂``)."""
        x3, g3 = self._unit_pair(x, g)
        packed = array_module(x).zeros(self.stat_size, dtype=accumulation_dtype(x.dtype))
        ops.batchnorm_fisher(x3, g3, self.eps, scale, out=packed)
        return unpack_stack(packed, self.units, self.k)

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: Array) -> None:
        """The packed per-channel Fisher added to ``stats`` by one operation
        (``hpckfac.ops.batchnorm_fisher``: two kernel launches on a GPU)."""
        ops.batchnorm_fisher(*self._unit_pair(saved, g), self.eps, scale, out=stats)

    def _unit_pair(self, x: Array, g: Array) -> tuple[Array, Array]:
        """``x`` and ``g`` checked and viewed as ``(N, C, T)``."""
        self._check_pair(x, g)
        check_units(x, 1, self.units, "x", self.name)
        return x.reshape(x.shape[0], self.units, -1), self.unit_view(g)
