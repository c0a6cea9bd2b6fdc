"""``LinearBlock``: K-FAC block of a fully connected layer ``s = W a + b``.

Inputs ``(B, d_in)`` give one row per example. Inputs with extra dimensions
``(B, ..., d_in)`` (token sequences, ...) give one row per example and extra
index ``t``: ``A`` is summed over those positions and ``G`` averaged
(DESIGN.md), exactly as for a convolution's spatial positions.
"""
from __future__ import annotations

from hpckfac.layers.base import Array, KronBlock, check_positive_int, prod


class LinearBlock(KronBlock):
    """Curvature block of ``torch.nn.Linear(in_features, out_features, bias)``.

    ``d_A = in_features + bias``, ``d_G = out_features``; the weight is
    ``(out_features, in_features)``.
    """

    def __init__(self, name: str, in_features: int, out_features: int, bias: bool) -> None:
        in_features = check_positive_int(in_features, "in_features")
        out_features = check_positive_int(out_features, "out_features")
        super().__init__(name, in_features, out_features, bias, (out_features, in_features))
        self.in_features, self.out_features = in_features, out_features

    def a_rows(self, a: Array) -> Array:
        """``a.reshape(-1, in_features)`` (+ a column of ones with a bias)."""
        self._check_width(a, "a", self.in_features, -1)
        return self.with_ones(a.reshape(-1, self.in_features))

    def g_rows(self, g: Array) -> Array:
        """``g.reshape(-1, out_features)``."""
        self._check_width(g, "g", self.out_features, -1)
        return g.reshape(-1, self.out_features)

    def positions(self, g: Array) -> int:
        """Product of the extra dimensions of ``g`` (between batch and features); 1 for ``(B, d_out)``."""
        return prod(g.shape[1:-1])
