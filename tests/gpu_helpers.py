"""Shared pieces of the GPU tests (tests/test_gpu_*.py): the skip condition,
a poisoning allocator and error measures. Without a CUDA device (or without
CuPy) every GPU test is skipped; CuPy imports fine on such machines, so the
device count decides."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

try:
    import cupy

    DEVICES = cupy.cuda.runtime.getDeviceCount()
except Exception:  # CuPy missing, no driver, or no device
    cupy = None
    DEVICES = 0

requires_gpu = pytest.mark.skipif(DEVICES == 0, reason="needs CuPy and a CUDA device (CuPy missing or no device)")

SIZES = (1, 2, 3, 31, 64, 65, 257, 1152, 4608)


@contextlib.contextmanager
def poisoned_allocations():
    """Every CuPy allocation inside the block starts filled with 0xFF bytes (NaN in
    every float format), so an output element a kernel fails to write shows."""
    pool = cupy.cuda.MemoryPool()

    def malloc(size: int):
        mem = pool.malloc(size)
        mem.memset_async(0xFF, size)
        return mem

    cupy.cuda.set_allocator(malloc)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)


def host(a) -> np.ndarray:
    """``a`` as a NumPy array (CuPy arrays are copied from the device)."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_same_bits(got, want) -> None:
    """Bit-for-bit equality of two float arrays of the same dtype (NaN patterns included)."""
    got, want = host(got), host(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    view = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.itemsize]
    diff = np.flatnonzero(got.view(view) != want.view(view))
    assert diff.size == 0, f"{diff.size} elements differ, first at {diff[:5]}: {got.ravel()[diff[:5]]} vs {want.ravel()[diff[:5]]}"


def factor_error(got, oracle) -> float:
    """Largest |got - oracle| of a (d, d) factor relative to sqrt(F_ii F_jj), the
    largest magnitude the entry (i, j) of a Gram matrix can have."""
    got, oracle = host(got).astype(np.float64), host(oracle).astype(np.float64)
    diag = np.sqrt(np.abs(np.diagonal(oracle)))
    scale = np.outer(diag, diag)
    scale[scale == 0] = 1.0
    return float(np.max(np.abs(got - oracle) / scale, initial=0.0))


def random_spd(rng: np.random.Generator, batch: int, n: int, low: float = 1.0, high: float = 10.0) -> np.ndarray:
    """(batch, n, n) float64 SPD matrices Q diag(w) Q^T, Q random orthogonal,
    w log-uniform in [low, high] (condition number at most high/low)."""
    q, _ = np.linalg.qr(rng.standard_normal((batch, n, n)))
    w = np.exp(rng.uniform(np.log(low), np.log(high), (batch, n)))
    return (q * w[:, None, :]) @ q.swapaxes(1, 2)
