"""Kronecker-factor accumulation ``scale * X^T X`` with fp32 accumulation (CPU)."""
from __future__ import annotations

import numpy as np

from hpckfac.ops.average import ema_update
from hpckfac.ops.checks import accumulation_dtype
from hpckfac.ops.packing import triu


def accumulate_factor(
    x: np.ndarray,
    scale: float,
    packed: bool,
    out: np.ndarray | None,
    decay: float | None,
) -> np.ndarray:
    """``scale * x.T @ x`` in float32 (float64 for float64 ``x``), dense or packed.

    Half-precision rows are upcast before the product: the conversion is exact
    and the products and their sums then happen in float32, so inputs whose
    squares overflow float16 (|x| > 256) still give the right factor.
    With ``decay`` the result is blended into ``out`` (see ``ema_update``); a
    non-finite product raises ValueError and leaves ``out`` untouched.
    """
    rows = x.astype(accumulation_dtype(x.dtype), copy=False)
    factor = rows.T @ rows
    factor *= scale
    if packed:
        factor = factor[triu(factor.shape[0])]
    if out is None:
        return factor
    if decay is None:
        out[...] = factor
    elif not ema_update(out, factor, decay, first=False):
        raise ValueError("x: the factor scale * x.T @ x is not finite; the running average was left untouched")
    return out
