"""Ending the whole job when one rank fails.

In a multi-rank run an exception on one rank leaves the others waiting in
their next collective until the batch system kills the job, burning the
allocation. Once ``hpckfac.comm`` is imported (``hpckfac.torch`` imports it)
in a world of several ranks, an uncaught exception (Ctrl-C included) on any
rank prints its traceback, one line naming the rank and the cause, and aborts
every rank through ``MPI_Abort`` (what ``python -m mpi4py`` does for scripts).
Set ``HPCKFAC_ABORT_ON_ERROR=0`` to keep Python's default (the rank exits, the
others may wait). ``sys.exit()`` is not an exception to Python's hook: a rank
that exits alone with a failure code leaves the others waiting, unless the
script runs under ``python -m mpi4py``, which aborts on that too.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from types import TracebackType
from typing import NoReturn

from mpi4py import MPI

from hpckfac.log import get_logger

ABORT_ENV = "HPCKFAC_ABORT_ON_ERROR"
ABORT_GRACE_S = 0.2
_installed = False


def abort_job(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` tagged with this rank and abort every rank of the job; never returns."""
    world = MPI.COMM_WORLD
    sys.stderr.write(f"{message} [rank {world.Get_rank()} of {world.Get_size()}; aborting the job]\n")
    sys.stderr.flush()
    # The launcher forwards a rank's output asynchronously; without a pause, the abort can
    # tear the job down before the one line that says why reaches the user.
    time.sleep(ABORT_GRACE_S)
    world.Abort(code)
    # Some MPI libraries return from MPI_Abort once the launcher has been told (their runtime
    # then kills the other ranks): nothing more may run here, nor print the message again.
    os._exit(code)


def _hook(previous):
    def hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        previous(kind, error, tb)
        cause = "".join(traceback.format_exception_only(kind, error)).strip().splitlines()
        abort_job(f"hpckfac: uncaught {cause[-1] if cause else kind.__name__}")
    return hook


_warned_env = False


def install_abort_on_error() -> bool:
    """Abort the job on an uncaught exception on any rank (once; only with several ranks
    and unless ``HPCKFAC_ABORT_ON_ERROR=0``; another value is named in a warning, once, and
    taken as 1). Returns whether the hook is installed."""
    global _installed, _warned_env
    value = os.environ.get(ABORT_ENV, "1")
    if value not in ("0", "1"):
        if not _warned_env:
            _warned_env = True
            get_logger("hpckfac.comm.abort").warning("%s=%r: expected 0 or 1; the job aborts on an uncaught "
                                                     "error (1)", ABORT_ENV, value)
        value = "1"
    if not _installed and value == "1" and MPI.COMM_WORLD.Get_size() > 1:
        sys.excepthook = _hook(sys.excepthook)
        _installed = True
    return _installed
