"""The benchmarks' command lines under mpiexec: a refusal ends every rank alike, fast."""
import time

import pytest

from hpckfac.bench.__main__ import main as bench
from liveness import LIVENESS_S


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
    elapsed = time.perf_counter() - start
    comm.barrier()  # before any assertion can fail on one rank alone (see liveness)
    assert elapsed < LIVENESS_S


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [["comm", "--min-bytes", "4096", "--max-bytes", str(2**30)],
                                  ["step", "--batch", "65536", "--steps", "1"],
                                  ["scaling", "--model", "small", "--batch", str(2**20), "--mode", "weak"]])
def test_sizes_beyond_one_machine_are_refused_on_every_rank(comm, argv, capsys, monkeypatch):
    """Only the last rank's machine is too small: every rank still ends, alike and at once."""
    from hpckfac.bench import report

    last = comm.rank == comm.size - 1
    monkeypatch.setattr(report, "host_memory", lambda: 2**28 if last else 2**50)
    start = time.perf_counter()
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert "GiB of this machine" in err.splitlines()[-1] and "error: --" in err.splitlines()[-1]
    elapsed = time.perf_counter() - start
    comm.barrier()  # before any assertion can fail on one rank alone (see liveness)
    assert elapsed < LIVENESS_S


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["step", "convergence"])
def test_benchmarks_started_with_other_settings_on_one_rank_fail_on_every_rank(comm, name, monkeypatch):
    """The last rank asks for one more timed step, or one more seed: bench step ran its steps
    and the unchecked barriers between them a different number of times and every rank waited
    for good; bench convergence named the first option of a preconditioner that differed. Both
    compare their settings first, as bench comm and bench scaling do."""
    from hpckfac.bench import convergence
    from hpckfac.comm import CollectiveMismatchError

    if comm.size == 1:
        return  # nothing to disagree with: they run (tests/test_bench_step.py, tests/test_train_convergence.py)
    monkeypatch.setattr(convergence, "run_one", None)  # nothing may be trained
    more = 1 + (comm.rank == comm.size - 1)
    option, argv = {"step": ("steps", ["step", "--steps", str(more), "--warmup", "0", "--batch", "4", "--depth",
                                       "8", "--width", "4", "--configs", "sgd"]),
                    "convergence": ("seeds", ["convergence", "--quick", "--seeds", str(more)])}[name]
    start = time.perf_counter()
    with pytest.raises(CollectiveMismatchError) as info:
        exit_code(argv)
    assert str(info.value) == (f"ranks disagree on {name} benchmark settings: {option}: rank 0 has 1, "
                               f"rank {comm.size - 1} has 2")
    assert time.perf_counter() - start < LIVENESS_S


@pytest.mark.mpi
def test_convergence_refuses_rank_counts_its_batches_do_not_split_over(comm, capsys, monkeypatch):
    """At 3 or 4 ranks a study would fail, the batch-128 one at once, the full-batch one (1438
    examples) only after minutes of the other: every rank says so before the first run."""
    from hpckfac.bench import convergence

    if comm.size <= 2:
        return  # both batches split: the study runs (tests/test_train_convergence.py)
    monkeypatch.setattr(convergence, "run_one", None)  # nothing may be trained
    start = time.perf_counter()
    assert exit_code(["convergence", "--quick"]) == 2
    if comm.rank == 0:
        assert f"do not all split evenly over {comm.size} ranks: run with 1 or 2 rank(s)" in \
            capsys.readouterr().err.splitlines()[-1]
    elapsed = time.perf_counter() - start
    comm.barrier()  # before any assertion can fail on one rank alone (see liveness)
    assert elapsed < LIVENESS_S


@pytest.mark.mpi
@pytest.mark.parametrize("argv,message", [(["--scale", "0"], "--scale: expected an integer >= 1, got 0"),
                                          (["--repeat", "0"], "--repeat: expected an integer >= 1, got 0"),
                                          (["--warmup", "-1"], "--warmup: expected an integer >= 0, got -1")])
def test_scaling_refuses_bad_sizes_once_on_every_rank(comm, argv, message, capsys):
    """The same bad value on every rank: one line from rank 0 after the usage, status 2 everywhere,
    no rank aborting the job with its own copy of the message."""
    assert exit_code(["scaling", "--model", "small", *argv]) == 2
    err = capsys.readouterr().err
    if comm.rank == 0:
        assert err.startswith("usage:") and err.splitlines()[-1] == f"python -m hpckfac.bench scaling: error: {message}"
    else:
        assert err == ""
    comm.barrier()
