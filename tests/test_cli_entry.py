"""The ``hpckfac`` console entry point: help exits 0, unknown commands exit 2 with usage."""
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
