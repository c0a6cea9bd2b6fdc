"""``hpckfac.stages.memory.held_bytes``: each distinct buffer counted once, at its whole size,
whatever views of it the groups hold; against the byte counts of the
arrays as allocated here."""
import numpy as np

from hpckfac.stages.memory import held_bytes


def test_views_count_as_the_whole_buffer_once_in_the_first_group():
    rng = np.random.default_rng(0)
    big = np.empty(int(rng.integers(50, 100)) * 6, np.float32)
    other = np.empty(int(rng.integers(1, 40)), np.float64)
    deep = big[6:].reshape(-1, 6)[1:, ::2]  # a view of a view of a view
    got = held_bytes({"a": [deep, None], "b": [big[:3], other, other[1:]], "c": [], "d": [big]})
    assert got == {"a": big.nbytes, "b": other.nbytes, "c": 0, "d": 0}
