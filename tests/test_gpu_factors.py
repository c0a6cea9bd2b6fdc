"""GPU factor accumulation (kernels/syrk.cu) against a float64 oracle and the
CPU reference over sizes, row counts and input dtypes; tensor-core and
CUDA-core paths, split-K and single-pass, packed and dense, fused running
average and its NaN guard."""
import math

import ml_dtypes
import numpy as np
import pytest

from gpu_helpers import SIZES, cupy, factor_error, host, poisoned_allocations, requires_gpu
from hpckfac import ops
from hpckfac.ops import cuda_module

pytestmark = requires_gpu

ROWS = (1, 7, 1000, 30000)
DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16, np.float64)
BASE_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3}
# CPU reference only where it takes well under a second.
CPU_FLOP_LIMIT = 2e10


def tolerance(dtype, rows: int) -> float:
    """Error bound relative to sqrt(F_ii F_jj): the dtype's base, growing like
    sqrt(rows) beyond 10^4 rows (float32 rounding of long sums)."""
    return BASE_TOL[np.dtype(dtype).name] * max(1.0, math.sqrt(rows / 1e4))


def oracle(x_host: np.ndarray, scale: float) -> np.ndarray:
    """scale * X^T X in float64 on the device (cuBLAS DGEMM), as a host array."""
    x = cupy.asarray(x_host.astype(np.float64))
    return host(scale * (x.T @ x))


def case(rng, rows, d, dtype):
    x = (rng.standard_normal((rows, d)) * rng.uniform(0.5, 3.0, d)).astype(dtype)
    return x, 1.0 / max(rows, 1)


# (input dtype, whether half inputs are forced onto the CUDA-core kernel)
PATHS = [(np.float32, False), (np.float64, False), (np.float16, False), (np.float16, True),
         (ml_dtypes.bfloat16, False), (ml_dtypes.bfloat16, True)]
PATH_IDS = [f"{np.dtype(t).name}{'-fma' if fma else ''}" for t, fma in PATHS]


@pytest.fixture(autouse=True)
def kernel_route(monkeypatch):
    """The syrk kernel unless a test asks for another route (``auto`` sends wide factors to cuBLAS)."""
    monkeypatch.setenv("HPCKFAC_FACTOR_ROUTE", "kernel")


def test_auto_route_switches_at_the_measured_width(monkeypatch):
    from hpckfac.ops import cuda as ops_cuda

    monkeypatch.setenv("HPCKFAC_FACTOR_ROUTE", "auto")
    monkeypatch.setattr(ops_cuda, "GEMM_MIN_D", {"float32": 300, "half": 900})
    assert [ops_cuda.factor_route(np.float32, d) for d in (299, 300)] == ["kernel", "gemm"]
    assert [ops_cuda.factor_route(t, d) for t in (np.float16, ml_dtypes.bfloat16) for d in (899, 900)] == [
        "kernel", "gemm", "kernel", "gemm"]
    monkeypatch.setenv("HPCKFAC_FACTOR_ROUTE", "kernel")
    assert ops_cuda.factor_route(np.float32, 5000) == "kernel"
    monkeypatch.setenv("HPCKFAC_FACTOR_ROUTE", "fast")
    with pytest.raises(ValueError, match="HPCKFAC_FACTOR_ROUTE"):
        ops_cuda.factor_route(np.float32, 10)


@pytest.fixture(params=PATHS, ids=PATH_IDS)
def dtype(request, monkeypatch):
    """Input dtype; half inputs run through wmma (where the GPU has it) or, forced, the FMA kernel."""
    dtype, fma = request.param
    if fma:
        monkeypatch.setattr(cuda_module, "WMMA_MIN_ARCH", {})
    return dtype


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d", SIZES)
def test_packed_factor_matches_oracle(d, rows, dtype):
    if rows * d > 2e8:
        rows = int(2e8 // d)
    rng = np.random.default_rng(d * 100003 + rows)
    x, scale = case(rng, rows, d, dtype)
    want = oracle(x, scale)
    with poisoned_allocations():
        got = ops.accumulate_factor(cupy.asarray(x), scale, packed=True)
    assert got.shape == (d * (d + 1) // 2,) and got.dtype == ops.checks.accumulation_dtype(x.dtype)
    dense = ops.unpack_sym(got, [d])[0]
    assert factor_error(dense, want) <= tolerance(dtype, rows)
    if rows * d * d <= CPU_FLOP_LIMIT:
        cpu = ops.unpack_sym(ops.accumulate_factor(x, scale, packed=True), [d])[0]
        assert factor_error(dense, cpu) <= 2 * tolerance(dtype, rows)


@pytest.mark.parametrize("d,rows", [(3, 5000), (65, 20000), (257, 300), (1152, 64)])
def test_dense_output_and_out_argument(d, rows, dtype):
    rng = np.random.default_rng(d + rows)
    x, scale = case(rng, rows, d, dtype)
    want = oracle(x, scale)
    out = cupy.full((d, d), cupy.nan, dtype=ops.checks.accumulation_dtype(x.dtype))
    assert ops.accumulate_factor(cupy.asarray(x), scale, out=out) is out
    assert factor_error(out, want) <= tolerance(dtype, rows)
    if x.dtype != np.float64:  # the kernel writes both triangles from one sum
        assert bool((out == out.T).all())
    with poisoned_allocations():
        fresh = ops.accumulate_factor(cupy.asarray(x), scale)
    assert factor_error(fresh, want) <= tolerance(dtype, rows)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d,rows", [(2, 40000), (64, 1000), (257, 3000)])
def test_fused_running_average(d, rows, dtype, packed):
    rng = np.random.default_rng(7 * d + rows)
    x, scale = case(rng, rows, d, dtype)
    work = ops.checks.accumulation_dtype(x.dtype)
    old_dense = rng.standard_normal((d, d))
    old_dense = (old_dense + old_dense.T).astype(work)
    old = ops.pack_sym([old_dense]) if packed else old_dense
    decay = 0.93
    want_dense = decay * old_dense.astype(np.float64) + (1 - decay) * oracle(x, scale)
    out = cupy.asarray(old)
    assert ops.accumulate_factor(cupy.asarray(x), scale, packed=packed, out=out, decay=decay) is out
    got = ops.unpack_sym(out, [d])[0] if packed else out
    # The old value's entries are O(1): measure against 1 + sqrt(F_ii F_jj).
    err = np.abs(host(got).astype(np.float64) - want_dense)
    diag = np.sqrt(np.diagonal(oracle(x, scale)))
    assert np.max(err / (1 + np.outer(diag, diag))) <= tolerance(dtype, rows)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
def test_non_finite_product_leaves_running_average_untouched(dtype, bad):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 70)).astype(dtype)
    x[417, 5] = bad
    running = cupy.asarray(rng.standard_normal(70 * 71 // 2).astype(ops.checks.accumulation_dtype(x.dtype)))
    before = running.copy()
    with pytest.raises(ValueError, match="not finite"):
        ops.accumulate_factor(cupy.asarray(x), 0.1, packed=True, out=running, decay=0.9)
    assert bool((running == before).all())


def test_overflowing_half_squares_and_misaligned_input():
    # 300**2 overflows float16; the product must not. The offset view is not
    # 16-byte aligned, so the scalar-load path runs.
    backing = cupy.full(64 * 16 + 1, 300.0, dtype=np.float16)
    x = backing[1:].reshape(64, 16)
    assert x.data.ptr % 16 != 0
    factor = ops.accumulate_factor(x, 1 / 64)
    assert bool(cupy.allclose(factor, 90000.0, rtol=1e-6))


def test_non_contiguous_input_and_empty_shapes():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 90)).astype(np.float32)
    got = ops.accumulate_factor(cupy.asarray(x)[:, ::3], 0.5)
    assert factor_error(got, oracle(x[:, ::3], 0.5)) <= 1e-5
    zero_rows = ops.accumulate_factor(cupy.zeros((0, 5), dtype=np.float16), 1.0, packed=True)
    assert zero_rows.shape == (15,) and bool((zero_rows == 0).all())
    assert ops.accumulate_factor(cupy.zeros((4, 0), dtype=np.float32), 1.0).shape == (0, 0)


def test_ema_update_on_device():
    rng = np.random.default_rng(5)
    running = cupy.asarray(rng.standard_normal(50).astype(np.float32))
    new = cupy.asarray(rng.standard_normal(50).astype(np.float32))
    want = 0.8 * host(running).astype(np.float64) + 0.2 * host(new)
    assert ops.ema_update(running, new, 0.8) is True
    assert np.allclose(host(running), want, rtol=1e-6, atol=1e-7)
    before = running.copy()
    new[7] = cupy.nan
    assert ops.ema_update(running, new, 0.8) is False
    assert bool((running == before).all())
    new[7] = 1.0
    assert ops.ema_update(running, new, 0.8, first=True) and bool((running == new).all())
    beyond = cupy.asarray(rng.standard_normal(50))  # float64, one value beyond float32's range
    beyond[11] = -1e39
    before = running.copy()
    assert ops.ema_update(running, beyond, 0.8) is False and ops.ema_update(running, beyond, 0.8, first=True) is False
    assert bool((running == before).all())


GEMM_CASES = [(1, 7), (3, 5000), (65, 300), (513, 2000), (577, 100), (1152, 3000), (4608, 600), (300, 0)]


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d,rows", GEMM_CASES)
def test_gemm_route_matches_oracle(monkeypatch, d, rows, dtype, packed):
    """The cuBLAS route (upper-triangle panels, float32 output) against the float64 oracle,
    fresh output, ``out`` and the fused running average."""
    monkeypatch.setenv("HPCKFAC_FACTOR_ROUTE", "gemm")
    rng = np.random.default_rng(d * 31 + rows)
    x, scale = case(rng, rows, d, dtype)
    want = oracle(x, scale)
    with poisoned_allocations():
        got = ops.accumulate_factor(cupy.asarray(x), scale, packed=packed)
    assert got.dtype == np.float32 and got.shape == ((d * (d + 1) // 2,) if packed else (d, d))
    dense = ops.unpack_sym(got, [d])[0] if packed else got
    assert factor_error(dense, want) <= tolerance(dtype, rows)
    if not packed:
        assert bool((got == got.T).all())
    old = cupy.asarray(ops.pack_sym([np.eye(d, dtype=np.float32)]) if packed else np.eye(d, dtype=np.float32))
    ops.accumulate_factor(cupy.asarray(x), scale, packed=packed, out=old, decay=0.5)
    blended = ops.unpack_sym(old, [d])[0] if packed else old
    err = np.abs(host(blended).astype(np.float64) - (0.5 * np.eye(d) + 0.5 * want))
    diag = np.sqrt(np.diagonal(want))
    assert np.max(err / (1 + np.outer(diag, diag)), initial=0.0) <= tolerance(dtype, rows)
