"""Stage 4's KL clip factor against its formula, nu = min(1, sqrt(kl_clip / (lr^2 sum))), and
its edge cases: a sum that is not positive, a zero or huge learning rate, non-finite sums."""
import math

import numpy as np
import pytest

from hpckfac.stages.all_gather import kl_clip_factor


def gathered_with_partials(partials, rng):
    """A gathered buffer with the ranks' partial sums at random places among other values."""
    buffer = rng.standard_normal(40)
    at = np.sort(rng.choice(40, size=len(partials), replace=False))
    buffer[at] = partials
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
