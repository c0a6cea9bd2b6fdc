"""A failure on one rank ends the whole job in bounded time, with one line naming
the rank and the cause (real processes at 2 ranks; a hang fails on the timeout)."""
import os
import subprocess
import sys
import textwrap

import pytest
from mpi4py import MPI

from hpckfac.comm import Communicator
from hpckfac.comm.abort import ABORT_ENV, install_abort_on_error
from test_multirank import last_line, mpiexec

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(tmp_path, script, ranks=2, timeout=120, cwd=None, **env):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run([*mpiexec(), "-n", str(ranks), sys.executable, str(path)], capture_output=True,
                          text=True, timeout=timeout, env=dict(ENV, **env), cwd=cwd)


def test_uncaught_exception_on_one_rank_ends_the_job(tmp_path):
    proc = run(tmp_path, """
        from hpckfac.comm import Communicator
        comm = Communicator()
        if comm.rank == 1:
            raise RuntimeError("disk full on this rank")
        comm.barrier()  # rank 0 would wait here forever
    """)
    assert proc.returncode != 0
    assert "hpckfac: uncaught RuntimeError: disk full on this rank [rank 1 of 2; aborting the job]" in proc.stderr, \
        proc.stderr
    assert proc.stderr.count("aborting the job]") == 1, proc.stderr  # said once, even where MPI_Abort returns


def test_a_rank_ended_by_sigterm_ends_the_job_through_the_launcher(tmp_path):
    """SIGTERM is no exception to Python: no hook runs and no line of hpckfac's is printed
    (docs/training.md, "Errors"), but the launcher ends the rank waiting in a collective."""
    proc = run(tmp_path, """
        import os, signal
        from hpckfac.comm import Communicator
        comm = Communicator()
        comm.barrier()
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        comm.barrier()  # rank 0 would wait here forever
    """, timeout=60)
    assert proc.returncode != 0, proc.stderr
    assert "aborting the job" not in proc.stderr, proc.stderr


def test_exception_before_the_first_communicator_ends_the_job(tmp_path):
    proc = run(tmp_path, """
        from mpi4py import MPI
        import hpckfac.torch  # the import installs the hook: no Communicator yet
        if MPI.COMM_WORLD.Get_rank() == 1:
            raise FileNotFoundError("shard_1.npz")
        MPI.COMM_WORLD.Barrier()  # rank 0 would wait here forever
    """)
    assert proc.returncode != 0
    assert "hpckfac: uncaught FileNotFoundError: shard_1.npz [rank 1 of 2; aborting the job]" in proc.stderr, \
        proc.stderr


def test_rank_local_error_in_train_aborts_with_one_line(tmp_path):
    proc = run(tmp_path, f"""
        import sys
        from mpi4py import MPI
        from hpckfac.train import cli, loop

        def run(self, progress=None):
            if self.rank == 0:
                raise OSError(28, "No space left on device")
            self.comm.barrier()
        loop.Trainer.run = run
        sys.exit(cli.main(["--steps", "2", "--batch-size", "16", "--no-progress", "--out", {str(tmp_path / 'o')!r}]))
    """)
    assert proc.returncode != 0
    assert "hpckfac train: error: [Errno 28] No space left on device [rank 0 of 2; aborting the job]" in proc.stderr, \
        proc.stderr
    assert proc.stderr.count("No space left on device") == 1, proc.stderr


def test_an_unexpected_error_on_one_rank_is_named_with_its_type(tmp_path):
    """A KeyError's message alone is the missing key ('test_acc'), which names no cause."""
    proc = run(tmp_path, """
        import sys
        from hpckfac.train import cli, loop

        def run(self, progress=None):
            if self.rank == 1:
                raise KeyError("test_acc")
            self.comm.barrier()
        loop.Trainer.run = run
        sys.exit(cli.main(["--steps", "2", "--batch-size", "16", "--no-progress"]))
    """)
    assert proc.returncode != 0
    assert proc.stderr.count("hpckfac train: error: KeyError: 'test_acc' [rank 1 of 2; aborting the job]") == 1, \
        proc.stderr


def test_output_folder_is_checked_before_training_on_every_rank(tmp_path):
    (tmp_path / "o" / "training.png").mkdir(parents=True)
    cmd = [*mpiexec(), "-n", "2", sys.executable, "-m", "hpckfac", "train", "--no-progress", "--steps", "5",
           "--batch-size", "16", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2
    assert last_line(proc.stderr) == (
        f"hpckfac train: error: --out: {tmp_path / 'o' / 'training.png'} is a directory; the run writes a file there")
    (tmp_path / "p").write_text("a file")
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "p" / "sub")], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and "--out: cannot write into" in proc.stderr


def test_abort_setting_is_validated(monkeypatch, caplog):
    from hpckfac.comm import abort

    monkeypatch.setenv(ABORT_ENV, "maybe")
    monkeypatch.setattr(abort, "_warned_env", False)
    with caplog.at_level("WARNING", logger="hpckfac"):
        Communicator(MPI.COMM_SELF)  # a bad value is named, and the default kept
    assert f"{ABORT_ENV}='maybe': expected 0 or 1" in caplog.text
    monkeypatch.setenv(ABORT_ENV, "1")
    assert install_abort_on_error() is (MPI.COMM_WORLD.Get_size() > 1)


def test_rank_local_benchmark_error_ends_the_job(tmp_path):
    """A benchmark failing on rank 0 alone (writing its results) aborts every rank."""
    proc = run(tmp_path, """
        import sys
        from mpi4py import MPI
        from hpckfac.bench import __main__ as bench, model

        def main(argv, prog):
            if MPI.COMM_WORLD.Get_rank() == 0:
                raise OSError(28, "No space left on device")
            MPI.COMM_WORLD.Barrier()  # rank 1 would wait here forever
        model.main = main
        sys.exit(bench.main(["model"]))
    """)
    assert proc.returncode != 0
    line = ("python -m hpckfac.bench model: error: [Errno 28] No space left on device [rank 0 of 2; aborting the job]")
    assert proc.stderr.count(line) == 1, proc.stderr
    assert proc.stderr.count("No space left on device") == 1, proc.stderr


@pytest.mark.parametrize("call", ["torch.save(precond.state_dict(), 'x.pt')", "precond.report(gather=True)",
                                  "sync_batchnorm_stats(model, comm)"])
def test_a_collective_on_rank_0_alone_at_the_end_ends_the_job(tmp_path, call):
    """The other ranks leave the script: their check at exit meets rank 0's collective, and the
    job ends with the reason instead of rank 0 waiting forever."""
    proc = run(tmp_path, f"""
        import os
        import torch
        from torch import nn
        from hpckfac.comm import Communicator
        from hpckfac.torch import KFACPreconditioner, sync_batchnorm_stats
        os.chdir({str(tmp_path)!r})
        comm = Communicator()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        precond = KFACPreconditioner(model, comm=comm)
        model(torch.randn(8, 4)).pow(2).mean().backward()
        precond.step()
        if comm.rank == 0:
            {call}
    """, timeout=60)
    assert proc.returncode != 0
    # Each side names the mismatch (whichever aborts first may cut the other's line short).
    assert "the end of the script on ranks [1])" in proc.stderr and "aborting the job]" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_exit_check_runs_when_a_later_communicator_checks(tmp_path):
    """The end-of-script check does not depend on which Communicator on COMM_WORLD came first."""
    proc = run(tmp_path, """
        from hpckfac.comm import Communicator
        quiet = Communicator(check_agreement="off")
        comm = Communicator()
        if comm.rank == 0:
            comm.allgather_object(1, what="state_dict()")
    """, timeout=60)
    assert proc.returncode != 0 and "the end of the script on ranks [1])" in proc.stderr, proc.stderr


SPLIT_GROUPS = """
    import numpy as np
    from mpi4py import MPI
    from hpckfac.comm import Communicator
    world = MPI.COMM_WORLD.Get_rank()
    group = Communicator(MPI.COMM_WORLD.Split(world % 2, world))  # no Communicator on COMM_WORLD
    total = np.zeros(1)
    for step in range(3):
        if world == {leaver} and step == 1:
            break  # leaves its group's loop early
        total += group.allreduce(np.full(1, world + 1.0))
    print(f"rank {{world}}: {{total[0]:g}}", flush=True)
"""


def test_a_rank_leaving_a_group_early_ends_the_job(tmp_path):
    """Communicators made on a Split of COMM_WORLD alone: a rank that leaves its group's loop
    runs the end-of-script check on that communicator, which meets its peer's allreduce: the job
    ends with the mismatch named instead of the peer waiting forever."""
    proc = run(tmp_path, SPLIT_GROUPS.format(leaver=2), ranks=4, timeout=120)
    assert proc.returncode != 0, proc.stderr
    assert "the end of the script on ranks [1])" in proc.stderr and "aborting the job" in proc.stderr, proc.stderr


def test_groups_that_finish_together_pass_the_end_of_script_check(tmp_path):
    """Every rank of both groups reaches the end: the checks agree, the job succeeds, and each
    group's sums are its own ranks' (ranks 0 and 2: 1 + 3 per step; ranks 1 and 3: 2 + 4)."""
    proc = run(tmp_path, SPLIT_GROUPS.format(leaver=-1) + """
    if world % 2:
        group.mpi.Free()  # a freed communicator (a collective: both of its ranks) is skipped at exit
    """, ranks=4, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for rank, total in ((0, 12), (1, 18), (2, 12), (3, 18)):
        assert f"rank {rank}: {total}" in proc.stdout, proc.stdout


def test_benchmark_output_checks_agree_across_ranks(tmp_path):
    """Ranks in different directories see different paths: rank 0 (which writes) decides for
    all, so no rank exits while another waits, and the answer is printed once."""
    for name, sub_is_dir in (("a", True), ("b", False)):
        (tmp_path / name).mkdir()
        if sub_is_dir:
            (tmp_path / name / "sub").mkdir()
        else:
            (tmp_path / name / "sub").write_text("a file")
    bench = [sys.executable, "-m", "hpckfac.bench", "scaling", "--model", "small", "--repeat", "1",
             "--json", "sub"]
    proc = subprocess.run([*mpiexec(), "-n", "1", "-wdir", str(tmp_path / "a"), *bench, ":",
                           "-n", "1", "-wdir", str(tmp_path / "b"), *bench], capture_output=True, text=True,
                          timeout=60, env=ENV)
    assert proc.returncode == 2 and "--json sub:" in proc.stderr and "is a directory" in proc.stderr, proc.stderr
    # Every rank exits with the same answer; rank 0 alone prints it (with the usage block).
    assert proc.stderr.count("error:") == 1 and proc.stderr.count("usage:") == 1, proc.stderr


def test_a_helper_without_comm_on_one_rank_meets_a_duplicated_world(tmp_path):
    """The script's Communicator wraps a duplicate of COMM_WORLD: a helper called without
    ``comm`` on one rank still uses it (and its agreement check) instead of creating one there."""
    proc = run(tmp_path, """
        import numpy as np
        from mpi4py import MPI
        from torch import nn
        from hpckfac.comm import CollectiveMismatchError, Communicator, world_communicator
        from hpckfac.torch import sync_batchnorm_stats

        comm = Communicator(MPI.COMM_WORLD.Dup())
        assert world_communicator() is comm
        try:
            if comm.rank == 0:
                sync_batchnorm_stats(nn.BatchNorm1d(4))
            else:
                comm.allreduce(np.ones(3))
        except CollectiveMismatchError:
            open(f"raised_{comm.rank}", "w").close()  # a file per rank: their stdout lines can interleave
    """, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "raised_0").exists() and (tmp_path / "raised_1").exists(), proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["convergence", "conv", "kernels", "no-such-benchmark"])
def test_benchmark_parsing_before_mpi_prints_its_error_once(name):
    """A benchmark that parses its arguments before it first uses MPI (and a name that is no
    benchmark) still prints the usage and error on rank 0 alone; every rank exits 2."""
    proc = subprocess.run([*mpiexec(), "-n", "2", sys.executable, "-m", "hpckfac.bench", name, "--no-such-flag"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and proc.stderr.count("usage:") == 1, proc.stderr


def test_a_checkpoint_only_some_ranks_can_read_is_an_error_not_a_hang(tmp_path):
    """``--resume PATH`` alone takes the run's settings from the checkpoint; a rank that cannot
    read it (a relative path on a node-local disk) started with other settings, called the
    setup's collectives a different number of times, and every rank waited forever."""
    run_dir = tmp_path / "node0" / "run"
    (tmp_path / "node1").mkdir()
    first = subprocess.run([sys.executable, "-m", "hpckfac", "train", "--optimizer", "sgd", "--steps", "2",
                            "--batch-size", "16", "--no-progress", "--checkpoint-every", "2", "--out", str(run_dir)],
                           capture_output=True, text=True, timeout=120, env=ENV)
    assert first.returncode == 0, first.stderr
    proc = run(tmp_path, f"""
        import os, sys
        from mpi4py import MPI
        from hpckfac.train import cli
        os.chdir({str(tmp_path)!r} + ("/node0" if MPI.COMM_WORLD.Get_rank() == 0 else "/node1"))
        sys.exit(cli.main(["--resume", "run", "--no-progress"]))
    """, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == (
        "hpckfac train: error: --resume: rank 1 of 2 cannot read the checkpoint the others resume from "
        "(resume: no checkpoint file or directory at run)"), proc.stderr


@pytest.mark.parametrize("readable", [True, False])
def test_resume_given_to_some_ranks_only_is_named(tmp_path, readable):
    """``--resume`` on rank 1 alone: a rank that read the checkpoint took its settings, and the
    error named the first that differed (``--lr is None on rank 0, 0.05 on rank 1``); one that
    could not read it started as the others, and the job ended on ``check_replicas() in step()``
    against ``resuming``. Both now name ``--resume``, status 2."""
    run_dir = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "hpckfac", "train", "--optimizer", "sgd", "--steps", "2",
                            "--batch-size", "16", "--width", "4", "--no-progress", "--checkpoint-every", "2",
                            "--out", str(run_dir)], capture_output=True, text=True, timeout=120, env=ENV)
    assert first.returncode == 0, first.stderr
    path = str(run_dir if readable else tmp_path / "missing")
    proc = run(tmp_path, f"""
        import sys
        from mpi4py import MPI
        from hpckfac.train import cli
        resume = ["--resume", {path!r}] if MPI.COMM_WORLD.Get_rank() == 1 else []
        sys.exit(cli.main(["--steps", "2", "--batch-size", "16", "--width", "4", "--no-progress", *resume]))
    """, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == (
        "hpckfac train: error: the ranks were started with different settings: --resume is given on rank(s) [1] "
        "only; give it to every rank, or to none"), proc.stderr


@pytest.mark.parametrize("case", ["steps", "weights"])
def test_ranks_that_resume_different_checkpoints_fail_together(tmp_path, case):
    """``--resume`` may name another path on each node: ranks that read checkpoints of
    different steps ran different numbers of steps (the job ended when the first rank left,
    naming no cause), and SGD replicas resumed from different weights of the same step
    trained apart to the end with status 0."""
    run_dir = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "hpckfac", "train", "--optimizer", "sgd", "--steps", "6",
                            "--batch-size", "16", "--width", "4", "--no-progress", "--checkpoint-every", "2",
                            "--out", str(run_dir)], capture_output=True, text=True, timeout=120, env=ENV)
    assert first.returncode == 0, first.stderr
    from hpckfac.train.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
    mine = checkpoint_path(str(run_dir / "checkpoints"), 2)
    theirs = checkpoint_path(str(run_dir / "checkpoints"), 4)
    if case == "weights":  # the same step, another rank's copy with other weights
        state = load_checkpoint(mine)
        name = next(iter(state["model"]))
        state["model"][name] = state["model"][name] + 1e-3
        theirs = str(tmp_path / "other.pt")
        save_checkpoint(theirs, state)
    proc = run(tmp_path, f"""
        import sys
        from mpi4py import MPI
        from hpckfac.train import cli
        path = {mine!r} if MPI.COMM_WORLD.Get_rank() == 0 else {theirs!r}
        sys.exit(cli.main(["--resume", path, "--no-progress", "--checkpoint-every", "0"]))
    """, timeout=90)
    assert proc.returncode == 1, proc.stderr
    expected = ("(step 2 on rank 0, step 4 on rank 1)" if case == "steps" else
                "of step 2 (stem.0.weight has 2 different values (ranks [0]; ranks [1]))")
    assert last_line(proc.stderr) == (
        f"hpckfac train: error: --resume: the ranks resumed from different checkpoints {expected}; every rank "
        "must resume from the same one"), proc.stderr


@pytest.mark.parametrize("flag, mine, theirs, expected", [
    ("--width", "4", "8", "--width is 4 on rank 0, 8 on rank 1"),
    # without signals a rank skips the others' per-step stop exchange
    ("--stop-signals", "none", "TERM", "--stop-signals is none on rank 0, TERM on rank 1"),
    ("--stop-signals", "15,SIGUSR1", "TERM,USR1", None),  # the same signals, spelt otherwise
])
def test_ranks_started_with_different_settings_fail_together(tmp_path, flag, mine, theirs, expected):
    proc = run(tmp_path, f"""
        import sys
        from mpi4py import MPI
        from hpckfac.train import cli
        value = {mine!r} if MPI.COMM_WORLD.Get_rank() == 0 else {theirs!r}
        sys.exit(cli.main(["--steps", "2", "--batch-size", "16", "--no-progress", {flag!r}, value]))
    """, timeout=90)
    if expected is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    assert last_line(proc.stderr) == (
        f"hpckfac train: error: the ranks were started with different settings: {expected}"), proc.stderr


@pytest.mark.parametrize("theirs, expected", [
    (["--steps", "x"], "rank 1 of 2: argument --steps: invalid int value: 'x'"),
    (["--help"], "rank 1 of 2: --help"),
])
def test_an_error_or_help_on_one_rank_only_ends_every_rank(tmp_path, theirs, expected):
    """Rank 1 alone cannot parse its arguments, or asks for --help: it returned while rank 0
    waited for good in the settings' comparison. Both return 2, rank 0 naming rank 1's cause."""
    proc = run(tmp_path, f"""
        import sys
        from mpi4py import MPI
        from hpckfac.train import cli
        mine = ["--steps", "2", "--batch-size", "16", "--no-progress"]
        sys.exit(cli.main(mine if MPI.COMM_WORLD.Get_rank() == 0 else {theirs!r}))
    """, timeout=90)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert last_line(proc.stderr) == (
        f"hpckfac train: error: the ranks were started with different arguments: {expected}"), proc.stderr


def test_trainer_setup_checks_are_checked_collectives(tmp_path):
    """From Python, ``out`` on rank 0 only made rank 0 run one more setup exchange than the
    others: a hang, now CollectiveMismatchError on every rank naming both steps."""
    proc = run(tmp_path, f"""
        from hpckfac.comm import CollectiveMismatchError, Communicator
        from hpckfac.train.config import TrainConfig
        from hpckfac.train.loop import Trainer
        comm = Communicator()
        config = TrainConfig(steps=2, batch_size=16, progress=False,
                             out={str(tmp_path / 'o')!r} if comm.rank == 0 else None)
        try:
            Trainer(config, comm)
        except CollectiveMismatchError as exc:
            open({str(tmp_path)!r} + f"/rank{{comm.rank}}.txt", "w").write(str(exc))
    """, timeout=90)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks disagree on the call (checking --out on ranks [0]; loading the data on ranks [1])" in said, said


@pytest.mark.parametrize("ranks", [2, 3])
def test_an_interrupt_while_one_rank_parses_ends_every_rank(tmp_path, ranks):
    """A KeyboardInterrupt raised while the last rank alone parses its arguments: that rank
    returned 130 while the others waited for good in the comparison of the outcomes. Every
    rank ends with status 2, rank 0 naming the last rank and the interrupt once."""
    proc = run(tmp_path, """
        import sys
        from mpi4py import MPI
        from hpckfac.cli import RankParser, exit_status

        def steps(text):
            if MPI.COMM_WORLD.Get_rank() == MPI.COMM_WORLD.Get_size() - 1:
                raise KeyboardInterrupt
            return int(text)

        def main():
            parser = RankParser(prog="demo")
            parser.add_argument("--steps", type=steps)
            parser.parse_everywhere(["--steps", "3"])
            return 0

        sys.exit(exit_status(main, "demo"))
    """, ranks=ranks, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1, proc.stderr
    assert last_line(proc.stderr) == (f"demo: error: the ranks were started with different arguments: "
                                      f"rank {ranks - 1} of {ranks}: KeyboardInterrupt"), proc.stderr
