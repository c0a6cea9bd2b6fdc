"""The ``hpckfac`` console entry point: help exits 0, unknown commands exit 2 with usage."""

import argparse
import signal

import pytest

from hpckfac import cli


def test_help_and_usage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hpckfac {train|bench}") and "bench" in out
    assert cli.main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: hpckfac bench NAME")
    for name in ("comm", "step", "kernels", "convergence", "scaling", "model"):
        with pytest.raises(SystemExit) as done:
            cli.main(["bench", name, "--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: hpckfac bench {name}")
    assert cli.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert "usage: hpckfac" in err and "hpckfac: error: unknown command 'nope'" in err
    assert cli.main(["bench", "nope"]) == 2
    assert "hpckfac bench: error: unknown benchmark 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "step", "--help"])
    out = capsys.readouterr().out
    assert "timed iterations per configuration (default: 100)" in " ".join(out.split())  # defaults shown
    for name, default in (("kernels", "run one group (default: all three)"),
                          ("scaling", "input height/width (default: the model's, 224 for resnet50, 8 for small)")):
        with pytest.raises(SystemExit):
            cli.main(["bench", name, "--help"])
        assert default in " ".join(capsys.readouterr().out.split())


def test_help_shows_a_default_only_where_it_says_something():
    """A default is added to a setting's help, not to a flag's (False), an unset one's (None) or
    a help text that gives it already."""
    parser = argparse.ArgumentParser(prog="p", formatter_class=cli.HelpFormatter)
    parser.add_argument("--size", type=int, default=7, help="a size")
    parser.add_argument("--flag", action="store_true", help="a flag")
    parser.add_argument("--path", default=None, help="a path")
    parser.add_argument("--threads", type=int, default=0, help="threads (default 0: the process's own)")
    text = " ".join(parser.format_help().split())
    assert "a size (default: 7)" in text and text.count("default") == 2, text


def test_benchmark_help_describes_without_naming_another_program(capsys):
    """Under ``hpckfac bench NAME`` the usage line gives the program; the description line
    must not name ``python -m hpckfac.bench NAME`` nor carry the docstring's reST quotes."""
    from hpckfac.bench.__main__ import BENCHMARKS

    for name in BENCHMARKS:
        with pytest.raises(SystemExit):
            cli.main(["bench", name, "--help"])
        description = capsys.readouterr().out.split("\n\n")[1]
        assert "python -m" not in description and "``" not in description, description
        assert description[0].isupper() and description.rstrip().endswith("."), description


def test_every_train_and_benchmark_flag_has_help_text(monkeypatch):
    import argparse
    import importlib

    from hpckfac.bench.__main__ import BENCHMARKS
    from hpckfac.train.cli import build_parser

    assert [a.option_strings for a in build_parser()._actions if not a.help] == []
    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **kw: parsers.append(self) or (_ for _ in ()).throw(SystemExit(0)))
    for name in BENCHMARKS:
        with pytest.raises(SystemExit):
            importlib.import_module(f"hpckfac.bench.{name}").main([])
    assert len(parsers) == len(BENCHMARKS) == 7
    assert [(p.prog, a.option_strings) for p in parsers for a in p._actions if not a.help] == []


@pytest.mark.parametrize("argv", [["model", "--ranks", "0"], ["model", "--calibrate", "/nonexistent/run.json"],
                                  ["scaling", "--scale", "0"], ["step", "--threads", "-2"], ["step", "--steps", "0"],
                                  ["step", "--profile-steps", "0"], ["step", "--image", "0"],
                                  ["model", "--ranks", "abc"], ["model", "--calibrate", "CORRUPT"],
                                  ["kernels", "--repeat", "0"], ["conv", "--repeat", "0"], ["conv", "--kernel", "4"],
                                  ["conv", "--shapes", "64:16"], ["conv", "--shapes", "64:0:8x8"],
                                  ["model", "--alpha", "nan"], ["model", "--beta", "-5"],
                                  ["model", "--gemm-flops", "0"], ["comm", "--max-bytes", "999999999999999"],
                                  ["step", "--json", "DIR"], ["comm", "--json", "FILE/x.json"],
                                  ["model", "--png", "FILE/sub/x.png"], ["convergence", "--out", "FILE/x"],
                                  ["step", "--profile", "DIR"], ["comm", "--min-bytes", "6"],
                                  ["comm", "--min-bytes", "4", "--dtype", "float64"],
                                  ["scaling", "--image", "0"], ["scaling", "--model", "small", "--image", "100000"],
                                  ["model", "--measure", "0"], ["model", "--cores", "0"], ["model", "--ranks", "100000000"],
                                  ["model", "--calibrate", "DIR"]])
def test_bad_benchmark_arguments_give_one_line(argv, capsys, tmp_path):
    """Each fails before it runs anything (an output path that cannot be written included)."""
    from hpckfac.bench.__main__ import main as bench

    (tmp_path / "run.json").write_text("{not json")
    (tmp_path / "file").write_text("a file")
    names = {"CORRUPT": tmp_path / "run.json", "DIR": tmp_path, "FILE": tmp_path / "file"}
    argv = [str(names[a.split("/")[0]]) + a[len(a.split("/")[0]):] if a.split("/")[0] in names else a for a in argv]
    try:
        code = bench(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and f"bench {argv[0]}: error:" in err[-1]


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 18.7 TiB for an array"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                                                "allocate 76800000000 bytes")])
def test_out_of_memory_gives_one_line(error, monkeypatch, capsys):
    """Sizes too large for the machine are the user's to fix, like a bad argument."""
    from hpckfac.bench import conv
    from hpckfac.bench.__main__ import main as bench

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(conv, "main", fail)
    assert bench(["conv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m hpckfac.bench conv: error: out of memory (")


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    """A RuntimeError that is no failed allocation is a fault to report, not the user's input."""
    from hpckfac.bench import conv
    from hpckfac.bench.__main__ import main as bench

    def fail(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(conv, "main", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        bench(["conv"])


@pytest.mark.parametrize("argv", [["step", "--depth", "7"], ["step", "--width", "0"],
                                  ["step", "--statistics-fraction", "nan"], ["step", "--batch", "100000000"],
                                  ["step", "--batch", "1", "--model", "resnet50", "--image", "32"]])
def test_bad_sizes_are_refused_by_their_flag_before_anything_is_built(argv, capsys, monkeypatch):
    from hpckfac.bench import step
    from hpckfac.bench.__main__ import main as bench

    monkeypatch.setattr(step, "Runner", None)  # nothing may be built
    with pytest.raises(SystemExit) as done:
        bench(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m hpckfac.bench step: error: ") and argv[1] in err[-1]


def buffered_env(**extra: str) -> dict[str, str]:
    """The environment with ``extra``, stdout block-buffered into a pipe as a user's shell has it
    (``PYTHONUNBUFFERED``, set by some CI runners, would make every print fail at once instead)."""
    import os

    return {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, **extra}


def into_closed_pipe(argv: list[str], env: dict[str, str], stderr_too: bool = False):
    """``python argv`` with stdout (and stderr with ``stderr_too``, as ``2>&1 | head`` has it) into a
    pipe whose reader is gone before the command starts: its first write there fails, whatever the
    timing. The completed process, its stderr captured unless it went into the pipe."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        # transformers 5 beside a torch older than 2.6 prints its own notices on stderr when torch's
        # optimizers import it; they are not the command's to silence.
        return subprocess.run([sys.executable, *argv], stdout=write, stderr=write if stderr_too else subprocess.PIPE,
                              text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1",
                                                           "TRANSFORMERS_VERBOSITY": "error"})
    finally:
        os.close(write)


TRAIN = ["-m", "hpckfac", "train", "--steps", "2", "--batch-size", "16"]


@pytest.mark.parametrize("argv", [["-m", "hpckfac", "--help"], ["-m", "hpckfac.bench", "--help"],
                                  TRAIN + ["--no-progress"]])
def test_a_closed_stdout_ends_quietly(argv):
    """``hpckfac ... | head``: the reader of stdout gone before the first line, the command ends
    with the status of a Unix tool ended by SIGPIPE and says nothing on stderr. (argparse's
    ``--help`` of a command ignores the failed write itself and exits 0.)"""
    done = into_closed_pipe(argv, buffered_env())
    assert (done.returncode, done.stderr) == (cli.BROKEN_PIPE_STATUS, "")
    assert cli.BROKEN_PIPE_STATUS == 128 + signal.SIGPIPE  # what a shell reports for a tool SIGPIPE ended


def test_a_write_that_fails_inside_a_benchmark_is_no_error_of_its_own():
    """Unbuffered, the first print fails inside the benchmark rather than at exit: its handling of
    the user's errors (OSError among them) must not report the broken pipe as one."""
    done = into_closed_pipe(["-m", "hpckfac.bench", "model", "--ranks", "1,2", "--preset", "h100-ndr"],
                            buffered_env(PYTHONUNBUFFERED="1"))
    assert (done.returncode, done.stderr) == (cli.BROKEN_PIPE_STATUS, "")


def test_a_closed_pipe_taking_stderr_too_ends_quietly():
    """``hpckfac train ... 2>&1 | head``: the progress lines (stderr) meet the closed pipe inside
    the training loop; the command still ends with SIGPIPE's status, not Python's 120 for a
    failed flush of stderr at exit."""
    done = into_closed_pipe(TRAIN + ["--progress", "lines"], buffered_env(), stderr_too=True)
    assert done.returncode == cli.BROKEN_PIPE_STATUS


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys):
    """Ctrl-C while the command starts (torch loading, say): one line and 130, no traceback."""
    def interrupted():
        raise KeyboardInterrupt

    assert cli.exit_status(interrupted, "hpckfac") == cli.INTERRUPTED_STATUS == 130
    assert capsys.readouterr().err == "hpckfac: interrupted\n"
    assert cli.exit_status(lambda: 3, "hpckfac") == 3


def test_output_still_buffered_when_the_command_returns_ends_quietly_too():
    """A command that returns with its output still in stdout's buffer (a pipe's, flushed only
    when full): the failed flush is the broken pipe, and Python's own flush at exit finds nothing
    more to fail on."""
    import os
    import subprocess
    import sys

    code = "import sys; from hpckfac import cli; sys.exit(cli.exit_status(lambda: print('x') or 0, 'p'))"
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120, env=buffered_env())
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (cli.BROKEN_PIPE_STATUS, "")


@pytest.mark.parametrize("module", ["hpckfac", "hpckfac.bench"])
@pytest.mark.parametrize("argv", [["--help"], [], ["nothing"]])
def test_the_usage_starts_no_mpi_outside_a_launcher(module, argv):
    """``hpckfac --help`` or a mistyped command on a login node, where no launcher's variables
    are set: the usage is printed without starting MPI (some MPI libraries cannot start outside
    a job); under a launcher the job's size is MPI's, so that every rank ends together."""
    import os
    import subprocess
    import sys

    script = (f"import sys, runpy\nsys.argv = [{module!r}] + {argv!r}\n"
              f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit as e:\n"
              f"    status = e.code\nprint('mpi started' if 'mpi4py.MPI' in sys.modules else 'no mpi', status)\n")
    launchers = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                 "SLURM_NTASKS", "PMIX_RANK", "PMIX_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launchers}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.stdout.splitlines()[-1] == f"no mpi {0 if argv == ['--help'] else 2}", done.stderr
    assert ("usage:" in done.stdout) == (argv == ["--help"]) and ("usage:" in done.stderr) == (argv != ["--help"])
