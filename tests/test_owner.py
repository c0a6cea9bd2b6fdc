"""Stage 3 (hpckfac.stages.owner) on one rank: the KL sum's float64 products on a device
array, and a run of blocks preconditioned with one stack of inverses that a loaded state
replaces."""
import numpy as np
from mpi4py import MPI

import standin
from hpckfac.comm import Communicator
from hpckfac.layers import LinearBlock
from hpckfac.stages.engine import KFACEngine
from hpckfac.stages.owner import float64_dot


def test_the_kl_sum_of_device_arrays_takes_its_products_in_float64():
    """float32 gradients of 1e20 on a device array: their products pass float32's range (3.4e38)
    but not float64's, and the sum is a float64 0-d device array."""
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(50) * 1e20).astype(np.float32), (rng.standard_normal(50) * 1e20).astype(np.float32)
    want = np.sum(x.astype(np.float64) * y.astype(np.float64))
    with standin.installed():
        got = float64_dot(standin.to_device(x), standin.to_device(y))
        assert isinstance(got, standin.DeviceArray) and got.shape == () and got.dtype == np.float64
        np.testing.assert_allclose(got.item(), want, rtol=1e-12)
    np.testing.assert_allclose(float64_dot(x, y), want, rtol=1e-12)


def test_a_state_without_factors_loaded_over_a_stacked_run_passes_its_gradients_through():
    """Two blocks of one shape form a run, inverted into one stack and preconditioned with one
    batched product. Loading a state from before any statistics (no factors, no inverses) drops
    that stack: the next step, again without statistics, passes the gradients through as a new
    engine does, instead of preconditioning them with the inverses the load replaced."""
    rng = np.random.default_rng(1)
    blocks = [LinearBlock("a", 4, 3, True), LinearBlock("b", 4, 3, True)]
    assert blocks[0].batch_key == blocks[1].batch_key is not None
    engine = KFACEngine(blocks, Communicator(MPI.COMM_SELF), factor_update_interval=1, inverse_update_interval=1,
                        kl_clip=None)
    fresh = engine.state_dict()
    stats = [b.statistics(rng.standard_normal((8, 4)), rng.standard_normal((8, 3)), 1 / 8) for b in blocks]
    grads = [rng.standard_normal(b.grad_shape) for b in blocks]
    preconditioned = [v.copy() for v in engine.step(grads, stats)]
    assert not any(np.allclose(v, g.astype(np.float32)) for v, g in zip(preconditioned, grads))
    engine.load_state_dict(fresh)
    grads = [rng.standard_normal(b.grad_shape) for b in blocks]
    for got, want in zip(engine.step(grads, [None, None]), grads):
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_a_loaded_run_holds_its_inverses_once():
    """Inverses loaded block by block are copied into the run's one stack per slot and the
    blocks' inverses become views of it: the engine holds one copy of them, whose values are
    the loaded ones and which preconditions as the engine that saved them."""
    import tracemalloc

    rng = np.random.default_rng(2)
    blocks = [LinearBlock(name, 99, 100, True) for name in ("a", "b")]
    stats = [b.statistics(rng.standard_normal((120, 99)), rng.standard_normal((120, 100)), 1 / 120) for b in blocks]
    grads = [rng.standard_normal(b.grad_shape) for b in blocks]

    def engine():
        return KFACEngine([LinearBlock(b.name, 99, 100, True) for b in blocks], Communicator(MPI.COMM_SELF),
                          factor_update_interval=1, inverse_update_interval=2, kl_clip=None)

    saved = engine()
    saved.step(grads, stats)
    state = saved.state_dict()
    inverse_bytes = sum(x.nbytes for b in state["blocks"].values() for x in b["inverses"])
    loaded = engine()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loaded.load_state_dict(state)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert inverse_bytes <= held < 1.25 * inverse_bytes, held / inverse_bytes
    for i, name in enumerate(("a", "b")):
        for got, want in zip(loaded.state.inverses[i], state["blocks"][name]["inverses"]):
            np.testing.assert_array_equal(got, want)
    # Not an inverse-update step: both precondition with the inverses of the first step.
    grads = [rng.standard_normal(b.grad_shape) for b in blocks]
    for got, want in zip(loaded.step(grads, stats), saved.step(grads, stats)):
        np.testing.assert_array_equal(got, want)
