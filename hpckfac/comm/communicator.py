"""The Communicator: hpckfac's collectives on top of an mpi4py communicator."""
from __future__ import annotations

import atexit
import contextlib
import math
import numbers
import os
import pickle
import threading
import weakref
from functools import cached_property
from typing import Any, Callable, Iterator, Literal, Sequence, get_args

import numpy as np
from mpi4py import MPI

from hpckfac.arrays import namespace
from hpckfac.comm import ring, vcoll
from hpckfac.comm.abort import abort_job, install_abort_on_error
from hpckfac.comm.agreement import (ALGORITHMS, OPS, Algorithm, ReduceAlgorithm, ReduceOp, Signature, describe, digest,
                                    disagreement, rejected, signature)
from hpckfac.comm.backend import Backend, HostBackend, backend_for
from hpckfac.comm.dtypes import DTYPE_CODES, check_dtype, mpi_type, sum_op
from hpckfac.comm.errors import CollectiveMismatchError
from hpckfac.comm.fusion import DEFAULT_BUCKET_BYTES, FusionBuffers, plan_buckets, reduce_fused
from hpckfac.comm.topology import node_placement, visible_gpu_count
from hpckfac.log import get_logger, set_rank
from hpckfac.threads import configure_threads


AgreementMode = Literal["always", "on_change", "off"]
AGREEMENT_MODES: tuple[str, ...] = get_args(AgreementMode)


def _op_index(op: str) -> int:
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return OPS.index(op)


def _algorithm_index(algorithm: str, allowed: Sequence[str] = ALGORITHMS) -> int:
    if not isinstance(algorithm, str) or algorithm not in allowed:
        raise ValueError(f"algorithm must be one of {tuple(allowed)}, got {algorithm!r}")
    return ALGORITHMS.index(algorithm)


# The smallest message of the ring that "auto" sends: below it each of the ring's 2(P-1) steps
# is bound by latency, and MPI's allreduce (log2 P steps for small buffers) is faster. Measured
# on shared memory (docs/benchmarks.md): at 2 ranks the ring wins from 128 KiB per message.
RING_MIN_CHUNK_BYTES = 128 * 2**10


def reduction_algorithm(algorithm: str, nbytes: int, size: int) -> str:
    """The algorithm an allreduce of ``nbytes`` over ``size`` ranks runs: ``algorithm``, or for
    ``"auto"`` the ring when each of its messages (``nbytes / size``) carries at least
    ``RING_MIN_CHUNK_BYTES``, else MPI's. The same on every rank that agrees on the call."""
    if algorithm != "auto":
        return algorithm
    return "ring" if nbytes >= RING_MIN_CHUNK_BYTES * size else "mpi"


def _address(a: Any) -> int:
    """The address of ``a``'s first element: NumPy's array interface, CuPy's ``data.ptr``."""
    face = getattr(a, "__array_interface__", None)
    return face["data"][0] if face is not None else a.data.ptr


def _address_view(a: Any) -> np.ndarray:
    """A NumPy array with ``a``'s address, shape, strides and dtype, for address arithmetic only:
    NumPy arrays are their own; for a device array it points into device memory and must never
    be read, which ``np.shares_memory`` does not (it compares addresses)."""
    if isinstance(a, np.ndarray):
        return a

    class Face:
        __array_interface__ = {"version": 3, "shape": tuple(a.shape), "strides": tuple(a.strides),
                               "typestr": np.dtype(a.dtype).str, "data": (_address(a), False)}

    return np.asarray(Face())


def _check_distinct(arrays: list[Any]) -> None:
    """ValueError when two of ``arrays`` share memory: one array, or views of one tensor that
    are the same or overlap, passed twice. Each would be reduced in turn, so the shared elements
    would be summed again from already summed values (taken P**2 times), and which copy is
    written last would depend on the bucket plan. Views that interleave without sharing an
    element (``x[::2]`` and ``x[1::2]``) are fine."""
    spans = []  # (first byte, one past the last byte, position) of each non-empty array
    for i, a in enumerate(arrays):
        if a.size:  # empty arrays may share an address and hold nothing to reduce
            lo = hi = _address(a)
            for n, stride in zip(a.shape, a.strides):
                lo, hi = (lo + (n - 1) * stride, hi) if stride < 0 else (lo, hi + (n - 1) * stride)
            spans.append((lo, hi + a.itemsize, i))
    spans.sort()
    open_spans: list[tuple[int, int]] = []  # (end, position) of the arrays whose bytes may reach further
    for lo, hi, i in spans:
        # Only arrays whose byte ranges overlap can share an element: disjoint tensors (the usual
        # case) cost one sort, however many there are, and no address view.
        open_spans = [(end, j) for end, j in open_spans if end > lo]
        for _, j in open_spans:
            first, second = sorted((j, i))
            x, y = arrays[first], arrays[second]
            if np.shares_memory(_address_view(x), _address_view(y)):
                whole = _address(x) == _address(y) and x.nbytes == y.nbytes
                raise ValueError(f"arrays[{first}] and arrays[{second}] are the same memory"
                                 f"{'' if whole else ' in part'}: each array is reduced once, so pass it once "
                                 "and no two arrays that overlap")
        open_spans.append((hi, i))


def _check_out(out: Any, like: Any, length: int) -> None:
    """ValueError (TypeError for another kind of array) unless ``out`` can take a V-collective's
    result: an array of ``like``'s library and dtype, one axis of ``length`` elements, contiguous,
    writeable, and not overlapping ``like``, the input."""
    if out is None:
        return
    try:
        kind = backend_for(out)
    except TypeError as err:  # named: the input's own refusal reads the same
        raise TypeError(f"out: {err}") from None
    if kind is not backend_for(like):
        raise TypeError(f"out: expected an array of the input's kind, got {type(out).__module__}."
                        f"{type(out).__qualname__}")
    if out.dtype != like.dtype or out.shape != (length,) or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a contiguous 1-D array of {length} {like.dtype} elements, got shape "
                         f"{tuple(out.shape)} of {out.dtype}{'' if out.flags.c_contiguous else ', not contiguous'}")
    _check_writeable(out, "out")
    if out.size and like.size and namespace(out).may_share_memory(out, like):
        raise ValueError("out: overlaps the input; the collective reads the input while it writes out")


def _alone(buf: Any, out: Any) -> Any:
    """A V-collective's result over one rank, ``buf`` itself: in ``out`` when given, else a new
    1-D array, as over several ranks."""
    if out is None:
        return buf.flatten()
    out[...] = buf.reshape(-1)
    return out


def _direct(out: Any, work: Any) -> Any:
    """``out`` where MPI can write it itself (the array kind of ``work``, the buffer MPI reads:
    not behind a staging buffer), else None."""
    return out if out is not None and type(out) is type(work) else None


def _received(result: Any, out: Any, backend: Any) -> Any:
    """A V-collective's ``result`` (an array of ``backend.xp``) as the caller gets it: ``out``
    when given (written directly, or copied into it from a staging buffer), else the
    backend's result."""
    if out is None:
        return backend.result(result)
    if result is not out:
        backend.stage_out(result, out)
    return out


def _check_writeable(buf: Any, name: str) -> None:
    """ValueError for a read-only buffer, before any rank starts a collective that writes it."""
    if not getattr(getattr(buf, "flags", None), "writeable", True):
        raise ValueError(f"{name} is read-only; the collective writes its result into it")


# Whether the Communicators made on COMM_WORLD check agreement: the distinct flags, so that a
# sweep making one per run keeps at most two (the same on every rank: constructing one is
# collective). Flags, not the objects: a Communicator that is collected on one rank and not yet
# on another must not change what happens at exit.
_world_checks: set[bool] = set()

# The MPI communicators other than COMM_WORLD that a checking Communicator of several ranks was
# made on, each once, in the order they were last wrapped (the same on every rank of each:
# constructing one is collective). The mpi4py objects are kept, not the Communicators, for the
# same reason; freed ones are dropped as new ones come, so a sweep that splits and frees a
# communicator per run keeps only those still in use.
_other_checks: list[MPI.Intracomm] = []


# The first Communicator made on COMM_WORLD, kept for the process's lifetime: whether it exists
# decides whether a helper called without ``comm`` creates one (a collective), so it must not be
# collected on one rank and not on another.
_world: list["Communicator"] = []


def world_communicator() -> "Communicator":
    """The first Communicator made on ``MPI.COMM_WORLD`` (or on a duplicate of it) in this
    process, by the script or by hpckfac, made now if there is none: what hpckfac uses where
    ``comm`` is left out, so that a helper called on one rank alone never creates one there
    (creating one is a collective and would wait for the others) but meets the agreement check
    of the one the script made."""
    return _world[0] if _world else Communicator()


def _register_exit_check(comm: "Communicator") -> None:
    """At the end of the script, one agreement check on COMM_WORLD when any Communicator made
    on it checks agreement: a rank still waiting in a checked collective that the others never
    call (``if rank == 0: torch.save(precond.state_dict(), ...)`` as the last line) then gets an
    error instead of waiting forever, and the job ends. In a script that made no Communicator on
    COMM_WORLD, one such check on each other communicator a checking Communicator was made on
    (a ``Split`` of it: a group of ranks training a model of its own), latest first."""
    if not (_world_checks or _other_checks):
        atexit.register(_check_at_exit)
    if comm.mpi == MPI.COMM_WORLD:
        _world_checks.add(comm.check_agreement != "off")
    elif comm.check_agreement != "off":
        # ``==`` compares MPI handles: a freed communicator equals COMM_NULL, and another mpi4py
        # object for the same communicator equals this one.
        _other_checks[:] = [c for c in _other_checks if c != MPI.COMM_NULL and c != comm.mpi]
        _other_checks.append(comm.mpi)


def _check_at_exit() -> None:
    if MPI.Is_finalized():
        return
    if _world_checks:
        # Not the other communicators as well: a rank waiting there for this one, and one of this
        # rank's peers there waiting on COMM_WORLD, cannot both be met, whichever comes first.
        if any(_world_checks):
            _end_of_script(MPI.COMM_WORLD)
        return
    for mpi_comm in reversed(_other_checks):
        if mpi_comm != MPI.COMM_NULL:  # not freed since
            _end_of_script(mpi_comm)


def _end_of_script(mpi_comm: MPI.Intracomm) -> None:
    """The end-of-script agreement check on ``mpi_comm``: ends the job when any rank of it waits in
    another collective."""
    found = disagreement(mpi_comm, signature("the end of the script"), "the end of the script")
    if found is not None:
        abort_job(f"hpckfac: the end of the script: ranks disagree on {describe(*found)}: this rank reached "
                  f"the end of the script while others wait in a collective it never calls (every rank must "
                  f"call it)")


WAIT_NOTICE_ENV = "HPCKFAC_WAIT_NOTICE"


def _wait_notice_seconds() -> float:
    """``HPCKFAC_WAIT_NOTICE`` (seconds > 0, default 60); a bad value is named in a warning and
    the default kept (the notice is advice: it must not fail the collective)."""
    text = os.environ.get(WAIT_NOTICE_ENV, "60")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= threading.TIMEOUT_MAX):
        get_logger("hpckfac.comm").warning("%s=%r: expected a number of seconds > 0 (at most %.3g); using 60",
                                           WAIT_NOTICE_ENV, text, threading.TIMEOUT_MAX)
        return 60.0
    return seconds


def _same(a: Any, b: Any) -> bool:
    """Whether ``check_same`` takes ``a`` and ``b`` (one rank's value and another's) as equal:
    ``==``, except that a NaN matches a NaN, also inside dicts, lists and tuples. Values whose
    pickles match pass without this comparison, NaNs included, so it must not fail the same
    NaN where something else in the value (a set, a dict's order) pickles differently."""
    if isinstance(a, (float, np.floating)) and isinstance(b, (float, np.floating)) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is dict and type(b) is dict:  # not an OrderedDict, whose == also compares the order
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is type(b) and isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. arrays, whose == is element-wise
        return pickle.dumps(a) == pickle.dumps(b)


def _for_reduction(backend: Backend, dtype, algorithm: str) -> Backend:
    """The backend a reduction of ``dtype`` by ``algorithm`` runs through: MPI's own
    float16 sum is a Python user op that reads host memory, so a device-memory
    backend hands such reductions to its host-staging twin."""
    if backend.device_memory and algorithm == "mpi" and dtype == np.float16:
        return backend.staged
    return backend


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _mismatch(call: str, mine: Signature, found: tuple[list[Signature], list[str]]) -> CollectiveMismatchError:
    """The error of a comparing collective (``same_everywhere``, ``nonzero_ranks``) whose ranks
    differ in more than the values compared: ranks in the same collective that name different
    things (each rank's name given), or in different calls."""
    everyone, calls = found
    if _one_collective(mine, everyone):
        holders: dict[str, list[int]] = {}  # grouped, as ``describe`` does: one entry per name
        for rank, name in enumerate(calls):
            holders.setdefault(name, []).append(rank)
        held = "; ".join(f"{name} on ranks {ranks}" for name, ranks in holders.items())
        return CollectiveMismatchError(f"{call}: ranks compare different things ({held})")
    return CollectiveMismatchError(f"{call}: ranks disagree on {describe(*found)}")


def _one_collective(mine: Signature, everyone: Sequence[Signature]) -> bool:
    """Whether every rank's signature is an accepted call of ``mine``'s collective for the same
    object: the ranks' arguments may differ, not what they are doing."""
    return all(sig.valid and sig.collective == mine.collective and sig.instance == mine.instance
               for sig in everyone)


class Communicator:
    """Collectives over the ranks of an MPI communicator.

    Array collectives take NumPy arrays, or CuPy arrays through the device backend
    installed for this MPI (``hpckfac.comm.device``), of float64, float32 or float16
    (any shape; non-contiguous arrays are staged through a contiguous copy).

    With ``check_agreement="always"`` (the default) every array collective starts
    with one small allreduce comparing what each rank passed (collective, dtype,
    length, op, algorithm, root, counts); if ranks disagree, every rank raises
    CollectiveMismatchError instead of hanging or reading garbage. A rank whose
    own arguments are invalid raises ValueError/TypeError after that check
    (no data has moved) and its peers raise CollectiveMismatchError.
    ``"on_change"`` runs that check only for a call this rank has not yet seen
    agreed (the first step of each kind, a new shape): the cheapest steady state,
    but a rank that alone calls in another order may then hang instead of raising.
    ``"off"`` (or False) skips it: invalid arguments raise before any
    communication; disagreeing ranks then hang or fail in MPI.

    The first Communicator of a process also sizes the rank's thread pools
    (``hpckfac.threads``) unless the user set thread counts. In a job of
    several ranks, creating a Communicator also makes an uncaught
    exception on any rank abort the whole job (``hpckfac.comm.abort``; opt out
    with ``HPCKFAC_ABORT_ON_ERROR=0``).

    Args:
        mpi_comm: the mpi4py intracommunicator to wrap (default ``MPI.COMM_WORLD``;
            a plain ``python script.py`` is a world of size 1); ``MPI.COMM_NULL`` (a rank
            a ``Split`` left out) raises ValueError.
        check_agreement: when to run the agreement check before an array collective:
            ``"always"`` (or True), ``"on_change"`` or ``"off"`` (or False); the same on
            every rank (compared at construction, which is a collective).
    """

    def __init__(self, mpi_comm: MPI.Intracomm | None = None,
                 check_agreement: AgreementMode | bool = "always") -> None:
        mpi_comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        # Before the type check: the constant MPI.COMM_NULL itself is a plain Comm, a Split's an Intracomm.
        if isinstance(mpi_comm, MPI.Comm) and mpi_comm == MPI.COMM_NULL:  # an MPI error, not a wrong type
            raise ValueError("mpi_comm: MPI.COMM_NULL (this rank is not in it: a Split with color "
                             "MPI.UNDEFINED gives it to the ranks it leaves out, and Free() leaves it behind); "
                             "make a Communicator only on the ranks of the communicator")
        if not isinstance(mpi_comm, MPI.Intracomm):
            raise TypeError(f"mpi_comm must be an mpi4py Intracomm, got {type(mpi_comm).__name__}")
        self.mpi = mpi_comm
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        self._agree_on_mode(check_agreement)
        self.local_rank, self.local_size, cpu_sets = node_placement(mpi_comm)
        self._fusion = FusionBuffers()
        self._calls: list[str] = []  # the library calls this rank is in (``calling``)
        self._instances: list[int] = []  # the preconditioners whose calls this rank is in (``instance``)
        self._instance_count = 0  # preconditioners (engines) numbered so far (``new_instance``)
        set_rank(MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size())
        install_abort_on_error()
        configure_threads(cpu_sets[self.local_rank], cpu_sets)
        if not _world and MPI.Comm.Compare(mpi_comm, MPI.COMM_WORLD) in (MPI.IDENT, MPI.CONGRUENT):
            _world.append(self)  # COMM_WORLD itself or a duplicate of it (same ranks, same order)
        if self.size > 1:  # every rank of mpi_comm made it: every rank of it checks at exit
            _register_exit_check(self)

    def _agree_on_mode(self, mode: AgreementMode | bool) -> None:
        """Set ``check_agreement`` to ``mode`` after one exchange of every rank's choice: a rank
        that checks waits in each check for ranks that do not, so modes that differ (or one
        that is invalid) raise on every rank here rather than hang at the first collective."""
        try:
            self.check_agreement = mode
            mine = self._check_agreement
        except ValueError as err:
            mine, error = None, err
        else:
            error = None
        everyone = self.mpi.allgather(mine) if self.size > 1 else [mine]
        if error is not None:
            raise error
        if len(set(everyone)) > 1:
            ranks = "; ".join(f"rank {r}: {m if m is not None else 'invalid'}" for r, m in enumerate(everyone))
            raise CollectiveMismatchError(f"Communicator: ranks disagree on check_agreement ({ranks}); pass the "
                                          "same mode on every rank")

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"local_size={self.local_size}, check_agreement={self.check_agreement})")

    @cached_property
    def device(self) -> int | None:
        """The GPU bound to this rank (``local_rank % visible GPUs``), None without CUDA.

        Counted on first use, without creating a CUDA context.
        """
        count = visible_gpu_count()
        return self.local_rank % count if count else None

    @property
    def check_agreement(self) -> AgreementMode:
        """When array collectives run the agreement check: ``"always"``, ``"on_change"`` or ``"off"``
        (compared across ranks at construction; set a new mode on every rank alike)."""
        return self._check_agreement

    @check_agreement.setter
    def check_agreement(self, mode: AgreementMode | bool) -> None:
        mode = {True: "always", False: "off"}.get(mode, mode) if isinstance(mode, bool) else mode
        if mode not in AGREEMENT_MODES:
            raise ValueError(f"check_agreement: expected one of {AGREEMENT_MODES} (or a bool), got {mode!r}")
        self._check_agreement = mode
        self._agreed: set[Signature] = set()  # calls every rank agreed on (used by "on_change")

    @contextlib.contextmanager
    def calling(self, name: str) -> Iterator[None]:
        """Within the block, collectives name ``name`` (e.g. ``"step()"``) as the call they
        belong to, so that a rank that disagrees learns what the others are doing
        (``allreduce_many in step()`` against ``state_dict()``)."""
        self._calls.append(name)
        try:
            yield
        finally:
            self._calls.pop()

    def new_instance(self, owner: object | None = None) -> int:
        """A number for a new object whose collectives must not be mistaken for those of another
        of the same shapes (a ``KFACEngine``, and with it its ``KFACPreconditioner``): 1 for the
        first made on this communicator, then 2, 3, ... Every rank builds them in the same order,
        so one object has the same number on every rank (call it on every rank alike). When
        ``owner`` (the object numbered) is collected, what ``check_agreement="on_change"``
        remembers of its calls is forgotten: no later call can carry its number, and a sweep
        building one object per run on a shared Communicator would otherwise keep every run's."""
        self._instance_count += 1
        if owner is not None:
            weakref.finalize(owner, self._forget_instance, self._instance_count).atexit = False
        return self._instance_count

    def _forget_instance(self, number: int) -> None:
        # A new set rather than removals in place: this may run in a garbage collection started
        # inside a collective's check of the set.
        self._agreed = {sig for sig in self._agreed if sig.instance != number}

    @contextlib.contextmanager
    def instance(self, number: int) -> Iterator[None]:
        """Within the block, the agreement check compares ``number`` (from ``new_instance``) as
        well: ranks that run the same collective for different objects (two preconditioners of
        same-shaped models, stepped in another order on some ranks) raise
        ``CollectiveMismatchError`` instead of summing one object's buffers with another's."""
        self._instances.append(number)
        try:
            yield
        finally:
            self._instances.pop()

    def _numbered(self, mine: Signature) -> Signature:
        """``mine`` with the number of the object whose call this is (``instance``)."""
        return mine._replace(instance=self._instances[-1]) if self._instances else mine

    def _call_name(self, label: str) -> str:
        return f"{label} in {self._calls[-1]}" if self._calls else label

    def _enter(self, collective: str, validate: Callable[[], tuple[Any, Signature]], label: str | None = None) -> Any:
        """Validate this rank's arguments and, as ``check_agreement`` says, confirm
        that every rank called ``collective`` compatibly (``label``: the call's name in the
        error, default ``collective``). Returns what ``validate`` planned."""
        mode = self._check_agreement
        if mode == "off":
            return validate()[0]
        try:
            plan, mine = validate()
        except (TypeError, ValueError):
            disagreement(self.mpi, rejected(collective), self._call_name(label or collective))  # peers raise too
            raise
        mine = self._numbered(mine)
        if mode == "on_change" and mine in self._agreed:
            return plan
        call = self._call_name(label or collective)
        found = disagreement(self.mpi, mine, call)
        if found is not None:
            everyone, calls = found
            raise CollectiveMismatchError(f"{call}: ranks disagree on {describe(*found)}",
                                          same_call=_one_collective(mine, everyone) and len(set(calls)) == 1)
        if mode == "on_change":
            self._agreed.add(mine)
        return plan

    def _reduce_flat(self, flat: Any, mean: bool, algorithm: str, backend: Backend) -> None:
        datatype = mpi_type(flat.dtype)
        if algorithm == "ring":
            ring.allreduce(self.mpi, flat, datatype, backend, mean)
            return
        self.mpi.Allreduce(MPI.IN_PLACE, [flat, datatype], op=sum_op(flat.dtype))
        if mean and self.size > 1:
            flat /= self.size

    def allreduce(self, buf: Any, op: ReduceOp = "sum", algorithm: ReduceAlgorithm = "ring") -> Any:
        """Sum (or mean) ``buf`` over ranks, in place; returns ``buf``.

        ``algorithm="ring"`` is hpckfac's ring allreduce; ``"mpi"`` is MPI's Allreduce;
        ``"auto"`` the ring for buffers large enough that its messages are not bound by
        latency (``reduction_algorithm``), MPI's otherwise.
        """
        def validate():
            backend, dtype = backend_for(buf), check_dtype(buf.dtype)
            _check_writeable(buf, "buf")
            op_index, alg = _op_index(op), _algorithm_index(algorithm)
            chosen = reduction_algorithm(algorithm, buf.nbytes, self.size)
            return (_for_reduction(backend, dtype, chosen), chosen), signature(
                "allreduce", dtype=DTYPE_CODES[dtype], length=buf.size, op=op_index, algorithm=alg)

        backend, chosen = self._enter("allreduce", validate)
        if self.size == 1:  # the sum (or mean) over one rank is the buffer itself: no staging, no MPI
            return buf
        work = backend.stage_in(buf)
        self._reduce_flat(work, op == "mean", chosen, backend)
        backend.stage_out(work, buf)
        return buf

    def allreduce_many(self, arrays: Sequence[Any], op: ReduceOp = "mean",
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES, algorithm: ReduceAlgorithm = "ring") -> None:
        """Allreduce every array in ``arrays`` in place, fused into buffers of at most
        ``bucket_bytes`` per dtype (an array larger than that is reduced on its own);
        with ``algorithm="auto"`` each bucket by the algorithm its size calls for."""
        def validate():
            items = list(arrays)  # within the check: a TypeError here is refused on every rank
            op_index, alg = _op_index(op), _algorithm_index(algorithm)
            # Below 2**63: the agreement check sends it as an int64.
            if (isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral)
                    or not 0 < bucket_bytes < 2**63):
                raise ValueError(f"bucket_bytes must be a positive integer below 2**63, got {bucket_bytes!r}")
            backends = [backend_for(a) for a in items]
            for i, a in enumerate(items):
                _check_writeable(a, f"arrays[{i}]")
            if len({b.name for b in backends}) > 1:
                raise TypeError(f"allreduce_many: arrays of mixed types {sorted({b.name for b in backends})}")
            _check_distinct(items)
            dtypes = [check_dtype(a.dtype) for a in items]
            buckets = plan_buckets([a.nbytes for a in items], dtypes, bucket_bytes)
            layout = digest([x for a, d in zip(items, dtypes) for x in (DTYPE_CODES[d], a.size)])
            backend = backends[0] if backends else HostBackend()
            # A bucket holds one dtype, hence one backend, and runs one algorithm.
            chosen = [reduction_algorithm(algorithm, sum(items[i].nbytes for i in b), self.size) for b in buckets]
            plan = [(b, _for_reduction(backend, dtypes[b[0]], how), how) for b, how in zip(buckets, chosen)]
            return (items, plan), signature("allreduce_many", length=sum(a.size for a in items), op=op_index,
                                            algorithm=alg, parameter=bucket_bytes, layout=layout)

        items, plan = self._enter("allreduce_many", validate)
        if self.size == 1:  # nothing to reduce: a device buffer would make a round trip through the host
            return
        for bucket, backend, chosen in plan:
            reduce_fused(items, [bucket], backend, self._fusion,
                         lambda flat: self._reduce_flat(flat, op == "mean", chosen, backend))

    def reduce_scatter_v(self, sendbuf: Any, counts: Sequence[int], op: ReduceOp = "sum",
                         algorithm: Algorithm = "mpi", out: Any = None) -> Any:
        """Sum (or mean) ``sendbuf`` over ranks and return this rank's segment: elements
        ``sum(counts[:rank])`` to ``sum(counts[:rank+1])`` of the result, in ``out`` (a
        contiguous 1-D array of ``counts[rank]`` elements, ``sendbuf``'s kind and dtype, kept by
        a caller that reduces every step) or, when None, in a new array.

        ``counts`` (one non-negative integer per rank, zeros allowed) must sum to
        ``sendbuf.size`` and be the same on every rank. ``algorithm``: ``"mpi"``
        (``MPI_Reduce_scatter``) or ``"ring"`` (the ring's reduce-scatter phase).
        """
        def validate():
            backend, dtype, op_index = backend_for(sendbuf), check_dtype(sendbuf.dtype), _op_index(op)
            alg = _algorithm_index(algorithm, get_args(Algorithm))
            cnt = vcoll.check_counts(counts, self.size)
            if int(cnt.sum()) != sendbuf.size:
                raise ValueError(f"counts sum to {int(cnt.sum())} but sendbuf holds {sendbuf.size} elements")
            _check_out(out, sendbuf, int(cnt[self.rank]))
            return (_for_reduction(backend, dtype, algorithm), cnt), signature(
                "reduce_scatter_v", dtype=DTYPE_CODES[dtype], length=sendbuf.size, op=op_index, algorithm=alg,
                layout=digest(cnt))

        backend, cnt = self._enter("reduce_scatter_v", validate)
        if self.size == 1:  # the sum (or mean) over one rank is the buffer itself: no staging, no MPI
            return _alone(sendbuf, out)
        work = backend.stage_in(sendbuf)
        result = vcoll.reduce_scatter_v(self.mpi, work, cnt, mpi_type(work.dtype), sum_op(work.dtype),
                                        backend, op == "mean", algorithm, out=_direct(out, work))
        return _received(result, out, backend)

    def allgather_v(self, segment: Any, counts: Sequence[int], algorithm: Algorithm = "mpi",
                    what: str | None = None, out: Any = None) -> Any:
        """Concatenate every rank's ``segment`` (``counts[rank]`` elements) in rank
        order; returns the whole buffer: ``out`` (a contiguous 1-D array of ``sum(counts)``
        elements, ``segment``'s kind and dtype, kept by a caller that gathers every step) or,
        when None, a new 1-D array.
        ``algorithm``: ``"mpi"`` (``MPI_Allgatherv``) or ``"ring"``. ``what`` names the
        call a user makes (e.g. ``"state_dict()"``), as in ``allgather_object``: in the
        agreement check's error, and in a notice if this rank waits long for the others."""
        def validate():
            if what is not None and not isinstance(what, str):
                raise TypeError(f"what must be a string naming the call, got {type(what).__name__}")
            backend, dtype = backend_for(segment), check_dtype(segment.dtype)
            alg = _algorithm_index(algorithm, get_args(Algorithm))
            cnt = vcoll.check_counts(counts, self.size)
            if segment.size != cnt[self.rank]:
                raise ValueError(f"segment holds {segment.size} elements but counts[{self.rank}] "
                                 f"is {int(cnt[self.rank])}")
            _check_out(out, segment, int(cnt.sum()))
            layout = digest(cnt) if what is None else digest(cnt.tobytes() + what.encode())
            return (backend, cnt), signature("allgather_v", dtype=DTYPE_CODES[dtype], length=int(cnt.sum()),
                                             algorithm=alg, layout=layout)

        named = what if isinstance(what, str) else None
        with self._waiting(named):
            backend, cnt = self._enter("allgather_v", validate, label=named)
            if self.size == 1:
                return _alone(segment, out)
            work = backend.stage_in(segment)
            result = vcoll.allgather_v(self.mpi, work, cnt, mpi_type(segment.dtype), backend, algorithm,
                                       out=_direct(out, work))
        return _received(result, out, backend)

    @contextlib.contextmanager
    def _waiting(self, what: str | None) -> Iterator[None]:
        """Within the block, a rank that waits longer than ``HPCKFAC_WAIT_NOTICE`` seconds
        (default 60) logs a warning naming the call ``what`` (nothing when None, or at one
        rank): the others may never come, e.g. when they have finished the script."""
        if what is None or self.size == 1:
            yield
            return
        seconds = _wait_notice_seconds()
        notice = threading.Timer(seconds, get_logger("hpckfac.comm").warning,
                                 ("%s has waited %.0f s for the other ranks: it is a collective, every rank must call "
                                  "it (e.g. state_dict() on all ranks, then save on rank 0)", what, seconds))
        notice.daemon = True
        notice.start()  # MPI's blocking calls release the GIL, so the timer's thread can speak
        try:
            yield
        finally:
            notice.cancel()

    def broadcast(self, buf: Any, root: int = 0) -> Any:
        """Copy rank ``root``'s ``buf`` into ``buf`` on every rank, in place; returns ``buf``."""
        def validate():
            backend, dtype = backend_for(buf), check_dtype(buf.dtype)
            _check_writeable(buf, "buf")
            if isinstance(root, bool) or not isinstance(root, numbers.Integral) or not 0 <= root < self.size:
                raise ValueError(f"root must be a rank in [0, {self.size}), got {root!r}")
            return backend, signature("broadcast", dtype=DTYPE_CODES[dtype], length=buf.size, parameter=root)

        backend = self._enter("broadcast", validate)
        if self.size == 1:
            return buf
        work = backend.stage_in(buf)
        self.mpi.Bcast([work, mpi_type(work.dtype)], root=root)
        backend.stage_out(work, buf)
        return buf

    def allgather_object(self, obj: Any, what: str | None = None) -> list:
        """Every rank's (picklable) ``obj``, in rank order.

        With ``what`` (e.g. ``"state_dict()"``) the call is checked like the array
        collectives: a rank that calls it while the others call another collective
        (``if rank == 0: precond.state_dict()`` before the next ``step()``) raises
        ``CollectiveMismatchError`` on every rank, and a rank that waits for the others
        longer than ``HPCKFAC_WAIT_NOTICE`` seconds (default 60) logs a warning naming the
        call (the others may never come, e.g. when they have finished the script).
        """
        if what is None:
            return self.mpi.allgather(obj)
        named = what if isinstance(what, str) else None

        def validate():
            if named is None:
                raise TypeError(f"what must be a string naming the call, got {type(what).__name__}")
            # Pickled before the agreement check, so that an object that cannot be sent fails the
            # check on every rank instead of leaving the others waiting in the exchange.
            try:
                data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as err:  # any: a __reduce__ may raise anything (a closed file: ValueError)
                raise TypeError(f"{what}: the object to gather is not picklable: {err}") from err
            return data, signature("allgather_object", layout=digest(what.encode()))

        with self._waiting(named):
            data = self._enter("allgather_object", validate, label=named)
            return [pickle.loads(part) for part in self.mpi.allgather(data)]

    def same_everywhere(self, value: Any, what: str) -> bool:
        """Whether every rank passed a ``value`` that pickles to the same bytes: one digest
        allreduce, whatever ``check_agreement`` says (a collective, the same answer on every
        rank). False when they differ, and for equal values that pickle differently (sets):
        gather them in full to tell (``allgather_object``), which then costs ``P`` values per
        rank only when something differs. A rank in another call makes every rank raise
        CollectiveMismatchError naming ``what``, as do ranks that pass different ``what``s
        (each rank's named); an unpicklable value raises TypeError (its peers
        CollectiveMismatchError)."""
        return self._same_digest("same_everywhere", value, what, f"{what}: the value to compare is not picklable")

    def nonzero_ranks(self, value: int, what: str) -> dict[int, int]:
        """Every rank's ``value`` that is not 0, by rank (a collective, the same answer on every
        rank): one small allreduce when every rank passes the same value, an allgather of the
        values only when they differ, no communication with one rank. For a flag that any rank
        may raise between two calls, such as a signal received (``hpckfac.stop``). A rank in
        another call makes every rank raise CollectiveMismatchError naming ``what``, as do ranks
        that pass different ``what``s; a ``value`` that is not an integer in ``[0, 2**62)``
        raises ValueError (its peers CollectiveMismatchError)."""
        if not isinstance(what, str):
            disagreement(self.mpi, rejected("nonzero_ranks"), str(what))
            raise TypeError(f"what must be a string naming the call, got {type(what).__name__}")
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < 2**62:
            disagreement(self.mpi, rejected("nonzero_ranks"), self._call_name(what))
            raise ValueError(f"{what}: value must be an integer in [0, 2**62), got {value!r}")
        if self.size == 1:  # nobody to disagree with: no allreduce on a per-step path
            return {0: int(value)} if value else {}
        mine = self._numbered(signature("nonzero_ranks", parameter=int(value), layout=digest(what.encode())))
        call = self._call_name(what)
        found = disagreement(self.mpi, mine, call)  # no waiting notice: its timer thread would cost more than the call
        if found is None:
            return {rank: int(value) for rank in range(self.size)} if value else {}
        everyone, _ = found
        if any(sig._replace(parameter=0) != mine._replace(parameter=0) for sig in everyone):
            raise _mismatch(call, mine, found)
        return {rank: sig.parameter for rank, sig in enumerate(everyone) if sig.parameter}

    def _same_digest(self, collective: str, value: Any, label: str, unpicklable: str) -> bool:
        """``same_everywhere`` as ``collective`` (named ``label`` in errors); ``unpicklable``
        starts the TypeError of a value that cannot be pickled."""
        if not isinstance(label, str):  # refused on every rank, as an unpicklable value is
            disagreement(self.mpi, rejected(collective), str(label))
            raise TypeError(f"what must be a string naming what is compared, got {type(label).__name__}")
        try:
            # The label rides in the signature: two ranks comparing different things are told so,
            # rather than comparing values that were never meant to match.
            mine = self._numbered(signature(collective, parameter=digest(label.encode()),
                                            layout=digest(pickle.dumps(value, protocol=4))))
        except Exception as err:  # any: a __reduce__ may raise anything, and the peers must be told
            disagreement(self.mpi, rejected(collective), self._call_name(label))
            raise TypeError(f"{unpicklable}: {err}") from err
        call = self._call_name(label)
        found = disagreement(self.mpi, mine, call)
        if found is None:
            return True
        everyone, _ = found
        if any(sig._replace(layout=0) != everyone[0]._replace(layout=0) for sig in everyone):
            raise _mismatch(call, mine, found)
        return False

    def check_same(self, value: Any, what: str) -> None:
        """Raise CollectiveMismatchError on every rank unless every rank passed an equal
        (picklable) ``value`` under the same ``what``; the message names ``what`` and the ranks
        that differ.

        Runs whatever ``check_agreement`` says: one digest allreduce, plus an
        allgather of the values only when digests differ.
        """
        if self._same_digest("check_same", value, f"check_same({what})", f"check_same: {what} is not picklable"):
            return
        # Digests differ; equal values may still pickle differently (e.g. set order).
        values = self.mpi.allgather(value)
        differ = [r for r, v in enumerate(values) if not _same(v, values[0])]
        if differ:
            if all(isinstance(v, dict) for v in values):  # name the entries that differ, not whole dicts
                keys = [k for k in dict.fromkeys(k for v in values for k in v)
                        if any(not _same(values[r].get(k), values[0].get(k)) for r in differ)]
                detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} has {_short(values[r].get(k))}"
                                                        for r in [0] + differ) for k in keys)
            else:
                detail = ", ".join(f"rank {r} has {_short(values[r])}" for r in [0] + differ)
            raise CollectiveMismatchError(f"ranks disagree on {what}: {detail}")

    def barrier(self) -> None:
        """Wait until every rank has arrived."""
        self.mpi.Barrier()
