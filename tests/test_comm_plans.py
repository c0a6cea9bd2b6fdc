"""Pure planning logic of hpckfac.comm: ring chunking, fusion buckets, agreement messages."""
import numpy as np
import pytest

from hpckfac.comm.agreement import Signature, describe, digest, rejected, signature
from hpckfac.comm.fusion import plan_buckets
from hpckfac.comm.ring import chunk_bounds


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7, 64])
def test_chunk_bounds_cover_the_buffer_in_near_equal_chunks(parts):
    rng = np.random.default_rng(parts)
    for length in [0, 1, parts - 1, parts, parts + 1, 97, 1009] + list(rng.integers(0, 10**7, 20)):
        bounds = chunk_bounds(int(length), parts)
        sizes = np.diff(bounds)
        assert len(bounds) == parts + 1 and bounds[0] == 0 and bounds[-1] == length
        assert sizes.min() >= 0 and sizes.max() - sizes.min() <= 1
        assert np.all(np.diff(sizes) <= 0)  # the larger chunks come first
        assert sizes.max() == -(-length // parts)


def test_chunk_bounds_rejects_nonsense():
    with pytest.raises(ValueError, match="parts"):
        chunk_bounds(5, 0)
    with pytest.raises(ValueError, match="length"):
        chunk_bounds(-1, 2)


@pytest.mark.parametrize("bucket_bytes", [1, 10, 64, 1000, 10**9])
def test_plan_buckets(bucket_bytes):
    rng = np.random.default_rng(bucket_bytes)
    nbytes = [int(n) for n in rng.integers(0, 100, 200)]
    keys = [str(k) for k in rng.choice(["float16", "float32", "float64"], 200)]
    buckets = plan_buckets(nbytes, keys, bucket_bytes)
    assert sorted(i for b in buckets for i in b) == list(range(200))
    for bucket in buckets:
        assert len({keys[i] for i in bucket}) == 1
        assert bucket == sorted(bucket)
        assert len(bucket) == 1 or sum(nbytes[i] for i in bucket) <= bucket_bytes
    for key in set(keys):  # greedy: a bucket is closed only by an array that no longer fits in it
        same = [b for b in buckets if keys[b[0]] == key]
        for bucket, after in zip(same, same[1:]):
            assert sum(nbytes[i] for i in bucket) + nbytes[after[0]] > bucket_bytes
    assert buckets == plan_buckets(nbytes, keys, bucket_bytes)
    if bucket_bytes >= sum(nbytes):
        assert len(buckets) == 3  # one per dtype


def test_plan_buckets_rejects_empty_buckets():
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([4], ["f"], 0)


def test_describe_names_fields_and_ranks():
    a = signature("allreduce", dtype=1, length=10)
    b = a._replace(length=11)
    assert describe([a, a, b]) == "length (10 on ranks [0, 1]; 11 on ranks [2])"
    assert "rejected" in describe([a, rejected("allreduce")])
    assert "collective (allreduce on ranks [0]; broadcast on ranks [1])" in describe(
        [a, signature("broadcast", dtype=1, length=10)])


def test_describe_explains_a_settings_check_only_where_one_runs():
    """A rank alone in the step's settings check has its own message to read; a rank waiting in
    broadcast_parameters' check for a rank that left the script compared no changed setting."""
    check, end = signature("check_same", length=1), signature("the end of the script")
    said = describe([check, end], ["check_same(the step's settings) in step()", "the end of the script"])
    assert "compare settings that changed there alone" in said, said
    said = describe([check, end], ["check_same(the root and the model's parameters and buffers) in "
                                   "broadcast_parameters()", "the end of the script"])
    assert "compare settings" not in said, said


def test_describe_names_only_the_calls_of_one_collective_under_other_names():
    """Two digest comparisons under their own names (the model's structure in step(), a
    check_replicas()): their digests are no arguments to compare, the calls say what differs."""
    mine = signature("same_everywhere", parameter=5, layout=7, instance=1)
    theirs = signature("same_everywhere", parameter=9, layout=3)
    said = describe([mine, theirs], ["the model's structure in step()", "check_replicas()"])
    assert said == "the call (the model's structure in step() on ranks [0]; check_replicas() on ranks [1])", said


def test_describe_names_the_preconditioners_of_one_collective():
    """Ranks in the same collective of different preconditioners are told which each is in."""
    mine, theirs = (signature("allgather_v", length=4, instance=n) for n in (1, 2))
    said = describe([mine, mine, theirs], ["allgather_v in step()"] * 3)
    assert said.startswith("the preconditioner (#1 on ranks [0, 1]; #2 on ranks [2]; numbered in the order"), said


def test_digest_fits_int64_with_room_to_negate():
    values = [digest([i, 2 * i]) for i in range(100)] + [digest(b"x" * 1000)]
    assert all(0 <= v < 2**56 for v in values) and len(set(values)) == len(values)
    assert digest([1, 2]) == digest(np.array([1, 2], np.int32))
    assert len(Signature._fields) == 9
