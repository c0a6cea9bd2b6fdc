"""Owner assignment: which rank inverts and preconditions each curvature block.

Every rank computes the same assignment from the same layer list, so no
communication is needed. Two methods:

- ``"lpt"`` (default): greedy longest-processing-time. Blocks are taken by
  decreasing cost (ties: lower layer index first) and each goes to the rank
  with the least cost so far (ties: lower rank first). LPT is within 4/3 of
  the best possible maximum load.
- ``"contiguous"``: the layer list cut into ``size`` consecutive runs of
  nearly equal length (the first ``n % size`` ranks take one more), as the
  paper's chainerkfac code divides its links; it ignores cost.

Costs model the inversion work; each block states its own
(``hpckfac.layers.CurvatureBlock.cost``: ``sum count * n^3`` over the matrices
it inverts, e.g. ``d_A^3 + d_G^3`` for a Kronecker pair).
"""
from __future__ import annotations

import heapq
from typing import Sequence

ASSIGNMENTS = ("lpt", "contiguous")


def assign_owners(costs: Sequence[float], size: int, method: str = "lpt") -> list[int]:
    """Owner rank of each block, given the blocks' ``costs`` and ``size`` ranks.

    With more ranks than blocks some ranks own nothing. Deterministic: the same
    inputs give the same owners on every rank.
    """
    if method not in ASSIGNMENTS:
        raise ValueError(f"assignment: expected one of {ASSIGNMENTS}, got {method!r}")
    if int(size) < 1:
        raise ValueError(f"size: expected a positive number of ranks, got {size!r}")
    size, n = int(size), len(costs)
    if method == "contiguous":
        base, extra = divmod(n, size)
        owners = []
        for rank in range(size):
            owners += [rank] * (base + (rank < extra))
        return owners
    owners = [0] * n
    loads = [(0.0, rank) for rank in range(size)]  # a heap ordered by (load, rank)
    for index in sorted(range(n), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[index] = rank
        heapq.heappush(loads, (load + float(costs[index]), rank))
    return owners


def owner_loads(costs: Sequence[float], owners: Sequence[int], size: int) -> list[float]:
    """Total cost per rank under ``owners`` (max/mean of it is the load imbalance)."""
    loads = [0.0] * int(size)
    for cost, owner in zip(costs, owners):
        loads[owner] += float(cost)
    return loads
