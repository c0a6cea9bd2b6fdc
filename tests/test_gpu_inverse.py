"""GPU damped inversion (kernels/chol.cu for small orders, cuSOLVER above the
dispatch threshold) against float64 oracles and the CPU reference: results,
per-matrix status codes, fallbacks, validation."""
import ml_dtypes
import numpy as np
import pytest

from gpu_helpers import SIZES, cupy, host, poisoned_allocations, random_spd, requires_gpu
from hpckfac import ops
ops_cuda = pytest.importorskip("hpckfac.ops.cuda", reason="needs CuPy")

pytestmark = requires_gpu

TOL = {"float64": 1e-10, "float32": 1e-4}


def batch_for(n: int) -> int:
    """Many small matrices (as from BatchNorm and small layers), few large ones."""
    return 2048 if n <= 2 else 64 if n <= 65 else 4 if n <= 257 else 1


@pytest.fixture(params=["default", "cusolver"])
def route(request, monkeypatch):
    """The default dispatch, or every order through cuSOLVER (checks the path
    the threshold would pick on a GPU where cuSOLVER wins)."""
    if request.param == "cusolver":
        monkeypatch.setattr(ops_cuda, "CHOLESKY_KERNEL_MAX_N", 0)
    return request.param


def relative_error(got, want) -> float:
    got, want = host(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16],
                         ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("n", SIZES)
def test_spd_inverse_matches_oracle(n, dtype):
    rng = np.random.default_rng(n)
    batch = batch_for(n)
    mats = random_spd(rng, batch, n).astype(dtype)
    damping = rng.uniform(1e-3, 1e-1, batch)
    exact = mats.astype(np.float64) + damping[:, None, None] * np.eye(n)
    oracle = np.linalg.inv(exact)
    work = ops.checks.accumulation_dtype(mats.dtype)
    with poisoned_allocations():
        result = ops.damped_inverse(cupy.asarray(mats), cupy.asarray(damping))
    assert result.inverse.dtype == work and result.status.dtype == np.int8
    assert (host(result.status) == ops.CHOLESKY).all()
    assert relative_error(result.inverse, oracle) <= 10 * TOL[np.dtype(work).name]
    inv = host(result.inverse)
    assert (inv == inv.swapaxes(1, 2)).all()
    if n <= 1152:
        cpu = ops.damped_inverse(mats, damping)
        assert relative_error(result.inverse, cpu.inverse) <= 10 * TOL[np.dtype(work).name]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("n", [2, 3, 31, 64, 65, 257])
def test_fallbacks_match_cpu_statuses(n, dtype, route):
    rng = np.random.default_rng(100 + n)
    spd = random_spd(rng, 3, n)
    singular = np.ones((1, n, n)) * rng.uniform(0.5, 2.0)        # rank 1: jitter fixes it
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = rng.uniform(1.0, 2.0, n)
    w[n // 2] = -30.0                                              # beyond any jitter: eigen
    indefinite = ((q * w) @ q.T)[None]
    mats = np.concatenate([spd[:1], singular, spd[1:2], indefinite, spd[2:]]).astype(dtype)
    damping = np.array([1e-3, 0.0, 1e-2, 0.0, 1e-1], dtype=dtype)
    cpu = ops.damped_inverse(mats, damping)
    gpu = ops.damped_inverse(cupy.asarray(mats), cupy.asarray(damping))
    assert cpu.status.tolist() == [ops.CHOLESKY, ops.JITTER, ops.CHOLESKY, ops.EIGEN, ops.CHOLESKY]
    assert host(gpu.status).tolist() == cpu.status.tolist()
    inv = host(gpu.inverse)
    assert np.isfinite(inv).all() and (inv == inv.swapaxes(1, 2)).all()
    # A jittered inverse has condition number ~1/jitter: in float32 its rounding
    # error is of order n*eps*1e4, so it is compared in float64 only.
    compared = range(len(mats)) if dtype == np.float64 else [0, 2, 3, 4]
    tol = 1e-6 if dtype == np.float64 else 1e-3
    for i in compared:
        assert relative_error(inv[i], cpu.inverse[i]) <= tol, i


@pytest.mark.parametrize("n", [1, 2, 3, 31, 64])
def test_both_routes_agree_below_threshold(n, route):
    rng = np.random.default_rng(200 + n)
    mats = random_spd(rng, 16, n).astype(np.float32)
    damping = rng.uniform(0.0, 1e-2, 16).astype(np.float32)
    oracle = np.linalg.inv(mats.astype(np.float64) + damping[:, None, None].astype(np.float64) * np.eye(n))
    with poisoned_allocations():
        result = ops.damped_inverse(cupy.asarray(mats), cupy.asarray(damping))
    assert (host(result.status) == ops.CHOLESKY).all()
    assert relative_error(result.inverse, oracle) <= 1e-3


def test_scalar_damping_and_counters():
    rng = np.random.default_rng(7)
    mats = random_spd(rng, 10, 5).astype(np.float32)
    ops.reset_inversion_counters()
    result = ops.damped_inverse(cupy.asarray(mats), 0.05)
    assert ops.inversion_counters()["cholesky"] == 10
    oracle = np.linalg.inv(mats.astype(np.float64) + 0.05 * np.eye(5))
    assert relative_error(result.inverse, oracle) <= 1e-4


def test_non_finite_input_names_batch_indices():
    mats = random_spd(np.random.default_rng(8), 6, 4).astype(np.float32)
    mats[2, 1, 3] = np.nan
    mats[5, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        ops.damped_inverse(cupy.asarray(mats), 0.1)


def test_asymmetric_input_is_symmetrised_like_cpu():
    rng = np.random.default_rng(9)
    mats = random_spd(rng, 8, 12)
    mats += 1e-3 * rng.standard_normal(mats.shape)
    mats = mats.astype(np.float32)
    cpu = ops.damped_inverse(mats, 1e-2)
    gpu = ops.damped_inverse(cupy.asarray(mats), 1e-2)
    assert relative_error(gpu.inverse, cpu.inverse) <= 1e-4
