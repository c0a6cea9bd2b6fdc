"""Shared benchmark plumbing: timing with medians and JSON results."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence


def time_calls(fn: Callable[[], Any], repeat: int, warmup: int = 1,
               barrier: Callable[[], Any] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls.

    ``barrier`` (e.g. ``comm.barrier``) runs before each timed call so that every
    rank starts together and a straggler from the previous call is not charged
    to the next one.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def progress(items: Sequence[Any], desc: str, enabled: bool = True) -> Iterator[Any]:
    """``items``, showing that a long benchmark is alive on stderr: a bar on a terminal, a
    plain line per tenth of the items in a batch job's log (no carriage-return flood).
    ``enabled=False`` (ranks other than 0) shows nothing."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    total = len(items)
    for k, item in enumerate(tqdm(items, desc=desc, disable=not (enabled and interactive), leave=False)):
        yield item
        if enabled and not interactive and (k + 1) % max(1, total // 10) == 0:
            print(f"{desc}: {k + 1}/{total}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (the statistic quoted everywhere in docs/)."""
    return float(statistics.median(values))


def environment() -> dict[str, Any]:
    """Where a result was measured: host, Python, library versions (hpckfac's included), the
    job's ranks and this process's thread settings (``threads``)."""
    import numpy

    import hpckfac

    info: dict[str, Any] = {
        "hpckfac": hpckfac.__version__,
        "host": platform.node(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
        info["ranks"] = MPI.COMM_WORLD.Get_size()
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    info["threads"] = thread_settings()
    return info


def thread_settings() -> dict[str, Any]:
    """This process's pools as they ran: torch's threads, each BLAS library's threads (None
    without threadpoolctl) and the thread variables that were set (``hpckfac.threads``)."""
    from hpckfac.threads import USER_VARIABLES

    settings: dict[str, Any] = {"variables": {v: os.environ[v] for v in USER_VARIABLES if v in os.environ}}
    if "torch" in sys.modules:
        settings["torch"] = sys.modules["torch"].get_num_threads()
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        settings["blas"] = None
    else:
        settings["blas"] = {pool["internal_api"]: pool["num_threads"] for pool in threadpool_info()
                            if pool["user_api"] == "blas"}
    return settings


def output_problem(path: str, directory: bool = False) -> str | None:
    """Why ``path`` cannot be written as a file (``directory``: created as a directory), or
    None; checked before a benchmark runs, so that it does not fail at its end."""
    path = os.path.abspath(path)
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{path} exists and is not a directory"
        parent = path
    else:
        if os.path.isdir(path):
            return f"{path} is a directory"
        parent = os.path.dirname(path)
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent}"
    return None


def check_outputs(parser: argparse.ArgumentParser, files: Sequence[tuple[str, str | None]] = (),
                  directories: Sequence[tuple[str, str | None]] = ()) -> None:
    """``parser.error`` (one line, exit 2) for the first ``(flag, path)`` whose path cannot be
    written; None paths are skipped. Rank 0 writes the results, so rank 0 looks, and every rank
    of the job gets its answer (a collective of COMM_WORLD: call it on every rank), so that no
    rank exits while the others wait."""
    from mpi4py import MPI

    problem = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        problem = next((f"{flag} {path}: {why}" for items, directory in ((files, False), (directories, True))
                        for flag, path in items if path is not None
                        for why in [output_problem(path, directory)] if why), None)
    if MPI.COMM_WORLD.Get_size() > 1:
        problem = MPI.COMM_WORLD.bcast(problem, root=0)
    if problem:
        parser.error(problem)


def host_memory() -> int | None:
    """Bytes of memory of this machine (``MemTotal``), or None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def check_memory(parser: argparse.ArgumentParser, per_rank: int, flags: str) -> None:
    """``parser.error`` (one line, exit 2, every rank) when ranks that each need at least
    ``per_rank`` bytes of host memory cannot fit on their machine together, before anything is
    allocated: past that, an allocation fails with an error far from its cause, or the kernel
    kills a rank and the others wait. ``flags`` names the options that set the size. A collective
    of COMM_WORLD: call it on every rank."""
    from mpi4py import MPI

    from hpckfac.comm.topology import node_placement

    world = MPI.COMM_WORLD
    sharing = node_placement(world)[1]
    total = host_memory()
    problem = None
    if total is not None and per_rank * sharing > total:
        problem = (f"{flags}: need at least {per_rank / 2**30:.1f} GiB per rank"
                   f"{f' ({sharing} ranks on this machine)' if sharing > 1 else ''}, more than the "
                   f"{total / 2**30:.1f} GiB of this machine")
    if world.Get_size() > 1:  # every rank must exit alike; a machine of the job may differ
        problem = next((p for p in world.allgather(problem) if p), None)
    if problem:
        parser.error(problem)


def one_process(parser: argparse.ArgumentParser, what: str = "") -> None:
    """``parser.error`` on every rank when the job has several ranks: a benchmark of one process
    (``what``, e.g. ``--combine``, names the mode; empty: the whole benchmark) would run once per
    rank, each copy printing the same tables and writing the same files, and timing it beside
    its own copies."""
    from mpi4py import MPI

    size = MPI.COMM_WORLD.Get_size()
    if size > 1:
        parser.error(f"{what + ' ' if what else ''}runs in one process, not under mpiexec with {size} ranks: "
                     f"run it without mpiexec (or with -n 1)")


def make_parent(path: str | os.PathLike) -> None:
    """Create the folders above ``path`` that do not exist yet (``check_outputs`` accepted them)."""
    directory = os.path.dirname(os.fspath(path))
    if directory:
        os.makedirs(directory, exist_ok=True)


def write_json(path: str | os.PathLike, name: str, config: dict[str, Any],
               results: Any) -> None:
    """Write one benchmark's results with its configuration and environment."""
    payload = {"benchmark": name, "config": config, "environment": environment(),
               "results": results}
    make_parent(path)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
