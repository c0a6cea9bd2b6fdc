"""π-corrected Tikhonov damping of Kronecker factors (Martens & Grosse 2015, §6.3).

``A kron G + λ I`` is approximated by ``(A + π√λ I) kron (G + √λ/π I)`` with
``π = sqrt((tr A / d_A) / (tr G / d_G))``, which balances the damping between
the factors by their mean eigenvalues.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpckfac.checks import check_real
from hpckfac.layers.block import Array


def pi_damping(a: Array, g: Array, damping: float) -> tuple[float, float]:
    """``(π√λ, √λ/π)``: the damping to add to ``a`` and to ``g`` (square factor matrices).

    Guard: when π is not a finite positive number -- a trace of 0, inf or NaN,
    a negative mean eigenvalue -- or a damping term would overflow, π = 1 is
    used, i.e. both factors get ``√λ``.
    """
    damping = check_real(damping, "damping", at_least=0.0)
    for mat, name in ((a, "a"), (g, "g")):
        if getattr(mat, "ndim", None) != 2 or mat.shape[0] != mat.shape[1] or mat.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty square matrix, got shape {getattr(mat, 'shape', None)}")
    # Summed in float64: a float32 factor's trace passes float32's range long before its entries do.
    mean_a = np.float64(float(a.trace(dtype=np.float64)) / a.shape[0])
    mean_g = np.float64(float(g.trace(dtype=np.float64)) / g.shape[0])
    terms = pi_damping_terms(mean_a, mean_g, damping, np)
    return float(terms[0]), float(terms[1])


def pi_damping_terms(mean_a: Array, mean_g: Array, damping: float, xp: Any) -> tuple[Array, Array]:
    """``pi_damping`` for arrays of mean eigenvalues ``tr A / d_A`` and ``tr G / d_G``
    (float64, any shape), computed element-wise in namespace ``xp``.

    Runs where the factors live, so an owner on a GPU forms the damping of all
    its blocks without reading the traces back to the host.
    """
    root = math.sqrt(check_real(damping, "damping", at_least=0.0))
    with np.errstate(all="ignore"):  # invalid ratios are masked out below
        pi = xp.sqrt(mean_a / mean_g)
        term_a, term_g = pi * root, root / pi
    ok = (xp.isfinite(mean_a) & xp.isfinite(mean_g) & (mean_a > 0) & (mean_g > 0) & (pi > 0)
          & xp.isfinite(pi) & xp.isfinite(term_a) & xp.isfinite(term_g))
    return xp.where(ok, term_a, root), xp.where(ok, term_g, root)
