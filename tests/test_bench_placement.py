"""``hpckfac.bench.placement``: where a benchmark's ranks ran, and the line that says when
their threads outnumbered a host's cores."""
import os

import torch

from hpckfac.bench import placement
from hpckfac.comm import Communicator


def test_placement_note_flags_oversubscription():
    one = {"ranks": 1, "hosts": ["a"], "host_cpus": [2], "threads_per_rank": [2]}
    two = {"ranks": 2, "hosts": ["a", "a"], "host_cpus": [2, 2], "threads_per_rank": [1, 1]}
    # 3 ranks of 2 threads: 4 threads on a's 2 cores (2:1), 2 on b's 4 (not crowded).
    three = {"ranks": 3, "hosts": ["a", "a", "b"], "host_cpus": [2, 2, 4], "threads_per_rank": [2, 2, 2]}
    assert placement.oversubscription(one) is None and placement.oversubscription(two) is None
    assert placement.oversubscription(three) == (4, 2, "a")
    # Ranks of one thread each, more of them than cores: the threads are summed per host.
    four = {"ranks": 4, "hosts": ["a"] * 3 + ["b"], "host_cpus": [2, 2, 2, 1], "threads_per_rank": [1] * 4}
    assert placement.oversubscription(four) == (3, 2, "a")
    # The most crowded host is the one with most threads per core: b's 4 on 2 (2:1), not a's 9
    # on 6 (3:2), though a has more threads beyond its cores.
    two_hosts = {"ranks": 5, "hosts": ["a"] * 3 + ["b"] * 2, "host_cpus": [6] * 3 + [2] * 2,
                 "threads_per_rank": [3] * 3 + [2] * 2}
    assert placement.oversubscription(two_hosts) == (4, 2, "b")
    assert placement.placement_note([one, two]) == "torch threads per rank: 1, 2; no host oversubscribed at P=1/2"
    # Each rank count once, in order, whatever the order and number of the runs (two assignments each).
    assert placement.placement_note([two, one, dict(two)]).endswith("no host oversubscribed at P=1/2")
    crowded = placement.placement_note([four, three])
    assert crowded.endswith("P=3: 4 threads on the 2 cores of a, P=4: 3 threads on the 2 cores of a")
    note = placement.placement_note([two, four])
    assert note == "torch threads per rank: 1; oversubscribed, compute stages slowed: P=4: 3 threads on the 2 cores of a"
    # Runs from before the fields say nothing of cores.
    assert placement.oversubscription({"ranks": 2, "hosts": ["a", "a"]}) is None
    assert placement.placement_note([{"ranks": 2, "hosts": ["a", "a"]}]) == "torch threads per rank: not recorded"


def test_placement_of_one_process_is_its_own_cores_and_pool():
    record = placement.placement(Communicator())
    assert record["hosts"] == [os.uname().nodename]
    assert record["host_cpus"] == [len(os.sched_getaffinity(0))]
    assert record["threads_per_rank"] == [torch.get_num_threads()]


def test_a_host_s_cores_are_the_union_of_its_ranks_cpu_sets():
    """Ranks bound to disjoint cores of one host (a scheduler's CPU sets): the job has their union
    there, every rank's record says so; another host counts its own rank's cores."""
    class Comm:
        def allgather_object(self, mine):
            return [("a", [0, 1], 2), ("a", [2, 3], 2), ("b", [0, 1, 2], 1), ("a", [1, 2], 1)]

    assert placement.placement(Comm()) == {"hosts": ["a", "a", "b", "a"], "host_cpus": [4, 4, 3, 4],
                                           "threads_per_rank": [2, 2, 1, 1]}
