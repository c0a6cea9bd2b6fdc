"""hpckfac.comm in a world of one process (plain ``python``/``pytest``, no mpiexec):
properties, in-place semantics, and argument validation."""
import pickle

import ml_dtypes
import numpy as np
import pytest
from mpi4py import MPI

from hpckfac.comm import CollectiveMismatchError, Communicator
from hpckfac.comm.dtypes import mpi_type, sum_op
from hpckfac.comm.topology import visible_gpu_count

DTYPES = [np.float64, np.float32, np.float16]


@pytest.fixture(params=[True, "on_change", False], ids=["checked", "on_change", "unchecked"])
def comm(request):
    return Communicator(check_agreement=request.param)


class SpyMPI:
    """Forwards to a real communicator and records the names of the calls made."""

    def __init__(self, mpi):
        self._mpi, self.calls = mpi, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self._mpi, name)


def test_world_of_one(comm):
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    assert comm.mpi is MPI.COMM_WORLD
    assert comm.device == (0 if visible_gpu_count() else None)
    assert "size=1" in repr(comm)


def test_wraps_a_given_communicator():
    sub = MPI.COMM_WORLD.Dup()
    try:
        assert Communicator(sub).mpi is sub
    finally:
        sub.Free()
    with pytest.raises(TypeError, match="mpi_comm"):
        Communicator("world")


def test_a_null_communicator_is_named():
    """A rank left out of a Split (color MPI.UNDEFINED), or a communicator freed since, holds
    MPI.COMM_NULL: named as such, not MPI's "Invalid communicator" from inside the constructor;
    the constant MPI.COMM_NULL itself (a plain Comm, not an Intracomm) too, not as a wrong type."""
    left_out = MPI.COMM_SELF.Split(MPI.UNDEFINED)
    freed = MPI.COMM_SELF.Dup()
    freed.Free()
    for null in (left_out, freed, MPI.COMM_NULL):
        with pytest.raises(ValueError, match=r"mpi_comm: MPI.COMM_NULL \(this rank is not in it"):
            Communicator(null)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_is_identity_in_place(comm, dtype, algorithm, op):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(dtype)
    want = x.copy()
    assert comm.allreduce(x, op=op, algorithm=algorithm) is x
    np.testing.assert_array_equal(x, want)


def test_allreduce_many_leaves_values(comm):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(n).astype(d) for n, d in zip([0, 3, 7, 1], DTYPES + [np.float64])]
    want = [a.copy() for a in arrays]
    comm.allreduce_many(arrays, bucket_bytes=16)
    comm.allreduce_many([])
    for got, expected in zip(arrays, want):
        np.testing.assert_array_equal(got, expected)


def test_a_world_of_one_stages_nothing(comm, monkeypatch):
    """Over one rank the collectives leave their buffers where they are: staged, a GPU buffer
    would wait for the device's queue and travel to the host and back for nothing (every
    gradient of a one-GPU SGD step, a K-FAC step's presence flags)."""
    from hpckfac.comm import backend

    def refuse(*args):
        raise AssertionError("staged")

    monkeypatch.setattr(backend.HostBackend, "stage_in", refuse)
    x, y = np.arange(4.0), np.ones(3, dtype=np.float32)
    assert comm.allreduce(x, op="mean") is x and comm.broadcast(x) is x
    comm.allreduce_many([x, y], op="mean", bucket_bytes=16)
    np.testing.assert_array_equal(x, np.arange(4.0))
    np.testing.assert_array_equal(y, np.ones(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_v_collectives_return_new_arrays(comm, dtype):
    x = np.random.default_rng(2).standard_normal(9).astype(dtype)
    seg = comm.reduce_scatter_v(x, [9], op="mean")
    assert not np.shares_memory(seg, x) and seg.dtype == dtype
    np.testing.assert_array_equal(seg, x)
    whole = comm.allgather_v(seg, [9])
    assert not np.shares_memory(whole, seg)
    np.testing.assert_array_equal(whole, x)
    assert comm.reduce_scatter_v(x[:0], [0]).shape == (0,)


def test_broadcast_object_and_check_same(comm):
    x = np.arange(4.0)
    assert comm.broadcast(x) is x
    assert comm.allgather_object(("a", 1)) == [("a", 1)]
    comm.check_same({"lr": 0.1}, "settings")
    comm.barrier()
    with pytest.raises(TypeError, match="settings"):
        comm.check_same(lambda: None, "settings")


def test_half_precision_sum_op_adds_in_float16():
    a = np.array([1.0, 2048.0, -3.5], np.float16)
    b = np.array([0.5, 1.0, 3.5], np.float16)
    sum_op(np.float16).Reduce_local([a, mpi_type(np.float16)], [b, mpi_type(np.float16)])
    # 2048 + 1 rounds to 2048 in float16: the sum really is done in float16.
    np.testing.assert_array_equal(b, np.array([1.5, 2048.0, 0.0], np.float16))
    assert sum_op(np.float32) == MPI.SUM


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.complex64, ml_dtypes.bfloat16])
def test_unsupported_dtype_is_a_type_error_naming_it(comm, bad):
    x = np.ones(3, dtype=bad)
    name = np.dtype(bad).name
    for call in (lambda: comm.allreduce(x), lambda: comm.allreduce_many([np.ones(2), x]),
                 lambda: comm.reduce_scatter_v(x, [3]), lambda: comm.allgather_v(x, [3]),
                 lambda: comm.broadcast(x)):
        with pytest.raises(TypeError, match=name):
            call()


def test_unsupported_buffer_type(comm):
    with pytest.raises(TypeError, match="list"):
        comm.allreduce([1.0, 2.0])


def test_mixed_array_kinds_in_allreduce_many_are_a_type_error_before_any_data_moves(comm):
    """Host and device arrays in one ``allreduce_many``, whose buckets all run through one
    backend: a TypeError naming both kinds, at one rank as at several, after at most the
    agreement check."""
    import standin

    spy = SpyMPI(comm.mpi)
    comm.mpi = spy
    rng = np.random.default_rng(47)
    with standin.installed():
        with pytest.raises(TypeError, match=r"mixed types \['numpy', 'standin-staged'\]"):
            comm.allreduce_many([rng.standard_normal(3), standin.to_device(rng.standard_normal(2))])
    assert spy.calls == (["Allreduce"] if comm.check_agreement != "off" else [])


DUPLICATE = np.random.default_rng(36).standard_normal(6)  # passed twice to allreduce_many


@pytest.mark.parametrize("call,match", [
    (lambda c: c.allreduce(np.ones(2), op="max"), "op.*'max'"),
    (lambda c: c.allreduce(np.ones(2), algorithm="tree"), "algorithm.*'tree'"),
    (lambda c: c.allreduce_many([np.ones(2)], op="prod"), "'prod'"),
    (lambda c: c.allreduce_many([np.ones(2)], algorithm="nccl"), "'nccl'"),
    (lambda c: c.allreduce_many([np.ones(2)], bucket_bytes=0), "bucket_bytes"),
    (lambda c: c.allreduce_many([np.ones(2)], bucket_bytes=2**63), "bucket_bytes"),
    (lambda c: c.allreduce_many([DUPLICATE, np.ones(3), DUPLICATE]), r"arrays\[0\] and arrays\[2\] are the same"),
    (lambda c: c.allreduce_many([DUPLICATE.reshape(2, 3), DUPLICATE]), r"arrays\[0\] and arrays\[1\] are the same"),
    (lambda c: c.reduce_scatter_v(np.ones(4), [3]), "counts sum to 3 but sendbuf holds 4"),
    (lambda c: c.reduce_scatter_v(np.ones(4), [4, 0]), "one entry per rank"),
    (lambda c: c.reduce_scatter_v(np.ones(4), [[4]]), "one entry per rank"),  # the right size, but 2-D
    (lambda c: c.allgather_v(np.ones(4), [[4]]), "one entry per rank"),
    (lambda c: c.reduce_scatter_v(np.ones(0), [-1]), "non-negative"),
    (lambda c: c.reduce_scatter_v(np.ones(4), [4.0]), "non-negative integers"),
    (lambda c: c.reduce_scatter_v(np.ones(4), [4], op="min"), "'min'"),
    (lambda c: c.reduce_scatter_v(np.ones(4), [4], algorithm="tree"), "'tree'"),
    (lambda c: c.allgather_v(np.ones(4), [4], algorithm="tree"), "'tree'"),
    (lambda c: c.allgather_v(np.ones(2), [3]), r"segment holds 2 elements but counts\[0\] is 3"),
    (lambda c: c.broadcast(np.ones(2), root=1), "root"),
    (lambda c: c.broadcast(np.ones(2), root=-1), "root"),
])
def test_bad_arguments_are_value_errors_before_any_data_moves(comm, call, match):
    spy = SpyMPI(comm.mpi)
    comm.mpi = spy
    with pytest.raises(ValueError, match=match):
        call(comm)
    # At most the agreement check's small allreduce (so that peers can raise too).
    assert spy.calls == (["Allreduce"] if comm.check_agreement != "off" else [])


def test_error_class():
    assert issubclass(CollectiveMismatchError, RuntimeError)


def test_import_needs_no_gpu():
    import subprocess
    import sys

    code = "import hpckfac.comm, sys; print('cupy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("value,seconds", [("2.5", 2.5), ("abc", 60.0), ("-5", 60.0), ("nan", 60.0), ("0", 60.0)])
def test_wait_notice_setting(monkeypatch, caplog, value, seconds):
    from hpckfac.comm.communicator import WAIT_NOTICE_ENV, _wait_notice_seconds

    monkeypatch.setenv(WAIT_NOTICE_ENV, value)
    with caplog.at_level("WARNING", logger="hpckfac"):
        assert _wait_notice_seconds() == seconds
    assert (f"{WAIT_NOTICE_ENV}={value!r}: expected a number of seconds > 0" in caplog.text) == (seconds == 60.0)


@pytest.mark.parametrize("pick", [
    lambda g: [g[:5], g[:3]],  # the same start, another length
    lambda g: [g[0:6], g[3:9]],  # overlapping runs
    lambda g: [g[2:], g[::-1]],  # a reversed view of the whole
    lambda g: [g.reshape(2, 6)[:, 1:4], g[8:10]],  # a block of a 2-D view and a run inside it
    lambda g: [g[::3], g[6:7]],  # a strided view and one element it holds
    lambda g: [g[:3], g[::-1]],  # a reversed view, whose first element is the last in memory
    lambda g: [g[0:6], g[5:9]],  # runs sharing one element, the last of the first
])
def test_overlapping_views_in_allreduce_many_are_refused(comm, pick):
    grad = np.random.default_rng(43).standard_normal(12)
    before = grad.copy()
    with pytest.raises(ValueError, match=r"arrays\[0\] and arrays\[1\] are the same memory in part"):
        comm.allreduce_many(pick(grad), op="sum")
    np.testing.assert_array_equal(grad, before)


def test_interleaved_views_in_allreduce_many_are_not_refused(comm):
    grad = np.random.default_rng(44).standard_normal(12)
    before = grad.copy()
    blocks = grad.reshape(3, 4)
    comm.allreduce_many([grad[::2], grad[1::2]], op="sum")  # no element shared
    comm.allreduce_many([blocks[:, :2], blocks[:, 2:], blocks[:0]], op="sum")
    np.testing.assert_array_equal(grad, before)  # the sum over one rank


def test_check_same_fallback_takes_nan_as_equal():
    """The comparison ``check_same`` falls back to when pickles differ agrees with the digest,
    which passes equal NaNs: NaN matches NaN at any depth, other values by ``==``."""
    from collections import OrderedDict

    from hpckfac.comm.communicator import _same

    rng = np.random.default_rng(46)
    for _ in range(50):
        values = [float("nan") if rng.random() < 0.5 else float(rng.standard_normal()) for _ in range(5)]
        shuffled = [values[i] for i in rng.permutation(5)]
        a = {"x": values, "y": tuple(values), "z": {str(i): v for i, v in enumerate(values)}}
        b = {"z": {str(i): values[i] for i in reversed(range(5))}, "y": tuple(values), "x": list(values)}
        assert _same(a, b) and _same(values, list(values)) and _same(np.float64("nan"), float("nan"))
        # Another rank's value arrives unpickled: its NaNs are other objects, which == inside a
        # dict or list does not take as equal (it tries identity first).
        assert _same(a, pickle.loads(pickle.dumps(b))) and _same(values, pickle.loads(pickle.dumps(values)))
        assert _same(np.float32("nan"), np.float32("nan")) and _same([np.float16("nan")], [float("nan")])
        want = all(np.isnan(u) and np.isnan(v) or u == v for u, v in zip(values, shuffled))
        assert _same(values, shuffled) == want
        assert not _same({"x": values}, {"x": values + [float("nan")]})
    assert not _same([float("nan")], (float("nan"),))  # a list is not a tuple, as for ==
    assert not _same(OrderedDict(a=1, b=2), OrderedDict(b=2, a=1))  # ordered, as for ==
    assert not _same(float("nan"), 1.0) and not _same(None, float("nan"))
