"""The ``A`` factor of a stride-1 convolution without a patch matrix (CPU).

With stride 1 the patch Gram is a block-Toeplitz matrix up to the image border.
For kernel offsets ``δ1, δ2`` (dilation ``d``, padding ``P``) its block is

    A[δ1, δ2] = sum over output positions p of x[p + d δ1 - P] x[p + d δ2 - P]^T,

a ``C x C`` matrix. Summed over the *extended* positions instead (every ``p``
whose patch touches the image, and the output box), the block depends on
``Δ = δ2 - δ1`` alone: it is the lag product ``L(Δ) = sum_u x[u] x[u + d Δ]^T``
over the whole zero-extended input. There are ``(2k - 1)^n`` lags against
``k^n x k^n`` blocks, half of them transposes of the other half, and each is
one GEMM on two row-offset views of one zero-padded channels-last copy of the
input: with ``L_j >= d_j (k_j - 1)`` zeros before every row of dimension ``j``,
a flat row offset reads the shifted input, and what runs past a row lands in
the next row's zeros.

What the extended positions add beyond the output box is a frame ``e_j =
d_j (k_j - 1) - P_j`` positions thick on each side of dimension ``j`` (none with
"same" padding's centre offsets, one position for a 3x3 "same" convolution).
The frame is split into disjoint slabs (dimension ``j``'s two sides, the inner
dimensions of the slab over the output box, the outer over the extended range)
and in a slab the patches are zero outside a few kernel offsets of
dimension ``j`` (for a 3x3 "same" convolution, one of three), so each slab's
Gram is a small product of a thin patch matrix, subtracted from the lag blocks.

For ResNet-20's 3x3 convolutions at batch 64 this is 2.5-3.8x fewer flops than
the patch Gram and no patch matrix at all; the lag GEMMs (``C x C`` results
over ``N * H * W`` rows) run at the machine's GEMM rate down to 16 channels.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import torch

from hpckfac.ops.checks import accumulation_dtype
from hpckfac.ops.factors import finish_factor

# Below 16 channels the lag GEMMs are memory-bound and sum their ~N*H*W terms with a relative
# error near 1e-5 in float32 (measured, against 1e-6 for the patch Gram): patches there.
MIN_CHANNELS = 16
# The lags' flops must be at most this share of the patch Gram's. Per flop they run 1.1-1.7x
# slower than the patch Gram on 4x4 maps (the frame is most of the work there: break-even at a
# share of 0.6-0.9), 0.9-1.1x on 8x8 and ~0.8x on 16x16 maps (measured for 16-256 channels,
# batch 32-64, 3x3 "same" convolutions; 4x4 maps have a share of 1.0, 8x8 0.63, 16x16 0.47).
MAX_FLOP_SHARE = 0.75


@lru_cache(maxsize=64)
def _lag_plan(kernel: tuple[int, ...], dilation: tuple[int, ...], rows: tuple[int, ...]):
    """For padded row lengths ``rows`` (in positions, innermost last): each lag's flat shift
    ``s`` (only ``s >= 0`` are computed; a negative one is the transpose of ``-s``), and for
    every pair of kernel offsets the index of its lag among them."""
    steps = [int(np.prod(rows[j + 1:])) for j in range(len(rows))]
    lags = list(itertools.product(*(range(-(k - 1), k) for k in kernel)))
    shift = {lag: sum(d * l * s for d, l, s in zip(dilation, lag, steps)) for lag in lags}
    computed = sorted({abs(s) for s in shift.values()})
    # Lag table: the computed lags, then their transposes (index + len(computed)).
    slot = {lag: computed.index(abs(s)) + (len(computed) if s < 0 else 0) for lag, s in shift.items()}
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    pairs = np.array([[slot[tuple(b - a for a, b in zip(o1, o2))] for o2 in offsets] for o1 in offsets])
    return tuple(computed), pairs


def _slabs(kernel, padding, dilation, out_size):
    """The frame between the extended positions and the output box, as disjoint slabs:
    per slab, the position range and the kernel-offset range of every spatial dimension
    (ranges as ``(start, stop)``)."""
    frame = [max(0, d * (k - 1) - p) for k, p, d in zip(kernel, padding, dilation)]
    extended = [(-e, o + e) for e, o in zip(frame, out_size)]
    slabs = []
    for j, (k, p, d, e, o) in enumerate(zip(kernel, padding, dilation, frame, out_size)):
        if e == 0:
            continue
        inner = [(0, out) for out in out_size[:j]]
        full = [(0, kk) for kk in kernel]
        # Left of the box a patch reaches the image only from offset ceil((P + 1) / d) on;
        # right of it only up to offset floor((e - 1) / d).
        left_k, right_k = list(full), list(full)
        left_k[j], right_k[j] = ((p + d) // d, k), (0, (e - 1) // d + 1)
        slabs.append((inner + [(-e, 0)] + extended[j + 1:], left_k))
        slabs.append((inner + [(o, o + e)] + extended[j + 1:], right_k))
    return slabs, extended


@lru_cache(maxsize=256)
def lags_pay(channels: int, size: tuple[int, ...], kernel: tuple[int, ...], padding: tuple[int, ...],
             dilation: tuple[int, ...]) -> bool:
    """Whether ``lagged_a_factor`` beats the patch Gram for a stride-1 convolution of
    ``channels`` input channels over spatial ``size`` (per example), by their flops."""
    if channels < MIN_CHANNELS:
        return False
    volume = int(np.prod(kernel))
    out_size = [s + 2 * p - d * (k - 1) for s, k, p, d in zip(size, kernel, padding, dilation)]
    rows = np.prod([s + max(d * (k - 1), p) for s, k, p, d in zip(size, kernel, padding, dilation)])
    lags = (int(np.prod([2 * k - 1 for k in kernel])) + 1) // 2
    slabs, _ = _slabs(kernel, padding, dilation, out_size)
    frame = sum(np.prod([b - a for a, b in positions]) * (channels * np.prod([b - a for a, b in offsets])) ** 2
                for positions, offsets in slabs)
    # Per example, counting multiply-adds; the patch Gram computes about half its square.
    lag_work = lags * channels ** 2 * rows + frame
    patch_work = (channels * volume) ** 2 * np.prod(out_size) / 2
    return bool(lag_work <= MAX_FLOP_SHARE * patch_work)


def lagged_a_factor(x: np.ndarray, kernel: tuple[int, ...], padding: tuple[int, ...],
                    dilation: tuple[int, ...], bias: bool, scale: float, packed: bool) -> np.ndarray:
    """``scale * sum a~ a~^T`` over the patches of a stride-1 convolution of ``x``
    ``(N, C, *spatial)``: the same factor as the patch Gram (columns in PyTorch's
    ``(C, *kernel)`` order, a bias column last), dense or packed, float32 (float64
    for float64 ``x``), computed from lag products (module docstring)."""
    n, channels, *size = x.shape
    ndim = len(kernel)
    volume = int(np.prod(kernel))
    out_size = tuple(s + 2 * p - d * (k - 1) for s, k, p, d in zip(size, kernel, padding, dilation))
    lead = [max(d * (k - 1), p) for k, p, d in zip(kernel, padding, dilation)]
    rows = tuple(s + l for s, l in zip(size, lead))
    dtype = accumulation_dtype(x.dtype)

    # Zeros before every row of every dimension, one zero image after the last for the
    # slabs' reads past it; channels last, so a position is a row of C contiguous values.
    padded = np.zeros((n + 1, *rows, channels), dtype=dtype)
    padded[(slice(0, n), *(slice(l, None) for l in lead))] = np.moveaxis(x, 1, -1)
    buffer = torch.from_numpy(padded)
    flat = buffer[:n].reshape(-1, channels)
    total = flat.shape[0]

    shifts, pairs = _lag_plan(tuple(kernel), tuple(dilation), rows)
    lags = torch.empty((2 * len(shifts), channels, channels), dtype=buffer.dtype)
    for i, s in enumerate(shifts):
        torch.mm(flat[:total - s].T, flat[s:], out=lags[i])
    lags[len(shifts):] = lags[:len(shifts)].transpose(1, 2)

    d = channels * volume + bias
    factor = torch.empty((d, d), dtype=buffer.dtype)
    # Block (δ1, δ2) is lag δ2 - δ1; ordered (c, δ1) x (c', δ2) as PyTorch's weight columns.
    blocks = lags[torch.from_numpy(pairs.reshape(-1))].reshape(volume, volume, channels, channels)
    factor[:channels * volume, :channels * volume] = blocks.permute(2, 0, 3, 1).reshape(channels * volume, -1)
    slabs, extended = _slabs(kernel, padding, dilation, out_size)
    if bias:
        sums = flat.sum(0).repeat_interleave(volume)  # every offset sees every input value once
        factor[:-1, -1] = sums
        factor[-1, :-1] = sums
        factor[-1, -1] = n * int(np.prod([b - a for a, b in extended]))

    position_strides = buffer.stride()[1:1 + ndim]
    for positions, offsets in slabs:
        shape = (n, *(b - a for a, b in positions), *(b - a for a, b in offsets), channels)
        # Patch value at position p, offset δ: x[p + d δ - P], i.e. padded[p + d δ - P + lead].
        start = sum((a + dd * ka - p + l) * st for (a, _), (ka, _), p, dd, l, st in
                    zip(positions, offsets, padding, dilation, lead, position_strides))
        strides = (buffer.stride(0), *position_strides,
                   *(dd * st for dd, st in zip(dilation, position_strides)), 1)
        patches = torch.as_strided(buffer, shape, strides, start)
        width = int(np.prod(shape[1 + ndim:]))
        slab = torch.empty((int(np.prod(shape[:1 + ndim])), width + bias), dtype=buffer.dtype)
        slab[:, :width].view(shape).copy_(patches)  # one copy, straight beside the bias column
        if bias:
            slab[:, -1] = 1
        # The slab's columns (δ, c) are factor columns c * volume + flat(δ): subtract its Gram
        # through strided views of the factor as (C, *kernel) x (C, *kernel), then the bias.
        gram = slab.T @ slab
        box = tuple(slice(a, b) for a, b in offsets)
        sub = shape[1 + ndim:]
        channel_first = (ndim, *range(ndim))
        patch_block = gram[:width, :width].view(*sub, *sub).permute(*channel_first,
                                                                    *(ndim + 1 + i for i in channel_first))
        factor[:channels * volume, :channels * volume].view(channels, *kernel, channels, *kernel)[
            (slice(None), *box, slice(None), *box)] -= patch_block
        if bias:
            column = gram[:width, width].view(sub).permute(channel_first)
            factor[:-1, -1].view(channels, *kernel)[(slice(None), *box)] -= column
            factor[-1, :-1].view(channels, *kernel)[(slice(None), *box)] -= column
            factor[-1, -1] -= gram[width, width]

    result = factor.numpy()
    result *= scale
    return finish_factor(result, packed)
