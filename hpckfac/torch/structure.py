"""The model's structure, compared across ranks at every ``KFACPreconditioner.step()``.

A layer removed, replaced, added or resized, or a parameter frozen or unfrozen, on some ranks
only would make the step's collectives disagree (or, where the shapes still match, train the
replicas apart), and so would a second ``step()`` for one backward on some ranks only, which meets
the others' next ``step()``. ``StructureAgreement.agree`` sends one digest allreduce per step on every rank,
whether or not this rank's model changed, so that every rank makes the same collective calls;
only on a difference does it gather the structures, and then every rank raises
``CollectiveMismatchError`` naming the ranks and what differs.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from hpckfac.comm import CollectiveMismatchError, Communicator
from hpckfac.comm.agreement import digest

Params = Sequence[tuple["nn.Parameter | None", "nn.Parameter | None"]]


def structure(named: Sequence[tuple[str, nn.Parameter]], current: Params) -> tuple:
    """``(name, shape, requires_grad, block)`` of every parameter in ``named`` (the model's
    ``named_parameters()``), ``block`` the index of the K-FAC block among ``current`` (each
    block's parameters now) that covers it, -1 for first-order: a K-FAC layer removed or replaced
    by a new module shows as well as one resized, added or frozen. A few tuples per parameter:
    cheap enough to build at every step."""
    kfac = {id(p): i for i, params in enumerate(current) for p in params if p is not None}
    block = kfac.get
    return tuple([(name, p.shape, p.requires_grad, block(id(p), -1)) for name, p in named])


class StructureAgreement:
    """The structure every rank agreed on at the last ``agree``, and ``gone``: the blocks (indices
    into ``block_names``) none of whose parameters it has."""

    def __init__(self, comm: Communicator, block_names: Sequence[str]) -> None:
        self.comm = comm
        self.block_names = list(block_names)
        self.agreed: tuple | None = None
        self.gone: list[int] = []
        self._seen: tuple | None = None  # this rank's structure at the last call, and its digest
        self._digest = 0

    def agree(self, named: Sequence[tuple[str, nn.Parameter]], current: Params, step: int,
              again: bool = False) -> list[int] | None:
        """Compare the model's structure across ranks (a collective; ``step`` names the step in
        the error), and ``again``: whether this rank's ``step()`` finds the ``.grad`` its last
        one wrote untouched (a second ``step()`` for one backward), in the same digest. Returns
        ``gone`` when the agreed structure changed and some block is gone, else None."""
        mine = structure(named, current)
        if mine != self._seen:  # digested only when it changed here
            self._seen, self._digest = mine, digest(repr(mine).encode())
        mine = self._seen  # the agreed one itself when nothing changed: no second comparison
        what = "the model's structure"
        if self.comm.size > 1 and not self.comm.same_everywhere((self._digest, again), what):
            everyone = self.comm.allgather_object((mine, again), what=what)
            structures = [s for s, _ in everyone]
            if any(s != structures[0] for s in structures):
                raise CollectiveMismatchError(self.difference(structures, step))
            raise CollectiveMismatchError(self.repeated(everyone, step))
        if mine is self.agreed:
            return None
        self.agreed = mine
        present = {block for *_, block in mine}
        self.gone = [i for i in range(len(self.block_names)) if i not in present]
        return self.gone or None

    def difference(self, everyone: Sequence[tuple], step: int) -> str:
        """The message, alike on every rank, naming the ranks whose structure differs from the
        one every rank agreed on at the last step (when some rank still has it) or else from the
        one most ranks have, and what differs."""
        everyone = list(everyone)
        reference = self.agreed if self.agreed in everyone else \
            max(everyone, key=lambda s: (everyone.count(s), -everyone.index(s)))
        alike = [r for r, s in enumerate(everyone) if s == reference]
        told = [f"rank {r} has {self.changes(reference, s)}" for r, s in enumerate(everyone) if s != reference]
        whose = ", whose model every rank had at the last step()" if reference == self.agreed else ""
        return (f"ranks disagree on the model's structure at step {step}: {'; '.join(told)}, against "
                f"ranks {alike}{whose}; every rank must change its model alike (a layer removed, replaced, added or "
                "resized, or a parameter frozen or unfrozen, on some ranks only trains the replicas apart)")

    @staticmethod
    def repeated(everyone: Sequence[tuple[tuple, bool]], step: int) -> str:
        """The message, alike on every rank, where the structures agree but some ranks' ``step()``
        finds the ``.grad`` their last one wrote untouched while the others' have new gradients."""
        again = [rank for rank, (_, flag) in enumerate(everyone) if flag]
        new = [rank for rank, (_, flag) in enumerate(everyone) if not flag]
        return (f"ranks disagree on the step at step {step}: ranks {again} call step() again on the .grad their last "
                f"step() wrote, with no training forward and backward since, while ranks {new} have new gradients: "
                "a second step() on some ranks only meets the others' next step(), and the replicas train apart; "
                "call step() once per backward, on every rank")

    def changes(self, reference: tuple, other: tuple, limit: int = 4) -> str:
        """What ``other`` has that ``reference`` has not (two ``structure`` tuples), the first
        ``limit`` differences."""
        ref = {name: rest for name, *rest in reference}
        new = {name: rest for name, *rest in other}
        names = self.block_names
        found = []
        for name, (shape, trained, block) in ref.items():
            if name not in new:
                found.append(f"no parameter {name}" + (f" (K-FAC layer {names[block]})" if block >= 0 else ""))
                continue
            now_shape, now_trained, now_block = new[name]
            if now_shape != shape:
                found.append(f"{name} of shape {tuple(now_shape)}, not {tuple(shape)}")
            if now_trained != trained:
                found.append(f"{name} {'trainable' if now_trained else 'frozen'}")
            if now_block != block:
                found.append(f"{name} in a new module, not K-FAC layer {names[block]}'s" if now_block < 0
                             else f"{name} in K-FAC layer {names[now_block]}")
        found += [f"an extra parameter {name} of shape {tuple(shape)}" for name, (shape, _, _) in new.items()
                  if name not in ref]
        if not found:
            return "its parameters in another order"
        more = len(found) - limit
        return ", ".join(found[:limit]) + (f" and {more} more differences" if more > 0 else "")
