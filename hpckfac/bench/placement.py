"""Where a benchmark's ranks ran: each rank's host, the cores its host gives the job, and the
size of each rank's torch pool, gathered from every rank; and one line saying whether the
ranks' threads outnumbered a host's cores (then the compute stages shared cores, and their
times are not the hardware's)."""
from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

from hpckfac.comm.topology import cpu_set

if TYPE_CHECKING:
    from hpckfac.comm import Communicator


def rank_placement() -> tuple[str, list[int], int]:
    """This rank's host, the CPUs it may run on, and the size of torch's pool (set by the
    Communicator to the rank's share of the cores unless the user chose)."""
    import torch

    return platform.node(), sorted(cpu_set()), torch.get_num_threads()


def placement(comm: Communicator) -> dict[str, list[Any]]:
    """Every rank's host (``hosts``), the number of cores the job has on it (``host_cpus``)
    and its torch pool (``threads_per_rank``). Collective: call on every rank."""
    placed = comm.allgather_object(rank_placement())
    # A host's cores are those any of its ranks may run on: under a scheduler that shares nodes,
    # the job's CPU sets, not the machine's count.
    job_cpus: dict[str, set[int]] = {}
    for host, cpus, _ in placed:
        job_cpus.setdefault(host, set()).update(cpus)
    return {"hosts": [host for host, _, _ in placed],
            "host_cpus": [len(job_cpus[host]) for host, _, _ in placed],
            "threads_per_rank": [threads for _, _, threads in placed]}


def oversubscription(run: dict[str, Any]) -> tuple[int, int, str] | None:
    """``(threads, cores, host)`` of the most crowded host of ``run`` (a ``placement`` record)
    where its ranks' threads outnumber the job's cores there, or None where no host is
    oversubscribed (or the record predates ``host_cpus``)."""
    if "host_cpus" not in run:
        return None
    threads: dict[str, int] = {}
    for host, count in zip(run["hosts"], run["threads_per_rank"]):
        threads[host] = threads.get(host, 0) + count
    cores = dict(zip(run["hosts"], run["host_cpus"]))
    worst = max(((threads[h], cores[h], h) for h in cores), key=lambda c: c[0] / c[1])
    return worst if worst[0] > worst[1] else None


def placement_note(runs: list[dict[str, Any]]) -> str:
    """One line on the threads and cores behind the runs' times (each a ``placement`` record
    with its ``ranks``): the threads per rank, and each rank count whose ranks' threads
    outnumber a host's cores, whose compute stages then share cores."""
    counts = sorted({r["ranks"] for r in runs})
    threads = sorted({t for r in runs for t in r.get("threads_per_rank", [])})
    note = "torch threads per rank: " + (", ".join(map(str, threads)) or "not recorded")
    crowded = {run["ranks"]: worst for run in runs if (worst := oversubscription(run))}
    if crowded:
        note += "; oversubscribed, compute stages slowed: " + ", ".join(
            f"P={p}: {t} threads on the {c} cores of {h}" for p, (t, c, h) in sorted(crowded.items()))
    elif any("host_cpus" in r for r in runs):
        note += f"; no host oversubscribed at P={'/'.join(map(str, counts))}"
    return note
