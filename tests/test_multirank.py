"""Runs the multi-rank suite in tests/mpi under mpiexec at 1, 2, 3 and 4 ranks.

A failure on any rank at any rank count fails this test, with that run's output.
"""
import functools
import os
import re
import shutil
import subprocess
import sys

import pytest

MPI_DIR = os.path.join(os.path.dirname(__file__), "mpi")
TIMEOUT_S = int(os.environ.get("HPCKFAC_MPI_TEST_TIMEOUT", "900"))


def mpiexec() -> list[str]:
    """The mpiexec next to this interpreter (PyPI mpich), else the one on PATH, with the flags
    its MPI needs to run the tests' rank counts on any machine: Open MPI's refuses more ranks
    than cores (MPICH's runs them) unless told ``--oversubscribe``."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = local if os.path.exists(local) else shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found: install the 'mpi' extra or a system MPI")
    return [found, *_launcher_flags(found)]


@functools.lru_cache(maxsize=None)
def _launcher_flags(path: str) -> tuple[str, ...]:
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    # Open MPI 4 says "mpiexec (OpenRTE) 4.x", Open MPI 5 "mpiexec (Open MPI) 5.x".
    return ("--oversubscribe",) if "Open MPI" in version or "OpenRTE" in version else ()


# Open MPI's launcher adds a block framed by lines of dashes to the job's stderr when a rank exits
# with an error or calls MPI_Abort ("prterun detected that one or more processes exited with
# non-zero status", "MPI_ABORT was invoked on rank 1"); MPICH's adds nothing or one line.
_LAUNCHER_BLOCK = re.compile(r"^-{20,}\n.*?^-{20,}\n?", re.MULTILINE | re.DOTALL)


def program_stderr(stderr: str) -> str:
    """A job's stderr without the launcher's framed blocks: what the ranks themselves wrote."""
    return _LAUNCHER_BLOCK.sub("", stderr)


def last_line(stderr: str) -> str:
    """The last line the ranks wrote to stderr (the launcher's framed blocks left out)."""
    return program_stderr(stderr).strip().splitlines()[-1]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_multirank_suite(ranks: int) -> None:
    cmd = [*mpiexec(), "-n", str(ranks), sys.executable, "-m", "pytest", "--with-mpi",
           "-q", "-x", "-p", "no:cacheprovider", MPI_DIR]
    env = dict(os.environ, OMP_NUM_THREADS="1", HPCKFAC_TEST_RANKS=str(ranks))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{output[-20000:]}"
    assert " passed" in output, f"no test passed at {ranks} ranks:\n{output[-5000:]}"


@pytest.mark.parametrize("version, flags", [("mpiexec (Open MPI) 5.0.11", ["--oversubscribe"]),
                                            ("mpiexec (OpenRTE) 4.1.6", ["--oversubscribe"]),
                                            ("HYDRA build details:\n    Version: 5.0.2", [])])
def test_launcher_flags_let_open_mpi_run_more_ranks_than_cores(tmp_path, version, flags):
    launcher = tmp_path / "mpiexec"
    launcher.write_text(f"#!/bin/sh\necho '{version}'\n")
    launcher.chmod(0o755)
    assert list(_launcher_flags(str(launcher))) == flags


def test_last_line_leaves_out_open_mpi_launcher_blocks():
    """What Open MPI 5's mpiexec adds after a rank's own last line (an MPI_Abort, then the
    launcher's note of it); MPICH's adds one line of its own or none."""
    mine = "hpckfac: uncaught RuntimeError: disk full [rank 1 of 2; aborting the job]"
    dashes = "-" * 74
    stderr = "\n".join([
        "Traceback (most recent call last):", "RuntimeError: disk full", mine, dashes,
        "MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD", "  Proc: [[9288,1],1]",
        "  Errorcode: 1", "", "NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.", dashes,
        dashes, 'prterun has exited due to process rank 1 with PID 0 on node vm calling', '"abort".', dashes, " "])
    assert last_line(stderr) == mine
    assert program_stderr(stderr).count("\n") == 3
    assert last_line(f"usage: x\n{mine}\n") == mine
