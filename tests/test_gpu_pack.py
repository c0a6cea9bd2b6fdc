"""GPU symmetric pack / unpack (kernels/pack.cu) against the CPU reference:
bit-identical buffers and matrices for every pair of float dtypes, outputs
poisoned before each run."""
import itertools

import ml_dtypes
import numpy as np
import pytest

from gpu_helpers import SIZES, assert_same_bits, cupy, poisoned_allocations, requires_gpu
from hpckfac import ops

pytestmark = requires_gpu

DTYPES = (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)
PAIRS = list(itertools.product(DTYPES, repeat=2))


def random_mats(rng, sizes, dtype):
    """Symmetric-looking random matrices; the lower triangles differ from the
    upper ones so that reading the wrong triangle shows."""
    return [(rng.standard_normal((n, n)) * 100).astype(dtype) for n in sizes]


@pytest.mark.parametrize("src,dst", PAIRS, ids=lambda t: np.dtype(t).name)
def test_pack_matches_cpu_for_every_dtype_pair(src, dst):
    rng = np.random.default_rng(11)
    mats = random_mats(rng, SIZES, src)
    want = ops.pack_sym(mats, dtype=dst)
    with poisoned_allocations():
        got = ops.pack_sym([cupy.asarray(m) for m in mats], dtype=dst)
    assert_same_bits(got, want)


def test_pack_into_poisoned_out_with_strided_and_mixed_inputs():
    rng = np.random.default_rng(12)
    sizes = [3, 0, 65, 1, 31, 257]
    mats = random_mats(rng, sizes, np.float32)
    mats[0] = mats[0].astype(np.float64)
    mats[4] = mats[4].astype(np.float16)
    # Transposed, sliced-with-step and Fortran-ordered views.
    device = [cupy.asarray(m) for m in mats]
    device[2] = cupy.asarray(mats[2].T).T
    big = rng.standard_normal((2 * 257, 3 * 257)).astype(np.float32)
    mats[5] = big[::2, 1::3]
    device[5] = cupy.asarray(big)[::2, 1::3]
    device[3] = cupy.asfortranarray(device[3])
    want = ops.pack_sym(mats, dtype=np.float32)
    out = cupy.full(want.shape, cupy.nan, dtype=np.float32)
    assert ops.pack_sym(device, out=out) is out
    assert_same_bits(out, want)


def test_pack_into_non_contiguous_out():
    rng = np.random.default_rng(13)
    mats = random_mats(rng, [4, 9], np.float32)
    want = ops.pack_sym(mats)
    backing = cupy.full(2 * want.size, cupy.nan, dtype=np.float32)
    out = backing[::2]
    ops.pack_sym([cupy.asarray(m) for m in mats], out=out)
    assert_same_bits(out, want)
    assert bool(cupy.isnan(backing[1::2]).all())


@pytest.mark.parametrize("src,dst", PAIRS, ids=lambda t: np.dtype(t).name)
def test_unpack_matches_cpu_for_every_dtype_pair(src, dst):
    rng = np.random.default_rng(14)
    sizes = list(SIZES) + [0, 2]
    total = int(ops.packed_offsets(sizes)[-1])
    buffer = (rng.standard_normal(total) * 100).astype(src)
    want = ops.unpack_sym(buffer, sizes, dtype=dst)
    with poisoned_allocations():
        got = ops.unpack_sym(cupy.asarray(buffer), sizes, dtype=dst)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same_bits(g, w)


def test_round_trip_is_exact_and_symmetric():
    rng = np.random.default_rng(15)
    sizes = [2, 64, 65, 1152]
    upper = [np.triu(m) for m in random_mats(rng, sizes, np.float32)]
    sym = [cupy.asarray(u + np.triu(u, 1).T) for u in upper]
    back = ops.unpack_sym(ops.pack_sym(sym), sizes)
    for m, b in zip(sym, back):
        assert_same_bits(b, m)


@pytest.mark.parametrize("narrow", [np.float32, ml_dtypes.bfloat16], ids=lambda t: np.dtype(t).name)
def test_subnormals_are_kept(narrow):
    """CuPy compiles with -ftz=true, under which a plain float <-> double cast flushes float
    subnormals to zero; the kernels' conversions keep them, bit-exact with NumPy: float64 in
    float32's (and bfloat16's) subnormal range packed to ``narrow``, and ``narrow``
    subnormals packed and unpacked to float64."""
    rng = np.random.default_rng(14)
    n = 64
    count = n * (n + 1) // 2
    low = {"float32": -149, "bfloat16": -133}[np.dtype(narrow).name]  # the smallest subnormal's exponent
    values = rng.uniform(0.5, 1.0, count) * 2.0 ** rng.integers(low, -126, count) * rng.choice([-1, 1], count)
    mat = np.zeros((n, n))
    mat[np.triu_indices(n)] = values
    want = ops.pack_sym([mat], dtype=narrow)
    assert np.count_nonzero(want.astype(np.float64)) > count // 2  # mostly subnormals, not zeros
    assert_same_bits(ops.pack_sym([cupy.asarray(mat)], dtype=narrow), want)
    small = ops.unpack_sym(want, [n])[0]
    assert_same_bits(ops.pack_sym([cupy.asarray(small)], dtype=np.float64), ops.pack_sym([small], dtype=np.float64))
    assert_same_bits(ops.unpack_sym(cupy.asarray(want), [n], dtype=np.float64)[0],
                     ops.unpack_sym(want, [n], dtype=np.float64)[0])


def test_float64_to_bfloat16_rounds_once():
    """float64 values that float32 rounds onto a bfloat16 tie: packed and unpacked on the GPU
    they round once, as the CPU reference's ``cast`` does, not through float32 as ml_dtypes'
    ``astype`` does (which lands one bfloat16 ulp off on every one of them)."""
    from hpckfac.ops.casting import cast

    rng = np.random.default_rng(16)
    n = 64
    count = n * (n + 1) // 2
    # A bfloat16 tie (mantissa k of 7 bits, plus half an ulp) nudged by far less than half a float32
    # ulp, away from the even neighbour that rounding the tie would pick.
    k = rng.integers(0, 128, count)
    nudge = np.where(k % 2 == 0, 1.0, -1.0) * 2.0 ** -40
    scale = rng.choice([-1, 1], count) * 2.0 ** rng.integers(-100, 100, count)
    values = (1 + k * 2.0 ** -7 + 2.0 ** -8 + nudge) * scale
    want = cast(values, ml_dtypes.bfloat16)
    assert (want.view(np.uint16) != values.astype(ml_dtypes.bfloat16).view(np.uint16)).all()
    mat = np.zeros((n, n))
    mat[np.triu_indices(n)] = values
    assert_same_bits(ops.pack_sym([cupy.asarray(mat)], dtype=ml_dtypes.bfloat16), want)
    back = ops.unpack_sym(cupy.asarray(values), [n], dtype=ml_dtypes.bfloat16)[0]
    assert_same_bits(back, ops.unpack_sym(values, [n], dtype=ml_dtypes.bfloat16)[0])


def test_repeated_tables_come_from_the_cache_and_stay_correct():
    """A table seen before (same matrices at the same addresses) is not uploaded again; new
    data at those addresses is still what gets packed, on any stream; the cache stays bounded."""
    from hpckfac.ops import cuda

    rng = np.random.default_rng(3)
    mats = [cupy.asarray(m) for m in random_mats(rng, (3, 70), np.float32)]
    first = ops.pack_sym(mats)
    uploads = []
    original = cuda._upload
    cuda._upload = lambda host: uploads.append(host) or original(host)
    try:
        again = ops.pack_sym(mats)
        for m in mats:
            m *= 2  # same addresses, new values
        doubled = ops.pack_sym(mats)
        assert uploads == []
        with cupy.cuda.Stream() as side:
            on_side = ops.pack_sym(mats)
            side.synchronize()
        assert uploads == []
    finally:
        cuda._upload = original
    assert_same_bits(again, first)
    assert_same_bits(doubled, first * 2)
    assert_same_bits(on_side, first * 2)
    for k in range(cuda._TABLES_KEPT + 10):
        cuda._table(np.array([k]))
    assert len(cuda._tables) == cuda._TABLES_KEPT


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def test_a_table_still_in_flight_is_waited_for_on_another_stream():
    """The first use of a table queues its upload behind slow work on one stream; another
    stream reusing it at once must wait for that upload, not read the table before it lands."""
    from hpckfac.ops import cuda

    cuda._tables.clear()
    mats = [cupy.asarray(m) for m in random_mats(np.random.default_rng(8), (5, 9, 40), np.float32)]
    want = ops.pack_sym([m.get() for m in mats])
    cupy.cuda.Device().synchronize()
    slow, other = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    with slow:
        cupy.RawKernel(SPIN, "spin")((1,), (1,), (np.int64(200_000_000),))  # ~0.1 s
        on_slow = ops.pack_sym(mats)
    with other:
        on_other = ops.pack_sym(mats)
    slow.synchronize()
    other.synchronize()
    assert_same_bits(on_slow, want)
    assert_same_bits(on_other, want)
