"""Log records name the rank from the launcher's variables before any communicator exists (then
set_rank's), under the level HPCKFAC_LOG_LEVEL sets."""
import contextlib
import logging

import pytest

from hpckfac import log

LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                 "SLURM_NTASKS", "PMIX_RANK", "PMIX_SIZE")


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"PMI_RANK": "3", "PMI_SIZE": "5"}, (3, 5)),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "7", "PMIX_RANK": "2"}, (2, 7)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, (1, 4)),
    ({"PMIX_RANK": "6"}, (6, "?")),
    ({"PMI_RANK": "abc", "SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3)),  # not a number: the next launcher's
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": ""}, (1, "?")),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "four"}, (1, "?")),
    ({"PMI_RANK": "\u00b2", "SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3)),  # a digit, but no number
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "\u00b2"}, (1, "?")),
    ({"PMI_RANK": ""}, (0, 1)),
])
def test_rank_and_size_from_the_launcher(monkeypatch, env, expected):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert log.launcher_rank_and_size() == expected


@contextlib.contextmanager
def fresh_root():
    """The ``hpckfac`` logger without handlers (pytest's capture handlers included, which it
    attaches to non-propagating loggers), so that ``get_logger`` sets it up again; restored
    afterwards, with the rank tag."""
    root = logging.getLogger("hpckfac")
    saved = (root.handlers[:], root.level, root.propagate, log._RankFilter.rank, log._RankFilter.world)
    root.handlers[:] = []
    try:
        yield root
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        root.propagate = saved[2]
        log._RankFilter.rank, log._RankFilter.world = saved[3], saved[4]


@pytest.mark.parametrize("value, level", [(None, "WARNING"), ("debug", "DEBUG"), ("Error", "ERROR"),
                                          ("loud", "WARNING")])
def test_level_from_the_environment(monkeypatch, capsys, value, level):
    """``HPCKFAC_LOG_LEVEL`` sets the level, in any case; unset it is WARNING, and a value that
    is no level is named in a warning and read as WARNING."""
    if value is None:
        monkeypatch.delenv("HPCKFAC_LOG_LEVEL", raising=False)
    else:
        monkeypatch.setenv("HPCKFAC_LOG_LEVEL", value)
    with fresh_root() as root:
        log.get_logger("test")
        assert root.level == getattr(logging, level)
        assert root.propagate is False and len(root.handlers) == 1
    assert ("'loud' is not a level" in capsys.readouterr().err) == (value == "loud")


def test_records_carry_the_rank_set_and_the_hpckfac_prefix(monkeypatch, capsys):
    """Loggers are named under ``hpckfac`` (a name outside it is prefixed), and each record
    printed names the rank and size ``set_rank`` gave, not the launcher's."""
    monkeypatch.delenv("HPCKFAC_LOG_LEVEL", raising=False)
    with fresh_root():
        assert log.get_logger("hpckfac.ops").name == "hpckfac.ops"
        logger = log.get_logger("trainer")
        assert logger.name == "hpckfac.trainer"
        log.set_rank(3, 8)
        logger.warning("step %d", 7)
    err = capsys.readouterr().err
    assert "[rank 3/8] hpckfac.trainer WARNING: step 7" in err and err.count("step 7") == 1
