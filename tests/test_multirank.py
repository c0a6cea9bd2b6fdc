"""Runs the multi-rank suite in tests/mpi under mpiexec at 1, 2, 3 and 4 ranks.

A failure on any rank at any rank count fails this test, with that run's output.
"""
import os
import shutil
import subprocess
import sys

import pytest

MPI_DIR = os.path.join(os.path.dirname(__file__), "mpi")
TIMEOUT_S = int(os.environ.get("HPCKFAC_MPI_TEST_TIMEOUT", "900"))


def mpiexec() -> str:
    """The mpiexec next to this interpreter (PyPI mpich), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.path.exists(local) else shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra or a system MPI")
    return found


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_multirank_suite(ranks: int) -> None:
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "pytest", "--with-mpi",
           "-q", "-x", "-p", "no:cacheprovider", MPI_DIR]
    env = dict(os.environ, OMP_NUM_THREADS="1", HPCKFAC_TEST_RANKS=str(ranks))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{output[-20000:]}"
    assert " passed" in output, f"no test passed at {ranks} ranks:\n{output[-5000:]}"
