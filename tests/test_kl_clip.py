"""Stage 4's KL clip factor against its formula, nu = min(1, sqrt(kl_clip / (lr^2 sum))), and
its edge cases: a sum that is not positive, a zero or huge learning rate, non-finite sums; the
partial sums' encoding (mantissa and power of two) in buffers of every dtype."""
import math

import numpy as np
import pytest
from mpi4py import MPI

from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.stages.all_gather import decode_partials, encode_partial, kl_clip_factor
from hpckfac.stages.engine import KFACEngine


def gathered_with_partials(partials, rng, dtype=np.float64):
    """A gathered buffer with the ranks' partial sums, encoded, at random places among other values."""
    buffer = rng.standard_normal(40).astype(dtype)
    at = 2 * np.sort(rng.choice(20, size=len(partials), replace=False))
    for i, partial in zip(at, partials):
        encode_partial(np.float64(partial), buffer[i:i + 2])
    return buffer, at


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ratio", [0.3, 3.0])  # kl_clip / (lr^2 sum): an active clip, then none
def test_the_factor_is_the_formula(seed, ratio):
    rng = np.random.default_rng(seed)
    partials = rng.uniform(0.1, 2.0, size=3)
    buffer, at = gathered_with_partials(partials, rng)
    lr = 10 ** rng.uniform(-2, 0)
    kl_clip = ratio * lr * lr * partials.sum()
    want = min(1.0, math.sqrt(kl_clip / (lr * lr * partials.sum())))
    assert float(kl_clip_factor(buffer, at, kl_clip, lr)) == pytest.approx(want, rel=1e-12)
    assert kl_clip_factor(buffer, at, None, lr) is None


@pytest.mark.parametrize("partials,lr,want", [
    ([-0.5, 0.2], 0.1, 1.0),        # rounding can make the sum negative: no clip, not NaN
    ([0.0, 0.0], 0.1, 1.0),         # a zero gradient
    ([0.3, 0.4], 0.0, 1.0),         # lr 0 (a warmup's first step)
    ([0.3, 0.4], 1e155, math.sqrt(1e-3 / 0.7) / 1e155),  # lr^2 would overflow
    ([np.inf, 0.4], 0.1, math.nan),  # non-finite gradients: the update is non-finite too
    ([np.nan, 0.4], 0.1, math.nan),
])
def test_edge_cases(partials, lr, want):
    buffer, at = gathered_with_partials(np.array(partials), np.random.default_rng(7))
    nu = float(kl_clip_factor(buffer, at, 1e-3, lr))
    if math.isnan(want):
        assert math.isnan(nu)
    else:
        assert nu == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 0.0), (np.float32, 2.0 ** -24), (np.float16, 2.0 ** -11)])
def test_partial_sums_of_any_magnitude_travel_in_every_dtype(dtype, rtol):
    rng = np.random.default_rng(11)
    # Beyond float16's 65504 and float32's 3.4e38, below their smallest normals, negative, zero,
    # float64's largest and its subnormals (exponents down to -1073, exact in every dtype).
    partials = np.array([7.3e5, 2.9e41, 3.1e-9, 6.2e-300, -4.4e3, 0.0, 1.7e308, 3e-310, 5e-324])
    buffer, at = gathered_with_partials(partials, rng, dtype)
    decoded = decode_partials(buffer, at)
    assert decoded.dtype == np.float64
    np.testing.assert_allclose(decoded, partials, rtol=rtol, atol=0)
    if dtype == np.float64:
        assert np.array_equal(decoded, partials)  # exact: the float64 pipeline's sums are unchanged


def test_a_float16_buffer_clips_a_sum_beyond_its_range():
    partials = np.array([9.1e4, 4.0e5])  # each beyond 65504: as plain float16 elements, inf and nu NaN
    buffer, at = gathered_with_partials(partials, np.random.default_rng(3), np.float16)
    lr, kl_clip = 0.1, 1e-2
    nu = float(kl_clip_factor(buffer, at, kl_clip, lr))
    assert nu == pytest.approx(math.sqrt(kl_clip / (lr * lr * partials.sum())), rel=2e-3)


def test_non_finite_partials_stay_non_finite():
    buffer = np.zeros(4, dtype=np.float16)
    encode_partial(np.float64(np.inf), buffer[0:2])
    encode_partial(np.float64(np.nan), buffer[2:4])
    decoded = decode_partials(buffer, np.array([0, 2]))
    assert decoded[0] == np.inf and np.isnan(decoded[1])


def random_factors(rng):
    """Random well-conditioned factors ``A`` (31x31) and ``G`` (20x20) of a Linear layer of 30
    inputs, a bias and 20 outputs."""
    return tuple(x @ x.T / (2 * n) + np.eye(n) for n in (31, 20) for x in [rng.standard_normal((n, 2 * n))])


def clipped_step(a, g, grad, comm_dtype, damping=1e-3, lr=0.1, kl_clip=1e-2):
    """A KFACEngine's first step on that layer with statistics ``a``, ``g`` and gradient ``grad``,
    its buffers in ``comm_dtype``: the update (float64) and nu, with the float64 oracle's
    preconditioned gradient ``V``, sum of ``V * grad`` and nu."""
    stats = np.concatenate([a[np.triu_indices(31)], g[np.triu_indices(20)]])
    engine = KFACEngine([LinearBlock("fc", 30, 20, bias=True)], Communicator(MPI.COMM_SELF), damping=damping,
                        factor_decay=0.9, kl_clip=kl_clip, comm_dtype=comm_dtype)
    (out,) = engine.step([grad], [stats], lr=lr)
    pi = math.sqrt((np.trace(a) / 31) / (np.trace(g) / 20))
    v = np.linalg.inv(g + math.sqrt(damping) / pi * np.eye(20)) @ grad @ np.linalg.inv(
        a + pi * math.sqrt(damping) * np.eye(31))
    total = float(np.sum(v * grad))
    return np.asarray(out, dtype=np.float64), engine.last_nu, v, total, math.sqrt(kl_clip / (lr * lr * total))


def test_a_float16_pipeline_whose_kl_sum_passes_65504_gives_the_clipped_update():
    rng = np.random.default_rng(5)
    a, g = random_factors(rng)
    grad = 100.0 * rng.standard_normal((20, 31))
    out, last_nu, v, total, nu = clipped_step(a, g, grad, np.float16)
    assert np.abs(v).max() < 65504 < total  # every element fits in float16, their sum does not
    assert last_nu == pytest.approx(nu, rel=1e-2)
    np.testing.assert_allclose(out, nu * v, rtol=2e-2, atol=2e-2 * np.abs(nu * v).max())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("magnitude", [1e22, 1e30])
def test_a_float32_kl_sum_whose_products_pass_float32s_range_gives_the_clipped_update(seed, magnitude):
    """Finite float32 gradients and preconditioned gradients whose products ``V * grad`` are
    beyond float32's 3.4e38 while their float64 sum is not: nu and the update are the float64
    oracle's, not NaN."""
    rng = np.random.default_rng(seed)
    a, g = (m.astype(np.float32).astype(np.float64) for m in random_factors(rng))
    grad = (magnitude * rng.standard_normal((20, 31))).astype(np.float32).astype(np.float64)
    out, last_nu, v, total, nu = clipped_step(a, g, grad, np.float32)
    assert np.abs(v * grad).max() > np.finfo(np.float32).max and math.isfinite(total)
    assert last_nu == pytest.approx(nu, rel=1e-5)
    np.testing.assert_allclose(out, nu * v, rtol=1e-4, atol=1e-5 * np.abs(nu * v).max())
