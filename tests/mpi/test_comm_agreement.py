"""Ranks that disagree about a collective get CollectiveMismatchError on every rank
(never a hang), and the communicator keeps working afterwards."""
import time

import numpy as np
import pytest

from hpckfac.comm import CollectiveMismatchError, Communicator
from liveness import LIVENESS_S


def odd_one_out(comm):
    """True on the last rank when there is someone to disagree with."""
    return comm.size > 1 and comm.rank == comm.size - 1


def expect_mismatch(comm, call, match):
    """``call()`` raises CollectiveMismatchError matching ``match`` on every rank,
    promptly; at one rank (nobody to disagree with) it just succeeds."""
    start = time.perf_counter()
    if comm.size == 1:
        call()
        return
    with pytest.raises(CollectiveMismatchError, match=match):
        call()
    elapsed = time.perf_counter() - start
    # The next collective runs before the time is judged: a rank failing here first would skip it
    # and leave every later collective of the session paired with the wrong call.
    still_works(comm)
    assert elapsed < LIVENESS_S


def still_works(comm):
    """No stray messages were left behind: the next collective is correct."""
    buf = np.full(5, comm.rank + 1.0)
    np.testing.assert_array_equal(comm.allreduce(buf), np.full(5, comm.size * (comm.size + 1) / 2))


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_allreduce_lengths_differ(comm, algorithm):
    n = 11 if odd_one_out(comm) else 10
    expect_mismatch(comm, lambda: comm.allreduce(np.ones(n), algorithm=algorithm),
                    rf"allreduce.*length \(10 on ranks .*11 on ranks \[{comm.size - 1}\]")


@pytest.mark.mpi
def test_allreduce_dtypes_differ(comm):
    dtype = np.float32 if odd_one_out(comm) else np.float64
    expect_mismatch(comm, lambda: comm.allreduce(np.ones(4, dtype)), "dtype.*float32")


@pytest.mark.mpi
@pytest.mark.parametrize("call", ["reduce_scatter_v", "allgather_v", "broadcast"])
def test_dtypes_differ(comm, call):
    """The same number of elements of another dtype on one rank: other bytes on the wire."""
    dtype = np.float32 if odd_one_out(comm) else np.float64
    x = np.random.default_rng([35, comm.rank]).standard_normal(2 * comm.size).astype(dtype)
    run = {"reduce_scatter_v": lambda: comm.reduce_scatter_v(x, [2] * comm.size),
           "allgather_v": lambda: comm.allgather_v(x[:2], [2] * comm.size),
           "broadcast": lambda: comm.broadcast(x)}[call]
    expect_mismatch(comm, run, rf"{call}: ranks disagree on dtype \(float64 on ranks \[.*\]; "
                               rf"float32 on ranks \[{comm.size - 1}\]\)")


@pytest.mark.mpi
def test_allreduce_algorithms_differ(comm):
    algorithm = "mpi" if odd_one_out(comm) else "ring"
    expect_mismatch(comm, lambda: comm.allreduce(np.ones(4), algorithm=algorithm), "algorithm")


@pytest.mark.mpi
@pytest.mark.parametrize("call", ["allreduce", "allreduce_many", "reduce_scatter_v"])
def test_ops_differ(comm, call):
    """One rank takes the mean where the others take the sum: every rank sends the same
    messages, so only the check tells, instead of that rank alone ending with other values."""
    x = np.random.default_rng([33, comm.rank]).standard_normal(2 * comm.size + 1)
    op = "mean" if odd_one_out(comm) else "sum"
    run = {"allreduce": lambda: comm.allreduce(x, op=op),
           "allreduce_many": lambda: comm.allreduce_many([x[:3], x[3:]], op=op, bucket_bytes=16),
           "reduce_scatter_v": lambda: comm.reduce_scatter_v(x, [2] * (comm.size - 1) + [3], op=op)}[call]
    expect_mismatch(comm, run, rf"{call}: ranks disagree on op \(sum on ranks \[.*\]; "
                               rf"mean on ranks \[{comm.size - 1}\]\)")


@pytest.mark.mpi
def test_different_collectives(comm):
    buf = np.ones(4)
    call = (lambda: comm.broadcast(buf)) if odd_one_out(comm) else (lambda: comm.allreduce(buf))
    expect_mismatch(comm, call, r"the call \(.*broadcast on ranks")


@pytest.mark.mpi
def test_reduce_scatter_v_counts_differ(comm):
    counts = [2] * comm.size
    if odd_one_out(comm):
        counts[0], counts[-1] = 1, 3  # same total, different split
    expect_mismatch(comm, lambda: comm.reduce_scatter_v(np.ones(2 * comm.size), counts), "layout")


@pytest.mark.mpi
def test_allgather_v_segment_does_not_match_counts(comm):
    counts = [3] * comm.size
    segment = np.ones(4 if odd_one_out(comm) else 3)
    if comm.size == 1:
        comm.allgather_v(segment, counts)
    elif odd_one_out(comm):
        with pytest.raises(ValueError, match=r"counts\[%d\]" % comm.rank):
            comm.allgather_v(segment, counts)
    else:
        with pytest.raises(CollectiveMismatchError, match=rf"rejected .* on ranks \[{comm.size - 1}\]"):
            comm.allgather_v(segment, counts)


@pytest.mark.mpi
def test_one_rank_with_a_bad_op(comm):
    op = "max" if odd_one_out(comm) else "sum"
    if odd_one_out(comm):
        with pytest.raises(ValueError, match="'max'"):
            comm.allreduce(np.ones(3), op=op)
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.allreduce(np.ones(3), op=op), "arguments")


@pytest.mark.mpi
def test_one_rank_with_a_bucket_size_past_int64(comm):
    """A bucket_bytes the agreement check cannot carry (2**63 or more) is a bad argument like a
    non-positive one: ValueError on that rank, its peers told, not an OverflowError there alone."""
    arrays = [np.random.default_rng([31, comm.rank]).standard_normal(5)]
    huge = odd_one_out(comm) or comm.size == 1
    bucket_bytes = 2**63 if huge else 2**20
    if huge:
        with pytest.raises(ValueError, match="bucket_bytes"):
            comm.allreduce_many(arrays, bucket_bytes=bucket_bytes)
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.allreduce_many(arrays, bucket_bytes=bucket_bytes), "arguments")


@pytest.mark.mpi
def test_one_rank_passing_allreduce_many_no_sequence(comm):
    """``arrays`` that cannot be listed (None) is a bad argument like any other: TypeError on that
    rank after the agreement check, its peers told, and the next collective pairs up again."""
    arrays = [np.random.default_rng([32, comm.rank]).standard_normal(4)]
    bad = odd_one_out(comm) or comm.size == 1
    if bad:
        with pytest.raises(TypeError):
            comm.allreduce_many(None)
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.allreduce_many(arrays), "arguments")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_counts_summing_past_int64_are_refused(comm, algorithm):
    """Counts that sum to 2**64 (0 in int64) are a ValueError on every rank before any data
    moves, not taken for the counts of an empty buffer."""
    counts = [2**64 // comm.size] * comm.size
    counts[-1] += 2**64 % comm.size
    with pytest.raises(ValueError, match="counts"):
        comm.reduce_scatter_v(np.empty(0), counts, algorithm=algorithm)
    still_works(comm)


@pytest.mark.mpi
@pytest.mark.parametrize("call", ["allreduce", "allreduce_many", "broadcast"])
def test_one_rank_with_a_read_only_buffer(comm, call):
    buf = np.ones(4)
    if odd_one_out(comm):
        buf.flags.writeable = False
    run = {"allreduce": lambda: comm.allreduce(buf), "allreduce_many": lambda: comm.allreduce_many([np.ones(2), buf]),
           "broadcast": lambda: comm.broadcast(buf)}[call]
    if odd_one_out(comm):
        with pytest.raises(ValueError, match="read-only"):
            run()
        still_works(comm)
    else:
        expect_mismatch(comm, run, "arguments")


@pytest.mark.mpi
def test_allgather_v_algorithms_differ(comm):
    algorithm = "ring" if odd_one_out(comm) else "mpi"
    expect_mismatch(comm, lambda: comm.allgather_v(np.ones(2), [2] * comm.size, algorithm=algorithm),
                    "algorithm")


@pytest.mark.mpi
def test_reduce_scatter_v_algorithms_differ(comm):
    x = np.random.default_rng([34, comm.rank]).standard_normal(2 * comm.size)
    algorithm = "ring" if odd_one_out(comm) else "mpi"
    expect_mismatch(comm, lambda: comm.reduce_scatter_v(x, [2] * comm.size, algorithm=algorithm),
                    r"reduce_scatter_v: ranks disagree on algorithm \(mpi on ranks .*ring on ranks")


@pytest.mark.mpi
def test_broadcast_roots_differ(comm):
    root = comm.size - 1 if odd_one_out(comm) else 0
    expect_mismatch(comm, lambda: comm.broadcast(np.ones(3), root=root),
                    rf"broadcast: ranks disagree on root \(0 on ranks \[.*\]; {comm.size - 1} on ranks \[{comm.size - 1}\]\)")


@pytest.mark.mpi
def test_allreduce_many_layouts_differ(comm):
    arrays = [np.ones(3), np.ones(4, np.float32)] + ([np.ones(1)] if odd_one_out(comm) else [])
    expect_mismatch(comm, lambda: comm.allreduce_many(arrays, bucket_bytes=64), "allreduce_many")


@pytest.mark.mpi
def test_allreduce_many_splits_of_one_length_differ(comm):
    """The same dtype and total length cut into arrays of other sizes on one rank: one bucket of
    the same bytes on every rank, so only the arrays' sizes tell the calls apart."""
    sizes = [4, 3] if odd_one_out(comm) else [3, 4]
    arrays = [np.ones(n) for n in sizes]
    expect_mismatch(comm, lambda: comm.allreduce_many(arrays, bucket_bytes=64), "layout")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_allreduce_many_dtypes_of_one_layout_differ(comm, algorithm):
    """The same sizes, in the same order, with the dtypes of two arrays swapped on one rank: the
    same total length and bucket plan there, so only the arrays' dtypes tell the calls apart."""
    rng = np.random.default_rng([37, comm.rank])
    dtypes = [np.float32, np.float64] if odd_one_out(comm) else [np.float64, np.float32]
    arrays = [rng.standard_normal(n).astype(d) for n, d in zip([3, 4], dtypes)]
    expect_mismatch(comm, lambda: comm.allreduce_many(arrays, bucket_bytes=64, algorithm=algorithm),
                    "allreduce_many: ranks disagree on layout")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_allreduce_many_bucket_sizes_differ(comm, algorithm):
    """The same arrays under another bucket size on one rank: fused into one buffer there, one
    buffer per array on the others."""
    rng = np.random.default_rng([36, comm.rank])
    arrays = [rng.standard_normal(3), rng.standard_normal(4)]
    bucket_bytes = 64 if odd_one_out(comm) else 32
    expect_mismatch(comm, lambda: comm.allreduce_many(arrays, bucket_bytes=bucket_bytes, algorithm=algorithm),
                    rf"allreduce_many: ranks disagree on bucket_bytes \(32 on ranks \[.*\]; "
                    rf"64 on ranks \[{comm.size - 1}\]\)")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_allgather_v_counts_differ(comm, algorithm):
    """Rank 0 passes another split of the same total, its own segment matching it: only the
    counts tell the calls apart (each rank's segment fits its own counts)."""
    counts = [2] * comm.size
    if comm.size > 1 and comm.rank == 0:
        counts[0], counts[-1] = 1, 3
    segment = np.ones(counts[comm.rank])
    expect_mismatch(comm, lambda: comm.allgather_v(segment, counts, algorithm=algorithm), "layout")


@pytest.mark.mpi
def test_check_same(comm):
    comm.check_same({"lr": 0.1, "layers": [3, 4]}, "settings")
    # Equal sets of strings may pickle in different orders on different ranks.
    comm.check_same({f"layer{i}" for i in range(20)}, "layer names")
    # Dicts: only the entries that differ are named, with each differing rank's value.
    value = {"damping": 0.01, "lr": 0.2 if odd_one_out(comm) else 0.1}
    expect_mismatch(comm, lambda: comm.check_same(value, "settings"),
                    rf"ranks disagree on settings: lr: rank 0 has 0.1, rank {comm.size - 1} has 0.2$")
    value = [0.2 if odd_one_out(comm) else 0.1]
    expect_mismatch(comm, lambda: comm.check_same(value, "values"),
                    rf"ranks disagree on values: rank 0 has \[0.1\], rank {comm.size - 1} has \[0.2\]$")


@pytest.mark.mpi
def test_check_same_takes_nan_as_equal_where_values_pickle_differently(comm):
    """Equal settings whose pickles differ (a dict built in another order on each rank) are
    compared value by value; a NaN there is the same setting as on the other ranks, as it is
    where the pickles match, and a value that does differ is still named."""
    rng = np.random.default_rng(45)  # the same settings on every rank
    for case in range(10):
        names = [f"s{i}" for i in range(int(rng.integers(2, 9)))]
        values = [float("nan") if rng.random() < 0.4 else float(rng.standard_normal()) for _ in names]
        values[0] = float("nan")
        nested = {"nested": [float("nan"), (1.0, float("nan"))]}
        order = np.random.default_rng([45, case, comm.rank]).permutation(len(names))  # per rank
        settings = {names[i]: values[i] for i in order} | nested
        comm.check_same(settings, "settings")
        comm.check_same([float("nan"), settings], "a list of settings")
        finite = [i for i, v in enumerate(values) if not np.isnan(v)]
        if not finite:
            continue
        changed = names[finite[0]]
        if odd_one_out(comm):
            settings[changed] += 1.0
        expect_mismatch(comm, lambda: comm.check_same(settings, "settings"),
                        rf"ranks disagree on settings: {changed}: rank 0 has .*, rank {comm.size - 1} has ")


@pytest.mark.mpi
def test_agreement_check_can_be_switched_off(comm):
    quiet = Communicator(comm.mpi, check_agreement=False)
    xs = [np.random.default_rng([9, r]).integers(-9, 9, 31).astype(np.float64) for r in range(comm.size)]
    np.testing.assert_array_equal(quiet.allreduce(xs[comm.rank].copy()), np.sum(xs, axis=0))
    with pytest.raises(ValueError, match="counts"):  # every rank, with no communication
        quiet.reduce_scatter_v(np.ones(3), [4] * comm.size)


class CountingMPI:
    """An mpi4py communicator that counts its Allreduce calls (the agreement checks here)."""

    def __init__(self, mpi) -> None:
        self._mpi, self.allreduces = mpi, 0

    def __getattr__(self, name):
        if name == "Allreduce":
            self.allreduces += 1
        return getattr(self._mpi, name)


@pytest.mark.mpi
def test_on_change_checks_each_new_call_once_and_still_catches_disagreement(comm):
    steady = Communicator(comm.mpi, check_agreement="on_change")
    counting = steady.mpi = CountingMPI(comm.mpi)
    xs = [np.random.default_rng([11, r]).standard_normal(64) for r in range(comm.size)]
    counts = [3 + r for r in range(comm.size)]
    for repeat in range(3):
        np.testing.assert_allclose(steady.reduce_scatter_v(xs[comm.rank][:sum(counts)].copy(), counts),
                                   np.sum(xs, axis=0)[:sum(counts)][sum(counts[:comm.rank]):][:counts[comm.rank]])
        whole = steady.allgather_v(np.full(counts[comm.rank], float(comm.rank)), counts)
        np.testing.assert_array_equal(whole, np.repeat(np.arange(comm.size, dtype=float), counts))
        if repeat == 0:
            checks = counting.allreduces
    # The two calls were checked the first time only (one small allreduce each, at any rank count).
    assert checks == 2 and counting.allreduces == 2
    # A new shape is checked again, and a disagreement there still raises on every rank.
    n = 12 if odd_one_out(comm) else 10
    expect_mismatch(comm, lambda: steady.allgather_v(np.ones(n), [n] * comm.size if not odd_one_out(comm)
                                                     else [10] * (comm.size - 1) + [12]), "allgather_v")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["ring", "mpi"])
def test_on_change_refuses_a_disagreement_each_time_it_is_made(comm, algorithm):
    """A call the ranks disagreed on is not remembered as agreed: made again, it is checked and
    refused again rather than run unchecked with buffers of other lengths."""
    steady = Communicator(comm.mpi, check_agreement="on_change")
    x = np.random.default_rng([39, comm.rank]).standard_normal(11 if odd_one_out(comm) else 10)
    for _ in range(2):
        expect_mismatch(comm, lambda: steady.allreduce(x.copy(), algorithm=algorithm),
                        r"allreduce: ranks disagree on length \(10 on ranks")


@pytest.mark.mpi
def test_a_named_object_gather_that_cannot_pickle_fails_on_every_rank(comm):
    """The rank whose object cannot be pickled raises TypeError; the others are told instead of
    waiting for it in the exchange; the communicator stays usable. At one rank the same errors."""
    import threading

    assert comm.allgather_object({"rank": comm.rank}, what="report()") == [{"rank": r} for r in range(comm.size)]
    if odd_one_out(comm) or comm.size == 1:
        with pytest.raises(TypeError, match="report\\(\\): the object to gather is not picklable"):
            comm.allgather_object(threading.Lock(), what="report()")
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.allgather_object(1, what="report()"), "report\\(\\): ranks disagree")
    with pytest.raises(TypeError, match="what must be a string"):
        comm.allgather_object(1, what=5)


@pytest.mark.mpi
def test_numpy_integers_are_integers(comm):
    buf = np.full(3, float(comm.rank))
    comm.broadcast(buf, root=np.int64(comm.size - 1))
    np.testing.assert_array_equal(buf, np.full(3, comm.size - 1.0))
    arrays = [np.full(4, 1.0), np.full(2, 2.0)]
    comm.allreduce_many(arrays, op="sum", bucket_bytes=np.int64(16))
    np.testing.assert_array_equal(arrays[1], np.full(2, 2.0 * comm.size))


@pytest.mark.mpi
@pytest.mark.parametrize("odd", ["off", "on_change", "never"])
def test_communicators_with_other_check_modes_fail_on_every_rank(comm, odd):
    """A rank that checks agreement waits in each check for the ranks that do not: modes that
    differ (or one that is invalid) raise at construction on every rank instead."""
    if comm.size == 1:
        if odd == "never":
            with pytest.raises(ValueError, match="check_agreement"):
                Communicator(comm.mpi, check_agreement=odd)
        else:
            assert Communicator(comm.mpi, check_agreement=odd).check_agreement == odd
        return
    mode = odd if odd_one_out(comm) else "always"
    if odd == "never" and odd_one_out(comm):
        with pytest.raises(ValueError, match="check_agreement"):
            Communicator(comm.mpi, check_agreement=mode)
    else:
        with pytest.raises(CollectiveMismatchError, match=rf"check_agreement \(rank 0: always;.* rank {comm.size - 1}: "
                                                          rf"{'invalid' if odd == 'never' else odd}\)"):
            Communicator(comm.mpi, check_agreement=mode)
    still_works(comm)


@pytest.mark.mpi(min_size=2)
def test_a_rank_rejecting_its_arguments_inside_a_call_is_named_in_that_call(comm):
    """Both ranks are in the same call (``comm.calling``); the one whose arguments fail names
    its own error, the others name the call and the refusal, not two different calls."""
    buf = np.ones(4, dtype=np.int32 if odd_one_out(comm) else np.float64)
    with comm.calling("step()"):
        if odd_one_out(comm):
            with pytest.raises(TypeError):
                comm.allreduce(buf)
        else:
            with pytest.raises(CollectiveMismatchError, match=r"^allreduce in step\(\): ranks disagree on arguments") \
                    as caught:
                comm.allreduce(buf)
            assert "the call" not in str(caught.value)
    still_works(comm)


class RefusesPickling:
    """A value whose pickling raises ValueError, as a closed file's does."""

    def __reduce__(self):
        raise ValueError("I/O operation on closed file")


@pytest.mark.mpi
@pytest.mark.parametrize("call", ["same_everywhere", "check_same", "allgather_object"])
def test_a_value_whose_pickling_raises_value_error_fails_on_every_rank(comm, call):
    """Whatever pickling raises, the rank whose value cannot be pickled announces it in the
    check: TypeError naming the call there, CollectiveMismatchError on its peers, and the next
    collective pairs up."""
    run = {"same_everywhere": lambda v: comm.same_everywhere(v, "settings"),
           "check_same": lambda v: comm.check_same(v, "settings"),
           "allgather_object": lambda v: comm.allgather_object(v, what="settings")}[call]
    value = np.random.default_rng([33, comm.rank]).standard_normal(3).tolist()
    if odd_one_out(comm) or comm.size == 1:
        with pytest.raises(TypeError, match="settings.*not picklable"):
            run([value, RefusesPickling()])
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: run([value]), "arguments")


@pytest.mark.mpi
def test_nonzero_ranks(comm):
    """Every rank's nonzero value by rank, on every rank: from the allreduce alone when all pass
    the same value, from the gathered values when they differ; bad values and ranks in other
    calls fail every rank promptly."""
    values = [(3 * rank + 1) % 4 for rank in range(comm.size)]  # 1, 0, 3, 2: one rank passes 0
    assert comm.nonzero_ranks(values[comm.rank], "flags") == {r: v for r, v in enumerate(values) if v}
    assert comm.nonzero_ranks(2**61, "flags") == {r: 2**61 for r in range(comm.size)}
    assert comm.nonzero_ranks(0, "flags") == {}
    with pytest.raises(TypeError, match="^what must be a string naming the call, got int$"):
        comm.nonzero_ranks(1, 5)
    bad = odd_one_out(comm) or comm.size == 1
    if bad:
        with pytest.raises(ValueError, match=r"^flags: value must be an integer in \[0, 2\*\*62\), got -1$"):
            comm.nonzero_ranks(-1, "flags")
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.nonzero_ranks(1, "flags"), "arguments")
    what = "other" if odd_one_out(comm) else "flags"
    expect_mismatch(comm, lambda: comm.nonzero_ranks(1, what),
                    rf"ranks compare different things \(flags on ranks \[0(, \d+)*\]; other on ranks \[{comm.size - 1}\]\)")
    call = (lambda: comm.same_everywhere(1, "settings")) if odd_one_out(comm) else \
        (lambda: comm.nonzero_ranks(1, "flags"))
    expect_mismatch(comm, call, rf"ranks disagree on the call \(flags on ranks \[0(, \d+)*\]; settings on ranks \[{comm.size - 1}\]\)")


@pytest.mark.mpi
def test_same_everywhere(comm):
    """One digest allreduce: True on every rank when every rank passed the same value, False on
    every rank when one differs; a rank in another call, or with a value that cannot be pickled,
    fails every rank promptly."""
    import threading

    assert comm.same_everywhere({"layers": [3, 4], "lr": 0.1}, "settings") is True
    differ = comm.same_everywhere([0.2 if odd_one_out(comm) else 0.1], "settings")
    assert differ is (comm.size == 1)
    assert comm.same_everywhere(None if odd_one_out(comm) else [], "gradients") is (comm.size == 1)
    # A name that is no string is named as such (the value [1] pickles), on every rank alike.
    with pytest.raises(TypeError, match="^what must be a string naming what is compared, got NoneType$"):
        comm.same_everywhere([1], None)
    if comm.size == 1:
        with pytest.raises(TypeError, match="settings: the value to compare is not picklable"):
            comm.same_everywhere(threading.Lock(), "settings")
        return
    if odd_one_out(comm):
        with pytest.raises(TypeError, match="settings: the value to compare is not picklable"):
            comm.same_everywhere(threading.Lock(), "settings")
        still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.same_everywhere(1, "settings"), r"settings: ranks disagree on arguments")
    call = (lambda: comm.check_same(1, "options")) if odd_one_out(comm) else \
        (lambda: comm.same_everywhere(1, "construction"))
    expect_mismatch(comm, call, r"the call \(construction on ranks \[.*check_same\(options\) on ranks")
    what = "gradients" if odd_one_out(comm) else "settings"
    expect_mismatch(comm, lambda: comm.same_everywhere([0.1], what),
                    rf"ranks compare different things \(settings on ranks \[0(, \d+)*\]; "
                    rf"gradients on ranks \[{comm.size - 1}\]\)")
    label = "options" if odd_one_out(comm) else "layers"
    expect_mismatch(comm, lambda: comm.check_same([0.1], label),
                    rf"ranks compare different things \(check_same\(layers\) on ranks \[0(, \d+)*\]; "
                    rf"check_same\(options\) on ranks \[{comm.size - 1}\]\)")


@pytest.mark.mpi
def test_named_values_that_agree_are_not_gathered(comm, monkeypatch):
    """Building a preconditioner, check_replicas() and the first step's comparisons send one
    digest when the ranks agree: no rank gathers every rank's layer list or digests (P of them
    per rank at P ranks)."""
    import torch
    from torch import nn

    from hpckfac.torch import KFACPreconditioner, check_replicas

    monkeypatch.setattr(comm, "allgather_object", lambda *a, **k: pytest.fail(f"gathered {k.get('what')}"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    precond = KFACPreconditioner(model, comm=comm)
    check_replicas(model, comm)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(comm.rank))
    model(x).pow(2).mean().backward()
    precond.step()


@pytest.mark.mpi
def test_allgather_v_with_a_bad_what_fails_on_every_rank(comm):
    """``what`` names the call; a rank that passes something else raises TypeError after the
    agreement check, its peers CollectiveMismatchError, and the gather itself still works."""
    counts = [2] * comm.size
    whole = comm.allgather_v(np.full(2, comm.rank + 0.5), counts, what="state_dict()")
    np.testing.assert_array_equal(whole, np.repeat(np.arange(comm.size) + 0.5, 2))
    if odd_one_out(comm) or comm.size == 1:
        with pytest.raises(TypeError, match="what must be a string"):
            comm.allgather_v(np.ones(2), counts, what=5)
        if comm.size > 1:
            still_works(comm)
    else:
        expect_mismatch(comm, lambda: comm.allgather_v(np.ones(2), counts, what="state_dict()"), "rejected")


@pytest.mark.mpi
def test_allgather_v_whats_differ(comm):
    """Ranks gathering for different calls (``report()`` on one rank, ``state_dict()`` on the
    others) with the same counts: each would take the others' segments for its own call's."""
    what = "report()" if odd_one_out(comm) else "state_dict()"
    segment = np.random.default_rng([38, comm.rank]).standard_normal(2)
    expect_mismatch(comm, lambda: comm.allgather_v(segment, [2] * comm.size, what=what),
                    rf"ranks disagree on the call \(state_dict\(\) on ranks \[.*\]; report\(\) on ranks "
                    rf"\[{comm.size - 1}\]\)")


@pytest.mark.mpi
def test_one_rank_passing_an_array_twice_to_allreduce_many(comm):
    """The same memory twice in ``allreduce_many`` (one rank's views of one gradient) would be
    reduced twice: a ValueError on that rank, its peers told, and the result of the next call
    the ranks' sum."""
    arrays = [np.random.default_rng([37, comm.rank, i]).standard_normal(5) for i in range(2)]
    if odd_one_out(comm) or comm.size == 1:
        with pytest.raises(ValueError, match="same memory"):
            comm.allreduce_many([arrays[0], arrays[1], arrays[0][:]])
        if comm.size > 1:
            still_works(comm)  # as expect_mismatch does on the peers
    else:
        expect_mismatch(comm, lambda: comm.allreduce_many(arrays), "arguments")
    want = sum(np.random.default_rng([37, r, 1]).standard_normal(5) for r in range(comm.size))
    comm.allreduce_many([arrays[1]], op="sum")
    np.testing.assert_allclose(arrays[1], want, rtol=1e-13)


@pytest.mark.mpi
def test_the_end_of_script_checks_stay_bounded_over_a_sweep_of_communicators(comm):
    """A sweep that makes Communicators run after run (on COMM_WORLD, on one kept duplicate of it,
    and on a duplicate freed after its run) keeps what the end-of-script check needs, not one
    entry per Communicator ever made."""
    from mpi4py import MPI

    from hpckfac.comm import communicator

    kept = MPI.COMM_WORLD.Dup()

    def run():
        Communicator()
        Communicator(kept)
        freed = MPI.COMM_WORLD.Dup()
        Communicator(freed)
        freed.Free()
        return len(communicator._world_checks), len(communicator._other_checks)

    try:
        first = run()
        assert [run() for _ in range(20)] == [first] * 20
    finally:
        kept.Free()
