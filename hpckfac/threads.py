"""The rank's thread pools: torch's OpenMP pool and NumPy's BLAS pool.

Both pools busy-wait between calls. Left at their defaults, every rank of a
node starts a full pool of each on the same cores and they fight for them
(measured: K-FAC steps 2-5x slower, SGD steps too). Unless the user chose
thread counts (any of ``USER_VARIABLES`` set), ``configure_threads`` makes
one pool do the work: torch gets the rank's share of the cores (all cores of
the CPU set the launcher gave the rank, or the node's cores divided by the
ranks on the node, torchrun's convention), and NumPy's BLAS one thread,
because the K-FAC products run in torch's pool (``hpckfac.ops.factors``)
and NumPy is left with small work. It runs once per process, when the first
Communicator is created, and logs its choice.
"""
from __future__ import annotations

import os

from hpckfac.log import get_logger

USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS")
_log = get_logger("hpckfac.threads")
_done: dict = {}


def rank_cores(local_size: int) -> int:
    """Cores this rank should use: its CPU set when the launcher bound it to part of the
    machine, else the machine's cores divided by the ``local_size`` ranks on the node."""
    total = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = total
    if allowed < total:
        return max(1, allowed)
    return max(1, total // max(1, local_size))


def configure_threads(local_size: int) -> dict:
    """Size torch's and NumPy's pools for a rank sharing its node with ``local_size - 1``
    others (once per process); returns what was decided (``{}`` when the user decided)."""
    if "decided" in _done:
        return _done["decided"]
    chosen = [v for v in USER_VARIABLES if v in os.environ]
    if chosen:
        _log.info("thread counts left as set (%s)", ", ".join(f"{v}={os.environ[v]}" for v in chosen))
        _done["decided"] = {}
        return {}
    import torch

    decided = {"torch": rank_cores(local_size), "blas": 1}
    torch.set_num_threads(decided["torch"])
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the BLAS pool stays as it is
        decided["blas"] = None
    else:
        threadpool_limits(limits=1, user_api="blas")
    _log.info("%d rank(s) on this node: %d torch thread(s), %s BLAS thread(s) per rank "
              "(set OMP_NUM_THREADS or OPENBLAS_NUM_THREADS to choose)", local_size, decided["torch"],
              decided["blas"] if decided["blas"] else "default")
    _done["decided"] = decided
    return decided
