"""Damped batched inversion: Cholesky path, jitter and eigen fallbacks, validation."""
import logging
from fractions import Fraction

import numpy as np
import pytest

from gpu_helpers import cupy, host, requires_gpu
from hpckfac import ops
from hpckfac.ops import inverse as cpu_inverse


def spd_batch(rng, batch, n, dtype=np.float64):
    x = rng.standard_normal((batch, 2 * n, n))
    return (x.swapaxes(1, 2) @ x / (2 * n)).astype(dtype)


def with_spectrum(rng, eigvals):
    q, _ = np.linalg.qr(rng.standard_normal((len(eigvals), len(eigvals))))
    return (q * eigvals) @ q.T


@pytest.fixture
def warnings_seen():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("hpckfac.ops")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("seed", range(3))
def test_well_conditioned_scalar_damping(dtype, tol, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20))
    mats = spd_batch(rng, 4, n, dtype)
    result = ops.damped_inverse(mats, 0.1)
    assert result.inverse.dtype == dtype and result.status.dtype == np.int8
    assert (result.status == ops.CHOLESKY).all()
    damped = mats.astype(np.float64) + 0.1 * np.eye(n)
    np.testing.assert_allclose(damped @ result.inverse, np.broadcast_to(np.eye(n), damped.shape), atol=tol)
    np.testing.assert_array_equal(result.inverse, result.inverse.swapaxes(1, 2))


def test_per_matrix_damping():
    rng = np.random.default_rng(21)
    mats = spd_batch(rng, 3, 6)
    damping = np.array([0.0, 0.01, 3.0])
    result = ops.damped_inverse(mats, damping)
    for m, lam, inv in zip(mats, damping, result.inverse):
        np.testing.assert_allclose(inv, np.linalg.inv(m + lam * np.eye(6)), rtol=1e-9, atol=1e-12)
    # A list is taken as the array it holds, not refused as a malformed scalar.
    np.testing.assert_array_equal(ops.damped_inverse(mats, damping.tolist()).inverse, result.inverse)


def test_half_input_computed_in_float32():
    rng = np.random.default_rng(22)
    mats = spd_batch(rng, 2, 5, np.float16)
    result = ops.damped_inverse(mats, 0.5)
    assert result.inverse.dtype == np.float32
    expect = np.linalg.inv(mats.astype(np.float64) + 0.5 * np.eye(5))
    np.testing.assert_allclose(result.inverse, expect, rtol=1e-4, atol=1e-5)


def test_asymmetric_input_uses_symmetric_part():
    rng = np.random.default_rng(23)
    mats = spd_batch(rng, 2, 5)
    skew = rng.standard_normal((2, 5, 5)) * 1e-3
    result = ops.damped_inverse(mats + skew - skew.swapaxes(1, 2), 0.2)
    np.testing.assert_allclose(result.inverse, np.linalg.inv(mats + 0.2 * np.eye(5)), rtol=1e-9, atol=1e-12)



def test_asymmetric_input_is_symmetrised_chunk_by_chunk(monkeypatch):
    """The transposes are added a chunk of matrices at a time (``TRANSPOSE_CHUNK_BYTES``): with
    chunks of two matrices, a batch of five (the last chunk short) is inverted as the symmetric
    parts of all five."""
    monkeypatch.setattr(cpu_inverse, "TRANSPOSE_CHUNK_BYTES", 2 * 5 * 5 * 8)
    rng = np.random.default_rng(27)
    mats = spd_batch(rng, 5, 5) + rng.standard_normal((5, 5, 5)) * 0.1
    result = ops.damped_inverse(mats, 0.2)
    assert (result.status == ops.CHOLESKY).all()
    for m, inv in zip(mats, result.inverse):
        np.testing.assert_allclose(inv, np.linalg.inv((m + m.T) / 2 + 0.2 * np.eye(5)), rtol=1e-9, atol=1e-12)


def test_singular_psd_without_damping_takes_jitter():
    rng = np.random.default_rng(24)
    n = 8
    x = rng.standard_normal((2, 3, n)) * rng.uniform(0.5, 5.0, size=n)
    mats = x.swapaxes(1, 2) @ x  # rank 3 < 8
    result = ops.damped_inverse(mats, 0.0)
    assert (result.status == ops.JITTER).all()
    assert np.isfinite(result.inverse).all()
    for m, inv in zip(mats, result.inverse):
        # The inverse is that of m + c*I for one documented jitter c = j * mean(diag).
        shift = np.linalg.inv(inv) - m
        c = float(np.mean(np.diag(shift)))
        np.testing.assert_allclose(shift, c * np.eye(n), atol=1e-6 * np.abs(m).max())
        candidates = np.array(cpu_inverse.JITTERS) * np.diag(m).mean()
        assert np.min(np.abs(candidates - c) / candidates) < 1e-2  # candidates are 10x apart


def test_indefinite_takes_eigen_fallback():
    rng = np.random.default_rng(25)
    eigvals = np.array([-5.0, -0.1, 1.0, 2.0, 3.0, 4.0])
    mats = np.stack([with_spectrum(rng, eigvals), with_spectrum(rng, eigvals * 2)])
    damping = np.array([0.5, 0.0])
    result = ops.damped_inverse(mats, damping)
    assert (result.status == ops.EIGEN).all()
    for m, lam, inv in zip(mats, damping, result.inverse):
        assert np.isfinite(inv).all()
        np.testing.assert_array_equal(inv, inv.T)
        assert np.linalg.eigvalsh(inv).min() > 0
        # Oracle: clipped eigendecomposition as documented (docs/numerics.md: the floor is
        # max(damping, 1e-6 max|w|)), from an independent float64 eigh.
        w, v = np.linalg.eigh(m + lam * np.eye(6))
        floor = max(lam, 1e-6 * np.abs(w).max())
        np.testing.assert_allclose(inv, v @ np.diag(1.0 / np.maximum(w, floor)) @ v.T, rtol=1e-9, atol=1e-9)


def test_mixed_batch_status_counters_and_warning(warnings_seen):
    rng = np.random.default_rng(26)
    n = 5
    good = spd_batch(rng, 2, n)
    x = rng.standard_normal((2, n))
    singular = x.T @ x
    indefinite = with_spectrum(rng, np.array([-3.0, 1.0, 1.0, 2.0, 2.0]))
    mats = np.stack([good[0], indefinite, singular, good[1]])
    ops.reset_inversion_counters()
    result = ops.damped_inverse(mats, 0.0)
    assert result.status.tolist() == [ops.CHOLESKY, ops.EIGEN, ops.JITTER, ops.CHOLESKY]
    assert ops.inversion_counters() == {"cholesky": 2, "jitter": 1, "eigen": 1}
    assert np.isfinite(result.inverse).all()
    for i in (0, 3):
        np.testing.assert_allclose(mats[i] @ result.inverse[i], np.eye(n), atol=1e-10)
    assert len(warnings_seen) == 1 and warnings_seen[0].levelno == logging.WARNING
    assert warnings_seen[0].getMessage() == ("damped_inverse: 1 of 4 matrices needed jitter (indices [2]), "
                                             "1 of 4 matrices took the eigen fallback (indices [1])")
    ops.damped_inverse(mats[:3], 0.0)  # the counters add up across calls
    assert ops.inversion_counters() == {"cholesky": 3, "jitter": 2, "eigen": 2}
    # A path no matrix took is not named.
    ops.damped_inverse(mats[[0, 1]], 0.0)
    assert warnings_seen[-1].getMessage() == "damped_inverse: 1 of 2 matrices took the eigen fallback (indices [1])"
    ops.damped_inverse(mats[[2, 3]], 0.0)
    assert warnings_seen[-1].getMessage() == "damped_inverse: 1 of 2 matrices needed jitter (indices [0])"
    assert len(warnings_seen) == 4
    ops.reset_inversion_counters()
    assert ops.inversion_counters() == {"cholesky": 0, "jitter": 0, "eigen": 0}


def test_the_warning_names_a_few_indices_of_a_large_batch(warnings_seen):
    """Thousands of rank-deficient unit-wise blocks (a tiny batch) give one readable line:
    the first indices and how many more, not every index."""
    rng = np.random.default_rng(27)
    x = rng.standard_normal((300, 1, 2))
    mats = x.swapaxes(1, 2) @ x  # rank one: each needs jitter without damping
    mats[[5, 17]] = spd_batch(rng, 2, 2)
    result = ops.damped_inverse(mats, 0.0)
    jittered = np.flatnonzero(result.status == ops.JITTER)
    assert jittered.size == 298 and np.isfinite(result.inverse).all()
    message = warnings_seen[-1].getMessage()
    shown = ", ".join(str(i) for i in jittered[:8])
    assert f"298 of 300 matrices needed jitter (indices [{shown}, ... 290 more])" in message, message
    assert len(message) < 200


def test_jitter_scale_of_a_float32_diagonal_beyond_its_range():
    """A singular float32 matrix whose diagonal entries sum past float32's maximum: the jitter's
    scale, their mean, is taken in float64 (finite), so the matrix is jittered, to the float64
    oracle's inverse of M + 1e-5 s I, rather than sent to the eigen fallback by an inf scale."""
    rng = np.random.default_rng(41)
    v = rng.uniform(0.8, 1.2, size=(4, 1))
    mat = (v @ v.T * 2e38).astype(np.float32)  # rank 1
    with np.errstate(over="ignore"):
        assert np.isinf(np.diagonal(mat).sum(dtype=np.float32))
    result = ops.damped_inverse(mat[None], 0.0)
    assert result.status.tolist() == [ops.JITTER]
    scale = np.diagonal(mat).mean(dtype=np.float64)
    want = np.linalg.inv(mat.astype(np.float64) + 1e-5 * scale * np.eye(4))
    # float32 at a condition number near 1e5: about 1e-2 of the largest entry.
    np.testing.assert_allclose(result.inverse[0], want, atol=2e-2 * np.abs(want).max())


def test_zero_matrix_gets_unit_scale_jitter():
    # mean |diag| is 0, so the jitter scale falls back to 1: the first jitter 1e-6 * I succeeds.
    result = ops.damped_inverse(np.zeros((1, 3, 3)), 0.0)
    assert result.status[0] == ops.JITTER
    np.testing.assert_allclose(result.inverse[0], 1e6 * np.eye(3), rtol=1e-12)


def test_empty_batch():
    result = ops.damped_inverse(np.zeros((0, 4, 4)), 0.1)
    assert result.inverse.shape == (0, 4, 4) and result.status.shape == (0,)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_batch_indices(bad):
    rng = np.random.default_rng(27)
    mats = spd_batch(rng, 5, 3)
    mats[1, 0, 2] = bad
    mats[4, 1, 1] = bad
    with pytest.raises(ValueError, match=r"mats.*\[1, 4\]"):
        ops.damped_inverse(mats, 0.1)


@pytest.mark.parametrize(
    "mats, damping, name",
    [
        (np.ones((2, 3, 4)), 0.1, "mats"),
        (np.ones((3, 3)), 0.1, "mats"),
        (np.ones((2, 3, 3)), -0.1, "damping"),
        (np.ones((2, 3, 3)), float("nan"), "damping"),
        (np.ones((2, 3, 3)), np.array([0.1, -1.0]), "damping"),
        (np.ones((2, 3, 3)), np.array([0.1, np.inf]), "damping"),
        (np.ones((2, 3, 3)), np.array([0.1, 0.2, 0.3]), "damping"),
    ],
)
def test_invalid_arguments(mats, damping, name):
    with pytest.raises(ValueError, match=name):
        ops.damped_inverse(mats, damping)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("magnitude", ["max", "tiny"])
def test_extreme_magnitudes_stay_finite(dtype, magnitude):
    info = np.finfo(dtype)
    v = float(info.max) / 2 if magnitude == "max" else float(info.tiny) * 4
    rng = np.random.default_rng(28)
    spd = spd_batch(rng, 1, 4)[0]
    spd /= np.abs(spd).max()
    indefinite = np.array([[1.0, -1 / 3], [-1 / 3, -1.0]])
    for mat, expect in ((spd, ops.CHOLESKY), (indefinite, ops.EIGEN)):
        result = ops.damped_inverse((mat * v).astype(dtype)[None], 0.0)
        assert result.status[0] == expect
        assert np.isfinite(result.inverse).all()


def beyond_float32(rng: np.random.Generator, case: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Three float32 SPD matrices of order ``n`` and their dampings: the first ordinary, the
    other two with S = M + damping*I beyond float32's range though its inverse is representable,
    by a damping beyond it (``case`` "damping") or by entries near its maximum ("entries")."""
    mats = spd_batch(rng, 3, n)
    mats /= np.abs(mats).max(axis=(1, 2), keepdims=True)
    if case == "damping":
        damping = np.array([0.1, 1e39, 3e40])
    else:
        mats[1:] *= float(np.finfo(np.float32).max) * 0.9
        damping = np.array([0.1, 1e38, 1e38])
    return mats.astype(np.float32), damping


def assert_inverses_beyond_float32(mats: np.ndarray, damping: np.ndarray, inverse: np.ndarray) -> None:
    """``inverse`` is (M + damping*I)^-1 of the float64 oracle, matrix by matrix."""
    n = mats.shape[-1]
    for m, lam, inv in zip(mats, damping, inverse):
        oracle = np.linalg.inv(m.astype(np.float64) + lam * np.eye(n))
        np.testing.assert_allclose(inv, oracle, rtol=1e-5, atol=1e-5 * np.abs(oracle).max() + 2e-45)


@pytest.mark.parametrize("on", ["cpu", pytest.param("gpu", marks=requires_gpu)])
@pytest.mark.parametrize("case", ["damping", "entries"])
def test_a_damped_matrix_beyond_float32_stays_finite(case, on):
    """A finite damping beyond float32's range (valid, but inf once cast), or entries near its
    maximum plus a damping, overflow S = M + damping*I in float32 though its inverse is
    representable: the result is finite and, against a float64 oracle, that inverse; on the
    GPU too, with the CPU's statuses."""
    rng = np.random.default_rng(29)
    mats, damping = beyond_float32(rng, case, int(rng.integers(2, 8)))
    result = ops.damped_inverse(mats, damping)
    if on == "gpu":
        gpu = ops.damped_inverse(cupy.asarray(mats), cupy.asarray(damping))
        assert host(gpu.status).tolist() == result.status.tolist()
        result = gpu
    inverse = host(result.inverse)
    assert np.isfinite(inverse).all()
    assert_inverses_beyond_float32(mats, damping, inverse)


@pytest.mark.parametrize("batched_with_indefinite", [False, True])
def test_an_overflowing_inverse_is_not_accepted(batched_with_indefinite):
    """A well-conditioned matrix of subnormal scale factorises with sound pivots, but its inverse,
    and that of every jittered copy, overflows: the eigen fallback's floor sqrt(tiny) gives the
    finite result, alone and beside a matrix that fails Cholesky (the batch's other branch).
    float64: in float32, torch's Cholesky already fails on entries of subnormal scale."""
    tiny = float(np.finfo(np.float64).tiny)
    mat = np.array([[1.0, 0.5], [0.5, 1.0]]) * tiny / 8
    indefinite = np.array([[1.0, -1 / 3], [-1 / 3, -1.0]])
    mats = np.stack([indefinite, mat]) if batched_with_indefinite else mat[None]
    result = ops.damped_inverse(mats, 0.0)
    assert (result.status == ops.EIGEN).all()
    assert np.isfinite(result.inverse).all()
    # Oracle: both eigenvalues, 1.5 and 0.5 times tiny/8, lie below the floor sqrt(tiny): I / floor.
    floor = np.sqrt(tiny)
    np.testing.assert_allclose(result.inverse[-1], np.eye(2) / floor, rtol=1e-12, atol=1e-12 / floor)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("share,accepted", [(10.0, False), (50.0, False), (1000.0, True), (1e5, True)])
def test_a_pivot_is_numerically_zero_below_pivot_rtol_eps(dtype, share, accepted):
    """[[1, r], [r, 1]] leaves 1 - r^2 of its second diagonal entry to the second pivot; set to
    ``share`` eps, Cholesky is kept only from PIVOT_RTOL eps up (rounding moves it by ~2 eps)."""
    eps = np.finfo(dtype).eps
    r = np.sqrt(1.0 - share * float(eps))
    mats = np.array([[[1.0, r], [r, 1.0]]], dtype=dtype)
    result = ops.damped_inverse(mats, 0.0)
    assert result.status[0] == (ops.CHOLESKY if accepted else ops.JITTER)
    assert np.isfinite(result.inverse).all()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e5])
def test_float32_error_follows_the_condition_number(seed, cond):
    """A float32 matrix whose damped condition number kappa float32 can still factorise: the
    Cholesky result is within kappa * eps32 of the float64 inverse of the same (rounded) matrix
    (measured: 0.02-0.08 kappa eps32, as docs/numerics.md gives; its bound is 3 kappa eps)."""
    rng = np.random.default_rng(40 + seed)
    n = int(rng.integers(8, 30))
    mat = with_spectrum(rng, np.logspace(0, -np.log10(cond), n) * rng.uniform(0.5, 2.0)).astype(np.float32)
    damping = float(rng.uniform(0.0, 0.5)) / cond
    result = ops.damped_inverse(mat[None], damping)
    assert result.status[0] == ops.CHOLESKY
    damped = mat.astype(np.float64) + float(np.float32(damping)) * np.eye(n)
    oracle = np.linalg.inv(damped)
    error = np.linalg.norm(result.inverse[0] - oracle) / np.linalg.norm(oracle)
    assert error <= np.linalg.cond(damped) * np.finfo(np.float32).eps


def exact_inverse(mat, shift):
    """``((mat + mat^T)/2 + shift*I)^-1`` of a small float matrix in exact rational arithmetic
    (Gauss-Jordan), as float64."""
    n = len(mat)
    rows = [[(Fraction(float(mat[i][j])) + Fraction(float(mat[j][i]))) / 2 + Fraction(shift) * (i == j)
             for j in range(n)] + [Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [a - rows[r][col] * b for a, b in zip(rows[r], rows[col])]
    return np.array([[float(v) for v in row[n:]] for row in rows])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_well_conditioned_error_is_a_few_kappa_eps(dtype, n):
    """At kappa near 1 the roundings of S's diagonal, of the factor and of the inverse are not
    outweighed by kappa: up to ~1.9 kappa eps measured at orders 1-2, within the documented
    3 kappa eps (about 6 roundings of half an eps at order 1), against the exact inverse of
    the matrix as given."""
    rng = np.random.default_rng(60 + n)
    x = rng.standard_normal((256, 4 * n, n))
    mats = (x.swapaxes(1, 2) @ x / (4 * n)).astype(dtype)
    damping = rng.uniform(0.0, 2.0, 256)
    result = ops.damped_inverse(mats, damping)
    assert (result.status == ops.CHOLESKY).all()
    for m, lam, inv in zip(mats, damping, result.inverse):
        oracle = exact_inverse(m, float(dtype(lam)))  # the damping as the working dtype holds it
        error = np.linalg.norm(inv - oracle) / np.linalg.norm(oracle)
        kappa = np.linalg.cond(oracle)
        assert error <= 3 * kappa * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype, cond", [(np.float32, 1e5), (np.float64, 1e14)])
@pytest.mark.parametrize("n", [2, 10, 40])
def test_cholesky_is_kept_below_the_jitter_onset(dtype, cond, n):
    """The pivot test, not kappa itself, decides: on random eigenvectors and log-spaced
    eigenvalues Cholesky is kept in float32 up to kappa 1e5 and in float64 up to 1e14 (the
    onsets measured: 1e6-1e8 and 1e15-1e17, later for larger orders)."""
    rng = np.random.default_rng(70 + n)
    mats = np.stack([with_spectrum(rng, np.logspace(0, -np.log10(cond), n)) for _ in range(8)])
    result = ops.damped_inverse(mats.astype(dtype), 0.0)
    assert (result.status == ops.CHOLESKY).all()


@pytest.mark.parametrize("seed", range(3))
def test_float32_beyond_its_precision_inverts_a_jittered_matrix(seed):
    """Damped condition number 1e9 in float32 (a pivot below PIVOT_RTOL eps32): the status says
    JITTER and the result is the inverse of ``S + j * mean(diag S) * I`` for one documented ``j``
    (against a float64 oracle), not the inverse asked for, which float32 cannot resolve (relative
    error ~1 against it: the status is the caller's only sign)."""
    rng = np.random.default_rng(50 + seed)
    n = int(rng.integers(12, 30))
    mat = with_spectrum(rng, np.logspace(0, -9, n)).astype(np.float32)
    result = ops.damped_inverse(mat[None], 1e-12)
    assert result.status[0] == ops.JITTER and np.isfinite(result.inverse).all()
    s = mat.astype(np.float64) + float(np.float32(1e-12)) * np.eye(n)

    def error(shift):
        oracle = np.linalg.inv(s + shift * np.eye(n))
        return np.linalg.norm(result.inverse[0] - oracle) / np.linalg.norm(oracle)

    assert min(error(j * np.diag(s).mean()) for j in cpu_inverse.JITTERS) < 2e-2
    assert error(0.0) > 0.5


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("layout", ["transposed", "fortran", "strided"])
def test_non_c_contiguous_input_is_damped(dtype, overwrite, layout):
    """Matrices laid out other than in C order (each transposed, Fortran order, every other one
    of a stack) get their damping like a C-ordered copy, against NumPy's inverse; the caller's
    array is left as it was unless it was given up."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 7, 12))
    spd = x @ x.swapaxes(1, 2) / 12
    damping = rng.uniform(0.5, 2.0, 3)
    if layout == "transposed":
        mats = spd[:3].astype(dtype).swapaxes(1, 2)
    elif layout == "fortran":
        mats = np.asfortranarray(spd[:3].astype(dtype))
    else:
        mats = spd.astype(dtype)[::2]
    assert not mats.flags.c_contiguous
    given = mats.copy()
    expected = np.linalg.inv(given.astype(np.float64) + damping[:, None, None] * np.eye(7))
    result = cpu_inverse.damped_inverse(mats, damping, overwrite_mats=overwrite)[0]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(result, expected, rtol=tol, atol=tol)
    if not overwrite:
        np.testing.assert_array_equal(mats, given)
