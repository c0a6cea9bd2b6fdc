"""``RMSNormBlock``: unit-wise Fisher of RMSNorm's elementwise weight ``γ``.

``torch.nn.RMSNorm`` scales its input ``(N, ..., *normalized_shape)`` by the
root mean square over the trailing ``normalized_shape`` dimensions at every
example and position, ``x̂ = x / sqrt(mean(x²) + eps)``, then by ``γ``: a
LayerNorm without the centring and without ``β``, whose block this is with that
``x̂``. Each element of ``normalized_shape`` is a unit with the 1x1 Fisher of
its ``γ``; the dimensions between the batch and ``normalized_shape`` are the
positions its gradient sums over.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hpckfac.layers.block import Array, array_module
from hpckfac.layers.layernorm import LayerNormBlock
from hpckfac.ops.checks import accumulation_dtype


class RMSNormBlock(LayerNormBlock):
    """Curvature block of ``torch.nn.RMSNorm(normalized_shape, eps, elementwise_affine=True)``.

    ``eps=None`` is RMSNorm's default: the machine epsilon of the dtype the layer computes
    in, which torch takes per input: float64's for float64 input, float32's for float32,
    float16 and bfloat16 (both upcast to float32 first; torch's documentation says
    ``torch.finfo(x.dtype).eps``, but its kernels use the upcast dtype's).
    """

    def __init__(self, name: str, normalized_shape: Sequence[int], eps: float | None = None) -> None:
        # The base class validates a given eps; None stands for a value only the input's dtype decides.
        super().__init__(name, normalized_shape, 1.0 if eps is None else eps, bias=False)
        self.eps: float | None = None if eps is None else self.eps

    def normalized(self, x: Array) -> Array:
        xp = array_module(x)
        dtype = accumulation_dtype(x.dtype)
        rows = self._rows(x, "x").astype(dtype, copy=False)
        eps = np.finfo(dtype).eps if self.eps is None else self.eps
        mean_square = (rows * rows).mean(axis=2, keepdims=True)
        return xp.swapaxes(rows / xp.sqrt(mean_square + dtype.type(eps)), 1, 2)
