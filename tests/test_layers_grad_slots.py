"""``grad_matrix(..., out=slot)`` writes the same matrix as ``grad_matrix(...)`` into a
caller's array (the engine's send buffer), for every block kind; and an engine fed the
slots it hands out gives the result of one fed separate arrays."""
import numpy as np
import pytest
from mpi4py import MPI

from hpckfac.comm import Communicator
from hpckfac.layers import (BatchNormBlock, ConvBlock, ConvTransposeBlock, EmbeddingBlock, GroupNormBlock,
                            InstanceNormBlock, LayerNormBlock, LinearBlock, PReLUBlock, RMSNormBlock)
from hpckfac.stages.engine import KFACEngine

BLOCKS = [
    LinearBlock("fc", 5, 3, bias=True), LinearBlock("fc_nobias", 5, 3, bias=False),
    LinearBlock("conv1d", 4, 6, bias=True, transposed=True),
    ConvBlock("conv", 3, 4, (3, 3), (1, 1), (1, 1), (1, 1), bias=True),
    ConvBlock("grouped", 4, 6, (3,), (1,), (0,), (1,), bias=False, groups=2),
    ConvTransposeBlock("up", 4, 6, (2, 2), (2, 2), (0, 0), (0, 0), (1, 1), bias=True, groups=2),
    BatchNormBlock("bn", 5, 1e-5), LayerNormBlock("ln", (2, 3), 1e-5),
    LayerNormBlock("ln_nobias", 4, 1e-5, bias=False), GroupNormBlock("gn", 2, 6, 1e-5),
    InstanceNormBlock("in", 4, 1e-5, spatial_dims=2), RMSNormBlock("rms", (2, 3)), EmbeddingBlock("emb", 7, 3),
    PReLUBlock("prelu", 3), PReLUBlock("prelu_shared"),
]


def random_grads(block, rng):
    weight_shape, bias_shape = block.param_shapes
    return rng.standard_normal(weight_shape), None if bias_shape is None else rng.standard_normal(bias_shape)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_grad_matrix_into_out_equals_a_fresh_one(block):
    rng = np.random.default_rng(len(block.name))
    weight, bias = random_grads(block, rng)
    want = block.grad_matrix(weight, bias)
    out = np.full(block.grad_shape, np.nan, dtype=np.float32)
    got = block.grad_matrix(weight, bias, out=out)
    assert got is out
    assert np.array_equal(out, want.astype(np.float32))  # every element written, cast to out's dtype
    back_w, back_b = block.split_matrix(np.asarray(want))
    assert np.array_equal(back_w, weight) and (bias is None or np.array_equal(back_b, bias))
    with pytest.raises(ValueError, match="out"):
        block.grad_matrix(weight, bias, out=np.zeros((block.grad_shape[0] + 1, block.grad_shape[1])))


def test_engine_fed_its_own_slots_equals_engine_fed_copies():
    rng = np.random.default_rng(5)
    comm = Communicator(MPI.COMM_SELF)
    options = dict(factor_update_interval=2, inverse_update_interval=2, kl_clip=1e-2, comm_dtype=np.float64)
    engines = [KFACEngine(BLOCKS, comm, **options) for _ in range(2)]
    for _ in range(4):
        params = [random_grads(b, rng) for b in BLOCKS]
        stats = [b.statistics(*inputs(b, rng), 1 / 4) for b in BLOCKS] if engines[0].is_factor_step() else None
        copies = engines[0].step([b.grad_matrix(*p) for b, p in zip(BLOCKS, params)], stats, lr=0.1)
        slots = engines[1].gradient_slots()
        filled = [b.grad_matrix(*p, out=slot) for b, p, slot in zip(BLOCKS, params, slots)]
        assert all(f is s for f, s in zip(filled, slots))
        direct = engines[1].step(filled, stats, lr=0.1)
        for x, y in zip(copies, direct):
            assert np.array_equal(x, y)
    assert engines[0].last_nu == engines[1].last_nu


def inputs(block, rng):
    """A random (input, output gradient) pair of one call of ``block`` (batch 4)."""
    if isinstance(block, EmbeddingBlock):
        return rng.integers(0, block.num_embeddings, (4, 2)), rng.standard_normal((4, 2, block.embedding_dim))
    if isinstance(block, LinearBlock):
        d_in = block.d_A - block.has_bias
        return rng.standard_normal((4, d_in)), rng.standard_normal((4, block.d_G))
    if isinstance(block, (ConvBlock, ConvTransposeBlock)):
        size = (5,) * len(block.kernel_size)
        a = rng.standard_normal((4, block.in_channels, *size))
        out = block.output_size(size)
        return a, rng.standard_normal((4, block.out_channels, *out))
    shape = {"bn": (4, 5, 3), "ln": (4, 2, 3), "ln_nobias": (4, 4), "gn": (4, 6, 2), "in": (4, 4, 2, 3),
             "rms": (4, 5, 2, 3), "prelu": (4, 3, 2, 2), "prelu_shared": (4, 5)}[block.name]
    return rng.standard_normal(shape), rng.standard_normal(shape)
