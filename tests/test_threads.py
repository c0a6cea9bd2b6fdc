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


@pytest.fixture
def nothing_set(monkeypatch):
    """No thread variable in the environment and no decision taken yet in this process."""
    for name in threads.USER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_done", {})


def test_user_settings_are_left_alone(monkeypatch, nothing_set):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {}
    assert torch.get_num_threads() == before


def test_configuration_when_nothing_is_set(monkeypatch, nothing_set):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

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


def test_blas_gets_one_thread_whatever_torch_gets(nothing_set):
    """Two cores for the rank: torch's pool takes both, NumPy's BLAS still one (the products run in torch's)."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits():
        try:
            assert threads.configure_threads(cpus(0, 4), [cpus(0, 4)] * 2) == {"torch": 2, "blas": 1}
            assert torch.get_num_threads() == 2
            assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
        finally:
            torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_each_torch_variable_leaves_the_pools_alone(monkeypatch, name, nothing_set):
    """Either variable torch sizes its pool from is the user's choice: the pools are left as
    they are, and that decision holds for the process (a second call, with the variable gone,
    still changes nothing)."""
    import torch

    monkeypatch.setenv(name, "2")
    before = torch.get_num_threads()
    assert threads.configure_threads(cpus(0, 4), [cpus(0, 4)]) == {}
    monkeypatch.delenv(name)
    assert threads.configure_threads(cpus(0, 4), [cpus(0, 4)]) == {}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("name", ["OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS"])
def test_a_blas_variable_leaves_torch_to_the_division(monkeypatch, name, nothing_set):
    """A site that sets only ``OPENBLAS_NUM_THREADS=1`` (for NumPy) chose no size for torch's pool,
    which torch does not read it for: torch still gets the rank's share, NumPy's BLAS stays as set."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    monkeypatch.setenv(name, "2")
    monkeypatch.setattr(threads, "rank_cores", lambda mine, node: 1)
    before = torch.get_num_threads()
    with threadpool_limits(limits=2, user_api="blas"):
        try:
            assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {"torch": 1, "blas": None}
            assert torch.get_num_threads() == 1
            assert all(p["num_threads"] == 2 for p in threadpool_info() if p["user_api"] == "blas")
        finally:
            torch.set_num_threads(before)


def test_the_first_decision_holds_for_the_process(nothing_set):
    """``configure_threads`` decides once: a later call, even with other CPU sets, returns the
    first decision and leaves torch's pool as the first call sized it."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits():
        try:
            first = threads.configure_threads(cpus(0, 1), [cpus(0, 1)])
            assert first["torch"] == 1 and torch.get_num_threads() == 1
            assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)]) == first
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)


@pytest.mark.parametrize("value", ["", " ", "0", "auto", "-2", "\u00b2", "\u0663"])
def test_a_variable_that_is_no_thread_count_is_not_a_choice(monkeypatch, caplog, nothing_set, value):
    """``export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK`` outside ``--cpus-per-task`` leaves it empty:
    the thread libraries reject such a value and start their full pools, so the pools are sized as
    with nothing set, and a warning names the variable."""
    import torch
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    monkeypatch.setattr(threads, "rank_cores", lambda mine, node: 1)
    before = torch.get_num_threads()
    with threadpool_limits(), caplog.at_level("WARNING", logger="hpckfac"):
        try:
            assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {"torch": 1, "blas": 1}
            assert torch.get_num_threads() == 1
        finally:
            torch.set_num_threads(before)
    assert f"OMP_NUM_THREADS={value!r}" in caplog.text


@pytest.mark.parametrize("value", ["3", " 3", "3,1"])
def test_a_thread_count_is_a_choice(monkeypatch, nothing_set, value):
    """A positive count, also with spaces or as OMP_NUM_THREADS' list of nested levels, is the user's."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    before = torch.get_num_threads()
    assert threads.configure_threads(cpus(0, 2), [cpus(0, 2)] * 2) == {}
    assert torch.get_num_threads() == before
