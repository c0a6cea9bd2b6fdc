"""Factor accumulation scale * X^T X against a float64 oracle, per input precision."""
import ml_dtypes
import numpy as np
import pytest

from hpckfac import ops

EPS32 = float(np.finfo(np.float32).eps)


def oracle(x, scale):
    x64 = x.astype(np.float64)  # exact for every supported input dtype
    return scale * (x64.T @ x64)


def fp32_bound(x, scale):
    """Error bound of an fp32 sum of `rows` products (plus the scaling): (rows+2)*eps*|x|^T|x|."""
    a = np.abs(x.astype(np.float64))
    return (x.shape[0] + 2) * EPS32 * abs(scale) * (a.T @ a)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_half_and_single_accumulate_in_fp32(dtype, seed):
    rng = np.random.default_rng(seed)
    rows, d = rng.integers(20, 200), rng.integers(1, 30)
    x = (rng.standard_normal((rows, d)) * rng.uniform(0.1, 4.0, size=d)).astype(dtype)
    scale = 1.0 / rows
    got = ops.accumulate_factor(x, scale)
    assert got.dtype == np.float32 and got.shape == (d, d)
    assert np.all(np.abs(got - oracle(x, scale)) <= fp32_bound(x, scale))


def test_float64_stays_float64():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 9))
    got = ops.accumulate_factor(x, 0.25)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, 0.25 * np.einsum("ri,rj->ij", x, x), rtol=1e-13, atol=1e-13)


def test_fp16_squares_overflowing_fp16():
    rng = np.random.default_rng(8)
    x = rng.uniform(260.0, 350.0, size=(40, 5)).astype(np.float16)
    with np.errstate(over="ignore"):
        assert np.isinf(x * x).all()  # every fp16 square overflows
    got = ops.accumulate_factor(x, 1.0 / 40)
    assert np.isfinite(got).all()
    assert np.all(np.abs(got - oracle(x, 1.0 / 40)) <= fp32_bound(x, 1.0 / 40))


@pytest.mark.parametrize("magnitude", [1e-18, 1e18, 1e-25, 1e25])
def test_bfloat16_products_beyond_float32s_range(magnitude):
    """bfloat16 has float32's exponent range: rows of magnitude 1e-18 or 1e18 keep the fp32 bound;
    at 1e-25 the products (1e-50) flush to zero, at 1e25 (1e50) they overflow, as documented."""
    rng = np.random.default_rng(9)
    x = (rng.uniform(1.0, 2.0, size=(30, 4)) * magnitude).astype(ml_dtypes.bfloat16)
    with np.errstate(over="ignore"):
        got = ops.accumulate_factor(x, 1.0 / 30)
    if magnitude == 1e-25:
        assert (got == 0).all()
    elif magnitude == 1e25:
        assert np.isinf(got).all()
    else:
        assert np.all(np.abs(got - oracle(x, 1.0 / 30)) <= fp32_bound(x, 1.0 / 30))


@pytest.mark.parametrize("d", [127, 128, 129, 200, 513, 1100])
@pytest.mark.parametrize("packed", [False, True])
def test_wide_factors_in_column_panels(d, packed):
    """From 128 columns on the upper triangle is computed in 2-8 column panels: every panel,
    the last included, against the float64 oracle."""
    rng = np.random.default_rng(d)
    x = rng.standard_normal((37, d)) * rng.uniform(0.5, 2.0, size=d)
    want = oracle(x, 0.3)
    got = ops.accumulate_factor(x, 0.3, packed=packed)
    np.testing.assert_allclose(got, want[np.triu_indices(d)] if packed else want, rtol=1e-12, atol=1e-12)
    x32 = x.astype(np.float32)
    got32 = ops.accumulate_factor(x32, 0.3, packed=packed)
    bound = fp32_bound(x32, 0.3)
    if packed:
        assert np.all(np.abs(got32 - want[np.triu_indices(d)]) <= bound[np.triu_indices(d)])
    else:
        assert np.all(np.abs(got32 - want) <= bound)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_packed_matches_dense_upper_triangle(dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 7)).astype(dtype)
    dense = ops.accumulate_factor(x, 0.5)
    packed = ops.accumulate_factor(x, 0.5, packed=True)
    assert packed.shape == (ops.packed_size(7),) and packed.dtype == dense.dtype
    np.testing.assert_array_equal(packed, ops.pack_sym([dense]))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
def test_fused_decay_matches_formula(packed, dtype):
    rng = np.random.default_rng(10)
    d, decay, scale = 6, 0.9, 1.0 / 50
    x = rng.standard_normal((50, d)).astype(dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    old = oracle(rng.standard_normal((80, d)), 1.0 / 80)
    out = (ops.pack_sym([old]) if packed else old).astype(acc)
    expect = decay * old + (1 - decay) * oracle(x, scale)
    got = ops.accumulate_factor(x, scale, packed=packed, out=out, decay=decay)
    assert got is out
    tol = 1e-12 if acc == np.float64 else 1e-5
    np.testing.assert_allclose(got, ops.pack_sym([expect]) if packed else expect, rtol=tol, atol=tol)


def test_out_without_decay_is_overwritten():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    out = np.full(10, np.nan, dtype=np.float32)
    ops.accumulate_factor(x, 2.0, packed=True, out=out)
    np.testing.assert_array_equal(out, ops.accumulate_factor(x, 2.0, packed=True))


def test_fused_decay_refuses_non_finite_product():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((10, 3)).astype(np.float32)
    x[4, 1] = np.nan
    out = oracle(rng.standard_normal((10, 3)), 0.1).astype(np.float32)
    before = out.copy()
    with pytest.raises(ValueError, match="x"):
        ops.accumulate_factor(x, 0.1, out=out, decay=0.95)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"x": np.ones(4)}, "x"),
        ({"x": np.ones((3, 2)), "scale": float("nan")}, "scale"),
        ({"x": np.ones((3, 2)), "decay": 0.5}, "out"),
        ({"x": np.ones((3, 2)), "out": np.zeros((2, 2)), "decay": 1.0}, "decay"),
        ({"x": np.ones((3, 2)), "out": np.zeros((2, 2)), "decay": -0.1}, "decay"),
        ({"x": np.ones((3, 2)), "out": np.zeros((2, 2), np.float32)}, "out"),
        ({"x": np.ones((3, 2)), "out": np.zeros((2, 2)), "packed": True}, "out"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ops.accumulate_factor(**kwargs)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_float_input_rejected(dtype):
    with pytest.raises(TypeError, match="x"):
        ops.accumulate_factor(np.ones((3, 2), dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_read_only_rows_without_a_warning(dtype):
    """Read-only rows (a received buffer, a broadcast view) are copied for torch, which would
    otherwise warn that the memory is not writable (once per process unless told to warn
    always); the factor is the same."""
    import warnings

    import torch

    from hpckfac.ops.factors import example_gram

    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 6, 5)).astype(dtype)
    frozen = x.copy()
    frozen.flags.writeable = False
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows = ops.accumulate_factor(frozen.reshape(-1, 5), 0.5)
            gram = example_gram(frozen, 0.5, packed=False)
    finally:
        torch.set_warn_always(always)
    np.testing.assert_array_equal(rows, ops.accumulate_factor(x.reshape(-1, 5), 0.5))
    np.testing.assert_array_equal(gram, example_gram(x, 0.5, packed=False))
    bound = np.full((5, 5), 1e-13 if dtype == np.float64 else 1e-5)
    assert np.all(np.abs(rows - oracle(x.reshape(-1, 5), 0.5)) <= bound * np.abs(rows).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
def test_example_gram_is_the_gram_of_the_channels_last_rows(dtype):
    from hpckfac.ops.factors import example_gram

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5, 11, 37)) * rng.uniform(0.1, 4.0, size=(1, 11, 1))).astype(dtype)
    x.flags.writeable = False
    rows = np.moveaxis(x, 1, -1).reshape(-1, 11)  # (N * T, C)
    want, bound = oracle(rows, 0.2), fp32_bound(rows, 0.2)
    if dtype == np.float64:  # float64 products and sums: rounding of float64, not float32
        bound = np.full_like(want, 1e-13 * np.abs(want).max())
    dense = example_gram(x, 0.2, packed=False)
    assert dense.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_array_equal(dense, dense.T)
    assert np.all(np.abs(dense - want) <= bound)
    np.testing.assert_array_equal(example_gram(x, 0.2, packed=True), dense[np.triu_indices(11)])
