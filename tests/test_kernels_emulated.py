"""The CUDA kernels' own source run on the CPU by the SIMT emulator (tests/simt), launched by
``hpckfac.ops.cuda``'s own launch code (grids, blocks, shared memory, argument lists and offset
tables, on a stand-in GPU of 2 SMs so that grid-stride loops turn), against the CPU
references and float64 oracles with the GPU tests' tolerances; bit for bit where the
project promises it (packing, its casts included). Outputs start poisoned (NaN) between
guard bytes. Needs a C++ compiler only; the emulator's limits are in tests/simt/__init__.py."""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

import simt
from gpu_helpers import assert_same_bits, factor_error, random_spd
from hpckfac import ops
from hpckfac.ops.casting import cast
from simt import host_cupy
from test_gpu_factors import case, tolerance
from test_gpu_batchnorm import TOL as BN_TOL
from test_ops_batchnorm import draw, oracle
from test_ops_inverse import assert_inverses_beyond_float32, beyond_float32

pytestmark = pytest.mark.skipif(simt.compiler() is None, reason="no C++ compiler (g++, c++ or clang++) found")

DTYPES = (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)
PAIRS = list(itertools.product(DTYPES, repeat=2))
# Orders around the tile and warp size 32, one row longer than a lane's 4 x 32 elements per
# turn; 588 rows and 72 tiles in all, so that both grids (64 blocks on 2 SMs) stride.
PACK_SIZES = (1, 2, 3, 31, 32, 33, 64, 65, 100, 257)


def name(t) -> str:
    return np.dtype(t).name


@pytest.fixture(scope="module")
def gpu():
    """``hpckfac.ops.cuda`` on the emulated kernels, compute capability 9.0."""
    simt.libraries()  # compiled once, before any test's clock starts
    return host_cupy.load_backend(arch=90)


def device(gpu, a):
    return gpu.cupy.asarray(a)


def random_mats(rng, sizes, dtype):
    """Matrices whose lower triangles differ from the upper ones, so reading the wrong one shows."""
    return [(rng.standard_normal((n, n)) * 100).astype(dtype) for n in sizes]


# ---------------------------------------------------------------- pack.cu

@pytest.mark.parametrize("src,dst", PAIRS, ids=name)
def test_pack_every_dtype_pair_bit_exact(gpu, src, dst):
    rng = np.random.default_rng(11)
    mats = random_mats(rng, PACK_SIZES, src)
    want = ops.pack_sym(mats, dtype=dst)
    got = gpu.pack_sym([device(gpu, m) for m in mats], list(PACK_SIZES), np.dtype(dst), None)
    assert_same_bits(np.asarray(got), want)


@pytest.mark.parametrize("src,dst", PAIRS, ids=name)
def test_unpack_every_dtype_pair_bit_exact(gpu, src, dst):
    rng = np.random.default_rng(14)
    sizes = list(PACK_SIZES) + [0, 2]
    buffer = (rng.standard_normal(int(ops.packed_offsets(sizes)[-1])) * 100).astype(src)
    want = ops.unpack_sym(buffer, sizes, dtype=dst)
    got = gpu.unpack_sym(device(gpu, buffer), sizes, np.dtype(dst))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same_bits(np.asarray(g), w)


def test_pack_strided_mixed_inputs_into_out(gpu):
    """Several source dtypes (one launch each), transposed, stepped and Fortran-ordered views,
    an empty matrix, into a given ``out`` and into a non-contiguous one."""
    rng = np.random.default_rng(12)
    sizes = [3, 0, 65, 1, 31, 70]
    mats = random_mats(rng, sizes, np.float32)
    mats[0] = mats[0].astype(np.float64)
    mats[4] = mats[4].astype(np.float16)
    mats[2] = np.ascontiguousarray(mats[2].T).T
    mats[3] = np.asfortranarray(mats[3])
    mats[5] = rng.standard_normal((2 * 70, 3 * 70)).astype(np.float32)[::2, 1::3]
    mats[1] = mats[1][::-1, ::-1]  # negative strides (an empty matrix all the same)
    mats.append(rng.standard_normal((40, 40)).astype(np.float32)[::-1, ::-2][:20, :20])
    sizes.append(20)
    want = ops.pack_sym(mats, dtype=np.float32)
    out = gpu.cupy.full(want.shape, np.nan, dtype=np.float32)
    assert gpu.pack_sym([device(gpu, m) for m in mats], sizes, np.dtype(np.float32), out) is out
    assert_same_bits(np.asarray(out), want)
    launched = [entry[0] for entry in gpu.cuda_module.launches[-3:]]
    assert sorted(launched) == ["pack_sym<__half, float>", "pack_sym<double, float>", "pack_sym<float, float>"]
    backing = gpu.cupy.full(2 * want.size, np.nan, dtype=np.float32)
    gpu.pack_sym([device(gpu, m) for m in mats], sizes, np.dtype(np.float32), backing[::2])
    assert_same_bits(np.asarray(backing[::2]), want)
    assert np.isnan(np.asarray(backing[1::2])).all()


def test_round_trip_is_exact_and_symmetric(gpu):
    rng = np.random.default_rng(15)
    sizes = [2, 64, 65, 97]
    upper = [np.triu(m) for m in random_mats(rng, sizes, np.float32)]
    sym = [u + np.triu(u, 1).T for u in upper]
    back = gpu.unpack_sym(gpu.pack_sym([device(gpu, m) for m in sym], sizes, np.dtype(np.float32), None),
                          sizes, np.dtype(np.float32))
    for m, b in zip(sym, back):
        assert_same_bits(np.asarray(b), m)


@pytest.mark.parametrize("narrow", [np.float32, np.float16, ml_dtypes.bfloat16], ids=name)
def test_casts_of_subnormals_ties_and_specials_bit_exact(gpu, narrow):
    """float64 values on and near ``narrow``'s rounding ties, in its subnormal range, beyond its
    range, infinities and zeros, packed to ``narrow`` and back to float64; and float64 that
    float32 rounds onto a bfloat16 tie, which the kernels round once, as ``cast`` does."""
    rng = np.random.default_rng(16)
    info = ml_dtypes.finfo(narrow)
    ulp = 2.0 ** -int(info.nmant)
    k = rng.integers(0, 2 ** int(info.nmant), 600)
    scale = rng.choice([-1, 1], 600) * 2.0 ** rng.integers(int(info.minexp), int(info.maxexp), 600)
    ties = (1 + k * ulp + ulp / 2) * scale
    near = ties * (1 + rng.choice([-1, 1], 600) * 2.0 ** -40)
    subnormal = rng.uniform(0.0, 1.0, 300) * float(info.smallest_normal) * rng.choice([-1, 1], 300)
    special = [float(info.max), -float(info.max) * (1 + ulp / 2), float(info.max) * (1 + ulp / 4),
               float(info.smallest_subnormal) / 2, float(info.smallest_subnormal) * 0.75, 1e300, np.inf,
               -np.inf, 0.0, -0.0, 1 + 2.0 ** -8 + 2.0 ** -40, 1 + 2.0 ** -11 + 2.0 ** -40]
    values = np.concatenate([ties, near, subnormal, special])
    n = int(np.ceil((np.sqrt(8 * values.size + 1) - 1) / 2))
    values = np.concatenate([values, np.zeros(n * (n + 1) // 2 - values.size)])
    mat = np.zeros((n, n))
    mat[np.triu_indices(n)] = values
    with np.errstate(over="ignore"):
        want = cast(values, narrow)
        assert_same_bits(ops.pack_sym([mat], dtype=narrow), want)
        unpacked_want = ops.unpack_sym(values, [n], dtype=narrow)[0]
    packed = gpu.pack_sym([device(gpu, mat)], [n], np.dtype(narrow), None)
    assert_same_bits(np.asarray(packed), want)
    unpacked = gpu.unpack_sym(device(gpu, values), [n], np.dtype(narrow))[0]
    assert_same_bits(np.asarray(unpacked), unpacked_want)
    wide = gpu.unpack_sym(packed, [n], np.dtype(np.float64))[0]
    assert_same_bits(np.asarray(wide), ops.unpack_sym(want, [n], dtype=np.float64)[0])


# ---------------------------------------------------------------- chol.cu

CHOL_SIZES = (1, 2, 3, 8, 9, 16, 17, 31, 32, 33, 63, 64)
# tests/test_gpu_inverse.py's TOL (that module skips on import without CuPy, so it is not imported).
INVERSE_TOL = {"float64": 1e-10, "float32": 1e-4}


@pytest.mark.parametrize("dtype", DTYPES, ids=name)
@pytest.mark.parametrize("n", CHOL_SIZES)
def test_cholesky_inverse_matches_oracle(gpu, n, dtype):
    """Every thread count the launch code picks (32 to 256, n above and below it)."""
    rng = np.random.default_rng(n)
    batch = 3
    mats = random_spd(rng, batch, n).astype(dtype)
    damping = rng.uniform(1e-3, 1e-1, batch)
    oracle_inverse = np.linalg.inv(mats.astype(np.float64) + damping[:, None, None] * np.eye(n))
    inverse, status = gpu.damped_inverse(device(gpu, mats), device(gpu, damping))
    work = ops.checks.accumulation_dtype(mats.dtype)
    assert inverse.dtype == work and (np.asarray(status) == ops.CHOLESKY).all()
    assert gpu.cuda_module.launches[-1][0] == f"chol_inverse<{'double' if work == np.float64 else 'float'}>"
    inv = np.asarray(inverse)
    tol = 10 * INVERSE_TOL[name(work)]
    assert np.abs(inv - oracle_inverse).max() / np.abs(oracle_inverse).max() <= tol
    assert (inv == inv.swapaxes(1, 2)).all()
    cpu = ops.damped_inverse(mats, damping)
    assert np.abs(inv - cpu.inverse).max() / np.abs(cpu.inverse).max() <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=name)
@pytest.mark.parametrize("n", [2, 3, 31, 64])
def test_cholesky_failures_and_jitter_match_cpu_statuses(gpu, n, dtype):
    """A rank-1 matrix fails the kernel's pivot test and passes on a jittered retry (the
    ``shift`` argument); an indefinite one fails every retry and goes to the eigen fallback."""
    rng = np.random.default_rng(100 + n)
    spd = random_spd(rng, 3, n)
    singular = np.ones((1, n, n)) * rng.uniform(0.5, 2.0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = rng.uniform(1.0, 2.0, n)
    w[n // 2] = -30.0
    indefinite = ((q * w) @ q.T)[None]
    mats = np.concatenate([spd[:1], singular, spd[1:2], indefinite, spd[2:]]).astype(dtype)
    damping = np.array([1e-3, 0.0, 1e-2, 0.0, 1e-1], dtype=dtype)
    cpu = ops.damped_inverse(mats, damping)
    inverse, status = gpu.damped_inverse(device(gpu, mats), device(gpu, damping))
    assert cpu.status.tolist() == [ops.CHOLESKY, ops.JITTER, ops.CHOLESKY, ops.EIGEN, ops.CHOLESKY]
    assert np.asarray(status).tolist() == cpu.status.tolist()
    inv = np.asarray(inverse)
    assert np.isfinite(inv).all() and (inv == inv.swapaxes(1, 2)).all()
    compared = range(len(mats)) if dtype == np.float64 else [0, 2, 3, 4]
    tol = 1e-6 if dtype == np.float64 else 1e-3
    for i in compared:
        assert np.abs(inv[i] - cpu.inverse[i]).max() / np.abs(cpu.inverse[i]).max() <= tol, i


def _flush_float32(a: np.ndarray) -> np.ndarray:
    """``a`` with its float32 subnormals as signed zeros, in place (what CUDA's ``.ftz``
    instructions make of them)."""
    if a.dtype == np.float32:
        small = np.abs(a) < np.finfo(np.float32).tiny
        a[small] = np.copysign(0.0, a[small])
    return a


class _FlushedOps:
    """CuPy's own float32 kernels as ``-ftz=true`` compiles them (CuPy passes it to every
    module): array operations and ``astype`` read and write float32 subnormals as zeros."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        args = [_flush_float32(np.array(x)) if isinstance(x, np.ndarray) else x for x in inputs]
        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = tuple(np.asarray(o) for o in outs)
        with np.errstate(all="ignore"):  # CuPy warns of nothing
            result = getattr(ufunc, method)(*args, **kwargs)
        results = result if isinstance(result, tuple) else (result,)
        for r in results:
            if isinstance(r, np.ndarray):
                _flush_float32(r)
        if outs is not None:
            return outs if isinstance(result, tuple) else outs[0]
        wrapped = tuple(r.view(host_cupy.DeviceArray) if isinstance(r, np.ndarray) else r for r in results)
        return wrapped if isinstance(result, tuple) else wrapped[0]

    def astype(self, dtype, *args, **kwargs):
        with np.errstate(all="ignore"):
            cast = np.ndarray.astype(np.asarray(self), dtype, *args, **kwargs)
        if np.dtype(dtype) != self.dtype:  # a conversion: a kernel (a same-dtype copy moves bits only)
            _flush_float32(cast)
        return cast.view(host_cupy.DeviceArray)


@pytest.mark.parametrize("case", ["damping", "entries"])
def test_eigen_fallback_keeps_float32_subnormal_inverses_under_ftz(gpu, monkeypatch, case):
    """A damping beyond float32's range (or entries near its maximum plus a damping) overflows
    S in float32 and takes the eigen fallback, whose inverse lies in float32's subnormal range:
    under CuPy's ``-ftz=true`` a float32 ``astype`` or product of it is zero, so the fallback
    narrows through the pack kernels' conversion (``hk::narrow``) and gives the CPU's inverse."""
    monkeypatch.setattr(host_cupy.DeviceArray, "__array_ufunc__", _FlushedOps.__array_ufunc__, raising=False)
    monkeypatch.setattr(host_cupy.DeviceArray, "astype", _FlushedOps.astype, raising=False)
    mats, damping = beyond_float32(np.random.default_rng(29), case, 4)
    cpu = ops.damped_inverse(mats, damping)
    inverse, status = gpu.damped_inverse(device(gpu, mats), device(gpu, damping))
    assert np.asarray(status).tolist() == cpu.status.tolist() == [ops.CHOLESKY, ops.EIGEN, ops.EIGEN]
    inv = np.asarray(inverse)
    assert inv.dtype == np.float32 and (inv == inv.swapaxes(1, 2)).all()
    assert_inverses_beyond_float32(mats, damping, inv)


def test_cholesky_kernel_flags_failures_and_leaves_their_output(gpu):
    """failed[b] = 1 for a non-positive pivot, a NaN and a pivot below the relative
    tolerance; nothing written to out[b] then (it stays poisoned); 0 for the others."""
    n = 5
    mats = random_spd(np.random.default_rng(3), 4, n).astype(np.float32)
    mats[1] = -np.eye(n)
    mats[2, 0, 0] = np.nan
    mats[3] = np.ones((n, n))  # rank 1: the second pivot is rounding noise
    inverse, ok = gpu._kernel_inverse(device(gpu, mats), device(gpu, np.zeros(4, np.float32)), None)
    assert np.asarray(ok).tolist() == [True, False, False, False]
    assert np.isnan(np.asarray(inverse)[1:]).all()


# ---------------------------------------------------------------- unitwise.cu

# (1, 1, 1), one position; 70 positions: lanes loop; 200 channels x 3: more rows than the grid's warps.
BN_SHAPES = [(1, 1, 1), (3, 5, 7), (4, 3, 70), (3, 200, 3)]


@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=name)
def test_batchnorm_fisher_against_the_float64_formulas(gpu, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x, g = draw(rng, shape, np.float32)
    x, g = x.astype(dtype), g.astype(dtype)
    out_dtype = np.float64 if dtype == np.float64 else np.float32
    start = rng.standard_normal(3 * shape[1]).astype(out_dtype)
    out = gpu.cupy.asarray(start.copy())
    assert gpu.batchnorm_fisher(device(gpu, x), device(gpu, g), 1e-5, 1.0 / shape[0], out) is out
    total = start.astype(np.float64) + oracle(x, g, 1e-5, 1.0 / shape[0])
    tol = BN_TOL[name(dtype)]
    np.testing.assert_allclose(np.asarray(out), total, rtol=tol, atol=tol * np.abs(total).max())


def test_batchnorm_mixed_dtypes_strides_and_repeatable_bits(gpu):
    rng = np.random.default_rng(11)
    x, g = draw(rng, (8, 6, 40))
    want = oracle(x.astype(np.float16), g.astype(np.float32), 1e-3, 0.5)
    # channels-last storage of a half input with a float32 gradient, as under autocast
    x_dev = device(gpu, np.ascontiguousarray(x.astype(np.float16).transpose(0, 2, 1)).transpose(0, 2, 1))
    g_dev = device(gpu, np.ascontiguousarray(g.astype(np.float32).transpose(0, 2, 1)).transpose(0, 2, 1))
    runs = [np.asarray(gpu.batchnorm_fisher(x_dev, g_dev, 1e-3, 0.5, gpu.cupy.zeros(18, np.float32)))
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_allclose(runs[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    buffer = gpu.cupy.zeros(36, np.float32)
    gpu.batchnorm_fisher(x_dev, g_dev, 1e-3, 0.5, buffer[::2])
    np.testing.assert_array_equal(np.asarray(buffer[::2]), runs[0])
    assert not np.asarray(buffer[1::2]).any()


def test_batchnorm_large_mean_against_the_spread(gpu):
    rng = np.random.default_rng(4)
    x, g = draw(rng, (16, 8, 49))
    x += 1e5
    got = gpu.batchnorm_fisher(device(gpu, x), device(gpu, g), 1e-5, 1 / 16, gpu.cupy.zeros(24))
    want = oracle(x, g, 1e-5, 1 / 16)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


# ---------------------------------------------------------------- syrk.cu

# (input dtype, compute capability): the CUDA-core kernel for float32 and, below the
# tensor-core architectures, for float16 (6.0) and bfloat16 (7.5); wmma on 9.0.
SYRK_PATHS = [(np.float32, 90, "syrk_fma"), (np.float16, 90, "syrk_wmma"), (ml_dtypes.bfloat16, 90, "syrk_wmma"),
              (np.float16, 60, "syrk_fma"), (ml_dtypes.bfloat16, 75, "syrk_fma")]
SYRK_IDS = [f"{name(t)}-sm{arch}" for t, arch, _ in SYRK_PATHS]


@pytest.fixture(params=SYRK_PATHS, ids=SYRK_IDS)
def syrk_path(request, gpu):
    dtype, arch, kernel = request.param
    gpu.cuda_module.arch = arch
    yield dtype, kernel
    gpu.cuda_module.arch = 90


def syrk_oracle(x, scale):
    x = x.astype(np.float64)
    return scale * (x.T @ x)


# Rows: one, a partial chunk, and enough for two splits (the second ending in a partial chunk).
# d = 190: partial edge tiles and, split, more packed elements than syrk_finish's grid has threads.
@pytest.mark.parametrize("rows", [1, 7, 600])
@pytest.mark.parametrize("d", [1, 5, 64, 65, 190])
def test_packed_factor_matches_oracle(gpu, syrk_path, d, rows):
    dtype, kernel = syrk_path
    rng = np.random.default_rng(d * 100003 + rows)
    x, scale = case(rng, rows, d, dtype)
    got = gpu.accumulate_factor(device(gpu, x), scale, True, None, None)
    assert got.shape == (d * (d + 1) // 2,) and got.dtype == np.float32
    names = [entry[0] for entry in gpu.cuda_module.launches[-2:]]
    splits = gpu._syrk_splits(rows, d)[0]
    assert names[-1] == ("syrk_finish" if splits > 1 else f"{kernel}<{ops.cuda_module.ctype(dtype)}>")
    assert (rows < 512) or splits > 1  # the split-K path is reached
    dense = ops.unpack_sym(np.asarray(got), [d])[0]
    assert factor_error(dense, syrk_oracle(x, scale)) <= tolerance(dtype, rows)
    cpu = ops.unpack_sym(ops.accumulate_factor(x, scale, packed=True), [d])[0]
    assert factor_error(dense, cpu) <= 2 * tolerance(dtype, rows)


@pytest.mark.parametrize("d,rows", [(3, 600), (65, 40), (130, 33)])
def test_dense_output_into_out(gpu, syrk_path, d, rows):
    dtype, _ = syrk_path
    rng = np.random.default_rng(d + rows)
    x, scale = case(rng, rows, d, dtype)
    out = gpu.cupy.full((d, d), np.nan, dtype=np.float32)
    assert gpu.accumulate_factor(device(gpu, x), scale, False, out, None) is out
    assert factor_error(out, syrk_oracle(x, scale)) <= tolerance(dtype, rows)
    assert (np.asarray(out) == np.asarray(out).T).all()  # both triangles from one sum


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "dense"])
@pytest.mark.parametrize("d,rows", [(2, 600), (64, 100), (70, 600)])
def test_fused_running_average(gpu, syrk_path, d, rows, packed):
    dtype, _ = syrk_path
    rng = np.random.default_rng(7 * d + rows)
    x, scale = case(rng, rows, d, dtype)
    old_dense = rng.standard_normal((d, d))
    old_dense = (old_dense + old_dense.T).astype(np.float32)
    old = ops.pack_sym([old_dense]) if packed else old_dense
    decay = 0.93
    want = decay * old_dense.astype(np.float64) + (1 - decay) * syrk_oracle(x, scale)
    out = gpu.cupy.asarray(old.copy())
    assert gpu.accumulate_factor(device(gpu, x), scale, packed, out, decay) is out
    got = ops.unpack_sym(np.asarray(out), [d])[0] if packed else np.asarray(out)
    diag = np.sqrt(np.diagonal(syrk_oracle(x, scale)))
    assert np.max(np.abs(got - want) / (1 + np.outer(diag, diag))) <= tolerance(dtype, rows)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("rows", [100, 600], ids=["one-split", "split"])
def test_non_finite_product_leaves_running_average_untouched(gpu, syrk_path, bad, rows):
    dtype, _ = syrk_path
    rng = np.random.default_rng(3)
    x = rng.standard_normal((rows, 70)).astype(dtype)
    x[rows // 2, 5] = bad
    running = gpu.cupy.asarray(rng.standard_normal(70 * 71 // 2).astype(np.float32))
    before = np.array(running)
    with pytest.raises(ValueError, match="not finite"):
        gpu.accumulate_factor(device(gpu, x), 0.1, True, running, 0.9)
    assert_same_bits(np.asarray(running), before)


def test_overflowing_half_squares_and_misaligned_input(gpu):
    """300**2 overflows float16, the float32 product must not; a view 2 bytes into its buffer
    takes the wmma kernel's scalar loads (vec = 0) although d % 8 == 0."""
    backing = np.full(64 * 16 + 1, 300.0, dtype=np.float16)
    x = backing[1:].reshape(64, 16)
    assert x.ctypes.data % 16 != 0
    factor = gpu.accumulate_factor(device(gpu, x), 1 / 64, False, None, None)
    assert np.allclose(np.asarray(factor), 90000.0, rtol=1e-6)


def test_zero_rows_give_zeros(gpu):
    got = gpu.accumulate_factor(device(gpu, np.zeros((0, 5), np.float16)), 1.0, True, None, None)
    assert got.shape == (15,) and (np.asarray(got) == 0).all()


def test_launches_stay_within_launch_bounds_and_shared_memory(gpu):
    """The emulator holds every launch to the kernel's __launch_bounds__ and to 48 KiB of
    dynamic shared memory; the largest Cholesky launch (order 64, float64) fits."""
    assert simt.kernel("syrk.cu", "syrk_fma<float>").max_threads == 256
    assert simt.kernel("syrk.cu", "syrk_wmma<__half>").max_threads == 128
    mats = random_spd(np.random.default_rng(9), 1, gpu.KERNEL_LIMIT_N)
    gpu._kernel_inverse(device(gpu, mats), device(gpu, np.ones(1)), None)
    assert gpu.cuda_module.launches[-1][3] <= simt.DYNAMIC_SHARED_BYTES


def test_syrk_tile_constants_match_the_kernel(gpu):
    """The launch code's tile and row step are the kernels' (the grid and splits follow from them)."""
    text = ops.cuda_module.source("syrk.cu")
    assert f"constexpr int TILE = {gpu._SYRK_TILE};" in text
    assert gpu._SYRK_ROW_STEP % 32 == 0  # whole K chunks of both kernels (16 and 32 rows)


# ---------------------------------------------------------------- thread order

def test_results_do_not_depend_on_the_order_of_threads(gpu):
    """Every kernel gives the same bits with a block's threads run first to last and last to
    first between barriers: a thread reading what another writes between the same two
    barriers would see the write in one order and not in the other."""
    rng = np.random.default_rng(21)

    def run_all() -> list[np.ndarray]:
        sizes = [33, 70]
        mats = random_mats(rng, sizes, np.float32)
        packed = gpu.pack_sym([device(gpu, m) for m in mats], sizes, np.dtype(ml_dtypes.bfloat16), None)
        unpacked = gpu.unpack_sym(packed, sizes, np.dtype(np.float32))
        spd = random_spd(rng, 2, 40)
        inverse, _ = gpu.damped_inverse(device(gpu, spd), 1e-2)
        x, g = draw(rng, (3, 4, 50))
        bn = gpu.batchnorm_fisher(device(gpu, x), device(gpu, g), 1e-5, 0.5, gpu.cupy.zeros(12))
        results = [packed, *unpacked, inverse, bn]
        for dtype in (np.float32, np.float16):
            results.append(gpu.accumulate_factor(device(gpu, case(rng, 600, 70, dtype)[0]), 0.5, True, None, None))
        return [np.array(r) for r in results]

    state = rng.bit_generator.state
    forward = run_all()
    simt.set_reverse_order(True)
    try:
        rng.bit_generator.state = state
        backward = run_all()
    finally:
        simt.set_reverse_order(False)
    for a, b in zip(forward, backward):
        assert_same_bits(a, b)


# ---------------------------------------------------------------- the emulator's own checks

SELF_TEST = r"""
#include "common.cuh"

__global__ void warp_sums(const double* in, double* down, double* butterfly, int* rotated) {
  const int t = threadIdx.x;
  double v = in[t], w = in[t];
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
    w += __shfl_xor_sync(0xffffffffu, w, offset);
  }
  down[t] = v;
  butterfly[t] = w;
  rotated[t] = __shfl_sync(0xffffffffu, t, (t % 32 + 5) % 32);
}

__global__ void block_sum(const float* in, float* out) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = in[blockIdx.x * blockDim.x + t];
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    __syncthreads();
    if (t < half) s[t] += s[t + half];
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

__global__ void conversions(const double* in, __half* h, __nv_bfloat16* b, float* f, __half* hf,
                            __nv_bfloat16* bf, __nv_bfloat16* bh, __half* hb) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  h[t] = hk::convert<__half>(in[t]);
  b[t] = hk::convert<__nv_bfloat16>(in[t]);
  f[t] = hk::convert<float>(in[t]);
  hf[t] = hk::convert<__half>(f[t]);
  bf[t] = hk::convert<__nv_bfloat16>(f[t]);
  bh[t] = hk::convert<__nv_bfloat16>(h[t]);
  hb[t] = hk::convert<__half>(b[t]);
}

__global__ void barrier_skipped(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void barrier_sites(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void racy(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = threadIdx.x + 1;
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];  // no barrier between write and read
}

__global__ void partial_warp(double* out) { out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0, 1); }

__global__ void __launch_bounds__(64) bounded(int* out) { out[threadIdx.x] = 1; }
"""
SELF_TEST_KERNELS = ("warp_sums", "block_sum", "conversions", "barrier_skipped", "barrier_sites",
                     "exit_before_barrier", "racy", "partial_warp", "bounded")


@pytest.fixture(scope="module")
def self_test():
    return simt.build("self_test", SELF_TEST, SELF_TEST_KERNELS)


def test_emulator_shuffles_and_barriers(self_test):
    k = self_test.kernels
    values = np.random.default_rng(1).standard_normal(64)
    down, butterfly, rotated = np.full(64, np.nan), np.full(64, np.nan), np.zeros(64, np.int32)
    k["warp_sums"]((1,), (64,), (values, down, butterfly, rotated))
    warps = values.reshape(2, 32)
    np.testing.assert_allclose(down[::32], warps.sum(axis=1), rtol=1e-14)
    np.testing.assert_allclose(butterfly, np.repeat(warps.sum(axis=1), 32), rtol=1e-14)
    assert rotated.tolist() == [w * 32 + (lane + 5) % 32 for w in range(2) for lane in range(32)]
    data = np.random.default_rng(2).standard_normal(3 * 256).astype(np.float32)
    out = np.zeros(3, np.float32)
    k["block_sum"]((3,), (256,), (data, out))
    np.testing.assert_allclose(out, data.reshape(3, 256).astype(np.float64).sum(axis=1), rtol=1e-5)


def test_emulator_conversions_bit_exact(self_test):
    """The stand-in half types convert as NumPy, ml_dtypes and ``cast`` do (float64 to
    bfloat16 once, not through float32)."""
    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 9, 4000),
        rng.uniform(0, 2.0 ** -14, 500), rng.uniform(0, 2.0 ** -126, 500) * rng.choice([-1, 1], 500),
        [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 1 + 2.0 ** -8, 1 + 2.0 ** -11 + 2.0 ** -40, 65504.0, 65520.0,
         70000.0, 1 + 2.0 ** -8 + 2.0 ** -40, -(1 + 3 * 2.0 ** -8 - 2.0 ** -40), 2.0 ** -24, 2.0 ** -25,
         3 * 2.0 ** -26, 1e-300, 3.4e38, 3.5e38, 0.0, -0.0, np.inf, -np.inf, np.nan],
    ])
    values = np.concatenate([values, np.zeros(-values.size % 128)])
    h, b, f = (np.empty(values.size, t) for t in (np.float16, ml_dtypes.bfloat16, np.float32))
    hf, bf, bh, hb = (np.empty(values.size, t) for t in (np.float16, ml_dtypes.bfloat16, ml_dtypes.bfloat16,
                                                         np.float16))
    self_test.kernels["conversions"]((values.size // 128,), (128,), (values, h, b, f, hf, bf, bh, hb))
    with np.errstate(over="ignore", invalid="ignore"):
        f16, bf16, f32 = values.astype(np.float16), cast(values, ml_dtypes.bfloat16), values.astype(np.float32)
        expected = [f16, bf16, f32, f32.astype(np.float16), f32.astype(ml_dtypes.bfloat16),
                    f16.astype(np.float32).astype(ml_dtypes.bfloat16), bf16.astype(np.float32).astype(np.float16)]
    for got, want in zip((h, b, f, hf, bf, bh, hb), expected):
        assert_same_bits(got, want)


@pytest.mark.parametrize("kernel,threads,message", [
    ("barrier_skipped", 32, "not every thread reaches"),
    ("barrier_sites", 32, "different __syncthreads"),
    ("exit_before_barrier", 32, "not every thread reaches"),
    ("partial_warp", 48, "only full warps"),
])
def test_emulator_rejects_divergent_barriers_and_partial_warps(self_test, kernel, threads, message):
    out = np.zeros(threads, np.float64 if kernel == "partial_warp" else np.int32)
    with pytest.raises(simt.EmulationError, match=message):
        self_test.kernels[kernel]((1,), (threads,), (out,))


def test_emulator_checks_arguments(self_test):
    with pytest.raises(simt.EmulationError, match="float32 array for the pointer parameter pf8"):
        self_test.kernels["partial_warp"]((1,), (32,), (np.zeros(32, np.float32),))
    with pytest.raises(simt.EmulationError, match="1 arguments for 2"):
        self_test.kernels["block_sum"]((1,), (32,), (np.zeros(32, np.float32),))
    with pytest.raises(simt.EmulationError, match="pass NumPy scalars"):
        self_test.kernels["racy"]((1,), (32,), (0,))
    out = np.zeros(128, np.int32)
    self_test.kernels["bounded"]((1,), (64,), (out,))
    with pytest.raises(simt.EmulationError, match="__launch_bounds__"):
        self_test.kernels["bounded"]((1,), (128,), (out,))
    with pytest.raises(simt.EmulationError, match="dynamic shared memory"):
        self_test.kernels["bounded"]((1,), (64,), (out,), shared_mem=simt.DYNAMIC_SHARED_BYTES + 1)


def test_emulator_shows_a_race_as_an_order_difference(self_test):
    results = []
    try:
        for reverse in (False, True):
            self_test.set_reverse_order(reverse)
            out = np.zeros(64, np.int32)
            self_test.kernels["racy"]((1,), (64,), (out,))
            results.append(out)
    finally:
        self_test.set_reverse_order(False)
    assert (results[0] != results[1]).any()
