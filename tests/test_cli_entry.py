"""The ``hpckfac`` console entry point: help exits 0, unknown commands exit 2 with usage."""
import contextlib

import pytest

from hpckfac import cli


def test_help_and_usage(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hpckfac {train|bench}") and "bench" in out
    assert cli.main(["bench", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: hpckfac bench NAME")
    assert cli.main(["nope"]) == 2
    assert "usage: hpckfac" in capsys.readouterr().err


def test_every_train_flag_has_help_text():
    from hpckfac.train.cli import build_parser

    assert [a.option_strings for a in build_parser()._actions if not a.help] == []


@pytest.mark.parametrize("argv", [["model", "--ranks", "0"], ["model", "--calibrate", "/nonexistent/run.json"],
                                  ["scaling", "--scale", "0"], ["step", "--threads", "-2"], ["step", "--steps", "0"],
                                  ["step", "--profile-steps", "0"],
                                  ["kernels", "--repeat", "0"]])
def test_bad_benchmark_arguments_give_one_line(argv, capsys):
    from hpckfac.bench.__main__ import main as bench

    with pytest.raises(SystemExit) if argv[0] in ("step", "kernels") else contextlib.nullcontext():
        assert bench(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and f"bench {argv[0]}: error:" in err[-1]
