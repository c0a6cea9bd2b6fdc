"""Stage 1's per-step sums (LocalStatistics) against each block's own statistics."""
import numpy as np

from hpckfac.layers import LinearBlock
from hpckfac.stages.local_factors import LocalStatistics


def test_calls_pair_inputs_with_output_gradients_and_unpaired_gradients_are_dropped():
    rng = np.random.default_rng(3)
    block = LinearBlock("fc", 6, 4, True)
    local = LocalStatistics([block], np.float64)
    a1, g1 = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    a2, g2 = rng.standard_normal((3, 6)), rng.standard_normal((3, 4))
    # An output gradient with no captured input (its forward ran without statistics) adds nothing.
    local.add_output_grads(0, rng.standard_normal((5, 4)))
    assert local.result() == [None]
    # Two calls of one layer in a step: backward meets the second call's output first.
    local.add_examples(8)
    local.add_inputs(0, a1)
    local.add_inputs(0, a2)
    local.add_output_grads(0, g2, 4.0)
    local.add_output_grads(0, g1, 4.0)
    local.add_output_grads(0, rng.standard_normal((5, 4)))  # unpaired again: dropped
    # scale = 4 multiplies the output-gradient part, as doubling the gradients does.
    want = (block.statistics(a1, 2 * g1) + block.statistics(a2, 2 * g2)) / 8
    np.testing.assert_allclose(local.result()[0], want, rtol=1e-13, atol=1e-15)
    local.reset()
    assert local.result() == [None] and local.examples == 0
