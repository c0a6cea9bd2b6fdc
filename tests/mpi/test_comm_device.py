"""Collectives on device arrays at any number of ranks: the stand-in device array
(staged through the host, every machine) and CuPy arrays (where a GPU exists;
the backend, CUDA-aware or staged, is picked by the Communicator itself).
Inputs are multiples of the rank count below 2048 / ranks, so sums and means are
exact even in float16: results must equal NumPy's, in the caller's array library."""
import numpy as np
import pytest

import standin
from hpckfac import arrays

try:
    import cupy

    GPU = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # CuPy missing, no driver or no device
    GPU = False

KINDS = ["standin", pytest.param("cupy", marks=pytest.mark.skipif(not GPU, reason="needs CuPy and a GPU"))]
DTYPES = [np.float64, np.float32, np.float16]


@pytest.fixture(params=KINDS)
def device(request):
    """(to_device, namespace) of one device array kind."""
    if request.param == "standin":
        with standin.installed():
            yield standin.to_device, standin.xp
    else:
        cupy.cuda.Device(0).use()
        yield cupy.asarray, cupy


def inputs(seed, size, length, dtype):
    return [(size * np.random.default_rng([seed, r]).integers(-100, 100, length)).astype(dtype) for r in range(size)]


def same(got, want, xp):
    assert arrays.namespace(got) is xp, type(got)
    host = arrays.to_host(got)
    assert host.dtype == want.dtype and np.array_equal(host, want)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_sum_and_mean(comm, device, algorithm, dtype):
    to_device, xp = device
    for seed, length in enumerate((0, 1, comm.size + 1, 1009, 2**18 + 3)):
        xs = inputs(seed, comm.size, length, dtype)
        for op in ("sum", "mean"):
            buf = to_device(xs[comm.rank].copy())
            assert comm.allreduce(buf, op=op, algorithm=algorithm) is buf
            total = np.sum([x.astype(np.float64) for x in xs], axis=0)
            same(buf, (total / (comm.size if op == "mean" else 1)).astype(dtype), xp)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_scatter_v_and_allgather_v(comm, device, algorithm, dtype):
    to_device, xp = device
    size = comm.size
    for seed, counts in enumerate(([5] + [0] * (size - 1), [3 * r + 1 for r in range(size)],
                                   [0] * (size - 1) + [2**17 + 1])):
        xs = inputs(seed, size, sum(counts), dtype)
        lo = sum(counts[:comm.rank])
        mean = np.sum([x.astype(np.float64) for x in xs], axis=0) / size
        seg = comm.reduce_scatter_v(to_device(xs[comm.rank]), counts, op="mean", algorithm=algorithm)
        same(seg, mean[lo:lo + counts[comm.rank]].astype(dtype), xp)
        whole = comm.allgather_v(seg, counts, algorithm=algorithm)
        same(whole, mean.astype(dtype), xp)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_reduce_scatter_v_and_allgather_v_into_a_given_out(comm, device, algorithm):
    """``out=`` on device arrays: the results (staged through the host where MPI cannot reach the
    device's memory) land in the caller's ``out``, which is returned."""
    to_device, xp = device
    size = comm.size
    counts = [3 * r + 1 for r in range(size)]
    xs = inputs(7, size, sum(counts), np.float32)
    lo = sum(counts[:comm.rank])
    mean = (np.sum([x.astype(np.float64) for x in xs], axis=0) / size).astype(np.float32)
    mine = to_device(np.full(counts[comm.rank], np.nan, np.float32))
    assert comm.reduce_scatter_v(to_device(xs[comm.rank]), counts, op="mean", algorithm=algorithm, out=mine) is mine
    same(mine, mean[lo:lo + counts[comm.rank]], xp)
    whole = to_device(np.full(sum(counts), np.nan, np.float32))
    assert comm.allgather_v(mine, counts, algorithm=algorithm, out=whole) is whole
    same(whole, mean, xp)


@pytest.mark.mpi
def test_v_collectives_refuse_an_out_of_another_kind(comm):
    """``out=`` of another array library than the input's (the device array for host input and
    the other way round, or a torch tensor): a TypeError naming ``out`` on every rank, before any
    rank starts the collective."""
    import torch

    counts = [3] * comm.size
    host = np.ones(3 * comm.size, np.float32)
    with standin.installed():
        for send, out in [(host, standin.to_device(np.empty(3, np.float32))),
                          (standin.to_device(host), np.empty(3, np.float32)), (host, torch.empty(3))]:
            with pytest.raises(TypeError, match="^out: "):
                comm.reduce_scatter_v(send, counts, out=out)
        with pytest.raises(TypeError, match="^out: "):
            comm.allgather_v(host[:3], counts, out=standin.to_device(np.empty(3 * comm.size, np.float32)))
        comm.allgather_v(host[:3], counts, out=np.empty(3 * comm.size, np.float32))  # the ranks still agree


@pytest.mark.mpi
def test_fused_allreduce_of_mixed_dtypes(comm, device):
    to_device, xp = device
    shapes, dtypes = [(3, 4), (1000,), (0,), (257, 3), (5,)], [np.float32, np.float64, np.float32, np.float16,
                                                                np.float32]
    xs = [inputs(100 + i, comm.size, int(np.prod(s)), d) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    bufs = [to_device(x[comm.rank].reshape(s).copy()) for x, s in zip(xs, shapes)]
    for algorithm in ("ring", "mpi"):
        comm.allreduce_many(bufs, op="sum", bucket_bytes=4096, algorithm=algorithm)
        for i, (x, d, s) in enumerate(zip(xs, dtypes, shapes)):
            total = np.sum([v.astype(np.float64) for v in x], axis=0) * (comm.size if algorithm == "mpi" else 1)
            same(bufs[i], total.astype(d).reshape(s), xp)


@pytest.mark.mpi
def test_broadcast(comm, device):
    to_device, xp = device
    xs = inputs(7, comm.size, 10007, np.float32)
    buf = to_device(xs[comm.rank].copy())
    comm.broadcast(buf, root=comm.size - 1)
    same(buf, xs[comm.size - 1], xp)


class _AwareBackend:
    """A stand-in for ``DeviceBackend`` (a CUDA-aware MPI): MPI reads and writes the device
    arrays' memory directly (here the wrapped host arrays), so MPI's float16 sum, a Python user
    op that reads host memory, must go through the host-staging twin ``staged``. Records which
    backend staged each buffer."""

    name = "standin-aware"
    xp = np  # the ring's scratch: device memory MPI can reach
    device_memory = True

    def __init__(self, log):
        self.log = log
        self.staged = _Logged(standin.StagedBackend(), log)

    def accepts(self, array):
        return isinstance(array, standin.DeviceArray)

    def stage_in(self, array):
        self.log.append((self.name, array.dtype, array.size))
        return array._a.reshape(-1)  # a flat view: MPI works on the array's own memory

    def stage_out(self, work, array):
        if not np.shares_memory(work, array._a):
            array._a[...] = work.reshape(array.shape)

    def add(self, dst, src):
        np.add(dst, src, out=dst)

    def synchronize(self):
        pass

    def result(self, work):
        return standin.DeviceArray(work)


class _Logged:
    def __init__(self, backend, log):
        self._backend, self.log = backend, log

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def stage_in(self, array):
        self.log.append((self._backend.name, array.dtype, array.size))
        return self._backend.stage_in(array)


@pytest.mark.mpi(min_size=2)
def test_auto_routes_each_bucket_of_a_device_memory_backend(comm):
    """With ``algorithm="auto"`` each bucket picks its own algorithm: on a CUDA-aware backend a
    small float16 bucket, reduced by MPI's user op, goes through the staged twin, while float32
    buckets (MPI's allreduce below 128 KiB per rank, the ring above) stay in device memory."""
    from hpckfac.comm import backend as comm_backend
    from hpckfac.comm.communicator import RING_MIN_CHUNK_BYTES

    log = []
    aware = _AwareBackend(log)
    large = RING_MIN_CHUNK_BYTES * comm.size // 4 + 1  # float32 elements: a ring bucket on its own
    specs = [(np.float16, 33), (np.float32, 5), (np.float32, large)]
    xs = [inputs(200 + i, comm.size, n, d) for i, (d, n) in enumerate(specs)]
    with standin.installed():
        comm_backend.register_backend(aware)
        try:
            bufs = [standin.to_device(x[comm.rank].copy()) for x in xs]
            comm.allreduce_many(bufs, op="mean", bucket_bytes=4 * large, algorithm="auto")
            half = standin.to_device(xs[0][comm.rank].copy())
            comm.allreduce(half, op="sum", algorithm="auto")
        finally:
            comm_backend._BACKENDS.remove(aware)
        for buf, x, (d, _) in zip(bufs, xs, specs):
            same(buf, (np.sum([v.astype(np.float64) for v in x], axis=0) / comm.size).astype(d), standin.xp)
        same(half, np.sum([v.astype(np.float64) for v in xs[0]], axis=0).astype(np.float16), standin.xp)
    assert sorted(log, key=str) == sorted([("standin-staged", np.float16, 33), ("standin-aware", np.float32, 5),
                                           ("standin-aware", np.float32, large),
                                           ("standin-staged", np.float16, 33)], key=str), log


@pytest.mark.mpi(min_size=2)
def test_reduce_scatter_v_routes_mpi_float16_sums_to_the_staged_twin(comm):
    """On a CUDA-aware backend ``reduce_scatter_v`` by MPI sums float16 with MPI's user op, which
    reads host memory: it goes through the staged twin, as the allreduces do, while float32 and
    the ring's float16 sums (our own adds) stay in device memory."""
    from hpckfac.comm import backend as comm_backend

    log = []
    aware = _AwareBackend(log)
    counts = [3 * r + 1 for r in range(comm.size)]
    lo = sum(counts[:comm.rank])
    cases = [(np.float16, "mpi"), (np.float32, "mpi"), (np.float16, "ring")]
    with standin.installed():
        comm_backend.register_backend(aware)
        try:
            for seed, (dtype, algorithm) in enumerate(cases):
                xs = inputs(300 + seed, comm.size, sum(counts), dtype)
                seg = comm.reduce_scatter_v(standin.to_device(xs[comm.rank]), counts, op="mean", algorithm=algorithm)
                mean = np.sum([x.astype(np.float64) for x in xs], axis=0) / comm.size
                same(seg, mean[lo:lo + counts[comm.rank]].astype(dtype), standin.xp)
        finally:
            comm_backend._BACKENDS.remove(aware)
    assert log == [("standin-staged", np.float16, sum(counts)), ("standin-aware", np.float32, sum(counts)),
                   ("standin-aware", np.float16, sum(counts))], log


@pytest.mark.mpi
def test_the_same_device_array_twice_is_refused(comm, device):
    """Device arrays passed twice to ``allreduce_many`` (by their device address) are refused on
    every rank, as host arrays are, and leave the buffers as they were."""
    to_device, xp = device
    x = np.random.default_rng([39, comm.rank]).standard_normal(6)
    buf = to_device(x.copy())
    with pytest.raises(ValueError, match="same memory"):
        comm.allreduce_many([buf, to_device(x.copy()), buf], op="sum")
    np.testing.assert_array_equal(buf.get(), x)
