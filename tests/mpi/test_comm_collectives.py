"""Every collective against NumPy on all ranks' inputs, at any number of ranks.

Each rank's input comes from a generator seeded by (test seed, rank), so every
rank can rebuild every other rank's input without communication: the oracle
does not depend on the code under test.
"""
import numpy as np
import pytest

DTYPES = [np.float64, np.float32, np.float16]


def lengths(size):
    # empty, one element, fewer elements than ranks, primes, and ~4 MB of float32
    return sorted({0, 1, max(size - 1, 0), 2, 3, 7, 13, 97, 1009, 2**20 + 7})


def inputs(seed, size, length, dtype, integer=False):
    """Every rank's input: integer-valued (exact sums in any order) or normal."""
    out = []
    for rank in range(size):
        rng = np.random.default_rng([seed, rank])
        values = rng.integers(-1000, 1000, length) if integer else rng.standard_normal(length)
        out.append(values.astype(dtype))
    return out


def reduce_oracle(xs, op):
    """Sum (or mean) over ranks in float64, and a bound on the rounding of the
    reduced dtype: one rounding per addition and one for the mean."""
    total = np.sum([x.astype(np.float64) for x in xs], axis=0)
    magnitude = np.sum([np.abs(x.astype(np.float64)) for x in xs], axis=0)
    size = len(xs)
    if op == "mean":
        total, magnitude = total / size, magnitude / size
    eps = np.finfo(xs[0].dtype).eps
    return total, (size + 1) * eps * magnitude


def check_reduced(got, xs, op):
    want, bound = reduce_oracle(xs, op)
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound + np.finfo(xs[0].dtype).tiny), f"max error {err.max()} (bound {bound.max()})"


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_integer_valued_float64_is_exact(comm, algorithm, op):
    for seed, length in enumerate(lengths(comm.size)):
        xs = inputs(seed, comm.size, length, np.float64, integer=True)
        got = comm.allreduce(xs[comm.rank].copy(), op=op, algorithm=algorithm)
        want = np.sum(xs, axis=0) / (comm.size if op == "mean" else 1)
        np.testing.assert_array_equal(got, want, err_msg=f"length {length}")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_within_rounding(comm, algorithm, dtype, op):
    for seed, length in enumerate(lengths(comm.size)):
        xs = inputs(100 + seed, comm.size, length, dtype)
        buf = xs[comm.rank].copy()
        assert comm.allreduce(buf, op=op, algorithm=algorithm) is buf
        assert buf.dtype == dtype
        check_reduced(buf, xs, op)


@pytest.mark.mpi
def test_ring_result_is_bit_identical_on_every_rank(comm):
    xs = inputs(7, comm.size, 10007, np.float32)
    buf = comm.allreduce(xs[comm.rank].copy(), op="mean")
    everyone = comm.allgather_object(buf.tobytes())
    assert all(b == everyone[0] for b in everyone)


@pytest.mark.mpi
def test_allreduce_of_strided_and_multidimensional_buffers(comm):
    whole = [np.random.default_rng([11, r]).integers(-50, 50, (6, 10)).astype(np.float32)
             for r in range(comm.size)]
    mine = whole[comm.rank].copy()
    view = mine[:, ::3]  # non-contiguous: staged through a contiguous copy
    comm.allreduce(view)
    want = np.sum(whole, axis=0)
    np.testing.assert_array_equal(mine[:, ::3], want[:, ::3])
    untouched = np.ones(10, bool)
    untouched[::3] = False
    np.testing.assert_array_equal(mine[:, untouched], whole[comm.rank][:, untouched])


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix's own
def test_allreduce_of_an_ndarray_subclass_that_stays_2d(comm, algorithm):
    """A ``np.matrix`` keeps two axes under ``reshape(-1)``: reduced as the plain array it holds,
    in place, with the ranks' sum (the ring's chunks otherwise ran along the wrong axis)."""
    whole = [np.random.default_rng([38, r]).integers(-50, 50, (3, 7)).astype(np.float64)
             for r in range(comm.size)]
    mine = np.asmatrix(whole[comm.rank].copy())
    comm.allreduce(mine, op="sum", algorithm=algorithm)
    np.testing.assert_array_equal(np.asarray(mine), np.sum(whole, axis=0))


def random_counts(rng, size):
    counts = rng.integers(0, 40, size)
    counts[rng.random(size) < 0.4] = 0  # ranks owning nothing
    return [int(c) for c in counts]


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_reduce_scatter_v(comm, dtype, op, algorithm):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        counts = random_counts(rng, comm.size) if seed else [0] * comm.size
        if seed == 1:
            counts[-1] = 2**18 + 3  # a large segment on the last rank
        xs = inputs(200 + seed, comm.size, sum(counts), dtype)
        send = xs[comm.rank].copy()
        got = comm.reduce_scatter_v(send, counts, op=op, algorithm=algorithm)
        np.testing.assert_array_equal(send, xs[comm.rank])  # input left alone
        start = sum(counts[:comm.rank])
        assert got.shape == (counts[comm.rank],) and got.dtype == dtype
        check_reduced(got, [x[start:start + counts[comm.rank]] for x in xs], op)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_reduce_scatter_v_integer_valued_float64_is_exact(comm, algorithm):
    counts = random_counts(np.random.default_rng(3), comm.size)
    xs = inputs(3, comm.size, sum(counts), np.float64, integer=True)
    start = sum(counts[:comm.rank])
    got = comm.reduce_scatter_v(xs[comm.rank], counts, algorithm=algorithm)
    np.testing.assert_array_equal(got, np.sum(xs, axis=0)[start:start + counts[comm.rank]])


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather_v(comm, dtype, algorithm):
    for seed in range(12):
        counts = random_counts(np.random.default_rng(seed), comm.size) if seed else [0] * comm.size
        segments = [np.random.default_rng([300 + seed, r]).standard_normal(counts[r]).astype(dtype)
                    for r in range(comm.size)]
        got = comm.allgather_v(segments[comm.rank], counts, algorithm=algorithm)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, np.concatenate(segments))


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_v_collectives_write_a_given_out(comm, algorithm, op):
    """``out=``: the same values as a new array, written into ``out``, which is returned."""
    counts = random_counts(np.random.default_rng(5), comm.size)
    xs = inputs(5, comm.size, sum(counts), np.float32)
    mine = np.full(counts[comm.rank], np.nan, np.float32)
    got = comm.reduce_scatter_v(xs[comm.rank], counts, op=op, algorithm=algorithm, out=mine)
    assert got is mine
    np.testing.assert_array_equal(mine, comm.reduce_scatter_v(xs[comm.rank], counts, op=op, algorithm=algorithm))
    whole = np.full(sum(counts), np.nan, np.float32)
    assert comm.allgather_v(mine, counts, algorithm=algorithm, out=whole) is whole
    np.testing.assert_array_equal(whole, comm.allgather_v(mine, counts, algorithm=algorithm))


@pytest.mark.mpi
def test_v_collectives_refuse_an_out_that_does_not_fit(comm):
    counts = [3] * comm.size
    send = np.ones(3 * comm.size, np.float32)
    for out, why in [(np.empty(4, np.float32), "contiguous 1-D array of 3"), (np.empty(3, np.float64), "float32"),
                     (np.empty(6, np.float32)[::2], "not contiguous"), (send[:3], "overlaps"),
                     (np.empty((3, 1), np.float32), r"got shape \(3, 1\)")]:
        with pytest.raises(ValueError, match=why):
            comm.reduce_scatter_v(send, counts, out=out)
    with pytest.raises(ValueError, match="overlaps"):
        comm.allgather_v(send[:3], counts, out=send)
    frozen = np.empty(3, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        comm.reduce_scatter_v(send, counts, out=frozen)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast(comm, dtype):
    for seed in range(4):
        root = int(np.random.default_rng(seed).integers(comm.size))
        xs = inputs(400 + seed, comm.size, 257, dtype)
        buf = xs[comm.rank].reshape(1, 257).copy()
        assert comm.broadcast(buf, root=root) is buf
        np.testing.assert_array_equal(buf[0], xs[root])


def many_arrays(seed, size):
    """Per rank: 60 arrays of mixed sizes (empty included), shapes and dtypes."""
    rng = np.random.default_rng(seed)
    shapes = [tuple(rng.integers(0, 6, rng.integers(1, 3))) for _ in range(60)]
    dtypes = [DTYPES[i] for i in rng.integers(0, 3, 60)]
    return [[np.random.default_rng([seed, r, i]).integers(-20, 20, s).astype(d)
             for i, (s, d) in enumerate(zip(shapes, dtypes))] for r in range(size)]


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_bytes", [1, 48, 256, 2**20])
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_allreduce_many(comm, bucket_bytes, algorithm, op):
    everyone = many_arrays(500 + bucket_bytes, comm.size)
    mine = [a.copy() for a in everyone[comm.rank]]
    comm.allreduce_many(mine, op=op, bucket_bytes=bucket_bytes, algorithm=algorithm)
    for i, got in enumerate(mine):
        xs = [arrays[i] for arrays in everyone]
        assert got.shape == xs[0].shape and got.dtype == xs[0].dtype
        check_reduced(got, xs, op)


@pytest.mark.mpi
def test_auto_takes_the_ring_for_large_buckets_and_mpi_for_small_ones(comm, monkeypatch):
    """``algorithm="auto"``: a bucket whose ring messages carry at least RING_MIN_CHUNK_BYTES
    goes around the ring, a smaller one through MPI's allreduce; both sums are exact for
    integer-valued float64, and alike on every rank."""
    from hpckfac.comm import communicator

    large = communicator.RING_MIN_CHUNK_BYTES // 8 * comm.size  # float64 elements
    rings = []
    real = communicator.ring.allreduce
    monkeypatch.setattr(communicator.ring, "allreduce", lambda *a, **kw: rings.append(a[1].size) or real(*a, **kw))
    for length, ring in ((large, True), (large - 1, False), (3, False)):
        xs = inputs(40 + length % 7, comm.size, length, np.float64, integer=True)
        got = comm.allreduce(xs[comm.rank].copy(), op="sum", algorithm="auto")
        np.testing.assert_array_equal(got, np.sum(xs, axis=0))
        assert rings == ([length] if ring and comm.size > 1 else []), length
        rings.clear()
    # Two buckets of one call (two dtypes): each by its own size.
    everyone = [[np.full(large, r + 1.0), np.full(5, r + 1.0, np.float32)] for r in range(comm.size)]
    mine = [a.copy() for a in everyone[comm.rank]]
    comm.allreduce_many(mine, op="mean", algorithm="auto")
    assert rings == ([large] if comm.size > 1 else [])
    for got, xs in zip(mine, zip(*everyone)):
        np.testing.assert_array_equal(got, np.mean(xs, axis=0).astype(got.dtype))
    everyone = comm.allgather_object([a.tobytes() for a in mine])
    assert all(b == everyone[0] for b in everyone)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        comm.reduce_scatter_v(np.ones(comm.size), [1] * comm.size, algorithm="auto")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        comm.allgather_v(np.ones(1), [1] * comm.size, algorithm="auto")


@pytest.mark.mpi
def test_allgather_object_and_barrier(comm):
    comm.barrier()
    assert comm.allgather_object({"rank": comm.rank}) == [{"rank": r} for r in range(comm.size)]


@pytest.mark.mpi
def test_topology(comm):
    from hpckfac.comm.topology import cpu_set, node_placement, visible_gpu_count

    # All ranks of these tests share one node.
    assert comm.local_size == comm.size and comm.local_rank == comm.rank
    local_rank, local_size, cpu_sets = node_placement(comm.mpi)
    assert (local_rank, local_size, len(cpu_sets)) == (comm.rank, comm.size, comm.size)
    assert cpu_sets[local_rank] == cpu_set() and all(isinstance(s, frozenset) and s for s in cpu_sets)
    assert cpu_sets == comm.allgather_object(cpu_set())
    gpus = visible_gpu_count()
    assert comm.device == (comm.local_rank % gpus if gpus else None)


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_v_collectives_of_multidimensional_buffers_return_flat_arrays(comm, algorithm):
    """Whatever the input's shape, reduce_scatter_v returns ``counts[rank]`` elements and
    allgather_v ``sum(counts)``, as 1-D arrays: at one rank as at several."""
    counts = random_counts(np.random.default_rng(21), comm.size)
    counts[-1] += 6 + sum(counts) % 2  # an even total: a (2, n) buffer on every rank
    total = sum(counts)
    xs = inputs(21, comm.size, total, np.float32)
    got = comm.reduce_scatter_v(xs[comm.rank].reshape(2, -1), counts, algorithm=algorithm)
    start = sum(counts[:comm.rank])
    assert got.shape == (counts[comm.rank],)
    check_reduced(got, [x[start:start + counts[comm.rank]] for x in xs], "sum")
    segments = [np.random.default_rng([22, r]).standard_normal((1, counts[r])) for r in range(comm.size)]
    whole = comm.allgather_v(segments[comm.rank], counts, algorithm=algorithm)
    assert whole.shape == (total,)
    np.testing.assert_array_equal(whole, np.concatenate(segments, axis=1)[0])


@pytest.mark.mpi
@pytest.mark.parametrize("bucket_bytes", [1, 2**20])
def test_allreduce_many_refuses_overlapping_views_and_sums_interleaved_ones(comm, bucket_bytes):
    """Views of one gradient that overlap without starting at the same element (``g[:n]`` and
    ``g[k:m]``) would have their shared elements summed again from summed values: refused on
    every rank before any data moves. Views that interleave without sharing an element
    (``g[::2]``, ``g[1::2]``) are summed like separate arrays."""
    cases = np.random.default_rng(41)  # the same cases on every rank
    for seed in range(20):
        length = int(cases.integers(4, 300))
        first = sorted(int(i) for i in cases.choice(length + 1, 2, replace=False))
        start = int(cases.integers(first[0], first[1]))  # inside the first view: they overlap
        second = [start, int(cases.integers(start + 1, length + 1))]
        xs = inputs(4100 + seed, comm.size, length, np.float64)
        grad = xs[comm.rank].copy()
        views = [grad[first[0]:first[1]], grad[second[0]:second[1]]]
        with pytest.raises(ValueError, match=r"arrays\[0\] and arrays\[1\] are the same memory"):
            comm.allreduce_many(views[::-1] if seed % 2 else views, op="sum", bucket_bytes=bucket_bytes)
        np.testing.assert_array_equal(grad, xs[comm.rank])  # nothing moved
        comm.allreduce_many([grad[1::2], grad[::2]], op="sum", bucket_bytes=bucket_bytes)
        check_reduced(grad, xs, "sum")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_v_collectives_given_out_allocate_no_result(comm, algorithm):
    """With ``out=`` the result is received there: no array of the result's size is made and
    copied from (the values would be the same). The ring's reduce-scatter sums a copy of its
    input in place, receiving each segment into a scratch buffer, which it may allocate."""
    import tracemalloc

    counts = [50_000 + 7 * r for r in range(comm.size)]
    xs = inputs(11, comm.size, sum(counts), np.float32, integer=True)
    send = xs[comm.rank]
    mine, whole = np.empty(counts[comm.rank], np.float32), np.empty(sum(counts), np.float32)
    ring_work = send.nbytes + send.itemsize * max(counts) if algorithm == "ring" and comm.size > 1 else 0
    for call, work in [(lambda: comm.reduce_scatter_v(send, counts, algorithm=algorithm, out=mine), ring_work),
                       (lambda: comm.allgather_v(mine, counts, algorithm=algorithm, out=whole), 0)]:
        call()  # any first-call set-up outside the measure
        tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            call()
            peak = tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
        assert peak < work + mine.nbytes // 4, (peak, work, mine.nbytes)
    np.testing.assert_array_equal(whole, np.sum(xs, axis=0))
