"""Fixtures shared by the multi-rank tests (run under mpiexec with --with-mpi)."""
import os
import sys

import pytest

# The serial tests' helpers (the stand-in device array) are shared with the multi-rank ones.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def comm():
    """A Communicator on COMM_WORLD."""
    from hpckfac.comm import Communicator

    return Communicator()
