"""A signal on one rank stops every rank after the same step (``hpckfac.stop``)."""
import signal

import pytest

from hpckfac.stop import StopOnSignal


@pytest.mark.mpi
def test_one_ranks_signal_stops_every_rank_after_the_same_step(comm):
    last = comm.size - 1
    with StopOnSignal(comm, ["USR2"]) as stop:
        answers = []
        for step in range(5):
            if step == 2 and comm.rank == last:
                signal.raise_signal(signal.SIGUSR2)
            answers.append(stop.should_stop())
        assert answers == [False, False, True, True, True]
        assert stop.stopping_ranks == {last: "SIGUSR2"}
        assert stop.received == ("SIGUSR2" if comm.rank == last else None)


@pytest.mark.mpi
def test_signals_on_several_ranks_are_all_named(comm):
    with StopOnSignal(comm, ["USR1", "USR2"]) as stop:
        assert not stop.should_stop()
        if comm.rank % 2:
            signal.raise_signal(signal.SIGUSR1)
        elif comm.rank:
            signal.raise_signal(signal.SIGUSR2)
        assert stop.should_stop() is (comm.size > 1)
        expected = {r: "SIGUSR1" if r % 2 else "SIGUSR2" for r in range(1, comm.size)}
        assert stop.stopping_ranks == expected


@pytest.mark.mpi
def test_the_stopping_ranks_are_those_of_the_first_decision_to_stop(comm):
    """A rank signalled after the first decision to stop is not named: the ranks are those that
    stopped the run (the trainer's ``stopped_by``), not those signalled since."""
    if comm.size == 1:
        return  # a second signal to the one rank would go to the previous handler
    last = comm.size - 1
    with StopOnSignal(comm, ["USR2"]) as stop:
        answers = []
        for step in range(4):
            if (step, comm.rank) in ((1, last), (2, 0)):
                signal.raise_signal(signal.SIGUSR2)
            answers.append(stop.should_stop())
        assert answers == [False, True, True, True]
        assert stop.stopping_ranks == {last: "SIGUSR2"}
        assert stop.received == ("SIGUSR2" if comm.rank in (0, last) else None)
