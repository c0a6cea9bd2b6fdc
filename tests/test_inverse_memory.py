"""Memory of an inverse-update step: the owner's temporaries, as NumPy allocates them."""
import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.stages.engine import KFACEngine


@pytest.mark.parametrize("outputs", [(300, 10), (300, 300)], ids=["two-shapes", "one-run"])
def test_an_inversion_holds_less_than_the_dense_factors_beyond_the_state(outputs):
    """Re-inverting (the inverses of the previous step held) peaks, in NumPy's allocations, at
    less than the dense factors' bytes beyond what the state held before: the inverses being
    replaced go first, each order's matrices are unpacked straight into one batch that the
    inversion overwrites, and the batch goes before the next order's. (Unpacked stacks, their
    concatenation and the inversion's separate halves and damped copies peaked at ~3.7 times.)
    Two blocks of one shape form a run whose inverses are also held as one stack: it goes
    first too."""
    blocks = [LinearBlock("wide", 300, outputs[0], bias=True), LinearBlock("head", 300, outputs[1], bias=True)]
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(b.grad_shape).astype(np.float32) for b in blocks]
    stats = [b.statistics(rng.standard_normal((64, 300)), rng.standard_normal((64, o)), 1 / 64)
             for b, o in zip(blocks, outputs)]
    tracemalloc.start()  # before the first inversion: releasing its inverses counts
    try:
        engine = KFACEngine(blocks, Communicator(MPI.COMM_SELF), factor_update_interval=1,
                            inverse_update_interval=1)
        engine.step(grads, stats, lr=0.1)  # the first step inverts
        state = engine.state
        before = [[x.copy() for x in inv] for inv in state.inverses]
        factor_bytes = sum(count * n * n for b in blocks for count, n in b.factor_shapes) * state.dtype.itemsize
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        state.invert(engine.damping)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert peak < factor_bytes, (peak / factor_bytes)
    # The same statistics and damping: the same inverses, bit for bit.
    assert all(np.array_equal(x, y) for inv, old in zip(state.inverses, before) for x, y in zip(inv, old))
