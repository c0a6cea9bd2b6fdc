"""Gradients between .grad and the engine's buffers as strided windows: the same bits as each
block's grad_matrix / split_matrix, for every block kind, dtype, frozen and missing gradients."""
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from hpckfac.torch.grad_io import GradientIO, windows
from hpckfac.torch.registry import block_for, block_params

MODULES = [nn.Linear(5, 3), nn.Linear(4, 2, bias=False), nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(3, 2, 2, bias=False),
           nn.ConvTranspose2d(4, 2, 3, groups=2), nn.BatchNorm2d(3), nn.LayerNorm((2, 3)), nn.GroupNorm(2, 4),
           nn.InstanceNorm2d(3, affine=True), nn.Embedding(7, 3), nn.PReLU(3), nn.PReLU(),
           nn.MultiheadAttention(4, 2), nn.MultiheadAttention(4, 2, bias=False)]  # their in_proj_weight/bias
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    MODULES.append(nn.RMSNorm((2, 3)))


def blocks_and_params(modules):
    blocks = [block_for(str(i), m) for i, m in enumerate(modules)]
    return blocks, [block_params(m) for m in modules]


def layout(blocks, gap=3):
    """Offsets of each block's matrix in one buffer, with gaps (as the engine's presence elements)."""
    offsets, at = [], gap
    for b in blocks:
        offsets.append(at)
        at += b.grad_size + gap
    return offsets, at


@pytest.mark.parametrize("dtype,buffer_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_read_and_write_equal_grad_matrix_and_split_matrix(dtype, buffer_dtype):
    torch.manual_seed(0)
    modules = [m.to(dtype) for m in MODULES]
    blocks, params = blocks_and_params(modules)
    gen = torch.Generator().manual_seed(1)
    for ps in params:
        for p in ps:
            if p is not None:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    modules[0].bias.grad = None  # a missing gradient reads as zeros
    io = GradientIO(blocks, params)
    generic = [l for l, found in enumerate(io.windows) if found is None]
    assert generic == [4]  # ConvTranspose's flipped kernel is no plain window
    offsets, size = layout(blocks)
    # Views that start inside their storage, as the engine's buffers may.
    buffer = torch.full((size + 5,), 7.0, dtype=buffer_dtype)[5:]
    io.read(buffer, offsets, params)
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}[buffer_dtype]
    for l, (block, ps) in enumerate(zip(blocks, params)):
        if l in generic:
            continue
        grads = [None if p is None else (p.grad if p.grad is not None else torch.zeros_like(p)).float().numpy()
                 for p in ps]
        want = np.zeros(block.grad_shape, dtype=np_dtype)
        block.grad_matrix(*grads, out=want)
        got = buffer[offsets[l]:offsets[l] + block.grad_size].numpy().reshape(block.grad_shape)
        assert np.array_equal(got, want), block.name
    # Nothing written outside the windows: the gaps between blocks keep their value.
    edges = [0] + [e for at, b in zip(offsets, blocks) for e in (at, at + b.grad_size)] + [size]
    for start, stop in zip(edges[::2], edges[1::2]):
        assert torch.all(buffer[start:stop] == 7.0), (start, stop)
    flipped = generic[0]
    assert torch.all(buffer[offsets[flipped]:offsets[flipped] + blocks[flipped].grad_size] == 7.0)

    results = torch.randn(size + 4, generator=gen).to(buffer_dtype)[4:]
    modules[1].weight.requires_grad_(False)
    modules[1].weight.grad = None
    io.write(results, offsets, params)
    assert modules[1].weight.grad is None  # frozen: left alone
    for l, (block, ps) in enumerate(zip(blocks, params)):
        if l in generic or l == 1:
            continue
        parts = block.split_matrix(results[offsets[l]:offsets[l] + block.grad_size].numpy().reshape(block.grad_shape))
        for p, part in zip(ps, parts):
            if p is not None:
                assert p.grad.dtype == dtype
                assert torch.equal(p.grad, torch.from_numpy(np.ascontiguousarray(part)).to(dtype)), block.name


def test_windows_refuse_anything_but_plain_windows():
    conv_t = nn.ConvTranspose1d(2, 3, 3)
    block = block_for("t", conv_t)
    assert windows(block, block_params(conv_t)) is None
    linear = nn.Linear(3, 2)
    found = windows(block_for("l", linear), block_params(linear))
    # [W | b] of shape (2, 4): W is the window (2, 3) with strides (4, 1) at 0, b the column at 3.
    assert [(w.shape, w.stride, w.offset) for w in found] == [((2, 3), (4, 1), 0), ((2,), (4,), 3)]


def test_parameters_replaced_after_construction_are_the_ones_written():
    """``load_state_dict(assign=True)`` puts new Parameter objects in the modules: the step
    reads and writes those, not the ones seen at construction."""
    from mpi4py import MPI

    from hpckfac.comm import Communicator
    from hpckfac.torch import KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    precond = KFACPreconditioner(model, comm=Communicator(MPI.COMM_SELF))
    old = [p for p in model.parameters()]
    model.load_state_dict({k: v.clone() + 0.5 for k, v in model.state_dict().items()}, assign=True)
    new = [p for p in model.parameters()]
    assert all(a is not b for a, b in zip(old, new))
    model(torch.randn(5, 4, dtype=torch.float64)).pow(2).mean().backward()
    precond.step()
    assert all(p.grad is None for p in old)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in new)


def test_generic_blocks_read_missing_gradients_as_zeros_and_leave_frozen_ones_none():
    """A block that is no plain window (ConvTranspose's flipped kernel) goes through
    grad_matrix/split_matrix: a missing bias gradient reads as zeros, as for the windowed
    blocks, and a frozen weight keeps ``.grad`` None when the results are written back."""
    torch.manual_seed(2)
    conv_t = nn.ConvTranspose2d(3, 4, (2, 3)).double()
    blocks, params = blocks_and_params([conv_t])
    io = GradientIO(blocks, params)
    assert io.windows == [None]
    conv_t.weight.grad = torch.randn_like(conv_t.weight)
    conv_t.bias.grad = None
    slot = np.full(blocks[0].grad_shape, 7.0)
    io.read_generic([slot], params)
    want = np.zeros(blocks[0].grad_shape)
    blocks[0].grad_matrix(conv_t.weight.grad.numpy(), np.zeros(4), out=want)
    np.testing.assert_array_equal(slot, want)

    conv_t.weight.requires_grad_(False)
    conv_t.weight.grad = None
    conv_t.bias.grad = None
    result = np.random.default_rng(3).standard_normal(blocks[0].grad_shape)
    io.write_generic([result], params)
    assert conv_t.weight.grad is None
    np.testing.assert_array_equal(conv_t.bias.grad.numpy(), blocks[0].split_matrix(result)[1])


def test_one_buffer_at_new_offsets_is_read_at_those_offsets():
    """The windows kept for a buffer are those of its offsets: the same buffer given other
    offsets (another layout) is read and written at the new ones."""
    torch.manual_seed(4)
    modules = [nn.Linear(3, 2), nn.Conv1d(2, 3, 3)]
    blocks, params = blocks_and_params(modules)
    for ps in params:
        for p in ps:
            p.grad = torch.randn_like(p)
    io = GradientIO(blocks, params)
    first, size = layout(blocks, gap=1)
    second, _ = layout(blocks, gap=4)
    buffer = torch.zeros(size + 3 * len(blocks) + 3)
    io.read(buffer, first, params)
    buffer.zero_()
    io.read(buffer, second, params)
    for l, (block, ps) in enumerate(zip(blocks, params)):
        want = np.zeros(block.grad_shape, dtype=np.float32)
        block.grad_matrix(*[p.grad.numpy() for p in ps], out=want)
        got = buffer[second[l]:second[l] + block.grad_size].numpy().reshape(block.grad_shape)
        np.testing.assert_array_equal(got, want)
    io.write(buffer * 2, second, params)
    for l, (block, ps) in enumerate(zip(blocks, params)):
        parts = block.split_matrix((buffer * 2)[second[l]:second[l] + block.grad_size].numpy().reshape(block.grad_shape))
        for p, part in zip(ps, parts):
            assert torch.equal(p.grad, torch.from_numpy(np.ascontiguousarray(part))), block.name


def test_buffers_beyond_the_engines_three_are_let_go():
    """The windows of a buffer are kept for its next call (the engine's two send buffers and its
    gathered one, step after step), but a caller's buffers beyond three are not held alive by
    the GradientIO: they are freed once the caller drops them."""
    torch.manual_seed(5)
    linear = nn.Linear(3, 2)
    blocks, params = blocks_and_params([linear])
    linear.weight.grad, linear.bias.grad = torch.randn(2, 3), torch.randn(2)
    io = GradientIO(blocks, params)
    offsets, size = layout(blocks)
    buffers = [torch.zeros(size) for _ in range(4)]
    first = weakref.ref(buffers[0])
    for buffer in buffers:
        io.read(buffer, offsets, params)
    want = np.zeros(blocks[0].grad_shape, dtype=np.float32)
    blocks[0].grad_matrix(linear.weight.grad.numpy(), linear.bias.grad.numpy(), out=want)
    np.testing.assert_array_equal(buffers[3][offsets[0]:offsets[0] + blocks[0].grad_size].numpy(), want.ravel())
    del buffers, buffer
    assert first() is None
