"""The shared scalar validators: every bound, and the values that are not numbers at all."""
import math

import numpy as np
import pytest

from hpckfac.checks import check_bool, check_integer, check_real


@pytest.mark.parametrize("value,bounds,ok", [
    (0.5, {}, True), (np.float32(0.5), {"above": 0.0}, True), (3, {"at_most": 3}, True),
    (0.0, {"above": 0.0}, False), (0.0, {"at_least": 0.0}, True), (1.0, {"below": 1.0}, False),
    (1.0, {"at_most": 1.0}, True), (1.5, {"above": 0.0, "at_most": 1.0}, False),
    (math.nan, {}, False), (math.inf, {}, False), (-math.inf, {"below": 0.0}, False),
    (True, {}, False), (np.bool_(True), {}, False), ("0.5", {}, False), (None, {}, False), (1 + 2j, {}, False),
])
def test_check_real(value, bounds, ok):
    if ok:
        assert check_real(value, "rate", **bounds) == float(value)
        assert type(check_real(value, "rate", **bounds)) is float
    else:
        with pytest.raises(ValueError, match=r"^rate: expected a finite real number"):
            check_real(value, "rate", **bounds)


def test_check_real_message_names_every_bound():
    with pytest.raises(ValueError, match=r"rate: expected a finite real number > 0 and <= 1, got 2"):
        check_real(2, "rate", above=0, at_most=1)


@pytest.mark.parametrize("value,ok", [(3, True), (np.int64(1), True), (0, False), (2.0, False), (True, False),
                                      ("3", False)])
def test_check_integer(value, ok):
    if ok:
        assert check_integer(value, "steps", 1) == int(value) and type(check_integer(value, "steps", 1)) is int
    else:
        with pytest.raises(ValueError, match=r"^steps: expected an integer >= 1"):
            check_integer(value, "steps", 1)


def test_check_bool():
    assert check_bool(np.bool_(False), "bias") is False and check_bool(True, "bias") is True
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match="^bias: expected a bool"):
            check_bool(bad, "bias")
