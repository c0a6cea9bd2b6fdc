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
    for name in ("comm", "step", "kernels", "convergence", "scaling", "model"):
        with pytest.raises(SystemExit) as done:
            cli.main(["bench", name, "--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: hpckfac bench {name}")
    assert cli.main(["nope"]) == 2
    assert "usage: hpckfac" in capsys.readouterr().err


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
                                  ["conv", "--shapes", "64:16"], ["conv", "--shapes", "64:0:8x8"]])
def test_bad_benchmark_arguments_give_one_line(argv, capsys, tmp_path):
    from hpckfac.bench.__main__ import main as bench

    if "CORRUPT" in argv:
        (tmp_path / "run.json").write_text("{not json")
        argv = [str(tmp_path / "run.json") if a == "CORRUPT" else a for a in argv]

    with pytest.raises(SystemExit) if argv[0] in ("step", "kernels") else contextlib.nullcontext():
        assert bench(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and f"bench {argv[0]}: error:" in err[-1]
