"""The ``hpckfac`` console script: ``hpckfac train ...`` and ``hpckfac bench ...``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

from hpckfac.log import launcher_rank_and_size

# The exit statuses of a Unix tool that SIGPIPE (128 + 13) or SIGINT (128 + 2) ended.
BROKEN_PIPE_STATUS = 141
INTERRUPTED_STATUS = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, where it says something (not None, not a flag's
    False, not where the help text already gives it)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RankParser(argparse.ArgumentParser):
    """The argument parser of a command run as ``mpiexec -n N hpckfac ...``: usage, help and
    errors are printed by world rank 0 alone (every rank parses, one copy of the answer is
    enough), and ``parse_everywhere`` ends alike on every rank (``job_rank_and_size``)."""

    _held: list[tuple[str, Any]] | None = None  # output kept back while the ranks compare outcomes
    _failure: str | None = None  # the message of this rank's last error()

    def _print_message(self, message: str, file: Any = None) -> None:
        if self._held is not None:
            self._held.append((message, file))
        elif job_rank_and_size()[0] == 0:
            super()._print_message(message, file)

    def error(self, message: str) -> NoReturn:
        self._failure = message
        super().error(message)

    def parse_everywhere(self, args: Sequence[str] | None = None, compare: bool = True) -> argparse.Namespace:
        """``parse_args(args)``, a collective of ``COMM_WORLD`` in a job of several ranks: one
        allgather of each rank's outcome, so that an error or ``--help`` on some ranks only (an
        MPMD launch, an argument that expands otherwise on another node) ends every rank with
        one message naming the first such rank, where the others would wait for good in their
        first collective. With ``compare``, ranks whose arguments parse to other values are
        refused too, naming the first option that differs, so that the checks that follow fail
        or pass on every rank alike. Each outcome's output is printed once, by rank 0."""
        if job_rank_and_size()[1] == 1:
            return self.parse_args(args)
        self._held, self._failure, parsed, stop = [], None, None, None
        try:
            parsed = self.parse_args(args)
            mine: tuple = ("args", {k: repr(v) for k, v in vars(parsed).items()} if compare else None)
        except BaseException as exc:  # any: a subclass's error() may raise its own type, and an
            # interrupt on this rank alone must meet the others in the allgather, not leave them there
            stop = exc
            said = self._failure if self._failure is not None or not isinstance(exc, SystemExit) else "--help"
            mine = ("stop", said if said is not None else str(exc) or type(exc).__name__)
        held, self._held = self._held, None
        everyone = _world().allgather((self.prog, mine))
        if all(theirs == everyone[0] for theirs in everyone):
            for message, file in held:  # rank 0's help or error, as it would have printed it
                self._print_message(message, file)
            if stop is not None:
                raise stop
            return parsed
        self.error(f"the ranks were started with different arguments: {_first_difference(everyone)}")


def _world():
    """mpi4py's ``COMM_WORLD`` (MPI starts on first use)."""
    from mpi4py import MPI

    return MPI.COMM_WORLD


def job_rank_and_size() -> tuple[int, int]:
    """This process's rank in ``COMM_WORLD`` and the job's size; ``(0, 1)`` without MPI where no
    launcher says otherwise (``hpckfac.log.launcher_rank_and_size``): ``--help`` or a usage error
    on a login node, where some MPI libraries cannot start outside a job, starts none."""
    if launcher_rank_and_size() == (0, 1):
        return 0, 1
    world = _world()
    return world.Get_rank(), world.Get_size()


def _first_difference(everyone: Sequence[tuple[str, tuple]]) -> str:
    """What the first rank that differs from rank 0 does otherwise: another command, an error
    or ``--help`` (``("stop", message)``), or the first option whose value differs."""
    prog, (kind, value) = everyone[0]
    rank, (their_prog, (their_kind, theirs)) = next((r, e) for r, e in enumerate(everyone) if e != everyone[0])
    if their_prog != prog:
        return f"rank 0 runs {prog}, rank {rank} {their_prog}"
    if kind == "stop" or their_kind == "stop":
        stopped, why = (0, value) if kind == "stop" else (rank, theirs)
        return f"rank {stopped} of {len(everyone)}: {why}"
    key = next(k for k in {**value, **theirs} if value.get(k) != theirs.get(k))
    return f"--{key.replace('_', '-')} is {value.get(key)} on rank 0, {theirs.get(key)} on rank {rank}"


def exit_status(run: Callable[[], int], prog: str) -> int:
    """``run()``'s exit status, ending as a Unix tool ends where the user ends it: when the
    reader of stdout goes away first (``hpckfac ... | head``, also with stderr in the pipe:
    ``2>&1 | head``), ``BROKEN_PIPE_STATUS`` and nothing on stderr; on Ctrl-C outside the
    training loop (which reports it itself: while torch loads, say), one line and
    ``INTERRUPTED_STATUS``; a traceback in neither case."""
    try:
        status = run()
        sys.stdout.flush()  # here, not in the interpreter's exit, whose failure would print
        return status
    except BrokenPipeError:
        # Python's own flush at exit would fail again on the closed pipe: stdout's, and stderr's
        # where the pipe took it too (``2>&1 | head``), holding the line that failed.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        try:
            sys.stderr.flush()
        except BrokenPipeError:
            os.dup2(devnull, sys.stderr.fileno())
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``hpckfac <command> [args]`` to the command's own ``main``."""
    return exit_status(lambda: _dispatch(argv), "hpckfac")


def _dispatch(argv: list[str] | None) -> int:
    """``main``'s work: the usage, or the command's own ``main`` with the remaining arguments."""
    from hpckfac.bench.__main__ import BENCHMARKS  # a dict of names: imports nothing heavy

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "hpckfac.train.cli", "bench": "hpckfac.bench.__main__"}
    usage = (f"usage: hpckfac {{{'|'.join(commands)}}} [options]  (hpckfac COMMAND --help)\n"
             "  train   train a ResNet with distributed K-FAC, SGD or Adam (mpiexec -n N hpckfac train)\n"
             f"  bench   benchmarks: {', '.join(BENCHMARKS)}")
    if not (argv and argv[0] in commands) and job_rank_and_size()[1] > 1:
        # Other ranks may have been given a command (an MPMD launch): meet them where they
        # compare their arguments, so that every rank ends, together, rather than this one alone.
        RankParser(prog=" ".join(["hpckfac", *argv[:1]]), add_help=False).parse_everywhere([])
    if argv and argv[0] in ("-h", "--help"):
        if job_rank_and_size()[0] == 0:  # one copy of the answer
            print(usage)
        return 0
    if not argv or argv[0] not in commands:
        if job_rank_and_size()[0] == 0:
            print(usage, file=sys.stderr)
            if argv:
                print(f"hpckfac: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    if argv[0] == "bench":
        return int(module.main(argv[1:], prog="hpckfac bench") or 0)
    return int(module.main(argv[1:]) or 0)

