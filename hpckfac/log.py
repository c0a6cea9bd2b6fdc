"""Rank-tagged logging: every record says which MPI rank speaks."""
from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s [rank %(rank)s/%(world)s] %(name)s %(levelname)s: %(message)s"


def launcher_rank_and_size() -> tuple[int, int | str]:
    """This process's rank and the job's size from the launcher's variables (MPICH, Open MPI,
    Slurm, PMIx), ``"?"`` for a size the launcher does not say; ``(0, 1)`` without a launcher.
    A value that is no whole number (an empty ``SLURM_NTASKS`` left by a wrapper script) is
    passed over: a log tag must not stop ``import hpckfac``.

    Read from the environment rather than MPI so that logging works before (and without) MPI
    initialisation; ``set_rank()`` overrides it once a communicator exists."""
    for rank_var, size_var in (
        ("PMI_RANK", "PMI_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
        ("PMIX_RANK", "PMIX_SIZE"),  # PMIx itself exports no size: "?" rather than a wrong 1
    ):
        # isdecimal, not isdigit: a superscript "²" is a digit that int() refuses.
        rank = os.environ.get(rank_var, "")
        if rank.isdecimal():
            size = os.environ.get(size_var, "")
            return int(rank), int(size) if size.isdecimal() else "?"
    return 0, 1


class _RankFilter(logging.Filter):
    rank, world = launcher_rank_and_size()

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        record.world = self.world
        return True


def set_rank(rank: int, world: int) -> None:
    """Tag subsequent records with ``rank``/``world`` (called by the Communicator)."""
    _RankFilter.rank, _RankFilter.world = rank, world


def get_logger(name: str = "hpckfac") -> logging.Logger:
    """Logger under the ``hpckfac`` hierarchy whose records carry the MPI rank.

    The level comes from ``HPCKFAC_LOG_LEVEL`` (default ``WARNING``).
    """
    root = logging.getLogger("hpckfac")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        level = os.environ.get("HPCKFAC_LOG_LEVEL", "WARNING").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            root.warning("HPCKFAC_LOG_LEVEL=%r is not a level (DEBUG, INFO, WARNING, ERROR, CRITICAL); "
                         "using WARNING", os.environ["HPCKFAC_LOG_LEVEL"])
            level = "WARNING"
        root.setLevel(level)
        root.propagate = False
    return logging.getLogger(name if name.startswith("hpckfac") else f"hpckfac.{name}")
