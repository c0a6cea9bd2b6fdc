"""Test-suite wiring.

``pytest tests`` runs the serial tests and, through ``test_multirank.py``, the
multi-rank tests in ``tests/mpi`` under ``mpiexec -n P`` for P = 1, 2, 3, 4.
The files in ``tests/mpi`` are only collected when pytest runs under MPI with
``--with-mpi`` (pytest-mpi), which is how the launcher starts them.
"""
import sys

collect_ignore = [] if "--with-mpi" in sys.argv else ["mpi"]
