"""CPU reference of BatchNorm's unit-wise statistics: each example's gradient of
``(γ_c, β_c)`` and their packed per-channel Fisher (``hpckfac.layers.batchnorm``).

``x`` (the layer input) and ``g`` (the output gradients) are ``(N, C, T)``:
example, channel, positions. ``x̂ = (x - mean_c) / s_c`` with ``s_c = sqrt(var_c
+ eps)``, mean and biased variance over examples and positions, as BatchNorm
normalises in training; ``x̂`` is never formed: ``s_c`` is the same at every
example and position, so ``Σ_t g x̂ = Σ_t g (x - mean_c) / s_c``.
"""
from __future__ import annotations

import numpy as np
import torch

from hpckfac.ops.factors import full_precision, host_tensor


@full_precision
def unit_gradients(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """``u[n, c] = (Σ_t g x̂, Σ_t g)``, shape ``(N, C, 2)``, in ``x``'s accumulation dtype.

    Computed in torch's pool with every reduction over the contiguous last axis
    (measured 3.5x faster than NumPy's reductions over ``(0, 2)`` and their
    temporaries, for 16-64 channels)."""
    x = host_tensor(x)
    g = host_tensor(g).to(x.dtype)
    count = x.shape[0] * x.shape[2]
    centred = x - (x.sum(2).sum(0) / count)[None, :, None]
    scale = torch.sqrt(torch.linalg.vecdot(centred, centred).sum(0) / count + eps)
    return torch.stack([torch.linalg.vecdot(g, centred) / scale, g.sum(2)], -1).numpy()


def batchnorm_fisher(x: np.ndarray, g: np.ndarray, eps: float, scale: float, out: np.ndarray) -> np.ndarray:
    """``out += scale * Σ_n u_n u_nᵀ`` per channel, packed ``(00, 01, 11)`` channel after
    channel; ``out`` returned."""
    u = unit_gradients(x, g, eps).transpose(1, 0, 2)  # (C, N, 2)
    fisher = u.transpose(0, 2, 1) @ u
    fisher *= u.dtype.type(scale)
    out += fisher.reshape(-1, 4)[:, [0, 1, 3]].reshape(-1)
    return out
