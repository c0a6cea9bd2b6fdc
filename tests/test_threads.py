"""Thread-pool sizing of a rank (hpckfac.threads): the rule, and that user settings win."""
import pytest

from hpckfac import threads


def cpus(first, count):
    return frozenset(range(first, first + count))


@pytest.mark.parametrize("mine,node,want", [
    (cpus(0, 16), [cpus(0, 16)] * 4, 4),                       # nothing bound: the node's cores over its ranks
    (cpus(0, 16), [cpus(0, 16)] * 3, 5),
    (cpus(0, 2), [cpus(0, 2)] * 4, 1),                         # more ranks than cores: one thread each
    (cpus(4, 4), [cpus(i, 4) for i in (0, 4, 8, 12)], 4),     # each rank bound to 4 cores of its own
    (cpus(0, 2), [cpus(0, 2)], 2),                             # one rank, bound to 2 cores
    (cpus(8, 8), [cpus(0, 8), cpus(0, 8), cpus(8, 8), cpus(8, 8)], 4),  # bound by socket, 2 ranks each
    (cpus(0, 2), [cpus(0, 2)] * 2, 1),                         # a container's 2 CPUs of 16, 2 ranks in it
    (cpus(0, 6), [cpus(0, 6), cpus(4, 6), cpus(12, 4)], 3),    # sets that overlap in part count in full
])
def test_rank_cores(mine, node, want):
    assert threads.rank_cores(mine, node) == want


def test_user_settings_are_left_alone(monkeypatch):
    import torch

    monkeypatch.setattr(threads, "_done", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {}
    assert torch.get_num_threads() == before


def test_configuration_when_nothing_is_set(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    for name in threads.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_done", {})
    monkeypatch.setattr(threads, "rank_cores", lambda mine, node: 1)
    before = torch.get_num_threads()
    with threadpool_limits():  # restores the BLAS pools afterwards
        try:
            assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {"torch": 1, "blas": 1}
            assert torch.get_num_threads() == 1
            assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
            assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {"torch": 1, "blas": 1}  # once per process
        finally:
            torch.set_num_threads(before)
