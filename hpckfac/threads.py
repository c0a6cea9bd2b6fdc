"""The rank's thread pools: torch's OpenMP pool and NumPy's BLAS pool.

Both pools busy-wait between calls. Left at their defaults, every rank of a
node starts a full pool of each on the same cores and they fight for them
(measured: K-FAC steps 2-5x slower, SGD steps too). Unless the user chose
thread counts (any of ``USER_VARIABLES`` set to a count), ``configure_threads`` makes
one pool do the work: torch gets the rank's share of the cores (its CPU set
divided among the node's ranks that may run on it: all cores of a set the
launcher gave the rank alone, the node's cores divided by its ranks when
nothing is bound, torchrun's convention), and NumPy's BLAS one thread,
because the K-FAC products run in torch's pool (``hpckfac.ops.factors``,
``hpckfac.ops.kron_apply``) and NumPy is left with small work. A BLAS variable
alone (``OPENBLAS_NUM_THREADS``, ``BLIS_NUM_THREADS``) leaves NumPy's pool as set
and torch's still sized. It runs once per process, when the first
Communicator is created, and logs its choice.
"""
from __future__ import annotations

import os
from typing import Sequence

from hpckfac.log import get_logger

USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS")
TORCH_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # those torch sizes its own pool from
_log = get_logger("hpckfac.threads")
_done: dict = {}


def rank_cores(mine: frozenset[int], node_sets: Sequence[frozenset[int]]) -> int:
    """Cores this rank should use: its CPU set ``mine`` divided among the ranks of the node
    whose sets (``node_sets``, this rank's included) overlap it. Nothing bound: every rank
    shares the machine; each rank bound to cores of its own: all of them; ranks bound by
    socket, or a container's CPU set shared by its ranks: that set split among its ranks."""
    return max(1, len(mine) // max(1, _sharing(mine, node_sets)))


def _sharing(mine: frozenset[int], node_sets: Sequence[frozenset[int]]) -> int:
    return sum(1 for other in node_sets if other & mine)


def _is_count(value: str) -> bool:
    """Whether ``value`` is a thread count: a positive whole number (OMP_NUM_THREADS: the first of
    its list of nested levels). OpenMP and the BLAS libraries start their full pools on anything
    else, so an empty or invalid variable is no choice of the user's."""
    first = value.split(",")[0].strip()
    # ASCII decimal digits only, as the libraries parse them: isdigit would take "²", which int()
    # refuses, and isdecimal "٣", which int() reads as 3 but OpenMP as no number.
    return first.isascii() and first.isdecimal() and int(first) > 0


def configure_threads(mine: frozenset[int], node_sets: Sequence[frozenset[int]]) -> dict:
    """Size torch's and NumPy's pools for a rank that may run on the CPUs ``mine``, among the
    node's ranks whose CPU sets are ``node_sets`` (once per process); returns what was decided
    (``{}`` when the user decided both; ``"blas": None`` where the BLAS pool was left as it is)."""
    if "decided" in _done:
        return _done["decided"]
    invalid = [v for v in USER_VARIABLES if v in os.environ and not _is_count(os.environ[v])]
    if invalid:
        _log.warning("%s: not a thread count, which the thread libraries ignore; sizing the pools as if "
                     "unset", ", ".join(f"{v}={os.environ[v]!r}" for v in invalid))
    chosen = [v for v in USER_VARIABLES if v in os.environ and v not in invalid]
    as_set = ", ".join(f"{v}={os.environ[v]}" for v in chosen)
    if any(v in TORCH_VARIABLES for v in chosen):
        _log.info("thread counts left as set (%s)", as_set)
        _done["decided"] = {}
        return {}
    import torch

    # A BLAS variable alone sizes NumPy's pool only: torch's still needs the rank's share.
    decided = {"torch": rank_cores(mine, node_sets), "blas": None if chosen else 1}
    torch.set_num_threads(decided["torch"])
    if not chosen:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # the BLAS pool stays as it is
            decided["blas"] = None
        else:
            threadpool_limits(limits=1, user_api="blas")
    blas = f"BLAS thread(s) as set ({as_set})" if chosen else f"{decided['blas'] or 'default'} BLAS thread(s)"
    _log.info("%d rank(s) on this node, %d of them on this rank's %d CPU(s): %d torch thread(s), %s per rank "
              "(set OMP_NUM_THREADS to choose)", len(node_sets), _sharing(mine, node_sets), len(mine),
              decided["torch"], blas)
    _done["decided"] = decided
    return decided
