"""The ``hpckfac`` console script: ``hpckfac train ...`` and ``hpckfac bench ...``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

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
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in commands:
        print(usage, file=sys.stderr)
        if argv:
            print(f"hpckfac: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    if argv[0] == "bench":
        return int(module.main(argv[1:], prog="hpckfac bench") or 0)
    return int(module.main(argv[1:]) or 0)

