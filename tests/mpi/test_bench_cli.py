"""The benchmarks' command lines under mpiexec: a refusal ends every rank alike, fast."""
import time

import pytest

from hpckfac.bench.__main__ import main as bench


def exit_code(argv):
    """The status ``python -m hpckfac.bench ARGV`` ends with (argparse's errors raise SystemExit)."""
    try:
        return bench(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [["conv", "--shapes", "1:1:4", "--repeat", "1"], ["kernels", "--repeat", "1"],
                                  ["model", "--ranks", "1"], ["scaling", "--combine", "absent.json"]])
def test_one_process_benchmarks_refuse_several_ranks(comm, argv, capsys):
    if comm.size == 1:
        return  # they run (tests/test_cli_entry.py and the benchmarks' own tests)
    start = time.perf_counter()
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert f"runs in one process, not under mpiexec with {comm.size} ranks" in err.splitlines()[-1]
    else:
        assert err == ""  # one copy of the answer
    assert time.perf_counter() - start < 10.0
    comm.barrier()
