"""Fixtures shared by the multi-rank tests (run under mpiexec with --with-mpi)."""
import pytest


@pytest.fixture
def comm():
    """A Communicator on COMM_WORLD."""
    from hpckfac.comm import Communicator

    return Communicator()
