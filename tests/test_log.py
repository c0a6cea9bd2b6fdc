"""Log records name the rank from the launcher's variables before any communicator exists."""
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
])
def test_rank_and_size_from_the_launcher(monkeypatch, env, expected):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert log._rank_and_size() == expected
