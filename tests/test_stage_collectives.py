"""Stages 2 and 4 (hpckfac.stages.reduce_scatter, hpckfac.stages.all_gather) on one rank:
the send buffer's statistics, presence elements and casts, and the gathered results."""
import warnings

import numpy as np
import pytest
from mpi4py import MPI

from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.stages.engine import KFACEngine


def blocks_and_inputs(seed):
    rng = np.random.default_rng(seed)
    blocks = [LinearBlock("fc1", 4, 3, True), LinearBlock("fc2", 3, 2, False)]
    stats = [b.statistics(rng.standard_normal((6, m)), rng.standard_normal((6, n)), 1 / 6)
             for b, (m, n) in zip(blocks, ((4, 3), (3, 2)))]
    grads = [rng.standard_normal(b.grad_shape) for b in blocks]
    return blocks, stats, grads


def test_statistics_of_wrong_sizes_are_refused_even_when_their_total_fits():
    """One block's statistics an element too long and the next's one too short fill the buffer's
    span exactly, but each is the wrong size: refused, not shifted into the other block's place."""
    blocks, stats, grads = blocks_and_inputs(0)
    engine = KFACEngine(blocks, Communicator(MPI.COMM_SELF), factor_update_interval=1, inverse_update_interval=1)
    shifted = np.concatenate(stats)
    wrong = [shifted[:stats[0].size + 1], shifted[stats[0].size + 1:]]
    assert sum(s.size for s in wrong) == sum(b.stat_size for b in blocks)
    with pytest.raises(ValueError):
        engine.step(grads, wrong)


@pytest.mark.parametrize("missing", [False, True], ids=["every-block", "one-block-missing"])
def test_statistics_beyond_a_float16_buffers_range_are_cast_without_numpys_warning(caplog, missing):
    """Statistics beyond 65504 become inf in a float16 buffer: the owner refuses them with its own
    warning, and the cast adds none of NumPy's (on the usual step's one copy, and block by block)."""
    blocks, stats, grads = blocks_and_inputs(1)
    engine = KFACEngine(blocks, Communicator(MPI.COMM_SELF), factor_update_interval=1, inverse_update_interval=1,
                        comm_dtype=np.float16)
    stats = [s * 1e6 for s in stats]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.step(grads, [None, stats[1]] if missing else stats)
    assert "non-finite statistics refused for blocks" in caplog.text
    assert engine.state.refused == (1 if missing else 2)
