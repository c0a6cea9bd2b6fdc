"""The ``hpckfac`` console script: ``hpckfac train ...`` and ``hpckfac bench ...``."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

# The exit status of a Unix tool that SIGPIPE ended: 128 + 13.
BROKEN_PIPE_STATUS = 141


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, where it says something (not None, not a flag's
    False, not where the help text already gives it)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def quiet_on_broken_pipe(run: Callable[[], int]) -> int:
    """``run()``'s exit status; when the reader of stdout goes away first (``hpckfac ... | head``),
    ``BROKEN_PIPE_STATUS`` and nothing on stderr, as a Unix tool ends, instead of a traceback."""
    try:
        status = run()
        sys.stdout.flush()  # here, not in the interpreter's exit, whose failure would print
        return status
    except BrokenPipeError:
        # Python's own flush at exit would fail again on the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``hpckfac <command> [args]`` to the command's own ``main``."""
    return quiet_on_broken_pipe(lambda: _dispatch(argv))


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

