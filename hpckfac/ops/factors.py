"""Kronecker-factor accumulation ``scale * X^T X`` with fp32 accumulation (CPU).

The product runs through torch (zero-copy views of the NumPy rows) so that it
uses torch's thread pool, the one the model's forward and backward use,
instead of starting NumPy's BLAS pool beside it (``hpckfac.threads``), and
computes only the upper triangle, in column panels. Torch's CPU autocast is off
inside (``full_precision``): the hooks run these inside the model's
``torch.autocast("cpu", ...)`` region, where its products would run in bfloat16.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from hpckfac.ops.average import ema_update
from hpckfac.ops.checks import accumulation_dtype
from hpckfac.ops.packing import mirror_upper, pack_upper


# Column panels of the upper triangle: about 64 columns each, at most 8 (the flops of k panels
# are (k+1)/(2k) of a full product; more, narrower panels lose more in GEMM efficiency).
PANEL_COLUMNS = 64
MAX_PANELS = 8


def _cpu_autocast_check() -> Callable[[], bool]:
    """A function telling whether torch's CPU autocast is on: ``is_autocast_enabled("cpu")``
    where torch has it (2.4), else the older ``is_autocast_cpu_enabled`` (deprecated since)."""
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled
    return lambda: torch.is_autocast_enabled("cpu")


cpu_autocast_enabled = _cpu_autocast_check()


def full_precision(fn: Callable) -> Callable:
    """``fn`` with torch's CPU autocast off. A forward hook runs inside the model's
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` region (and so does a backward hook when
    ``backward()`` is called there), where torch computes products of float32 tensors in
    bfloat16 and returns bfloat16: the factors' float32 products would lose 8 bits."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        # Entering and leaving the autocast context costs more than a small layer's product
        # (these run twice per layer per factor step): only when autocast is on.
        if not cpu_autocast_enabled():
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return run


@full_precision
def upper_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows.T @ rows`` with only the upper triangle computed (the strict lower
    triangle of the result is zero, unless one panel, fewer than ``2 * PANEL_COLUMNS``
    columns, computed it all), panel by panel in torch's thread pool."""
    d = rows.shape[1]
    panels = max(1, min(MAX_PANELS, d // PANEL_COLUMNS))
    if panels == 1:
        # One panel is the whole product: no zeroed matrix to write it into (the same GEMM, so
        # the same values, at a fraction of the host time for the small factors of small layers).
        return torch.mm(rows.T, rows)
    out = torch.zeros((d, d), dtype=rows.dtype)
    bounds = [d * k // panels for k in range(panels + 1)]
    for start, stop in zip(bounds, bounds[1:]):
        # Rows 0..stop of columns start..stop: the panel's blocks on and above the diagonal.
        torch.mm(rows[:, :stop].T, rows[:, start:stop], out=out[:stop, start:stop])
    return out


def host_tensor(x: np.ndarray) -> torch.Tensor:
    """``x`` as a contiguous CPU tensor of its accumulation dtype (float32, float64 for
    float64), sharing ``x``'s memory when it already is one (torch needs writable memory:
    a read-only array is copied)."""
    rows = np.ascontiguousarray(x, dtype=accumulation_dtype(x.dtype))
    return torch.from_numpy(rows if rows.flags.writeable else rows.copy())


def finish_factor(factor: np.ndarray, packed: bool) -> np.ndarray:
    """A factor from its upper triangle: packed, or made symmetric in place."""
    if packed:
        return pack_upper(factor[None])
    mirror_upper(factor)
    return factor


@full_precision
def example_gram(x: np.ndarray, scale: float, packed: bool) -> np.ndarray:
    """``scale * sum_i x_i x_i^T`` for ``x`` of shape ``(N, C, T)`` (example ``i``'s ``C x T``
    matrix, e.g. a convolution's output gradients over its positions), float32 (float64
    for float64 ``x``), dense or packed: the Gram of the rows ``(N * T, C)`` without
    copying them channels-last (one batched product in torch's pool, measured ~2x faster
    than the copy and a product for 16-64 channels)."""
    rows = host_tensor(x)
    factor = torch.bmm(rows, rows.transpose(1, 2)).sum(0).numpy()
    factor *= scale
    return finish_factor(factor, packed)


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
    factor = upper_gram(host_tensor(x)).numpy()
    factor *= scale
    factor = finish_factor(factor, packed)
    if out is None:
        return factor
    if decay is None:
        out[...] = factor
    elif not ema_update(out, factor, decay, first=False):
        raise ValueError("x: the factor scale * x.T @ x is not finite; the running average was left untouched")
    return out
