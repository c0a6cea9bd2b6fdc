"""``LinearBlock``: K-FAC block of a fully connected layer ``s = W a + b``.

Inputs ``(B, d_in)`` give one row per example. Inputs with extra dimensions
``(B, ..., d_in)`` (token sequences, ...) give one row per example and extra
index ``t``: ``A`` is summed over those positions and ``G`` averaged
(docs/design.md), exactly as for a convolution's spatial positions.

``transposed=True`` is the same layer with its weight stored ``(in, out)``,
as Hugging Face's GPT-2 ``Conv1D`` stores it (``s = a W + b``).
"""
from __future__ import annotations

from hpckfac.checks import check_bool, check_integer
from hpckfac.layers.block import Array, check_array, prod
from hpckfac.layers.kron import KronBlock


def _check_features(x: Array, name: str, block: str, width: int) -> None:
    """ValueError naming ``name`` unless ``x`` is an array whose last axis has ``width`` entries."""
    check_array(x, name, 1)
    if x.ndim < 2:  # PyTorch's Linear takes an unbatched (features,) input: one example, not `width`
        raise ValueError(f"{name}: block {block!r} expects (batch, ..., {width}); an unbatched input of shape "
                         f"{x.shape} is not supported (add a batch dimension)")
    if x.shape[-1] != width:
        raise ValueError(f"{name}: block {block!r} expects {width} features on the last axis, got shape {x.shape}")


class LinearBlock(KronBlock):
    """Curvature block of ``torch.nn.Linear(in_features, out_features, bias)``.

    ``d_A = in_features + bias``, ``d_G = out_features``; the weight is
    ``(out_features, in_features)``, or ``(in_features, out_features)`` with
    ``transposed``.
    """

    feature_axes = (1, 1)

    def __init__(self, name: str, in_features: int, out_features: int, bias: bool, transposed: bool = False) -> None:
        in_features = check_integer(in_features, "in_features", 1)
        out_features = check_integer(out_features, "out_features", 1)
        self.transposed = check_bool(transposed, "transposed")
        shape = (in_features, out_features) if self.transposed else (out_features, in_features)
        super().__init__(name, in_features, out_features, bias, shape)
        self.in_features, self.out_features = in_features, out_features

    @property
    def input_key(self) -> tuple:
        """The input's rows and so its ``A`` depend on its width and the bias only (not on
        ``out_features`` nor ``transposed``)."""
        return ("linear", self.in_features, self.has_bias)

    def input_rows(self, a: Array, ones: bool = False) -> Array:
        """``a.reshape(-1, in_features)`` (+ a column of ones with ``ones``)."""
        _check_features(a, "a", self.name, self.in_features)
        rows = a.reshape(-1, self.in_features)
        return self._with_ones(rows) if ones else rows

    def output_rows(self, g: Array) -> Array:
        """``g.reshape(-1, out_features)``."""
        _check_features(g, "g", self.name, self.out_features)
        return g.reshape(-1, self.out_features)

    def positions(self, g: Array) -> int:
        """Product of the extra dimensions of ``g`` (between batch and features); 1 for ``(B, d_out)``."""
        return prod(g.shape[1:-1])

    def weight_matrix(self, weight: Array) -> Array:
        return weight.T if self.transposed else weight

    def weight_from_matrix(self, mat: Array) -> Array:
        return mat.T if self.transposed else mat
