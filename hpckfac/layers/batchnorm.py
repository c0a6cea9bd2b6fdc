"""``BatchNormBlock``: unit-wise Fisher of BatchNorm's ``(γ_c, β_c)`` (SP-NGD, Osawa et al.).

A BatchNorm output is ``y = γ_c x̂ + β_c`` per channel ``c``, with ``x̂`` the
input normalised by the batch statistics (biased variance, as BatchNorm does
in training). Example ``i``'s gradient of ``(γ_c, β_c)`` is
``u_i = (Σ_t g_i x̂_i, Σ_t g_i)`` summed over the example's positions ``t``;
each channel gets the 2x2 Fisher ``Σ_i u_i u_iᵀ`` (times ``scale``), and the
gradient is preconditioned by solving ``(F_c + λ I) v_c = grad_c`` per channel.
"""
from __future__ import annotations

import numpy as np

from hpckfac.layers.base import Array, array_module, check_array, check_name, check_positive_int
from hpckfac.layers.damping import check_damping
from hpckfac.ops.checks import accumulation_dtype


class BatchNormBlock:
    """Curvature block of ``torch.nn.BatchNorm{1,2,3}d(num_features, eps)`` with affine parameters."""

    def __init__(self, name: str, num_features: int, eps: float) -> None:
        self.name = check_name(name)
        self.num_features = check_positive_int(num_features, "num_features")
        try:
            self.eps = float(eps)
        except (TypeError, ValueError):
            raise ValueError(f"eps: expected a finite number > 0, got {eps!r}") from None
        if not (np.isfinite(self.eps) and self.eps > 0.0):
            raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")

    def __repr__(self) -> str:
        return f"BatchNormBlock(name={self.name!r}, num_features={self.num_features}, eps={self.eps})"

    def fisher(self, x: Array, g: Array, scale: float = 1.0) -> Array:
        """``scale * Σ_i u_i u_iᵀ`` per channel, shape ``(C, 2, 2)``, order ``(γ, β)``.

        ``x`` is the BatchNorm input ``(N, C, *spatial)``, ``g`` the
        per-example loss gradients of its output (same shape). Computed in
        float32 (float64 for float64 input).
        """
        for arr, name in ((x, "x"), (g, "g")):
            check_array(arr, name, 2)
            if arr.shape[1] != self.num_features:
                raise ValueError(f"{name}: block {self.name!r} expects {self.num_features} channels on axis 1, "
                                 f"got shape {arr.shape}")
        if g.shape != x.shape:
            raise ValueError(f"g: shape {g.shape} differs from x's {x.shape}")
        xp = array_module(x)
        dtype = accumulation_dtype(x.dtype)
        x = x.reshape(x.shape[0], self.num_features, -1).astype(dtype, copy=False)
        g = g.reshape(x.shape).astype(dtype, copy=False)
        mean = x.mean(axis=(0, 2), keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(axis=(0, 2), keepdims=True)  # biased, as in training
        x_hat = centred / xp.sqrt(var + dtype.type(self.eps))
        u = xp.stack([(g * x_hat).sum(axis=2), g.sum(axis=2)], axis=-1)  # (N, C, 2)
        return xp.einsum("ncj,nck->cjk", u, u) * dtype.type(scale)

    def precondition(self, grad_gamma: Array, grad_beta: Array, fisher: Array, damping: float) -> tuple[Array, Array]:
        """``(F_c + damping I)^-1 (grad_gamma_c, grad_beta_c)`` for every channel ``c``.

        Closed-form 2x2 solve; a channel whose damped Fisher is (numerically)
        singular gets the minimum-norm solution ``pinv(F_c + damping I) grad_c``.
        Non-finite ``fisher`` raises ValueError.
        """
        damping = check_damping(damping)
        c = self.num_features
        if tuple(getattr(fisher, "shape", ())) != (c, 2, 2):
            raise ValueError(f"fisher: expected shape ({c}, 2, 2), got {getattr(fisher, 'shape', None)}")
        for arr, name in ((grad_gamma, "grad_gamma"), (grad_beta, "grad_beta")):
            if tuple(getattr(arr, "shape", ())) != (c,):
                raise ValueError(f"{name}: expected shape ({c},), got {getattr(arr, 'shape', None)}")
        xp = array_module(fisher)
        if not bool(xp.isfinite(fisher).all()):
            raise ValueError(f"fisher: block {self.name!r} has non-finite entries")
        m00 = fisher[:, 0, 0] + damping
        m11 = fisher[:, 1, 1] + damping
        m01 = 0.5 * (fisher[:, 0, 1] + fisher[:, 1, 0])
        det = m00 * m11 - m01 * m01
        # Relative pivot test: det tiny against m00*m11 means cond(M) beyond what the dtype resolves.
        ok = (det > 64 * np.finfo(det.dtype).eps * m00 * m11) & (m00 > 0)
        safe = xp.where(ok, det, 1)
        v_gamma = (m11 * grad_gamma - m01 * grad_beta) / safe
        v_beta = (m00 * grad_beta - m01 * grad_gamma) / safe
        if not bool(ok.all()):
            bad = xp.flatnonzero(~ok)
            mats = xp.stack([xp.stack([m00[bad], m01[bad]], -1), xp.stack([m01[bad], m11[bad]], -1)], -2)
            grads = xp.stack([grad_gamma[bad], grad_beta[bad]], -1)
            v = xp.einsum("cij,cj->ci", xp.linalg.pinv(mats), grads)
            v_gamma[bad], v_beta[bad] = v[:, 0], v[:, 1]
        return v_gamma, v_beta
