"""Owner assignment: LPT against the exhaustive optimum, tie-breaking, contiguous runs."""
import itertools

import numpy as np
import pytest

from hpckfac.assignment import assign_owners, owner_loads


def best_makespan(costs, size):
    """Smallest possible maximum load, by trying every assignment."""
    return min(max(owner_loads(costs, owners, size)) for owners in itertools.product(range(size), repeat=len(costs)))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("size", [2, 3])
def test_lpt_within_graham_bound_of_optimum(seed, size):
    costs = list(np.random.default_rng(seed).integers(1, 1000, size=7))
    owners = assign_owners(costs, size)
    lpt = max(owner_loads(costs, owners, size))
    # Graham's bound for LPT: at most (4/3 - 1/(3m)) times the optimum.
    assert lpt <= (4 / 3 - 1 / (3 * size)) * best_makespan(costs, size) + 1e-9


def plain_lpt(costs, size):
    """LPT written out without a heap: biggest block first, to the least-loaded (then lowest) rank."""
    loads, owners = [0.0] * size, [None] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[i], loads[rank] = rank, loads[rank] + costs[i]
    return owners


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [1, 3, 5, 12])
def test_lpt_on_fractional_costs_is_the_plain_greedy(seed, size):
    # Costs below 1 and with fractions: loads must add them exactly as given, not rounded.
    costs = [float(c) for c in np.random.default_rng(seed).uniform(0.01, 3.0, size=9)]
    owners = assign_owners(costs, size)
    assert owners == plain_lpt(costs, size)
    loads = owner_loads(costs, owners, size)
    assert loads == pytest.approx([sum(c for c, o in zip(costs, owners) if o == r) for r in range(size)])


def test_lpt_greedy_order_and_ties():
    # Sorted (cost desc, index asc): 2(9) -> r0, 0(5) -> r1, 1(5) -> r2, 3(1) -> r1 (loads 9,5,5: r1 wins the tie).
    assert assign_owners([5, 5, 9, 1], 3) == [1, 2, 0, 1]
    # Equal costs: round robin by index, the lowest rank first.
    assert assign_owners([1.0] * 5, 2) == [0, 1, 0, 1, 0]


def test_more_ranks_than_blocks_leaves_ranks_empty():
    owners = assign_owners([8, 27], 4)
    assert sorted(owners) == [0, 1] and set(range(4)) - set(owners) == {2, 3}
    assert assign_owners([8, 27], 4, "contiguous") == [0, 1]


def test_contiguous_runs():
    assert assign_owners([1] * 7, 3, "contiguous") == [0, 0, 0, 1, 1, 2, 2]
    assert assign_owners([], 2, "contiguous") == [] == assign_owners([], 2)


def test_deterministic_and_validated():
    costs = list(np.random.default_rng(1).random(20))
    assert assign_owners(costs, 4) == assign_owners(list(costs), 4)
    with pytest.raises(ValueError, match="assignment"):
        assign_owners(costs, 2, "random")
    with pytest.raises(ValueError, match="size"):
        assign_owners(costs, 0)
