"""``BatchNormBlock``: unit-wise Fisher of BatchNorm's ``(γ_c, β_c)`` per channel.

``x̂`` is the input normalised per channel by the batch statistics (biased
variance), as BatchNorm does in training. Because those statistics depend on
the whole micro-batch, the block always takes every example
(``uses_sample = False``).
"""
from __future__ import annotations

import numpy as np
import torch

from hpckfac.checks import check_integer
from hpckfac.layers.block import Array, array_module
from hpckfac.layers.unitwise import UnitWiseBlock, centred_and_scale, check_units, normalize
from hpckfac.ops.factors import host_tensor


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

    def unit_gradients(self, x: Array, g: Array) -> Array:
        """As ``UnitWiseBlock.unit_gradients``, without forming ``x̂``: a channel's scale
        ``sqrt(var + eps)`` is the same at every example and position, so
        ``Σ_t g x̂ = Σ_t g (x - mean) / scale`` (one pass over the input fewer, and no
        ``x̂``-sized temporary)."""
        self._check_pair(x, g)
        check_units(x, 1, self.units, "x", self.name)
        x3, g3 = x.reshape(x.shape[0], self.units, -1), self.unit_view(g)
        if isinstance(x, np.ndarray):
            return _host_unit_gradients(x3, g3, self.eps)
        centred, scale = centred_and_scale(x3, (0, 2), self.eps)
        g3 = g3.astype(centred.dtype, copy=False)
        return array_module(x).stack([(g3 * centred).sum(axis=2) / scale[:, :, 0], g3.sum(axis=2)], axis=-1)


def _host_unit_gradients(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """``unit_gradients`` of NumPy ``(N, C, T)`` arrays, the same centred formula in torch's
    pool with every reduction over the contiguous last axis (measured 3.5x faster than
    NumPy's reductions over ``(0, 2)`` and their temporaries, for 16-64 channels)."""
    x = host_tensor(x)
    g = host_tensor(g).to(x.dtype)  # in x's accumulation dtype, as on the generic path
    count = x.shape[0] * x.shape[2]
    centred = x - (x.sum(2).sum(0) / count)[None, :, None]
    scale = torch.sqrt(torch.linalg.vecdot(centred, centred).sum(0) / count + eps)
    return torch.stack([torch.linalg.vecdot(g, centred) / scale, g.sum(2)], -1).numpy()
