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
