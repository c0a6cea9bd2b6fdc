"""Symmetric packing: layout, offsets, exact float64 round trip, dtype casts."""
import ml_dtypes
import numpy as np
import pytest

from hpckfac import ops


def random_symmetric(rng, n, dtype=np.float64):
    a = rng.standard_normal((n, n))
    return (a + a.T).astype(dtype)


def explicit_pack(mats):
    """Oracle: the documented order written out as a double loop i <= j."""
    return np.array([m[i, j] for m in mats for i in range(m.shape[0]) for j in range(i, m.shape[0])])


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_and_layout_random_sizes(seed):
    rng = np.random.default_rng(seed)
    sizes = [1] + rng.integers(1, 12, size=rng.integers(1, 6)).tolist()
    rng.shuffle(sizes)
    mats = [random_symmetric(rng, n) for n in sizes]
    buf = ops.pack_sym(mats)
    assert buf.dtype == np.float64 and buf.ndim == 1
    np.testing.assert_array_equal(buf, explicit_pack(mats))
    offsets = ops.packed_offsets(sizes)
    assert offsets.dtype == np.int64
    assert offsets.tolist() == [sum(n * (n + 1) // 2 for n in sizes[:m]) for m in range(len(sizes) + 1)]
    for mat, back in zip(mats, ops.unpack_sym(buf, sizes), strict=True):
        np.testing.assert_array_equal(back, mat)  # bit-exact


def test_element_position_formula():
    rng = np.random.default_rng(7)
    sizes = [3, 4]
    mats = [random_symmetric(rng, n) for n in sizes]
    buf = ops.pack_sym(mats)
    offsets = ops.packed_offsets(sizes)
    for m, n in enumerate(sizes):
        for i in range(n):
            for j in range(i, n):
                assert buf[offsets[m] + i * n - i * (i - 1) // 2 + (j - i)] == mats[m][i, j]


def test_worked_example_two_three():
    a = np.array([[1.0, 2.0], [2.0, 3.0]])
    b = np.array([[4.0, 5.0, 6.0], [5.0, 7.0, 8.0], [6.0, 8.0, 9.0]])
    np.testing.assert_array_equal(ops.pack_sym([a, b]), [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert ops.packed_offsets([2, 3]).tolist() == [0, 3, 9]
    assert ops.packed_size(3) == 6


def test_empty_list():
    buf = ops.pack_sym([])
    assert buf.shape == (0,) and buf.dtype == np.float64
    assert ops.unpack_sym(buf, []) == []
    assert ops.packed_offsets([]).tolist() == [0]


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_lower_triangle_not_read(layout):
    """Only the upper triangle is read, from C-contiguous, Fortran-ordered and strided matrices alike."""
    rng = np.random.default_rng(3)
    mat = random_symmetric(rng, 5)
    skewed = mat.copy()
    skewed[np.tril_indices(5, -1)] = rng.standard_normal(10)
    skewed = {"C": skewed, "F": np.asfortranarray(skewed),
              "strided": np.repeat(np.repeat(skewed, 2, 0), 3, 1)[::2, ::3]}[layout]
    assert skewed.flags.c_contiguous == (layout == "C")
    np.testing.assert_array_equal(ops.pack_sym([skewed]), mat[np.triu_indices(5)])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, ml_dtypes.bfloat16])
def test_pack_with_cast(dtype):
    rng = np.random.default_rng(11)
    sizes = [4, 1, 6]
    mats = [random_symmetric(rng, n) for n in sizes]
    buf = ops.pack_sym(mats, dtype=dtype)
    assert buf.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(buf, explicit_pack(mats).astype(dtype))
    back = ops.unpack_sym(buf, sizes, dtype=np.float64)
    for mat, got in zip(mats, back):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, got.T)
        np.testing.assert_allclose(got, mat, rtol=float(ml_dtypes.finfo(dtype).eps), atol=0)


def test_pack_into_out():
    rng = np.random.default_rng(5)
    mats = [random_symmetric(rng, n, np.float32) for n in (2, 5)]
    out = np.full(ops.packed_offsets([2, 5])[-1], np.nan, dtype=np.float16)
    assert ops.pack_sym(mats, out=out) is out
    np.testing.assert_array_equal(out, explicit_pack(mats).astype(np.float16))


def test_mixed_input_dtypes_promote():
    rng = np.random.default_rng(2)
    mats = [random_symmetric(rng, 2, np.float32), random_symmetric(rng, 3, np.float64)]
    buf = ops.pack_sym(mats)
    assert buf.dtype == np.float64
    # The float64 matrix keeps every bit (no pass through float32); the float32 one is exact too.
    assert np.array_equal(buf, explicit_pack([m.astype(np.float64) for m in mats]))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: ops.pack_sym([np.zeros((2, 3))]), "mats[0]"),
        (lambda: ops.pack_sym([np.eye(2), np.zeros(4)]), "mats[1]"),
        (lambda: ops.pack_sym([np.eye(2)], out=np.zeros(4)), "out"),
        (lambda: ops.pack_sym([np.eye(2)], dtype=np.float16, out=np.zeros(3)), "dtype"),
        (lambda: ops.unpack_sym(np.zeros(5), [2]), "buffer"),
        (lambda: ops.unpack_sym(np.zeros(3), [2.0]), "sizes"),
        (lambda: ops.packed_offsets([2, -1]), "sizes"),
        (lambda: ops.packed_size(-3), "n"),
        (lambda: ops.packed_size(2.5), "n"),
        (lambda: ops.packed_offsets([2, True]), "sizes"),  # a bool is no matrix order
    ],
)
def test_invalid_arguments(call, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize("seed", range(3))
def test_large_orders_round_trip(seed):
    """Orders past the cached gather indices (copied row by row) keep the layout and the
    values exactly, in stacks and from non-contiguous matrices too."""
    from hpckfac.layers.block import pack_stack, unpack_stack
    from hpckfac.ops.factors import finish_factor

    rng = np.random.default_rng(seed)
    n, count = int(rng.integers(65, 400)), int(rng.integers(1, 4))
    stack = np.stack([random_symmetric(rng, n, np.float32) for _ in range(count)])
    rows, cols = np.triu_indices(n)
    expected = np.concatenate([m[rows, cols] for m in stack])
    np.testing.assert_array_equal(pack_stack(stack), expected)
    np.testing.assert_array_equal(ops.pack_sym([m.T for m in stack]), expected)  # Fortran-ordered
    np.testing.assert_array_equal(unpack_stack(expected, count, n), stack)
    for mat, back in zip(stack, ops.unpack_sym(expected, [n] * count), strict=True):
        np.testing.assert_array_equal(back, mat)
    upper = np.triu(stack[0]) + np.tril(rng.standard_normal((n, n)).astype(np.float32), -1)  # lower: not read
    np.testing.assert_array_equal(finish_factor(upper.copy(), packed=True), expected[:rows.size])
    np.testing.assert_array_equal(finish_factor(upper, packed=False), stack[0])


def test_large_orders_keep_no_memory():
    """Packing and unpacking a large matrix keeps nothing of its size once they return: cached
    int64 indices (n^2 entries, twice a float32 matrix) would stay for the process's lifetime."""
    import gc
    import tracemalloc

    from hpckfac.layers.block import pack_stack, unpack_stack

    rng = np.random.default_rng(11)
    n = int(rng.integers(300, 600))
    stack = random_symmetric(rng, n, np.float32)[None]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ops.unpack_sym(ops.pack_sym(list(stack)), [n])
        unpack_stack(pack_stack(stack), 1, n)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < stack.nbytes // 4, f"{kept} bytes kept after packing a {n}x{n} matrix"


@pytest.mark.parametrize("n", [5, 90])
def test_unpacking_into_a_non_contiguous_out_is_refused(n):
    """An ``out`` that is not C-contiguous would be written through a reshaped copy and the
    result lost: refused, naming ``out``; a C-contiguous one receives the exact stack."""
    from hpckfac.layers.block import unpack_stack

    rng = np.random.default_rng(n)
    stack = np.stack([random_symmetric(rng, n, np.float64) for _ in range(2)])
    packed = ops.pack_sym(list(stack))
    with pytest.raises(ValueError, match="out"):
        unpack_stack(packed, 2, n, np.empty((2, n, n)).swapaxes(1, 2))
    out = np.empty((2, n, n))
    assert unpack_stack(packed, 2, n, out) is out
    np.testing.assert_array_equal(out, stack)
