"""Entry point: ``python -m hpckfac.bench NAME [options]``; each NAME is a module here."""
from __future__ import annotations

import importlib
import sys

from hpckfac.cli import RankParser, job_rank_and_size

BENCHMARKS = {
    "comm": "collective bandwidth and latency: ring vs MPI allreduce, ReduceScatterV, AllGatherV",
    "step": "iteration time: SGD + ring-allreduce vs K-FAC, per-stage breakdown",
    "conv": "a convolution's A factor on the CPU: patch Gram vs lag products, per input shape",
    "kernels": "CUDA kernels against their obvious alternatives (needs a GPU)",
    "convergence": "K-FAC vs SGD vs Adam: steps and seconds to target accuracy",
    "scaling": "strong/weak scaling on ResNet-50 layer shapes, per-stage breakdown",
    "model": "alpha-beta performance model (H100/V100 presets, or calibrated here with --calibrate), extrapolated to 4096 GPUs",
}


def main(argv: list[str] | None = None, prog: str = "python -m hpckfac.bench") -> int:
    """Run benchmark ``argv[0]`` with the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lines = "\n".join(f"  {name:12s} {text}" for name, text in BENCHMARKS.items())
    usage = f"usage: {prog} NAME [options]  ({prog} NAME --help)\n{lines}"
    if not (argv and argv[0] in BENCHMARKS) and job_rank_and_size()[1] > 1:
        # Other ranks may have been given a benchmark (an MPMD launch): meet them where they
        # compare their arguments, so that every rank ends, together, rather than this one alone.
        RankParser(prog=" ".join([prog, *argv[:1]]), add_help=False).parse_everywhere([])
    if argv and argv[0] in ("-h", "--help"):
        if _rank_0():
            print(usage)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        if _rank_0():  # every rank exits alike: one copy of the answer
            print(usage, file=sys.stderr)
            if argv:
                print(f"{prog}: error: unknown benchmark {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"hpckfac.bench.{argv[0]}")
    try:
        return int(module.main(argv[1:], prog=f"{prog} {argv[0]}") or 0)
    except BrokenPipeError:
        raise  # stdout's reader went away: no error of the benchmark's (hpckfac.cli.exit_status)
    except (ValueError, OSError, MemoryError, RuntimeError) as exc:
        # A bad argument, an unreadable file or sizes too large for the machine are the user's
        # to fix: one line, no traceback. In a job of several ranks the error may be this rank's
        # alone (rank 0 writes the results): end the whole job, or the others would wait in
        # their next collective.
        if isinstance(exc, RuntimeError) and not out_of_memory(exc):
            raise  # a fault of the library, not of the input: its traceback is wanted
        message = f"{prog} {argv[0]}: error: {exc}"
        if isinstance(exc, (MemoryError, RuntimeError)):
            message = (f"{prog} {argv[0]}: error: out of memory ({str(exc).strip().splitlines()[-1]}): "
                       f"ask for smaller sizes (see --help)")
        if "mpi4py.MPI" in sys.modules and sys.modules["mpi4py.MPI"].COMM_WORLD.Get_size() > 1:
            from hpckfac.comm.abort import abort_job

            abort_job(message, code=2)
        print(message, file=sys.stderr)
        return 2


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed: NumPy's MemoryError, torch's CPU allocator
    ("can't allocate memory") or CUDA's ``torch.OutOfMemoryError``."""
    text = str(exc)
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or \
        "can't allocate memory" in text or "out of memory" in text.lower()


def _rank_0() -> bool:
    """Whether this process is rank 0 of the job (of ``mpiexec -n N python -m hpckfac.bench``)."""
    return job_rank_and_size()[0] == 0


if __name__ == "__main__":
    from hpckfac.cli import exit_status

    sys.exit(exit_status(main, "python -m hpckfac.bench"))
