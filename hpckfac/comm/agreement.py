"""Cheap check that every rank called the same collective with matching arguments.

Each rank describes its call as a fixed-length vector of integers (which
collective, whether its arguments passed local validation, dtype, length, op,
algorithm, a parameter such as the root, and a digest of counts, array layouts
or a value, and the number of the preconditioner whose call it is).
One MAX allreduce of ``[v, -v]`` yields both the element-wise maximum
and minimum over ranks; they are equal exactly when all ranks agree. Cost: one
allreduce of 18 int64 values (a latency-bound message) per collective. Only
when ranks disagree is there a second step, an allgather of the vectors, to
name the ranks in the error raised on every rank.
"""
from __future__ import annotations

import hashlib
from typing import Literal, NamedTuple, Sequence, get_args

import numpy as np
from mpi4py import MPI

from hpckfac.comm.dtypes import DTYPE_CODES

COLLECTIVES = ("allreduce", "allreduce_many", "reduce_scatter_v", "allgather_v", "broadcast", "check_same",
               "allgather_object", "the end of the script", "same_everywhere", "nonzero_ranks")
ReduceOp = Literal["sum", "mean"]
Algorithm = Literal["ring", "mpi"]
# An allreduce may also leave the choice to the buffer's size ("auto").
ReduceAlgorithm = Literal["ring", "mpi", "auto"]
OPS: tuple[str, ...] = get_args(ReduceOp)
ALGORITHMS: tuple[str, ...] = get_args(ReduceAlgorithm)
_DTYPE_NAMES = {code: str(dtype) for dtype, code in DTYPE_CODES.items()}
# What the ``parameter`` field holds, named in an error, for the collectives that send one.
_PARAMETER_NAMES = {"broadcast": "root", "allreduce_many": "bucket_bytes"}


class Signature(NamedTuple):
    """One rank's description of its call (all fields integers)."""

    collective: int  # index into COLLECTIVES
    valid: int = 1  # 0 when the rank's own arguments failed validation
    dtype: int = 0  # DTYPE_CODES value, 0 when not applicable
    length: int = 0  # elements in the buffer (or in all arrays)
    op: int = 0  # index into OPS
    algorithm: int = 0  # index into ALGORITHMS
    parameter: int = 0  # root, or bucket size
    layout: int = 0  # digest of counts, of array sizes and dtypes, or of a value
    instance: int = 0  # the preconditioner (or engine) whose call it is (``Communicator.new_instance``), 0: none


def signature(collective: str, **fields: int) -> Signature:
    """A signature for ``collective`` with the given fields."""
    return Signature(COLLECTIVES.index(collective), **fields)


def rejected(collective: str) -> Signature:
    """The signature of a rank whose arguments failed validation."""
    return Signature(COLLECTIVES.index(collective), valid=0)


def digest(values: Sequence[int] | bytes) -> int:
    """A 56-bit digest of integers or bytes (for counts, layouts and values);
    it fits an int64 with room to negate."""
    data = values if isinstance(values, bytes) else np.asarray(values, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def _show(field: str, value: int) -> str:
    if field == "collective":
        return COLLECTIVES[value]
    if field == "dtype":
        return _DTYPE_NAMES.get(value, "-")
    if field == "op":
        return OPS[value]
    if field == "algorithm":
        return ALGORITHMS[value]
    if field == "valid":
        return "accepted" if value else "rejected (raised its own error)"
    if field == "layout":
        return f"digest {value:014x}"
    if field == "instance":
        return f"#{value}" if value else "none"
    return str(value)


def describe(everyone: Sequence[Signature], calls: Sequence[str] | None = None) -> str:
    """The fields that differ between ranks, each with the ranks holding each value,
    e.g. ``length (3 on ranks [0]; 4 on ranks [1])``; where ranks are in different
    collectives, the ``calls`` they are in (``state_dict()``, ``allreduce_many in step()``)."""
    refused = [rank for rank, sig in enumerate(everyone) if not sig.valid]
    # A rank that rejected its arguments sent no dtype, length etc. to compare, and the fields of
    # two different collectives mean different things: then the collective alone is named.
    other_call = len({sig.collective for sig in everyone}) > 1
    # The same collective under other calls' names (two checks that compare digests of other
    # values): the calls say it, where their digests and values would read as arguments that differ.
    other_name = calls is not None and len(set(calls)) > 1
    fields = ("collective", "valid") if refused or other_call or other_name else Signature._fields
    parts = []
    for field in fields:
        i = Signature._fields.index(field)
        groups: dict[int | str, list[int]] = {}
        named = field == "collective" and calls is not None
        for rank, sig in enumerate(everyone):
            groups.setdefault(calls[rank] or _show(field, sig[i]) if named else sig[i], []).append(rank)
        if len(groups) > 1:
            held = "; ".join(f"{value if named else _show(field, value)} on ranks {ranks}"
                             for value, ranks in groups.items())
            if field == "instance":
                parts.append(f"the preconditioner ({held}; numbered in the order each rank built its "
                             f"KFACPreconditioners and KFACEngines on this communicator: every rank must run "
                             f"the collectives of the same one at the same time)")
            else:
                if field == "parameter":  # one collective here: the fields differ only within one
                    field = _PARAMETER_NAMES.get(COLLECTIVES[everyone[0].collective], field)
                parts.append(f"{'arguments' if field == 'valid' else 'the call' if named else field} ({held})")
    checking = [rank for rank, sig in enumerate(everyone) if sig.collective == COLLECTIVES.index("check_same")]
    # A step's settings are compared only where they changed, so a rank alone in that check is
    # explained by its own message; other checks (broadcast_parameters') run on every rank, and
    # a rank waiting in one is only waiting.
    if other_call and checking and (calls is None or any("settings" in calls[r] for r in checking)):
        parts.append(f"ranks {checking} compare settings that changed there alone: their message names them")
    return ", ".join(parts)


def disagreement(mpi: MPI.Comm, mine: Signature, call: str = "") -> tuple[list[Signature], list[str]] | None:
    """Every rank's signature and the name of the call it is in (``call``, e.g.
    ``"state_dict()"``; empty: the collective's own name) if any two ranks differ, else None
    (same answer on every rank). Only a disagreement sends the names."""
    vec = np.array(mine, dtype=np.int64)
    both = np.concatenate([vec, -vec])
    extremes = np.empty_like(both)
    mpi.Allreduce(both, extremes, op=MPI.MAX)
    if np.array_equal(extremes[:vec.size], -extremes[vec.size:]):
        return None
    everyone = mpi.allgather((tuple(int(x) for x in mine), call))
    return [Signature(*sig) for sig, _ in everyone], [name for _, name in everyone]
