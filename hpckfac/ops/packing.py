"""Symmetric packing: many square symmetric matrices in one 1-D buffer (CPU).

Layout. Matrices follow one another in the order given; matrix ``m`` of order
``n_m`` starts at ``offsets[m] = sum_{k<m} n_k (n_k + 1) / 2`` and occupies
``n_m (n_m + 1) / 2`` elements: its upper triangle, row by row, i.e. the order
of ``M[np.triu_indices(n)]``: ``(0,0), (0,1), ..., (0,n-1), (1,1), ..., (n-1,n-1)``.
Element ``(i, j)`` with ``i <= j`` sits at ``offsets[m] + i*n - i*(i-1)/2 + (j - i)``.
Only the upper triangle is read when packing; unpacking mirrors it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from hpckfac.ops.casting import cast


def packed_size(n: int) -> int:
    """Number of elements of the packed upper triangle of an ``n x n`` matrix."""
    return n * (n + 1) // 2


def packed_offsets(sizes: Sequence[int]) -> np.ndarray:
    """Start of each matrix in a packed buffer, plus the total length at the end (int64)."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum([packed_size(n) for n in sizes], out=offsets[1:])
    return offsets


@lru_cache(maxsize=256)
def triu(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached ``np.triu_indices(n)``: row and column of each packed element."""
    rows, cols = np.triu_indices(n)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def pack_sym(
    mats: Sequence[np.ndarray], sizes: list[int], dtype: np.dtype, out: np.ndarray | None
) -> np.ndarray:
    """Upper triangles of ``mats`` (orders ``sizes``) in one buffer of ``dtype``, ``out`` if given."""
    offsets = packed_offsets(sizes)
    if out is None:
        out = np.empty(int(offsets[-1]), dtype=dtype)
    for mat, n, start, stop in zip(mats, sizes, offsets[:-1], offsets[1:]):
        out[start:stop] = cast(mat[triu(n)], out.dtype)
    return out


def unpack_sym(buffer: np.ndarray, sizes: list[int], dtype: np.dtype) -> list[np.ndarray]:
    """Symmetric ``(n, n)`` matrices of ``dtype`` rebuilt from the packed ``buffer``."""
    offsets = packed_offsets(sizes)
    mats = []
    for n, start, stop in zip(sizes, offsets[:-1], offsets[1:]):
        rows, cols = triu(n)
        mat = np.empty((n, n), dtype=dtype)
        values = cast(buffer[start:stop], dtype)
        mat[rows, cols] = values
        mat[cols, rows] = values
        mats.append(mat)
    return mats
