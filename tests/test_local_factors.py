"""Stage 1's per-step sums (LocalStatistics) against each block's own statistics."""
import numpy as np

from hpckfac.layers import BatchNormBlock, LayerNormBlock, LinearBlock
from hpckfac.ops.packing import unpack_upper
from hpckfac.stages.local_factors import LocalStatistics


def test_calls_pair_inputs_with_output_gradients_and_unpaired_gradients_are_dropped():
    rng = np.random.default_rng(3)
    block = LinearBlock("fc", 6, 4, True)
    local = LocalStatistics([block], np.float64)
    a1, g1 = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    a2, g2 = rng.standard_normal((3, 6)), rng.standard_normal((3, 4))
    # An output gradient whose input was captured before the last reset (an earlier step) adds nothing.
    stale = local.add_inputs(0, rng.standard_normal((5, 6)))
    local.reset()
    # It is not a second backward through one forward: taken (True), though nothing is added.
    assert local.add_output_grads(0, rng.standard_normal((5, 4)), 1.0, stale)
    assert local.result() == [None]
    # Two calls of one layer in a step: backward meets the second call's output first.
    local.add_examples(8)
    first, second = local.add_inputs(0, a1), local.add_inputs(0, a2)
    local.add_output_grads(0, g2, 4.0, second)
    local.add_output_grads(0, g1, 4.0, first)
    assert not local.add_output_grads(0, rng.standard_normal((5, 4)), 4.0, first)  # paired already: refused
    # scale = 4 multiplies the output-gradient part, as doubling the gradients does.
    want = (block.statistics(a1, 2 * g1) + block.statistics(a2, 2 * g2)) / 8
    np.testing.assert_allclose(local.result()[0], want, rtol=1e-13, atol=1e-15)
    local.reset()
    assert local.result() == [None] and local.examples == 0


def test_a_pass_never_backpropagated_counts_no_examples_and_its_calls_drop_the_block():
    rng = np.random.default_rng(4)
    fc1, fc2 = LinearBlock("fc1", 6, 4, True), LinearBlock("fc2", 4, 3, False)
    local = LocalStatistics([fc1, fc2], np.float64)
    a1, g1 = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    # A forward of 7 examples that reaches only fc2 and is never backpropagated...
    local.add_examples(7)
    local.add_inputs(1, rng.standard_normal((7, 4)))
    # ... then a forward of 5 examples backpropagated through fc1 only.
    local.add_examples(5)
    local.add_output_grads(0, g1, 1.0, local.add_inputs(0, a1))
    assert local.examples == 5 and local.unpaired == [1]
    out = local.result()
    np.testing.assert_allclose(out[0], fc1.statistics(a1, g1) / 5, rtol=1e-13, atol=1e-15)
    assert out[1] is None  # fc2's input part has no output gradient: dropped, not mis-weighted


def test_an_empty_batch_adds_nothing_and_keeps_the_pairing():
    rng = np.random.default_rng(5)
    block = LinearBlock("fc", 3, 2, True)
    local = LocalStatistics([block], np.float64)
    local.add_examples(0)
    local.add_output_grads(0, np.zeros((0, 2)), 1.0, local.add_inputs(0, np.zeros((0, 3))))
    assert local.examples == 0 and local.result() == [None] and local.unpaired == []
    # An empty micro-batch between two real ones pairs with its own output gradient.
    a1, g1, a2, g2 = (rng.standard_normal(s) for s in ((4, 3), (4, 2), (2, 3), (2, 2)))
    local.add_examples(4)
    local.add_output_grads(0, g1, 1.0, local.add_inputs(0, a1))
    local.add_examples(0)
    local.add_output_grads(0, np.zeros((0, 2)), 1.0, local.add_inputs(0, np.zeros((0, 3))))
    local.add_examples(2)
    local.add_output_grads(0, g2, 1.0, local.add_inputs(0, a2))
    want = (block.statistics(a1, g1) + block.statistics(a2, g2)) / 6
    np.testing.assert_allclose(local.result()[0], want, rtol=1e-13, atol=1e-15)


def test_rows_in_a_pass_of_no_examples_add_nothing_and_an_empty_call_drops_nothing():
    """A batch-shared input (one row of positions) in a forward of no examples stands for no
    example; an empty call whose output gradient never comes (its loss left out of backward)
    added nothing, so it drops nothing."""
    rng = np.random.default_rng(6)
    block = LinearBlock("fc", 3, 2, True)
    local = LocalStatistics([block], np.float64)
    a1, g1 = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    local.add_examples(4)
    local.add_output_grads(0, g1, 1.0, local.add_inputs(0, a1))
    local.add_examples(0)
    local.add_output_grads(0, rng.standard_normal((1, 2)), 1.0, local.add_inputs(0, rng.standard_normal((1, 3))))
    local.add_examples(0)
    local.add_inputs(0, np.zeros((0, 3)))  # never backpropagated
    assert local.examples == 4 and local.unpaired == []
    np.testing.assert_allclose(local.result()[0], block.statistics(a1, g1) / 4, rtol=1e-13, atol=1e-15)


def _two_layernorm_calls(rng, rows1: int, rows2: int):
    """A LayerNorm block, its statistics, and the (input, output gradient) of two calls of
    ``rows1`` and ``rows2`` examples, the second's inputs shifted and scaled."""
    block = LayerNormBlock("ln", (4,), 1e-5)
    first = rng.standard_normal((rows1, 4)), rng.standard_normal((rows1, 4))
    second = rng.standard_normal((rows2, 4)) * 2 + 1, rng.standard_normal((rows2, 4))
    return block, LocalStatistics([block], np.float64), first, second


def test_calls_pair_in_backward_order_where_the_output_part_needs_the_input():
    """A unit-wise block's Fisher takes each example's input and output gradient together: two
    calls of one LayerNorm (different batch sizes), whose output gradients backward delivers
    call 2's first, each pair with their own call's input."""
    block, local, (a1, g1), (a2, g2) = _two_layernorm_calls(np.random.default_rng(6), 5, 3)
    local.add_examples(8)
    first, second = local.add_inputs(0, a1), local.add_inputs(0, a2)
    local.add_output_grads(0, g2, 1.0, second)
    local.add_output_grads(0, g1, 1.0, first)
    want = (block.statistics(a1, g1) + block.statistics(a2, g2)) / 8
    np.testing.assert_allclose(local.result()[0], want, rtol=1e-12, atol=1e-15)


def test_output_gradients_named_by_call_pair_with_it_in_any_order():
    """Each loss of a two-call LayerNorm backpropagated on its own, call 1's first: with the ids
    ``add_inputs`` returns, each output gradient meets its own call's input (the LayerNorm's
    Fisher against the stacked per-example products of (g * x_hat, g)); a second gradient for a
    call already paired is refused, adding nothing."""
    rng = np.random.default_rng(7)
    block, local, (a1, g1), (a2, g2) = _two_layernorm_calls(rng, 5, 5)
    local.add_examples(5)
    first, second = local.add_inputs(0, a1), local.add_inputs(0, a2)
    assert local.add_output_grads(0, g1, 1.0, first)
    assert local.add_output_grads(0, g2, 1.0, second)
    assert not local.add_output_grads(0, rng.standard_normal((5, 4)), 1.0, first)  # a second backward
    x = np.vstack([a1, a2])
    xhat = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    u = np.stack([np.vstack([g1, g2]) * xhat, np.vstack([g1, g2])], -1)  # (rows, units, 2)
    fisher = block.factors(local.result()[0])[0]
    np.testing.assert_allclose(fisher, np.einsum("nca,ncb->cab", u, u) / 5, rtol=1e-12, atol=1e-14)


def test_a_step_whose_sample_is_empty_drops_the_sampling_blocks_only():
    """Passes whose sampled share is 0 (a statistics fraction of none): a sampling block has no
    examples to divide by and gives None, while a block that takes every example (BatchNorm)
    divides by all of them."""
    rng = np.random.default_rng(11)
    fc, bn = LinearBlock("fc", 3, 2, True), BatchNormBlock("bn", 2, 1e-5)
    assert fc.uses_sample and not bn.uses_sample
    local = LocalStatistics([fc, bn], np.float64)
    (a1, g1), (x2, g2) = [(rng.standard_normal((5, m)), rng.standard_normal((5, 2))) for m in (3, 2)]
    local.add_examples(5, sampled=0)
    local.add_output_grads(0, g1, 1.0, local.add_inputs(0, a1))
    local.add_output_grads(1, g2, 1.0, local.add_inputs(1, x2))
    assert local.examples == 5 and local.sampled == 0
    out = local.result()
    assert out[0] is None
    np.testing.assert_allclose(out[1], bn.statistics(x2, g2) / 5, rtol=1e-13, atol=1e-15)
    # Without a sampling block, every block divides by all the examples, whatever the sample.
    local = LocalStatistics([bn], np.float64)
    local.add_examples(5, sampled=2)
    local.add_output_grads(0, g2, 1.0, local.add_inputs(0, x2))
    np.testing.assert_allclose(local.result()[0], bn.statistics(x2, g2) / 5, rtol=1e-13, atol=1e-15)


def test_a_step_after_an_unpaired_call_starts_from_zero():
    """The sums a dropped block holds are cleared at the next step, not carried into it."""
    rng = np.random.default_rng(8)
    block = LinearBlock("fc", 3, 2, False)
    local = LocalStatistics([block], np.float64)
    local.add_examples(4)
    local.add_inputs(0, rng.standard_normal((4, 3)))  # never backpropagated
    assert local.result() == [None] and local.unpaired == [0]
    local.reset()
    a, g = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    local.add_examples(6)
    local.add_output_grads(0, g, 1.0, local.add_inputs(0, a))
    np.testing.assert_allclose(local.result()[0], block.statistics(a, g) / 6, rtol=1e-13, atol=1e-15)


def test_a_step_that_reached_some_blocks_only_leaves_nothing_behind():
    """A step whose forward reached one of two blocks: the next step's sums start from zero for
    that block too (the clearing of a step that touched only some blocks goes block by block)."""
    rng = np.random.default_rng(10)
    fc1, fc2 = LinearBlock("fc1", 3, 2, True), LinearBlock("fc2", 2, 4, False)
    local = LocalStatistics([fc1, fc2], np.float64)
    local.add_examples(5)
    local.add_output_grads(0, rng.standard_normal((5, 2)), 1.0, local.add_inputs(0, rng.standard_normal((5, 3))))
    assert local.result()[1] is None
    local.reset()
    (a1, g1), (a2, g2) = [(rng.standard_normal((6, m)), rng.standard_normal((6, n))) for m, n in ((3, 2), (2, 4))]
    local.add_examples(6)
    local.add_output_grads(0, g1, 1.0, local.add_inputs(0, a1))
    local.add_output_grads(1, g2, 1.0, local.add_inputs(1, a2))
    out = local.result()
    np.testing.assert_allclose(out[0], fc1.statistics(a1, g1) / 6, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(out[1], fc2.statistics(a2, g2) / 6, rtol=1e-13, atol=1e-15)


def test_two_forwards_and_one_backward_count_both_passes():
    """``loss = f(model(x1)) + f(model(x2))``: backward reaches pass 2's call first, then pass
    1's; both passes count, and the statistics are those of the stacked rows over n1 + n2."""
    rng = np.random.default_rng(9)
    block = LinearBlock("fc", 3, 2, True)
    local = LocalStatistics([block], np.float64)
    (a1, g1), (a2, g2) = [(rng.standard_normal((n, 3)), rng.standard_normal((n, 2))) for n in (4, 6)]
    local.add_examples(4)
    first = local.add_inputs(0, a1)
    local.add_examples(6)
    second = local.add_inputs(0, a2)
    local.add_output_grads(0, g2, 1.0, second)
    local.add_output_grads(0, g1, 1.0, first)
    assert local.examples == 10
    a = np.hstack([np.vstack([a1, a2]), np.ones((10, 1))])
    g = np.vstack([g1, g2])
    iu_a, iu_g = np.triu_indices(4), np.triu_indices(2)
    want = np.concatenate([(a.T @ a)[iu_a], (g.T @ g)[iu_g]]) / 10
    np.testing.assert_allclose(local.result()[0], want, rtol=1e-13, atol=1e-15)


def _dense_a(a: np.ndarray, bias: bool) -> np.ndarray:
    """Float64 oracle: ``sum_rows [a, 1]^T [a, 1]`` of ``a``'s rows (the 1 with a bias)."""
    rows = a.reshape(-1, a.shape[-1]).astype(np.float64)
    if bias:
        rows = np.hstack([rows, np.ones((len(rows), 1))])
    return rows.T @ rows


def test_blocks_of_one_input_key_share_the_input_part_of_one_source_only():
    rng = np.random.default_rng(6)
    # Three projections of one input (as query, key, value), one without a bias (another key),
    # then the same array changed in place under a new version, then another array.
    blocks = [LinearBlock("q", 6, 4, True), LinearBlock("k", 6, 3, True, transposed=True),
              LinearBlock("v", 6, 4, False), LinearBlock("o", 6, 2, True), LinearBlock("p", 6, 2, True)]
    local = LocalStatistics(blocks, np.float32)
    reduced = []  # the blocks that reduced their input themselves
    for block in blocks:
        block.input_part = lambda a, own=block.input_part, name=block.name: (reduced.append(name), own(a))[1]
    local.add_examples(5)
    h, other = rng.standard_normal((5, 7, 6)).astype(np.float32), rng.standard_normal((5, 7, 6)).astype(np.float32)
    inputs = []
    for i, (a, version) in enumerate([(h, 0), (h, 0), (h, 0), (h, 1), (other, 0)]):
        if i == 3:
            h *= 2  # the caller's tensor changed in place: its version counter moved on
        inputs.append(a.copy())
        call = local.add_inputs(i, a, source=(h if a is h else other, version, 5, 5, False))
        local.add_output_grads(i, rng.standard_normal((5, 7, blocks[i].d_G)).astype(np.float32), 1.0, call)
    assert reduced == ["q", "v", "o", "p"]  # k took q's part
    out = local.result()
    for block, a, stats in zip(blocks, inputs, out):
        got = unpack_upper(stats[:block.d_A * (block.d_A + 1) // 2], 1, block.d_A)[0]
        np.testing.assert_allclose(got, _dense_a(a, block.has_bias) / 5, rtol=2e-6, atol=2e-6)
    # A shared part is the same reduction of the same values: bit for bit the block's own.
    for i in (1, 3):
        own = blocks[i].a_factor(inputs[i], packed=True) * np.float32(1 / 5)
        assert np.array_equal(out[i][:own.size], own)


def test_the_source_of_a_shared_input_part_is_held_weakly():
    """The source kept for the next call's comparison does not keep its first item alive (in
    the torch bridge a tensor, and with it the graph of a forward never backpropagated)."""
    import gc
    import weakref

    rng = np.random.default_rng(13)
    local = LocalStatistics([LinearBlock("q", 3, 2, True)], np.float64)
    local.add_examples(4)
    source = rng.standard_normal((4, 3))
    local.add_inputs(0, source, source=(source, 0))
    alive = weakref.ref(source)
    del source
    gc.collect()
    assert alive() is None


def test_steps_leave_nothing_behind_in_memory():
    """Each step's call ids and saved parts are forgotten at the next reset: a long run's
    accumulators hold the same memory after thousands of steps as after a few."""
    import tracemalloc

    rng = np.random.default_rng(12)
    block = LinearBlock("fc", 3, 2, True)
    local = LocalStatistics([block], np.float64)
    a, g = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))

    def steps(count):
        for _ in range(count):
            local.reset()
            local.add_examples(4)
            local.add_output_grads(0, g, 1.0, local.add_inputs(0, a))

    tracemalloc.start()
    try:
        steps(100)
        before = tracemalloc.get_traced_memory()[0]
        steps(4000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(local.result()[0], block.statistics(a, g) / 4, rtol=1e-13, atol=1e-15)
    assert grown < 20_000, grown
