"""hpckfac.comm.device without a GPU: CUDA-aware MPI detection, and the device
backends on a stand-in for CuPy that logs the copies, kernels and stream waits
they ask for (the order in which MPI may read device memory)."""
import importlib
import sys
import types
import warnings

import numpy as np
import pytest

from hpckfac.comm import device


@pytest.fixture(autouse=True)
def fresh_detection():
    device.cuda_aware_mpi.cache_clear()
    yield
    device.cuda_aware_mpi.cache_clear()


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False)])
def test_environment_forces_the_answer(monkeypatch, value, expected):
    monkeypatch.setenv(device.CUDA_AWARE_ENV, value)
    assert device.cuda_aware_mpi() is expected


def test_invalid_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(device.CUDA_AWARE_ENV, "yes")
    with pytest.raises(ValueError, match=device.CUDA_AWARE_ENV):
        device.cuda_aware_mpi()


def test_query_of_the_loaded_mpi(monkeypatch):
    monkeypatch.delenv(device.CUDA_AWARE_ENV, raising=False)
    importlib.import_module("mpi4py.MPI")

    assert device._loaded_mpi_libraries(), "the MPI library should be mapped once mpi4py is imported"
    assert isinstance(device.cuda_aware_mpi(), bool)


class FakeLibrary:
    """A loaded MPI library as ctypes shows it: with or without ``MPIX_Query_cuda_support``."""

    def __init__(self, answer=None):
        if answer is not None:
            self.MPIX_Query_cuda_support = lambda: answer


@pytest.mark.parametrize("answer,expected", [(1, True), (0, False)])
def test_the_first_library_with_the_query_answers(monkeypatch, answer, expected):
    monkeypatch.delenv(device.CUDA_AWARE_ENV, raising=False)
    libraries = {"/lib/libmpi_plain.so": FakeLibrary(), "/lib/libmpi_cuda.so": FakeLibrary(answer),
                 "/lib/libmpi_later.so": FakeLibrary(1 - answer)}
    monkeypatch.setattr(device, "_loaded_mpi_libraries", lambda: list(libraries))
    monkeypatch.setattr(device.ctypes, "CDLL", libraries.__getitem__)
    assert device.cuda_aware_mpi() is expected


def test_no_library_with_the_query_means_no_cuda_support(monkeypatch):
    monkeypatch.delenv(device.CUDA_AWARE_ENV, raising=False)
    monkeypatch.setattr(device, "_loaded_mpi_libraries", lambda: ["/lib/libmpi_a.so", "/lib/libmpi_b.so"])
    monkeypatch.setattr(device.ctypes, "CDLL", lambda path: FakeLibrary())
    assert device.cuda_aware_mpi() is False


class FakeArray:
    """A CuPy array of ``FakeCupy``: a NumPy array behind it, its module CuPy's (``is_cupy``)."""

    __module__ = "cupy"

    def __init__(self, a, events):
        self._a, self._events = a, events

    shape = property(lambda self: self._a.shape)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.__array_interface__["data"][0]))

    def reshape(self, *shape):
        return FakeArray(self._a.reshape(*shape), self._events)

    def __getitem__(self, key):
        return FakeArray(self._a[key], self._events)

    def __setitem__(self, key, value):
        self._events.append("write")
        self._a[key] = value._a if isinstance(value, FakeArray) else value

    def get(self, out=None):
        self._events.append("download")
        if out is None:
            return self._a.copy()
        out[...] = self._a
        return out


class FakeCupy(types.ModuleType):
    """What ``hpckfac.comm.device`` uses of CuPy, logging in ``events`` the copies, kernels,
    stream waits and pinned allocations it asks for."""

    def __init__(self):
        super().__init__("cupy")
        self.events = []
        stream = types.SimpleNamespace(synchronize=lambda: self.events.append("synchronize"))
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: stream, alloc_pinned_memory=self._pinned)

    def _pinned(self, nbytes):
        self.events.append(("pinned", nbytes))
        return bytearray(nbytes)

    def device(self, a):
        """A device array holding (sharing) the host array ``a``."""
        return FakeArray(a, self.events)

    def ascontiguousarray(self, a):
        if a.flags.c_contiguous:
            return a
        self.events.append("copy")
        return FakeArray(np.ascontiguousarray(a._a), self.events)

    def asarray(self, a):
        self.events.append("upload")
        return FakeArray(np.array(a), self.events)

    def add(self, x, y, out):
        self.events.append("add")
        np.add(x._a, y._a, out=out._a)
        return out


@pytest.fixture
def cupy(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


def test_a_contiguous_array_goes_to_mpi_as_itself_once_the_stream_is_done(cupy):
    backend = device.DeviceBackend()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    a = cupy.device(x.copy())
    work = backend.stage_in(a)
    assert backend.accepts(a) and work.shape == (12,) and work.data.ptr == a.data.ptr
    assert cupy.events == ["synchronize"]
    y = np.random.default_rng(1).standard_normal(12).astype(np.float32)
    backend.add(work, cupy.device(y))
    assert cupy.events == ["synchronize", "add", "synchronize"]  # the sum is done before MPI sends it
    backend.stage_out(work, a)
    assert cupy.events == ["synchronize", "add", "synchronize"]  # the result is already in place: no copy
    np.testing.assert_array_equal(a._a, x + y.reshape(3, 4))
    assert backend.result(work) is work


def test_a_strided_array_is_copied_then_waited_for_and_its_result_written_back(cupy):
    backend = device.DeviceBackend()
    parent = np.random.default_rng(2).standard_normal((4, 6))
    whole = parent.copy()
    a = cupy.device(whole)[:, ::2]
    work = backend.stage_in(a)
    assert cupy.events == ["copy", "synchronize"]  # MPI reads the copy once the stream made it
    np.testing.assert_array_equal(work._a, parent[:, ::2].reshape(-1))
    y = np.random.default_rng(3).standard_normal(12)
    backend.add(work, cupy.device(y))
    backend.stage_out(work, a)
    assert cupy.events[-1] == "write"
    want = parent.copy()
    want[:, ::2] += y.reshape(4, 3)
    np.testing.assert_array_equal(whole, want)


def test_staging_reuses_one_pinned_buffer_per_dtype_grown_to_twice_its_size(cupy):
    backend = device.StagedDeviceBackend()
    assert backend.accepts(cupy.device(np.ones(2))) and not backend.accepts(np.ones(2))
    rng = np.random.default_rng(4)
    xs = {n: rng.standard_normal(n) for n in (1000, 10, 1500)}
    first = backend.stage_in(cupy.device(xs[1000]))
    assert isinstance(first, np.ndarray) and np.array_equal(first, xs[1000])
    assert cupy.events.count(("pinned", 8000)) == 1
    small = backend.stage_in(cupy.device(xs[10]))
    assert small.shape == (10,) and np.shares_memory(small, first) and np.array_equal(small, xs[10])
    single = backend.stage_in(cupy.device(rng.standard_normal(6).astype(np.float32)))
    assert single.dtype == np.float32 and not np.shares_memory(single, first)
    np.testing.assert_array_equal(first[:10], xs[10])  # the float32 buffer is another one
    assert [e for e in cupy.events if e[0] == "pinned"] == [("pinned", 8000), ("pinned", 24)]
    large = backend.stage_in(cupy.device(xs[1500]))
    assert large.shape == (1500,) and np.array_equal(large, xs[1500])
    assert cupy.events[-2] == ("pinned", 8 * 2000)  # twice the old size: fewer regrowths
    backend.stage_in(cupy.device(rng.standard_normal(2000)))
    assert [e for e in cupy.events if e[0] == "pinned"][-1] == ("pinned", 16000)


def test_staging_reads_a_strided_array_in_order_and_writes_the_result_back(cupy):
    backend = device.StagedDeviceBackend()
    parent = np.random.default_rng(5).standard_normal((5, 4))
    whole = parent.copy()
    a = cupy.device(whole)[::2, 1:]
    work = backend.stage_in(a)
    np.testing.assert_array_equal(work, parent[::2, 1:].reshape(-1))
    y = np.random.default_rng(6).standard_normal(work.size)
    backend.add(work, y)
    backend.stage_out(work, a)
    want = parent.copy()
    want[::2, 1:] += y.reshape(3, 3)
    np.testing.assert_array_equal(whole, want)


def test_a_staged_result_is_a_device_copy_that_the_next_staging_leaves_alone(cupy):
    backend = device.StagedDeviceBackend()
    x = np.random.default_rng(7).standard_normal(8)
    result = backend.result(backend.stage_in(cupy.device(x)))
    backend.stage_in(cupy.device(np.random.default_rng(8).standard_normal(8)))
    assert isinstance(result, FakeArray) and np.array_equal(result._a, x)


def test_a_staged_sum_past_the_dtype_range_is_inf_without_a_warning(cupy):
    backend = device.StagedDeviceBackend()
    dst, src = np.array([60000.0, -60000.0, 1.5], np.float16), np.array([60000.0, -60000.0, 2.25], np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.add(dst, src)
    np.testing.assert_array_equal(dst, np.array([np.inf, -np.inf, 3.75], np.float16))
    backend.synchronize()  # nothing to wait for
    assert cupy.events == []


@pytest.mark.parametrize("aware,kind", [("1", device.DeviceBackend), ("0", device.StagedDeviceBackend)])
def test_the_backend_that_fits_this_mpi_is_installed_once_for_the_first_cupy_array(cupy, monkeypatch, aware, kind):
    from hpckfac.comm import backend as comm_backend

    monkeypatch.setenv(device.CUDA_AWARE_ENV, aware)
    monkeypatch.setattr(device, "_installed", [])
    before = list(comm_backend._BACKENDS)
    try:
        installed = comm_backend.backend_for(cupy.device(np.ones(3)))
        assert type(installed) is kind
        assert device.install_device_backend() is installed
        assert comm_backend.backend_for(cupy.device(np.ones(2))) is installed
        assert comm_backend._BACKENDS == [installed] + before
    finally:
        comm_backend._BACKENDS[:] = before
    if kind is device.DeviceBackend:  # MPI's float16 sums go through its host-staging twin
        assert type(installed.staged) is device.StagedDeviceBackend and installed.device_memory
    else:
        assert not installed.device_memory
