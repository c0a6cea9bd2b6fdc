"""Entry points route CuPy-typed arrays to hpckfac.ops.cuda after validating them."""
import sys
import types

import numpy as np
import pytest

import hpckfac.ops
from hpckfac import ops


class FakeCupyArray:
    """Stands in for a cupy.ndarray: only its defining module and shape metadata matter."""

    __module__ = "cupy._core.core"

    def __init__(self, shape, dtype=np.float32):
        self.shape, self.ndim, self.dtype = shape, len(shape), np.dtype(dtype)

    def get(self):
        return np.zeros(self.shape[0], dtype=np.int8)


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = []

    def record(name, result):
        return lambda *args: calls.append((name, args)) or result

    module = types.ModuleType("hpckfac.ops.cuda")
    module.pack_sym = record("pack_sym", "packed")
    module.unpack_sym = record("unpack_sym", ["unpacked"])
    module.accumulate_factor = record("accumulate_factor", "factor")
    module.ema_update = record("ema_update", True)
    module.damped_inverse = record("damped_inverse", ("inv", FakeCupyArray((2,))))
    monkeypatch.setitem(sys.modules, "hpckfac.ops.cuda", module)
    monkeypatch.setattr(hpckfac.ops, "cuda", module, raising=False)
    return calls


def test_cupy_arrays_go_to_cuda_backend(fake_cuda):
    a, b = FakeCupyArray((2, 2)), FakeCupyArray((3, 3))
    assert ops.pack_sym([a, b], dtype=np.float16) == "packed"
    assert fake_cuda[-1] == ("pack_sym", ([a, b], [2, 3], np.dtype(np.float16), None))
    buf = FakeCupyArray((9,))
    assert ops.unpack_sym(buf, [2, 3]) == ["unpacked"]
    assert fake_cuda[-1] == ("unpack_sym", (buf, [2, 3], np.dtype(np.float32)))
    x = FakeCupyArray((10, 4), np.float16)
    assert ops.accumulate_factor(x, 0.5, packed=True) == "factor"
    assert fake_cuda[-1] == ("accumulate_factor", (x, 0.5, True, None, None))
    running = FakeCupyArray((10,))
    assert ops.ema_update(running, FakeCupyArray((10,)), 0.9) is True
    assert fake_cuda[-1][0] == "ema_update" and fake_cuda[-1][1][2:] == (0.9, False, True)
    result = ops.damped_inverse(FakeCupyArray((2, 3, 3)), 0.1)
    assert result.inverse == "inv" and fake_cuda[-1][1][1] == 0.1


def test_validation_happens_before_dispatch(fake_cuda):
    with pytest.raises(ValueError, match="decay"):
        ops.ema_update(FakeCupyArray((3,)), FakeCupyArray((3,)), 1.5)
    with pytest.raises(ValueError, match="x"):
        ops.accumulate_factor(FakeCupyArray((3,)))
    assert fake_cuda == []


def test_numpy_arrays_stay_on_cpu(fake_cuda):
    ops.accumulate_factor(np.random.default_rng(0).standard_normal((5, 2)))
    assert fake_cuda == []
