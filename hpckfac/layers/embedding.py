"""``EmbeddingBlock``: K-FAC block of an embedding table.

An embedding is a Linear layer without bias on one-hot inputs: looking up
token ``v`` is ``W e_v`` with ``W`` the ``(embedding_dim, num_embeddings)``
transpose of the table. Its ``A`` is therefore diagonal, ``A = diag(n_v) / B``
with ``n_v`` how often token ``v`` occurs in the batch, and ``G`` is the full
``(1/(B|T|)) Σ g gᵀ`` of the looked-up vectors' gradients, positions summed
and averaged as for Linear layers on sequences (docs/design.md). The diagonal
``A`` is kept as ``num_embeddings`` 1x1 matrices, so it packs, damps and
inverts through the same calls as every other factor.

With ``padding_idx`` the padding row never gets a gradient (PyTorch leaves it
out), so a padding token is a zero input, as a zero row is to a Linear layer:
it adds nothing to ``A`` (``n_pad = 0``) and its output gradient still counts in
``G`` as one of the example's positions.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from hpckfac import ops
from hpckfac.checks import check_integer
from hpckfac.layers.block import Array, CurvatureBlock, array_module, check_name, check_shape, prod
from hpckfac.layers.damping import pi_damping_terms


class EmbeddingBlock(CurvatureBlock):
    """Curvature block of ``torch.nn.Embedding(num_embeddings, embedding_dim, padding_idx)``;
    the table is ``(num_embeddings, embedding_dim)``, the gradient matrix its transpose.
    ``padding_idx`` (None, or an index, negative ones counting from the end as PyTorch's):
    the token whose row gets no gradient, counted 0 times in ``A``."""

    averages_positions = True
    feature_axes = (0, 1)  # integer indices in, vectors out

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        self.name = check_name(name)
        self.num_embeddings = check_integer(num_embeddings, "num_embeddings", 1)
        self.embedding_dim = check_integer(embedding_dim, "embedding_dim", 1)
        if padding_idx is not None:
            index = check_integer(padding_idx, "padding_idx", -self.num_embeddings)
            if index >= self.num_embeddings:
                raise ValueError(f"padding_idx: expected an index into {self.num_embeddings} embeddings, "
                                 f"got {padding_idx!r}")
            padding_idx = index % self.num_embeddings
        self.padding_idx = padding_idx

    @property
    def factor_shapes(self) -> tuple[tuple[int, int], ...]:
        return ((self.num_embeddings, 1), (1, self.embedding_dim))

    @property
    def param_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        return (self.num_embeddings, self.embedding_dim), None

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (self.embedding_dim, self.num_embeddings)

    def describe(self) -> str:
        return f"A diagonal {self.num_embeddings}, G {self.embedding_dim}x{self.embedding_dim}"

    # ------------------------------------------------------------ statistics
    def add_input(self, stats: Array, a: Array) -> None:
        """Add the token counts of the indices ``a`` (any shape, integers); the padding
        token's count stays 0."""
        if getattr(getattr(a, "dtype", None), "kind", None) not in ("i", "u"):
            raise ValueError(f"a: block {self.name!r} expects integer token indices, got {getattr(a, 'dtype', None)}")
        # On a GPU, cupy.bincount reads back twice (its check for negative indices, the maximum
        # for the output's length): two waits for the device per factor step (docs/gpu.md).
        counts = array_module(a).bincount(a.reshape(-1), minlength=self.num_embeddings)
        if counts.shape[0] != self.num_embeddings:
            raise ValueError(f"a: token index {counts.shape[0] - 1} is outside the table of {self.name!r}")
        if self.padding_idx is not None:
            counts[self.padding_idx] = 0
        stats[:self.num_embeddings] += counts.astype(stats.dtype)
        return None

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: None) -> None:
        if getattr(g, "ndim", 0) < 2 or g.shape[-1] != self.embedding_dim:
            raise ValueError(f"g: block {self.name!r} expects (N, ..., {self.embedding_dim}), "
                             f"got shape {getattr(g, 'shape', None)}")
        positions = max(prod(g.shape[1:-1]), 1)  # none: no rows, nothing added (an empty sequence)
        stats[self.num_embeddings:] += ops.accumulate_factor(g.reshape(-1, self.embedding_dim),
                                                             scale / positions, packed=True)

    # ------------------------------------------------------------- gradients
    def grad_matrix(self, weight_grad: Array, bias_grad: Array | None = None, out: Array | None = None) -> Array:
        self._check_params(weight_grad, bias_grad)
        if out is None:
            return weight_grad.T
        check_shape(out, self.grad_shape, "out")
        out[...] = weight_grad.T
        return out

    def split_matrix(self, mat: Array) -> tuple[Array, Array | None]:
        check_shape(mat, self.grad_shape, "mat")
        return mat.T, None

    def outside_statistics(self, stats: Array, grad: Array) -> Array:
        """A gradient in the column of a token that no lookup counted: the lookups alone give
        those columns exact zeros (and the damping alone would scale them, by ``1/(π√λ)``)."""
        check_shape(grad, self.grad_shape, "grad")
        return ((grad != 0).any(axis=0) & (stats[:self.num_embeddings] == 0)).any()

    # ----------------------------------------------------------------- solve
    def damping(self, factors: Sequence[Array], damping: float) -> list[Array]:
        """pi-corrected damping, as for a Kronecker pair: every 1x1 entry of ``A`` gets ``π√λ``."""
        a, g = factors
        xp = array_module(a)
        mean_a = a.sum(dtype=np.float64).reshape(1) / np.float64(self.num_embeddings)
        mean_g = xp.trace(g, axis1=1, axis2=2, dtype=np.float64) / np.float64(self.embedding_dim)
        damp_a, damp_g = pi_damping_terms(mean_a, mean_g, damping, xp)
        return [xp.broadcast_to(damp_a, (self.num_embeddings,)), damp_g]

    def precondition(self, grad: Array, inverses: Sequence[Array]) -> Array:
        """``G^-1 grad A^-1`` with the diagonal ``A^-1`` applied column by column."""
        check_shape(grad, self.grad_shape, "grad")
        inv_a, inv_g = inverses
        check_shape(inv_a, (self.num_embeddings, 1, 1), "inverses[0]")
        check_shape(inv_g, (1, self.embedding_dim, self.embedding_dim), "inverses[1]")
        return (inv_g[0] @ grad) * inv_a[:, 0, 0]
