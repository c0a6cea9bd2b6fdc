"""Device backends of hpckfac.comm.device on one process: staging round trips,
device reductions, pinned buffers reused across calls."""
import numpy as np

from gpu_helpers import cupy, host, requires_gpu
from hpckfac.comm import device

pytestmark = requires_gpu


def test_device_backend_round_trip_and_add():
    backend = device.DeviceBackend()
    rng = np.random.default_rng(0)
    a = cupy.asarray(rng.standard_normal((6, 7)).astype(np.float32))
    strided = cupy.asarray(rng.standard_normal((6, 14)).astype(np.float32))[:, ::2]
    for array in (a, strided):
        work = backend.stage_in(array)
        assert work.ndim == 1 and work.flags.c_contiguous and backend.accepts(work)
        other = cupy.asarray(rng.standard_normal(work.size).astype(np.float32))
        want = host(work) + host(other)
        backend.add(work, other)
        backend.stage_out(work, array)
        assert np.array_equal(host(array).ravel(), want)


def test_staged_backend_reuses_pinned_buffers():
    backend = device.StagedDeviceBackend()
    rng = np.random.default_rng(1)
    a = cupy.asarray(rng.standard_normal(1000))
    work = backend.stage_in(a)
    assert isinstance(work, np.ndarray) and np.array_equal(work, host(a))
    work += 1.0
    backend.stage_out(work, a)
    assert np.array_equal(host(a), work)
    again = backend.stage_in(a[:10])
    assert np.shares_memory(again, work)  # same pinned allocation
    assert np.array_equal(again, host(a[:10]))
