"""Damped inversion of a batch of SPD matrices with per-matrix fallbacks (CPU).

For each matrix ``S = (M + M^T)/2 + damping*I``:

1. CHOLESKY: ``S = L L^T``, then ``S^-1`` from ``L`` (LAPACK ``potrf`` and a
   ``potri``-class inverse, batched, through torch so that they run in torch's
   thread pool like the factor products); accepted when LAPACK succeeds and no pivot is
   numerically zero: ``L_ii^2 >= PIVOT_RTOL * eps * S_ii`` for every ``i``
   (``eps`` of the working dtype) and the inverse ``L^-T L^-1`` is finite.
   ``L_ii^2 / S_ii`` is the share of the i-th diagonal entry not explained by
   the earlier rows; for a singular matrix rounding leaves a few eps of it, and
   the test is invariant under diagonal scaling.
2. JITTER: Cholesky of ``S + j * s * I`` for ``j`` in ``JITTERS``
   (1e-6 ... 1e-1) where ``s`` is the mean of ``|diag(S)|`` (1 if that is 0);
   the first ``j`` accepted as in 1 wins.
3. EIGEN: ``(M + M^T)/2 = V diag(u) V^T`` (``eigh``), ``w = u + damping``
   (in float64: ``S`` itself may overflow the working dtype, a damping beyond
   its range or entries near its maximum, where its inverse does not), and the
   inverse ``V diag(1/max(w, floor)) V^T`` with
   ``floor = max(damping, EIGEN_RFLOOR * max|w|, sqrt(tiny))``
   (``max|w|`` taken as 1 when 0): eigenvalues of a PSD matrix plus damping
   are ``>= damping``, so only what rounding or corruption pushed below that is
   raised, and the floor keeps the inverse finite.

Every result is finite and exactly symmetric.
"""
from __future__ import annotations

import numpy as np
import torch

from hpckfac.ops.checks import accumulation_dtype

CHOLESKY, JITTER, EIGEN = 0, 1, 2
JITTERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
PIVOT_RTOL = 100.0
EIGEN_RFLOOR = 1e-6


def damped_inverse(mats: np.ndarray, damping: float | np.ndarray,
                   overwrite_mats: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Inverses of ``mats + damping*I`` (batch, n, n) and their int8 status (batch,).

    ``damping`` is a float or a (batch,) array, already validated. Works in
    float64 for float64 input, float32 otherwise. Non-finite input raises
    ValueError naming the offending batch indices. With ``overwrite_mats`` the
    damped matrices are formed in ``mats`` itself, which the caller gives up.
    The inverses are C-contiguous.
    """
    dtype = accumulation_dtype(mats.dtype)
    # C order: the damping goes on the diagonal through a flat view, which must not be a copy.
    cast = mats.astype(dtype, order="C", copy=False)
    private = overwrite_mats or cast is not mats  # a cast is a copy of our own
    mats = cast
    bad = np.flatnonzero(~np.isfinite(mats).all(axis=(1, 2)))
    if bad.size:
        raise ValueError(f"mats: non-finite values in batch indices {bad.tolist()}")
    batch, n = mats.shape[:2]
    # Kept in float64 for the eigen fallback: a finite damping may overflow the working dtype.
    damping = np.broadcast_to(np.asarray(damping, dtype=np.float64), (batch,))
    # Symmetrise before factorising: LAPACK's Cholesky and eigh read one triangle
    # only, so an input that rounding left slightly asymmetric (fp32 accumulation,
    # fp16 communication) would otherwise be inverted as a matrix that depends on
    # which triangle the backend reads; the average is the nearest symmetric matrix.
    # Halving before adding keeps entries near the dtype's maximum finite.
    # The halves, their sum and the damped matrix share one buffer (``mats`` when it is ours):
    # the same products and sums as separate arrays, without two batch-sized temporaries.
    damped = np.multiply(mats, 0.5, out=mats if private else None)
    _add_transpose(damped)
    # The undamped diagonal: with the damped matrix's off-diagonal entries it gives back
    # ``(M + M^T)/2`` for the eigen fallback, without a copy of the batch kept for it.
    undamped_diag = np.diagonal(damped, axis1=1, axis2=2).copy()
    # The damping goes on the diagonal only (adding damping * I adds zeros everywhere else).
    with np.errstate(over="ignore"):  # an overflowed S fails Cholesky and goes to the eigen fallback
        damped.reshape(batch, n * n)[:, ::n + 1] += damping.astype(dtype)[:, None]

    status = np.full(batch, CHOLESKY, dtype=np.int8)
    factors, ok = _cholesky_batch(damped)
    with np.errstate(over="ignore", invalid="ignore"):
        if ok.all():  # the usual case: no gather and scatter of the accepted matrices
            half = _half_inverse(factors)
            del factors  # released before the inverse is summed: one batch fewer at the peak
            inverse = _symmetric_sum(half, damped.dtype)
            del half
            ok = np.isfinite(inverse).all(axis=(1, 2))
        else:
            inverse = np.empty_like(damped)
            inverse[ok] = _inverse_from_cholesky(factors[ok])
            del factors
            ok[ok] = np.isfinite(inverse[ok]).all(axis=(1, 2))
    for i in np.flatnonzero(~ok):
        jittered = _jittered_inverse(damped[i])
        if jittered is not None:
            inverse[i], status[i] = jittered, JITTER
        else:
            sym = damped[i].copy()
            np.fill_diagonal(sym, undamped_diag[i])
            inverse[i], status[i] = _clipped_eigen_inverse(sym, float(damping[i])), EIGEN
    return inverse, status


# Matrices whose transposes ``_add_transpose`` copies at once: NumPy copies an overlapping
# operand of an in-place operation, so this bounds that copy (or it is one matrix, if larger).
TRANSPOSE_CHUNK_BYTES = 1 << 22


def _add_transpose(mats: np.ndarray) -> None:
    """``mats += mats^T`` per matrix, in place, the transposed operand copied a chunk at a time
    (each entry the same sum as ``mats + mats.swapaxes(1, 2)``)."""
    if not mats.size:
        return
    step = max(1, TRANSPOSE_CHUNK_BYTES // (mats[0].size * mats.itemsize))
    for start in range(0, len(mats), step):
        chunk = mats[start:start + step]
        np.add(chunk, chunk.swapaxes(1, 2), out=chunk)


def _jittered_inverse(mat: np.ndarray) -> np.ndarray | None:
    """Inverse of ``mat + j*s*I`` for the first ``j`` in JITTERS whose Cholesky is usable."""
    # Summed in float64: a float32 diagonal near its maximum would overflow the sum.
    diag_scale = float(np.abs(np.diagonal(mat)).mean(dtype=np.float64)) or 1.0
    if not np.isfinite(diag_scale):  # S overflowed: no jitter makes it finite
        return None
    eye = np.eye(mat.shape[0], dtype=mat.dtype)
    for jitter in JITTERS:
        with np.errstate(over="ignore"):  # a shifted diagonal beyond the dtype's range fails Cholesky
            factor = _cholesky(mat + (jitter * diag_scale) * eye)
        if factor is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                inverse = _inverse_from_cholesky(factor)
            if np.isfinite(inverse).all():
                return inverse
    return None


def _well_conditioned(mats: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Per matrix: Cholesky factor finite and no pivot numerically zero (module docstring)."""
    pivots = np.diagonal(factors, axis1=-2, axis2=-1) ** 2
    diag = np.diagonal(mats, axis1=-2, axis2=-1)
    eps = np.finfo(factors.dtype).eps
    finite = np.isfinite(factors).all(axis=(-2, -1))
    with np.errstate(invalid="ignore", over="ignore"):
        return finite & (pivots >= PIVOT_RTOL * eps * diag).all(axis=-1)


def _cholesky(mat: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of one matrix, or None when it fails or is numerically singular."""
    factors, ok = _cholesky_batch(mat[None])
    return factors[0] if ok[0] else None


def _cholesky_batch(mats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors of a batch (LAPACK ``potrf`` through torch, in its thread pool)
    and which of them are usable: factorised without error and well conditioned."""
    factors, info = torch.linalg.cholesky_ex(torch.from_numpy(np.ascontiguousarray(mats)))
    factors = factors.numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        return factors, (info.numpy() == 0) & _well_conditioned(mats, factors)


def _inverse_from_cholesky(factors: np.ndarray) -> np.ndarray:
    """``L^-T L^-1`` for a batch of lower factors (LAPACK ``potri``-class, batched, through
    torch), symmetrised exactly; C-contiguous."""
    return _symmetric_sum(_half_inverse(factors), factors.dtype)


def _half_inverse(factors: np.ndarray) -> torch.Tensor:
    """Half of ``L^-T L^-1`` for a batch of lower factors (LAPACK ``potri``-class, batched,
    through torch), in the layout torch gives it."""
    # Read through its strides: torch copies the factors into LAPACK's layout anyway.
    return torch.cholesky_inverse(torch.from_numpy(factors)).mul_(0.5)


def _symmetric_sum(half: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """``half + half^T`` per matrix (exactly symmetric) in a new C-contiguous ``dtype`` array."""
    # Summed in torch's pool rather than NumPy's one thread, straight into C order (the owner's
    # and the checkpoints' layout) rather than torch's column-major one and a copy.
    out = np.empty(tuple(half.shape), dtype=dtype)
    torch.add(half, half.mT, out=torch.from_numpy(out))
    return out


def _clipped_eigen_inverse(sym: np.ndarray, damping: float) -> np.ndarray:
    """``V diag(1/max(w, floor)) V^T`` for ``sym + damping*I``, ``sym`` symmetric and undamped
    (see module docstring)."""
    # In float64 (NumPy's eigh computes a float32 matrix in float64 anyway), the damping added to
    # the eigenvalues: S and its eigenvalues may overflow the working dtype where S^-1 does not.
    eigvals, eigvecs = np.linalg.eigh(sym.astype(np.float64))
    eigvals += damping
    top = float(np.abs(eigvals).max(initial=0.0)) or 1.0
    floor = max(damping, EIGEN_RFLOOR * top, float(np.sqrt(np.finfo(sym.dtype).tiny)))
    inverse = ((eigvecs / np.maximum(eigvals, floor)) @ eigvecs.T).astype(sym.dtype)
    return 0.5 * inverse + 0.5 * inverse.T
