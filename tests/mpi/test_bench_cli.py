"""The benchmarks' command lines under mpiexec: a refusal ends every rank alike, fast."""
import time

import pytest

from hpckfac.bench.__main__ import main as bench
from liveness import LIVENESS_S


def ended(comm, capsys, argv, run=bench):
    """Every rank runs ``run(argv)`` (``python -m hpckfac.bench ARGV`` by default): the status it
    ends with (argparse's errors raise SystemExit) and what it printed, once every rank has
    ended, within ``LIVENESS_S`` (a barrier first: no assertion may fail on one rank alone)."""
    start = time.perf_counter()
    try:
        status = run(argv)
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    elapsed = time.perf_counter() - start
    comm.barrier()  # before any assertion can fail on one rank alone (see liveness)
    assert elapsed < LIVENESS_S
    return status, captured


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [["conv", "--shapes", "1:1:4", "--repeat", "1"], ["kernels", "--repeat", "1"],
                                  ["model", "--ranks", "1"], ["scaling", "--combine", "absent.json"]])
def test_one_process_benchmarks_refuse_several_ranks(comm, argv, capsys):
    if comm.size == 1:
        return  # they run (tests/test_cli_entry.py and the benchmarks' own tests)
    status, captured = ended(comm, capsys, argv)
    assert status == 2
    err = captured.err
    if comm.rank == 0:
        assert f"runs in one process, not under mpiexec with {comm.size} ranks" in err.splitlines()[-1]
    else:
        assert err == ""  # one copy of the answer


@pytest.mark.mpi
@pytest.mark.parametrize("argv", [["comm", "--min-bytes", "4096", "--max-bytes", str(2**30)],
                                  ["step", "--batch", "65536", "--steps", "1"],
                                  ["scaling", "--model", "small", "--batch", str(2**20), "--mode", "weak"]])
def test_sizes_beyond_one_machine_are_refused_on_every_rank(comm, argv, capsys, monkeypatch):
    """Only the last rank's machine is too small: every rank still ends, alike and at once."""
    from hpckfac.bench import report

    last = comm.rank == comm.size - 1
    monkeypatch.setattr(report, "host_memory", lambda: 2**28 if last else 2**50)
    status, captured = ended(comm, capsys, argv)
    assert status == 2
    err = captured.err
    if comm.rank == 0:
        assert "GiB of this machine" in err.splitlines()[-1] and "error: --" in err.splitlines()[-1]


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["step", "convergence", "comm"])
def test_benchmarks_started_with_other_settings_on_one_rank_fail_on_every_rank(comm, name, capsys, monkeypatch):
    """The last rank asks for one more timed step, one more seed or larger buffers: bench step
    ran its steps and the unchecked barriers between them a different number of times and
    every rank waited for good; bench convergence named the first option of a preconditioner
    that differed. Every benchmark compares its arguments as it parses them: exit 2 on every
    rank, rank 0 naming the option with the first rank's value and the last rank's."""
    from hpckfac.bench import convergence

    if comm.size == 1:
        return  # nothing to disagree with: they run (tests/test_bench_step.py, tests/test_train_convergence.py)
    monkeypatch.setattr(convergence, "run_one", None)  # nothing may be trained
    more = 1 + (comm.rank == comm.size - 1)
    option, argv, values = {
        "step": ("steps", ["step", "--steps", str(more), "--warmup", "0", "--batch", "4", "--depth", "8", "--width",
                           "4", "--configs", "sgd"], (1, 2)),
        "convergence": ("seeds", ["convergence", "--quick", "--seeds", str(more)], (1, 2)),
        "comm": ("max-bytes", ["comm", "--min-bytes", "64", "--max-bytes", str(1024 * more)], (1024, 2048))}[name]
    status, captured = ended(comm, capsys, argv)
    assert status == 2
    err = captured.err
    if comm.rank == 0:
        assert err.splitlines()[-1] == (f"python -m hpckfac.bench {name}: error: the ranks were started with different "
                                        f"arguments: --{option} is {values[0]} on rank 0, {values[1]} on rank "
                                        f"{comm.size - 1}")
    else:
        assert err == ""  # one copy of the answer


@pytest.mark.mpi
@pytest.mark.parametrize("last", [["comm", "--max-bytes", "x"], ["comm", "--help"], ["step"], ["comm2"], []],
                         ids=["invalid", "help", "other benchmark", "unknown benchmark", "no benchmark"])
def test_an_error_or_help_on_one_rank_only_ends_every_rank(comm, last, capsys):
    """The last rank alone cannot parse its arguments, asks for --help, runs another benchmark,
    one that does not exist or none (an MPMD launch): it exited (or printed its help) while the
    others waited for good in their first collective. Every rank exits 2 at once, rank 0 naming
    the last rank and its cause."""
    argv = ["comm", "--min-bytes", "64", "--max-bytes", "1024", "--repeat", "1"]
    if comm.size == 1:
        assert ended(comm, capsys, argv)[0] == 0
        return
    status, captured = ended(comm, capsys, last if comm.rank == comm.size - 1 else argv)
    assert status == 2
    err = captured.err
    end = comm.size - 1
    cause = {"x": f"rank {end} of {comm.size}: argument --max-bytes: invalid int value: 'x'",
             "--help": f"rank {end} of {comm.size}: --help",
             "step": f"rank 0 runs python -m hpckfac.bench comm, rank {end} python -m hpckfac.bench step",
             "comm2": f"rank 0 runs python -m hpckfac.bench comm, rank {end} python -m hpckfac.bench comm2",
             None: f"rank 0 runs python -m hpckfac.bench comm, rank {end} python -m hpckfac.bench"}[(last or [None])[-1]]
    if comm.rank == 0:
        assert err.splitlines()[-1] == f"python -m hpckfac.bench comm: error: the ranks were started with different " \
                                       f"arguments: {cause}"
    else:
        assert err == ""


@pytest.mark.mpi
def test_an_error_in_every_rank_is_said_once_as_it_is(comm, capsys):
    """The same bad argument on every rank: argparse's own message, once, exit 2 everywhere."""
    status, captured = ended(comm, capsys, ["comm", "--max-bytes", "y"])
    assert status == 2
    err = captured.err
    if comm.rank == 0:
        assert err.splitlines()[0].startswith("usage: python -m hpckfac.bench comm")
        assert err.splitlines()[-1] == "python -m hpckfac.bench comm: error: argument --max-bytes: invalid int value: 'y'"
    else:
        assert err == ""


@pytest.mark.mpi
def test_convergence_refuses_rank_counts_its_batches_do_not_split_over(comm, capsys, monkeypatch):
    """At 3 or 4 ranks a study would fail, the batch-128 one at once, the full-batch one (1438
    examples) only after minutes of the other: every rank says so before the first run."""
    from hpckfac.bench import convergence

    if comm.size <= 2:
        return  # both batches split: the study runs (tests/test_train_convergence.py)
    monkeypatch.setattr(convergence, "run_one", None)  # nothing may be trained
    status, captured = ended(comm, capsys, ["convergence", "--quick"])
    assert status == 2
    if comm.rank == 0:
        assert f"do not all split evenly over {comm.size} ranks: run with 1 or 2 rank(s)" in \
            captured.err.splitlines()[-1]


@pytest.mark.mpi
@pytest.mark.parametrize("argv,message", [(["--scale", "0"], "--scale: expected an integer >= 1, got 0"),
                                          (["--repeat", "0"], "--repeat: expected an integer >= 1, got 0"),
                                          (["--warmup", "-1"], "--warmup: expected an integer >= 0, got -1")])
def test_scaling_refuses_bad_sizes_once_on_every_rank(comm, argv, message, capsys):
    """The same bad value on every rank: one line from rank 0 after the usage, status 2 everywhere,
    no rank aborting the job with its own copy of the message."""
    status, captured = ended(comm, capsys, ["scaling", "--model", "small", *argv])
    assert status == 2
    err = captured.err
    if comm.rank == 0:
        assert err.startswith("usage:") and err.splitlines()[-1] == f"python -m hpckfac.bench scaling: error: {message}"
    else:
        assert err == ""


@pytest.mark.mpi
def test_an_unknown_command_on_one_rank_only_ends_every_rank(comm, capsys):
    """``hpckfac trian`` on the last rank, ``hpckfac bench comm`` on the others: the last rank
    printed the usage and returned while the others waited in the benchmark; every rank exits 2,
    rank 0 naming both commands."""
    from hpckfac.cli import main as hpckfac

    argv = ["bench", "comm", "--min-bytes", "64", "--max-bytes", "1024", "--repeat", "1"]
    last = comm.rank == comm.size - 1 and comm.size > 1
    status, captured = ended(comm, capsys, ["trian"] if last else argv, run=hpckfac)
    err = captured.err
    if comm.size == 1:
        assert status == 0
        return
    assert status == 2
    if comm.rank == 0:
        assert err.splitlines()[-1] == (f"hpckfac bench comm: error: the ranks were started with different arguments: "
                                        f"rank 0 runs hpckfac bench comm, rank {comm.size - 1} hpckfac trian")
    else:
        assert err == ""


@pytest.mark.mpi
def test_the_first_rank_whose_value_differs_is_named(comm, capsys):
    """Every rank but rank 0 gives --max-bytes a value of its own (random): the message names
    rank 1, the first that differs, with its value and rank 0's, on rank 0 alone."""
    import numpy as np

    seed = comm.mpi.bcast(int(np.random.SeedSequence().entropy % 2**32) if comm.rank == 0 else None, root=0)
    values = 64 * (1 + np.random.default_rng(seed).choice(1000, size=comm.size, replace=False))
    argv = ["comm", "--min-bytes", "64", "--max-bytes", str(values[comm.rank]), "--repeat", "1"]
    status, captured = ended(comm, capsys, argv)
    if comm.size == 1:
        assert status == 0
        return
    assert status == 2
    err = captured.err
    if comm.rank == 0:
        assert err.splitlines()[-1] == ("python -m hpckfac.bench comm: error: the ranks were started with different "
                                        f"arguments: --max-bytes is {values[0]} on rank 0, {values[1]} on rank 1")
    else:
        assert err == ""


@pytest.mark.mpi
@pytest.mark.parametrize("first", [["comm", "--max-bytes", "x"], ["comm", "--help"]], ids=["invalid", "help"])
def test_an_error_or_help_on_rank_0_only_is_rank_0s(comm, first, capsys):
    """Rank 0 alone cannot parse its arguments or asks for --help: the message names rank 0 and
    its cause, not the first other rank (whose arguments parse), and rank 0's help is not printed."""
    argv = ["comm", "--min-bytes", "64", "--max-bytes", "1024", "--repeat", "1"]
    if comm.size == 1:
        return  # one rank is always the first: test_an_error_in_every_rank_is_said_once_as_it_is
    status, captured = ended(comm, capsys, first if comm.rank == 0 else argv)
    assert status == 2
    cause = {"x": "argument --max-bytes: invalid int value: 'x'", "--help": "--help"}[first[-1]]
    if comm.rank == 0:
        assert captured.err.splitlines()[-1] == ("python -m hpckfac.bench comm: error: the ranks were started with "
                                                 f"different arguments: rank 0 of {comm.size}: {cause}")
        assert captured.out == ""  # the help of a refused launch is not printed
    else:
        assert captured.err == "" and captured.out == ""


@pytest.mark.mpi
@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["-h"], 0), ([], 2), (["trian"], 2),
                                          (["bench", "--help"], 0), (["bench"], 2), (["bench", "comm2"], 2)])
def test_the_usage_of_every_rank_is_printed_once(comm, argv, status, capsys):
    """The same request for the usage, or the same unknown name, on every rank: each rank ends
    with the status of one process, and only rank 0 prints, what one process prints."""
    from hpckfac.cli import main as hpckfac

    got, captured = ended(comm, capsys, argv, run=hpckfac)
    assert got == status
    if comm.rank != 0:
        assert captured.out == "" and captured.err == ""  # one copy of the answer
        return
    stream, other = (captured.out, captured.err) if status == 0 else (captured.err, captured.out)
    assert stream.count("usage:") == 1 and other == "", captured
    if argv[-1:] in (["trian"], ["comm2"]):
        assert stream.splitlines()[-1].endswith(f"error: unknown {'benchmark' if argv[0] == 'bench' else 'command'} "
                                                f"{argv[-1]!r}"), stream
