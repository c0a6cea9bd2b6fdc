"""Stopping a run at the same step on every rank when the batch system asks.

Batch systems warn a job before they end it: Slurm sends ``SIGTERM`` at the time limit
(and ``SIGKILL`` ``KillWait`` seconds later, 30 by default), or any signal chosen with
``#SBATCH --signal=USR1@120`` that long before; PBS sends ``SIGTERM`` on ``qdel`` and at
the walltime. MPICH's and Open MPI's launchers pass ``SIGUSR1`` on to every rank (MPICH's
``SIGTERM`` too: Open MPI's ``mpirun`` passes it on but kills the ranks about half a second
later). A rank that receives one cannot simply stop: the others would wait for
it in their next collective, and a checkpoint is a collective too. ``StopOnSignal`` turns
the signal into a flag that the ranks compare once per step (``should_stop``), so that
every rank stops after the same step, with the same answer, and can checkpoint together::

    stop = StopOnSignal(comm)                 # SIGTERM and SIGUSR1 by default
    for step in range(start, steps):
        train_one_step()
        if stop.should_stop():                # every rank, once per step
            save_checkpoint()                 # every rank stops after this same step
            break

Any signal after the first goes to the handler that was there before (by default: the
process ends), so that a run that does not stop can still be ended by signalling it again,
and Slurm's SIGTERM at the limit still ends a run its earlier ``--signal`` did not stop.
Python runs signal handlers between bytecodes of the main thread: a rank blocked inside an
MPI call notes the signal only when the call returns.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hpckfac.log import get_logger

if TYPE_CHECKING:
    from hpckfac.comm import Communicator

# Those of them this platform has (Windows has no SIGUSR1).
DEFAULT_SIGNALS: tuple[str, ...] = tuple(name for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
_log = get_logger("hpckfac.stop")


def parse_signal(spec: str | int, setting: str = "signals") -> signal.Signals:
    """The signal named ``spec``: ``"SIGUSR1"``, ``"USR1"`` (any case) or its number; ValueError
    naming ``setting`` for a name or number this platform does not know, or a signal no
    process can catch."""
    if isinstance(spec, bool) or not isinstance(spec, (str, int)):
        raise ValueError(f"{setting}: expected signal names or numbers, got {spec!r}")
    try:
        if isinstance(spec, int):
            sig = signal.Signals(spec)
        else:
            name = spec.strip().upper()
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
    except (KeyError, ValueError):
        raise ValueError(f"{setting}: {spec!r} is not a signal on this platform") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{setting}: {sig.name} cannot be caught")
    return sig


class StopOnSignal:
    """Note the given signals on this rank, and tell every rank alike when any rank has one.

    Args:
        comm: the ranks that stop together.
        signals: names (``"SIGUSR1"``, ``"USR1"``) or numbers of the signals that ask for a
            stop (default ``SIGTERM`` and ``SIGUSR1``).

    Installs its handlers at construction, in the main thread (Python's rule for signal
    handlers), and restores the previous ones on ``close()`` or at the end of a ``with``
    block. Construction is not a collective.
    """

    def __init__(self, comm: "Communicator", signals: Sequence[str | int] = DEFAULT_SIGNALS) -> None:
        if isinstance(signals, (str, int)):
            signals = [signals]
        wanted = list(dict.fromkeys(parse_signal(s) for s in signals))
        if not wanted:
            raise ValueError("signals: expected at least one signal")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopOnSignal: create it in the main thread (Python runs signal handlers there alone)")
        self.comm = comm
        self.signals: tuple[signal.Signals, ...] = tuple(wanted)
        self._received: signal.Signals | None = None
        self._closed = False
        self._stopping: dict[int, int] = {}
        self._previous: dict[signal.Signals, Any] = {}
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self._received is None and not self._closed:
            self._received = sig
            return
        # A signal after the first: the run did not stop in time (or the user insists), so
        # the handler that was there before takes this one. So does every signal after close():
        # this handler may still be installed, as the previous one of a StopOnSignal made after
        # this one and closed later, and must not keep a signal that nobody will ask about.
        previous = self._previous.get(sig, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    @property
    def received(self) -> str | None:
        """The name of the first signal this rank received (None before any)."""
        return None if self._received is None else self._received.name

    @property
    def requested(self) -> bool:
        """Whether a ``should_stop`` has said True (no communication: the same on every rank)."""
        return bool(self._stopping)

    @property
    def stopping_ranks(self) -> dict[int, str]:
        """The ranks that had received a signal at the first ``should_stop`` that said True,
        with the signal's name (empty before); ranks signalled later are not added."""
        return {rank: signal.Signals(number).name for rank, number in self._stopping.items()}

    def should_stop(self) -> bool:
        """Whether any rank has received one of the signals: the same answer on every rank,
        so that all stop after the same step. A collective: call it on every rank at the same
        point of each step (one small allreduce, a second exchange only when the ranks'
        flags differ); with one rank, no communication."""
        value = 0 if self._received is None else int(self._received)
        ranks = self.comm.nonzero_ranks(value, "StopOnSignal.should_stop()")
        if ranks and not self._stopping:
            self._stopping = ranks
            if self.comm.rank == 0:
                held = ", ".join(f"{signal.Signals(n).name} on rank {r}" for r, n in ranks.items())
                _log.warning("stop requested (%s of %d): every rank stops after this step", held, self.comm.size)
        return bool(ranks)

    def close(self) -> None:
        """Restore the handlers that were there before (those not replaced since); from then on
        this one, wherever it is still installed (under a StopOnSignal made after it and not
        yet closed), passes every signal on to them."""
        self._closed = True
        handle: Callable = self._handle
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == handle:
                signal.signal(sig, previous)

    def __enter__(self) -> "StopOnSignal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
