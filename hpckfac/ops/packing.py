"""Symmetric packing: many square symmetric matrices in one 1-D buffer (CPU).

Layout. Matrices follow one another in the order given; matrix ``m`` of order
``n_m`` starts at ``offsets[m] = sum_{k<m} n_k (n_k + 1) / 2`` and occupies
``n_m (n_m + 1) / 2`` elements: its upper triangle, row by row, i.e. the order
of ``M[np.triu_indices(n)]``: ``(0,0), (0,1), ..., (0,n-1), (1,1), ..., (n-1,n-1)``.
Element ``(i, j)`` with ``i <= j`` sits at ``offsets[m] + i*n - i*(i-1)/2 + (j - i)``.
Only the upper triangle is read when packing; unpacking mirrors it.

Matrices of order up to ``INDEX_MAX_N`` go through cached gather indices (one ``np.take``);
larger ones are copied row by row: an index of their ``n^2`` (or ``n (n + 1) / 2``) int64
entries is two to four times the size of a float32 matrix, and a cached one would stay for the
process's lifetime, after the preconditioner that needed it is gone.
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


# The largest order packed and unpacked through cached gather indices (a few KiB each, the
# fastest way for the many small matrices of normalisation layers).
INDEX_MAX_N = 64
# Columns mirrored at a time by ``mirror_upper``: a band that stays in cache while transposed.
MIRROR_TILE = 256


@lru_cache(maxsize=256)
def triu(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cached ``np.triu_indices(n)``: row and column of each packed element."""
    rows, cols = np.triu_indices(n)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@lru_cache(maxsize=256)
def triu_flat(n: int) -> np.ndarray:
    """Cached row-major flat index ``i * n + j`` of each packed element: one ``np.take`` of a
    contiguous matrix packs it ~6x faster than indexing by ``(rows, cols)``."""
    rows, cols = triu(n)
    flat = rows * n + cols
    flat.flags.writeable = False
    return flat


@lru_cache(maxsize=256)
def sym_gather(n: int) -> np.ndarray:
    """Cached packed index of each dense element ``(i, j)`` of an ``n x n`` matrix (that of
    ``(min(i, j), max(i, j))``): one ``np.take`` of the packed triangle rebuilds the matrix."""
    rows, cols = triu(n)
    where = np.empty((n, n), dtype=np.int64)
    where[rows, cols] = where[cols, rows] = np.arange(rows.size)
    flat = where.reshape(-1)
    flat.flags.writeable = False
    return flat


def pack_upper(mats: np.ndarray) -> np.ndarray:
    """Upper triangles of a ``(count, n, n)`` stack, matrix after matrix (``pack_sym`` order),
    1-D, in ``mats``' dtype."""
    count, n = mats.shape[0], mats.shape[-1]
    if n <= INDEX_MAX_N:
        return np.take(np.ascontiguousarray(mats).reshape(count, n * n), triu_flat(n), axis=1).reshape(-1)
    out = np.empty((count, packed_size(n)), dtype=mats.dtype)
    at = 0
    for i in range(n):
        out[:, at:at + n - i] = mats[:, i, i:]
        at += n - i
    return out.reshape(-1)


def unpack_upper(packed: np.ndarray, count: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """The ``(count, n, n)`` symmetric stack whose upper triangles ``packed`` holds
    (``pack_upper``), in its dtype; written into ``out`` (C-contiguous, of that shape and dtype)
    and returned when given."""
    if out is not None and not out.flags.c_contiguous:  # a reshape of it would be a copy, lost
        raise ValueError("out: expected a C-contiguous array")
    if n <= INDEX_MAX_N:
        if out is None:
            return np.take(packed.reshape(count, -1), sym_gather(n), axis=1).reshape(count, n, n)
        np.take(packed.reshape(count, -1), sym_gather(n), axis=1, out=out.reshape(count, n * n))
        return out
    rows = packed.reshape(count, -1)
    mats = np.empty((count, n, n), dtype=packed.dtype) if out is None else out
    at = 0
    for i in range(n):
        mats[:, i, i:] = rows[:, at:at + n - i]
        at += n - i
    mirror_upper(mats)
    return mats


def mirror_upper(mats: np.ndarray) -> None:
    """Copy the upper triangle of each ``(..., n, n)`` matrix onto its strict lower triangle,
    in place, a band of ``MIRROR_TILE`` columns at a time (a whole transposed copy reads
    memory ~14x slower at n = 4609)."""
    n = mats.shape[-1]
    for a in range(0, n, MIRROR_TILE):
        b = min(a + MIRROR_TILE, n)
        mats[..., b:, a:b] = mats[..., a:b, b:].swapaxes(-1, -2)
        tile = mats[..., a:b, a:b]
        np.copyto(tile, tile.swapaxes(-1, -2).copy(), where=np.tri(b - a, k=-1, dtype=bool))


def pack_sym(
    mats: Sequence[np.ndarray], sizes: list[int], dtype: np.dtype, out: np.ndarray | None
) -> np.ndarray:
    """Upper triangles of ``mats`` (orders ``sizes``) in one buffer of ``dtype``, ``out`` if given."""
    offsets = packed_offsets(sizes)
    if out is None:
        out = np.empty(int(offsets[-1]), dtype=dtype)
    for mat, n, start, stop in zip(mats, sizes, offsets[:-1], offsets[1:]):
        out[start:stop] = cast(pack_upper(np.asarray(mat).reshape(1, n, n)), out.dtype)
    return out


def unpack_sym(buffer: np.ndarray, sizes: list[int], dtype: np.dtype) -> list[np.ndarray]:
    """Symmetric ``(n, n)`` matrices of ``dtype`` rebuilt from the packed ``buffer``."""
    offsets = packed_offsets(sizes)
    mats = []
    for n, start, stop in zip(sizes, offsets[:-1], offsets[1:]):
        mats.append(unpack_upper(cast(buffer[start:stop], dtype), 1, n)[0])
    return mats
