"""float64 -> bfloat16 rounds once (hpckfac.ops.casting), against an oracle that
picks the nearest of all 65,536 bfloat16 values."""
import ml_dtypes
import numpy as np
import pytest

from hpckfac import ops
from hpckfac.ops.casting import cast

BF16 = ml_dtypes.bfloat16


def nearest_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties to the even bit pattern, by search over every finite bfloat16."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):  # the NaN patterns, dropped below
        values = bits.view(BF16).astype(np.float64)
    keep = np.isfinite(values) & ~((values == 0) & (bits >= 0x8000))  # one zero, no NaN/inf
    values, bits = values[keep], bits[keep]
    order = np.argsort(values)
    values, bits = values[order], bits[order]
    top = values[-1]
    out = np.empty(x.shape, dtype=np.uint16)
    hi = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = x - values[lo], values[hi] - x
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (bits[hi] % 2 == 0))
    out[:] = np.where(pick_hi, bits[hi], bits[lo])
    # Beyond the largest finite value plus half an ulp: infinity, as IEEE rounding gives.
    half_ulp = (top - values[-2]) / 2
    out[x >= top + half_ulp] = 0x7F80
    out[x <= -(top + half_ulp)] = 0xFF80
    negative_zero = (x == 0) & np.signbit(x)
    out[negative_zero | ((out == 0) & (x < 0))] = 0x8000
    return out.view(BF16)


def draws() -> np.ndarray:
    rng = np.random.default_rng(7)
    mags = 2.0 ** rng.uniform(-140, 128, 20000)
    random = mags * rng.choice([-1, 1], mags.size) * (1 + rng.standard_normal(mags.size) * 1e-3)
    # Values a hair beside bfloat16 ties: where rounding through float32 goes wrong.
    base = rng.standard_normal(4000).astype(BF16).astype(np.float64)
    ulp = np.abs(base) * 2.0 ** -7
    ties = base + ulp / 2
    near = np.concatenate([ties, ties + ulp * 2.0 ** -30, ties - ulp * 2.0 ** -30])
    edges = np.array([0.0, -0.0, 2.0 ** -133, 2.0 ** -134, 2.0 ** -134 * 1.0000001, 3e38, 3.4e38, 3.3961e38, -3.4e38])
    return np.concatenate([random, near, edges])


def test_float64_to_bfloat16_rounds_once():
    x = draws()
    got, want = cast(x, BF16), nearest_bfloat16(x)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    # NumPy's own cast goes through float32 and is wrong on some of these: the oracle can fail.
    assert not np.array_equal(x.astype(BF16).view(np.uint16), want.view(np.uint16))


def test_nan_stays_nan_and_other_casts_are_numpys():
    assert np.isnan(cast(np.array([np.nan]), BF16).astype(np.float32))[0]
    x = np.random.default_rng(0).standard_normal(100)
    for dtype in (np.float32, np.float16):
        assert np.array_equal(cast(x, dtype), x.astype(dtype))


@pytest.mark.parametrize("direction", ["pack", "unpack"])
def test_packing_to_bfloat16_rounds_once(direction):
    rng = np.random.default_rng(1)
    upper = np.triu(rng.standard_normal((9, 9)).astype(BF16).astype(np.float64))
    base = upper + np.triu(upper, 1).T  # symmetric bfloat16 values
    # Half a bfloat16 ulp (8 significant bits) above each, and a hair more: rounded to float32
    # first, every one of these lands on the tie and half of them then round the wrong way.
    half_ulp = np.ldexp(1.0, np.frexp(base)[1] - 9)
    mat = base + half_ulp * (1 + 2.0 ** -30)
    assert np.array_equal(mat, mat.T)
    assert not np.array_equal(mat.astype(BF16).view(np.uint16), nearest_bfloat16(mat).view(np.uint16))
    if direction == "pack":
        got = ops.pack_sym([mat], dtype=BF16)
        want = nearest_bfloat16(mat[np.triu_indices(9)])
    else:
        got = ops.unpack_sym(ops.pack_sym([mat]), [9], BF16)[0]
        want = nearest_bfloat16(mat)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
