"""Thread-pool sizing of a rank (hpckfac.threads): the rule, and that user settings win."""
import pytest

from hpckfac import threads


@pytest.mark.parametrize("total,allowed,local,want", [
    (16, 16, 4, 4),    # nothing bound: the node's cores split over its ranks
    (16, 16, 3, 5),
    (2, 2, 4, 1),      # more ranks than cores: one thread each
    (16, 4, 4, 4),     # the launcher bound the rank to 4 cores: use them
    (16, 2, 1, 2),
])
def test_rank_cores(monkeypatch, total, allowed, local, want):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: total)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(allowed)))
    assert threads.rank_cores(local) == want


def test_user_settings_are_left_alone(monkeypatch):
    import torch

    monkeypatch.setattr(threads, "_done", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    assert threads.configure_threads(2) == {}
    assert torch.get_num_threads() == before


def test_configuration_when_nothing_is_set(monkeypatch):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    for name in threads.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_done", {})
    monkeypatch.setattr(threads, "rank_cores", lambda local: 1)
    before = torch.get_num_threads()
    with threadpool_limits():  # restores the BLAS pools afterwards
        try:
            assert threads.configure_threads(2) == {"torch": 1, "blas": 1}
            assert torch.get_num_threads() == 1
            assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
            assert threads.configure_threads(2) == {"torch": 1, "blas": 1}  # once per process
        finally:
            torch.set_num_threads(before)
