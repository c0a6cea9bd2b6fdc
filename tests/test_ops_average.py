"""Running average semantics and the dispatch layer's import hygiene."""
import subprocess
import sys

import numpy as np
import pytest

from hpckfac import ops


def test_first_update_copies():
    rng = np.random.default_rng(31)
    running = rng.standard_normal(10)
    new = rng.standard_normal(10)
    assert ops.ema_update(running, new, 0.9, first=True) is True
    np.testing.assert_array_equal(running, new)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95])
def test_update_formula(decay):
    rng = np.random.default_rng(32)
    running = rng.standard_normal((4, 4))
    old = running.copy()
    new = rng.standard_normal((4, 4))
    assert ops.ema_update(running, new, decay)
    np.testing.assert_allclose(running, decay * old + (1 - decay) * new, rtol=1e-15, atol=1e-15)


def test_narrow_new_into_float32_running():
    rng = np.random.default_rng(33)
    running = rng.standard_normal(6).astype(np.float32)
    old = running.astype(np.float64)
    new = rng.standard_normal(6).astype(np.float16)
    assert ops.ema_update(running, new, 0.8)
    assert running.dtype == np.float32
    np.testing.assert_allclose(running, 0.8 * old + 0.2 * new.astype(np.float64), rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("first", [False, True])
def test_non_finite_new_refused(bad, first):
    rng = np.random.default_rng(34)
    running = rng.standard_normal(8)
    before = running.copy()
    new = rng.standard_normal(8)
    new[3] = bad
    assert ops.ema_update(running, new, 0.9, first=first) is False
    np.testing.assert_array_equal(running, before)


@pytest.mark.parametrize("first", [False, True])
def test_new_beyond_the_running_dtype_refused(first):
    """float64 statistics finite in float64 but beyond float32's range would turn a float32
    running average into inf: refused like NaN/Inf, the average untouched."""
    rng = np.random.default_rng(35)
    running = rng.standard_normal(8).astype(np.float32)
    before = running.copy()
    new = rng.standard_normal(8)
    new[rng.integers(8)] = 1e39 * rng.choice([-1.0, 1.0])
    assert ops.ema_update(running, new, 0.9, first=first) is False
    np.testing.assert_array_equal(running, before)


@pytest.mark.parametrize(
    "new, decay, name",
    [
        (np.ones(5), 0.9, "new"),
        (np.ones(4), 1.0, "decay"),
        (np.ones(4), -0.5, "decay"),
        (np.ones(4), float("nan"), "decay"),
    ],
)
def test_invalid_arguments(new, decay, name):
    with pytest.raises(ValueError, match=name):
        ops.ema_update(np.zeros(4), new, decay)


@pytest.mark.parametrize("running_dtype, new_dtype", [(np.float32, np.complex64), (np.int64, np.float64)])
def test_a_new_value_of_another_kind_is_refused(running_dtype, new_dtype):
    """A cast that would drop imaginary parts or truncate to integers is a TypeError, not a quiet update."""
    running = np.zeros(3, dtype=running_dtype)
    new = (np.random.default_rng(5).standard_normal(3) + 0.5).astype(new_dtype)
    with pytest.raises(TypeError, match="same_kind"):
        ops.ema_update(running, new, 0.5)
    assert not running.any()


def test_import_does_not_load_cupy():
    code = "import sys, hpckfac.ops; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_callers_verdict_on_finiteness():
    """``finite=False`` refuses without looking; ``finite=True`` blends without checking again."""
    rng = np.random.default_rng(34)
    running, new = rng.standard_normal(6), rng.standard_normal(6)
    before = running.copy()
    assert ops.ema_update(running, new, 0.5, finite=False) is False
    np.testing.assert_array_equal(running, before)
    assert ops.ema_update(running, new, 0.5, finite=True) is True
    np.testing.assert_allclose(running, 0.5 * before + 0.5 * new, rtol=1e-15)
