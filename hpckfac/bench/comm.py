"""Bandwidth and latency of hpckfac's collectives.

``python -m hpckfac.bench comm``, under ``mpiexec -n N``. For buffer sizes from ``--min-bytes`` to ``--max-bytes``
(factors of 4) it times the ring allreduce against MPI's own ``Allreduce``
(through the same ``Communicator.allreduce``, agreement check included unless
``--no-check``), and ``reduce_scatter_v`` (``rs_v``) / ``allgather_v``
(``ag_v``) with near-equal counts, each with MPI's collective and the ring. The algorithms take turns call by call, so they share the machine's
load. A call's time is the slowest rank's; the median is reported.

Bus bandwidth counts the bytes each rank must move: ``2(P-1)/P`` of the
buffer for allreduce, ``(P-1)/P`` for reduce-scatter and allgather (0 at P=1).
Buffers hold zeros, so repeated sums neither overflow nor slow down.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import numpy as np

from hpckfac.bench.report import check_memory, check_outputs, median, progress, time_calls, write_json
from hpckfac.comm import Communicator
from hpckfac.comm.ring import chunk_bounds
from hpckfac.tables import format_table
from hpckfac.cli import HelpFormatter, RankParser

COLLECTIVES = ("ring", "mpi", "rs_v_mpi", "rs_v_ring", "ag_v_mpi", "ag_v_ring")
# Each collective's share of the buffer a rank sends, times P/(P-1).
_TRAFFIC = {"ring": 2.0, "mpi": 2.0, "rs_v_mpi": 1.0, "rs_v_ring": 1.0, "ag_v_mpi": 1.0, "ag_v_ring": 1.0}
_BIG = 16 * 2**20  # sizes above this get proportionally fewer repetitions
MAX_BYTES = 4 * 2**30  # the largest buffer --max-bytes may ask for


PROG = "python -m hpckfac.bench comm"


def parse(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    """The parsed command line ``argv`` (None: ``sys.argv[1:]``; argparse exits with a usage
    message on bad input)."""
    parser = RankParser(prog=prog, description=__doc__.splitlines()[0],
                    formatter_class=HelpFormatter)
    parser.add_argument("--min-bytes", type=int, default=4096, help="smallest buffer (bytes)")
    parser.add_argument("--max-bytes", type=int, default=256 * 2**20, help="largest buffer (bytes)")
    parser.add_argument("--repeat", type=int, default=20,
                        help=f"timed calls per size and collective (fewer above {_BIG >> 20} MiB, at least 3)")
    parser.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16"],
                        help="element type of the buffers")
    parser.add_argument("--no-check", action="store_true", help="turn the agreement check off")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_everywhere(argv)
    check_outputs(parser, files=[("--json", args.json)])
    for name in ("min_bytes", "max_bytes", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_bytes > args.max_bytes:
        parser.error("--min-bytes must not exceed --max-bytes")
    if args.max_bytes > MAX_BYTES:
        parser.error(f"--max-bytes must be at most {MAX_BYTES >> 30} GiB (each rank allocates several buffers of it)")
    itemsize = np.dtype(args.dtype).itemsize
    if args.min_bytes % itemsize:  # the larger sizes are multiples of it
        parser.error(f"--min-bytes must be a multiple of the {itemsize} bytes of a {args.dtype} element, "
                     f"got {args.min_bytes} (a buffer holds whole elements: the size would be wrong)")
    # The buffer and, with several ranks, about as much again (results, the ring's scratch).
    from mpi4py import MPI

    largest = sizes(args.min_bytes, args.max_bytes)[-1]
    check_memory(parser, largest * (1 if MPI.COMM_WORLD.Get_size() == 1 else 2), "--max-bytes")
    return args


def sizes(lo: int, hi: int) -> list[int]:
    """``lo, 4 lo, 16 lo, ...`` up to ``hi``."""
    out = [lo]
    while out[-1] * 4 <= hi:
        out.append(out[-1] * 4)
    return out


def repetitions(nbytes: int, repeat: int) -> int:
    """Timed calls for a buffer of ``nbytes``: ``repeat``, scaled down above 16 MiB."""
    return max(3, min(repeat, repeat * _BIG // nbytes))


def calls(comm: Communicator, nbytes: int, dtype: np.dtype) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per collective on a buffer of ``nbytes``."""
    n = nbytes // dtype.itemsize
    buf = np.zeros(n, dtype)
    counts = np.diff(chunk_bounds(n, comm.size)).tolist()
    segment = np.zeros(counts[comm.rank], dtype)
    return {"ring": lambda: comm.allreduce(buf, algorithm="ring"),
            "mpi": lambda: comm.allreduce(buf, algorithm="mpi"),
            "rs_v_mpi": lambda: comm.reduce_scatter_v(buf, counts, algorithm="mpi"),
            "rs_v_ring": lambda: comm.reduce_scatter_v(buf, counts, algorithm="ring"),
            "ag_v_mpi": lambda: comm.allgather_v(segment, counts, algorithm="mpi"),
            "ag_v_ring": lambda: comm.allgather_v(segment, counts, algorithm="ring")}


def measure(comm: Communicator, nbytes: int, dtype: np.dtype, repeat: int) -> dict[str, Any]:
    """One table row: median seconds and bus bandwidth of every collective at ``nbytes``."""
    fns = calls(comm, nbytes, dtype)
    for fn in fns.values():
        fn()  # warm-up: first-touch pages, scratch buffers
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repetitions(nbytes, repeat)):
        for name, fn in fns.items():
            times[name] += time_calls(fn, repeat=1, warmup=0, barrier=comm.barrier)
    row: dict[str, Any] = {"bytes": nbytes, "size": label(nbytes), "repeat": repetitions(nbytes, repeat)}
    share = (comm.size - 1) / comm.size
    for name, samples in times.items():
        slowest = np.max(np.array(comm.allgather_object(samples)), axis=0)
        seconds = median(slowest)
        row[f"{name}_us"] = 1e6 * seconds
        row[f"{name}_GBps"] = _TRAFFIC[name] * share * nbytes / seconds / 1e9
    row["ring/mpi_bw"] = row["mpi_us"] / row["ring_us"]
    return row


def label(nbytes: int) -> str:
    """``4096`` -> ``4 KiB``."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the benchmark on every rank; rank 0 prints the table and writes the JSON. Exit status."""
    args = parse(argv, prog)
    comm = Communicator(check_agreement=not args.no_check)
    dtype = np.dtype(args.dtype)
    rows = [measure(comm, nbytes, dtype, args.repeat)
            for nbytes in progress(sizes(args.min_bytes, args.max_bytes), "sizes", enabled=comm.rank == 0)]
    if comm.rank == 0:
        print(f"ranks={comm.size} dtype={dtype} agreement_check={not args.no_check} "
              f"(medians of the slowest rank; GB/s = bus bandwidth)")
        print(format_table(rows, ["size", "repeat"] + [f"{c}_{u}" for c in COLLECTIVES[:2] for u in ("us", "GBps")]
                           + ["ring/mpi_bw"] + [f"{c}_GBps" for c in COLLECTIVES[2:]], floatfmt=".2f"))
        if args.json:
            write_json(args.json, "comm", {**vars(args), "ranks": comm.size}, rows)
    return 0
