"""The ``A`` factor of a stride-1 convolution without a patch matrix (CPU).

With stride 1 the patch Gram is a block-Toeplitz matrix up to the image border.
For kernel offsets ``δ1, δ2`` (dilation ``d``, padding ``P``) its block is

    A[δ1, δ2] = sum over output positions p of x[p + d δ1 - P] x[p + d δ2 - P]^T,

a ``C x C`` matrix. Summed over the *extended* positions instead (every ``p``
whose patch touches the image, and the output box), the block depends on
``Δ = δ2 - δ1`` alone: it is the lag product ``L(Δ) = sum_u x[u] x[u + d Δ]^T``
over the whole zero-extended input. There are ``(2k - 1)^n`` lags against
``k^n x k^n`` blocks, and all of them come from the cross-correlation theorem:
with ``X_i(f)`` the DFT of example ``i``'s channel images, zero-padded so that no
lag wraps round, ``L(Δ)`` is the inverse DFT of the cross-spectrum
``S(f) = sum_i conj(X_i(f)) X_i(f)^T`` at ``d Δ``. That is one real FFT of the
input, one ``2C x 2C`` Gram of the examples' (real, imaginary) parts per
frequency of the half spectrum, and the inverse DFT at the few lags needed as one
small GEMM: per example ``4 C^2`` multiply-adds per frequency, against the
``(2k - 1)^n / 2 * C^2`` per position of products taken lag by lag (5.5x fewer for
a 3x3 kernel on 32x32 maps, 3.5x on 8x8). With few examples per frequency those Grams
are rank-N updates bound by memory, and one GEMM per lag is faster: on a zero-padded
channels-last copy with ``L_j >= d_j (k_j - 1)`` zeros before every row of dimension
``j``, a flat row offset reads the shifted input (what runs past a row lands in the next
row's zeros), and lags of opposite sign are transposes. Each call takes whichever of
the two is less work (``_work``).

What the extended positions add beyond the output box is a frame ``e_j =
d_j (k_j - 1) - P_j`` positions thick on each side of dimension ``j`` (none with
"same" padding's centre offsets, one position for a 3x3 "same" convolution).
The frame is split into disjoint slabs (dimension ``j``'s two sides, the inner
dimensions of the slab over the output box, the outer over the extended range)
and in a slab the patches are zero outside a few kernel offsets of
dimension ``j`` (for a 3x3 "same" convolution, one of three), so each slab's
Gram is a small product of a thin patch matrix, subtracted from the lag blocks.

For ResNet-20's 3x3 convolutions at batch 64 the factor takes 1/4 to 1/2 of the
patch route's time, with no patch matrix; the rounding error is that of the patch
Gram (measured against float64: within 1.3e-6 of the diagonal's scale in float32).
"""
from __future__ import annotations

import itertools
import warnings
from functools import lru_cache

import numpy as np
import torch

from hpckfac.ops.checks import accumulation_dtype
from hpckfac.ops.factors import finish_factor, full_precision, upper_gram

# The lag route's work (``lags_pay``) must be at most this share of the patch Gram's. Per
# unit of work it runs 1.2-2.5x slower than the patch Gram (measured at batch 8-64, float32:
# every measured case up to a share of 0.60 ran faster than the patches, 0.76-0.85x of their
# time near the threshold; a share of 0.73 (3x3 maps) ran at 1.13x, 0.97 (batch 8 on 8x8
# maps) at 1.39x).
MAX_WORK_SHARE = 0.65
# Writing and reading a frequency's Gram costs about as much as this many examples' products
# (fitted with the share above: with few examples per frequency the products are rank-N
# updates, bound by memory).
GRAM_EXAMPLES = 64
# Below this much patch work (multiply-adds for the whole batch) the lag route's fixed cost,
# ~1 ms of some forty tensor operations, outweighs what it saves (measured: 128 examples of
# 8 channels on 8x8 maps, 26M, ran 1.6x slower than the patches; of 16 channels on 4x4 maps,
# 24M, 2.2x; 64 examples of 3 channels on 32x32 maps, 38M, 0.4x).
MIN_PATCH_WORK = 3e7
# A copied patch element costs about as much as this many multiply-adds of the patch Gram.
COPY_WORK = 8
# Elements of the per-frequency Grams computed at a time (4 MB in float32).
GRAM_CHUNK_ELEMENTS = 1 << 20
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _read_view(x: np.ndarray) -> torch.Tensor:
    """A zero-copy tensor of ``x`` (bfloat16 from its bits) to read from, read-only arrays included."""
    bits = x.dtype.name == "bfloat16"  # ml_dtypes' bfloat16, which torch.from_numpy does not know
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        # The bits as int16, not uint16: torch.from_numpy takes uint16 only from torch 2.3 on.
        tensor = torch.from_numpy(x.view(np.int16) if bits else x)
    return tensor.view(torch.bfloat16) if bits else tensor


def _smooth_size(m: int) -> int:
    """The smallest ``2^a 3^b 5^c >= m``: FFT lengths the FFT libraries run at full speed."""
    while True:
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1


@lru_cache(maxsize=64)
def _lag_transform(kernel: tuple[int, ...], dilation: tuple[int, ...], lengths: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """The inverse DFT restricted to the lags: ``L(Δ) = T[Δ] @ [Re S; Im S]`` for the
    cross-spectrum ``S(f)`` on the half spectrum of a real FFT of ``lengths`` over the
    dimensions with a kernel wider than 1 (lags in ``itertools.product`` order)."""
    lags = np.array(list(itertools.product(*(range(-(k - 1), k) for k in kernel))), dtype=np.float64)
    half = (*lengths[:-1], lengths[-1] // 2 + 1)
    freqs = np.stack(np.meshgrid(*(np.fft.fftfreq(m, 1 / m) for m in lengths[:-1]), np.arange(half[-1]),
                                 indexing="ij"), -1).reshape(-1, len(lengths))
    # S(-f) = conj(S(f)): every frequency of the half spectrum but the self-conjugate ones
    # (zero, and Nyquist for an even length) stands for two.
    last = freqs[:, -1]
    weight = np.where((last == 0) | (2 * last == lengths[-1]), 1.0, 2.0) / np.prod(lengths)
    phase = 2 * np.pi * (lags * np.array(dilation)) @ (freqs / np.array(lengths)).T
    return torch.from_numpy(np.concatenate([np.cos(phase) * weight, -np.sin(phase) * weight], 1)).to(dtype)


def _lag_products(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """``L(Δ) = sum_u x[u] x[u + d Δ]^T`` for every lag ``|Δ_j| < k_j`` of ``x`` ``(N, C, *spatial)``,
    which holds at least ``d_j (k_j - 1)`` zeros along every dimension with ``k_j > 1`` (so that
    no lag wraps round the DFT), as ``((2k - 1)^n, C, C)`` in ``itertools.product`` order.

    By the cross-correlation theorem ``L(Δ)`` is the inverse DFT of the cross-spectrum
    ``S(f) = sum_i conj(X_i(f)) X_i(f)^T``: one real FFT of every channel image, one batched
    product per frequency, and the inverse DFT at the few lags needed as one small GEMM."""
    n, channels, *size = x.shape
    wide = [j for j, k in enumerate(kernel) if k > 1]
    narrow = [j for j, k in enumerate(kernel) if k == 1]
    if narrow:  # dimensions with a one-wide kernel have lag 0 only: they join the examples
        x = x.permute(0, *(2 + j for j in narrow), 1, *(2 + j for j in wide)).reshape(
            -1, channels, *(size[j] for j in wide))
    lengths = tuple(size[j] for j in wide)
    spectrum = torch.fft.rfftn(x, dim=tuple(range(2, 2 + len(wide))))
    examples = spectrum.shape[0]
    # Per frequency, the examples by the channels' (Re, Im) pairs: one copy of the spectrum.
    parts = torch.view_as_real(spectrum.permute(*range(2, 2 + len(wide)), 0, 1).contiguous()).reshape(
        -1, examples, 2 * channels)
    c = channels
    transform = _lag_transform(tuple(kernel[j] for j in wide), tuple(dilation[j] for j in wide), lengths, x.dtype)
    transform = transform.view(len(transform), 2, -1)  # lag x (Re, Im) x frequency
    lags = torch.zeros((len(transform), c * c), dtype=x.dtype)
    # Frequencies in chunks whose Grams stay in cache: with few examples per frequency
    # the products are rank-N updates, bound by memory when written out whole (measured 3x
    # slower for 64 channels on 56x56 maps at batch 32).
    chunk = max(1, GRAM_CHUNK_ELEMENTS // (4 * c * c))
    for start in range(0, len(parts), chunk):
        part = parts[start:start + chunk]
        gram = torch.bmm(part.transpose(1, 2), part)
        cross = torch.empty((2, len(part), c, c), dtype=x.dtype)
        torch.add(gram[:, 0::2, 0::2], gram[:, 1::2, 1::2], out=cross[0])  # Re S = Re'Re + Im'Im
        torch.sub(gram[:, 0::2, 1::2], gram[:, 1::2, 0::2], out=cross[1])  # Im S = Re'Im - Im'Re
        lags.addmm_(transform[:, :, start:start + len(part)].reshape(len(lags), -1), cross.view(-1, c * c))
    return lags.view(-1, c, c)


def _lag_gemms(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """The same lag products as ``_lag_products``, one GEMM per lag: ``x`` ``(N, *rows, C)`` is
    channels-last with at least ``d_j (k_j - 1)`` zeros before every row of dimension ``j``, so
    that a flat row offset reads the shifted input (what runs past a row lands in the next
    row's zeros). Lags of opposite sign are transposes: only the nonnegative offsets are
    multiplied."""
    n, *rows, channels = x.shape
    flat = x.reshape(-1, channels)
    steps = [int(np.prod(rows[j + 1:])) for j in range(len(rows))]
    shifts = [sum(d * l * step for d, l, step in zip(dilation, lag, steps))
              for lag in itertools.product(*(range(-(k - 1), k) for k in kernel))]
    lags = torch.empty((len(shifts), channels, channels), dtype=x.dtype)
    first = {}
    for i, shift in enumerate(shifts):
        if shift >= 0 and shift not in first:
            torch.mm(flat[:len(flat) - shift].T, flat[shift:], out=lags[i])
            first[shift] = i
    for i, shift in enumerate(shifts):
        if first.get(shift) != i:
            lags[i] = lags[first[-shift]].T if shift < 0 else lags[first[shift]]
    return lags


@lru_cache(maxsize=64)
def _lag_pairs(kernel: tuple[int, ...]) -> torch.Tensor:
    """For every pair of kernel offsets ``(δ1, δ2)``, the index of the lag ``δ2 - δ1`` in
    ``_lag_products``' order."""
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    spans = tuple(2 * k - 1 for k in kernel)
    pairs = [np.ravel_multi_index(tuple(b - a + k - 1 for a, b, k in zip(o1, o2, kernel)), spans)
             for o1 in offsets for o2 in offsets]
    return torch.tensor(pairs)


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


def _padded_rows(size, kernel, padding, dilation, fft: bool) -> tuple[int, ...]:
    """Row lengths of the zero-padded input: the image and the zeros before it, ``max(d (k - 1),
    P)``, as many as a patch reaches past the image (so no lag wraps round), rounded up to a
    fast FFT length for the FFT route."""
    rows = tuple(s + max(d * (k - 1), p) for s, k, p, d in zip(size, kernel, padding, dilation))
    return tuple(_smooth_size(r) for r in rows) if fft else rows


@lru_cache(maxsize=256)
def _work(examples: int, channels: int, size: tuple[int, ...], kernel: tuple[int, ...],
          padding: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[float, float, float]:
    """Multiply-adds per example of the lag products through the FFT and as GEMMs (each with
    the frame's Grams), and of the patch Gram with its copy."""
    volume = int(np.prod(kernel))
    out_size = [s + 2 * p - d * (k - 1) for s, k, p, d in zip(size, kernel, padding, dilation)]
    slabs, _ = _slabs(kernel, padding, dilation, out_size)
    frame = sum(np.prod([b - a for a, b in positions]) * (channels * np.prod([b - a for a, b in offsets])) ** 2
                for positions, offsets in slabs)
    # The FFT, a (2C)^2 Gram per frequency and its share of the Gram's memory traffic.
    rows = _padded_rows(size, kernel, padding, dilation, fft=True)
    wide = [r for r, k in zip(rows, kernel) if k > 1]
    frequencies = np.prod(wide[:-1]) * (wide[-1] // 2 + 1) * np.prod([s for s, k in zip(size, kernel) if k == 1])
    fft = (2 * channels * np.prod(rows) * np.log2(np.prod(wide))
           + 4 * channels ** 2 * frequencies * (1 + GRAM_EXAMPLES / max(examples, 1)))
    # One C x C product per nonnegative lag over every padded position.
    gemm = (np.prod([2 * k - 1 for k in kernel]) + 1) // 2 * channels ** 2 * np.prod(
        _padded_rows(size, kernel, padding, dilation, fft=False))
    # About half the patch Gram's square, and the patch copy.
    patches = ((channels * volume) ** 2 / 2 + COPY_WORK * channels * volume) * np.prod(out_size)
    return float(fft + frame), float(gemm + frame), float(patches)


def lag_method(examples: int, channels: int, size: tuple[int, ...], kernel: tuple[int, ...],
               padding: tuple[int, ...], dilation: tuple[int, ...]) -> str:
    """``"fft"`` or ``"gemm"``: the method of ``lagged_a_factor`` that is less work for this batch."""
    fft, gemm, _ = _work(examples, channels, tuple(size), tuple(kernel), tuple(padding), tuple(dilation))
    return "fft" if fft < gemm else "gemm"


def lags_pay(examples: int, channels: int, size: tuple[int, ...], kernel: tuple[int, ...],
             padding: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    """Whether ``lagged_a_factor`` beats the patch Gram for a stride-1 convolution of a batch of
    ``examples`` with ``channels`` input channels over spatial ``size``, by a count of their work."""
    if int(np.prod(kernel)) == 1:
        return False
    fft, gemm, patches = _work(examples, channels, tuple(size), tuple(kernel), tuple(padding), tuple(dilation))
    return examples * patches >= MIN_PATCH_WORK and min(fft, gemm) <= MAX_WORK_SHARE * patches


@full_precision
def lagged_a_factor(x: np.ndarray, kernel: tuple[int, ...], padding: tuple[int, ...],
                    dilation: tuple[int, ...], bias: bool, scale: float, packed: bool,
                    method: str | None = None) -> np.ndarray:
    """``scale * sum a~ a~^T`` over the patches of a stride-1 convolution of ``x``
    ``(N, C, *spatial)``: the same factor as the patch Gram (columns in PyTorch's
    ``(C, *kernel)`` order, a bias column last), dense or packed, float32 (float64
    for float64 ``x``), computed from lag products (module docstring) through the FFT
    (``method="fft"``) or one GEMM per lag (``"gemm"``); by default whichever is less work."""
    n, channels, *size = x.shape
    ndim = len(kernel)
    volume = int(np.prod(kernel))
    out_size = tuple(s + 2 * p - d * (k - 1) for s, k, p, d in zip(size, kernel, padding, dilation))
    lead = [max(d * (k - 1), p) for k, p, d in zip(kernel, padding, dilation)]
    if not n:  # no patches (and no FFT of nothing)
        return finish_factor(np.zeros((channels * volume + bias,) * 2, dtype=accumulation_dtype(x.dtype)), packed)
    if method is None:
        method = lag_method(n, channels, size, kernel, padding, dilation)
    if method not in ("fft", "gemm"):
        raise ValueError(f"method: expected 'fft' or 'gemm', got {method!r}")
    # Zeros before every row of every dimension (``_padded_rows``) and one zero image after
    # the last for the slabs' reads past it; channels first for the FFT, last for the GEMMs
    # (a position is then a row of C contiguous values). The slabs read either through the
    # channels-first view.
    rows = _padded_rows(size, kernel, padding, dilation, fft=method == "fft")
    dtype = _TORCH_DTYPES[accumulation_dtype(x.dtype).name]
    if method == "fft":
        buffer = torch.zeros((n + 1, channels, *rows), dtype=dtype)
    else:
        buffer = torch.zeros((n + 1, *rows, channels), dtype=dtype).movedim(-1, 1)
    buffer[(slice(0, n), slice(None), *(slice(l, l + s) for l, s in zip(lead, size)))] = _read_view(x)
    if method == "fft":
        lags = _lag_products(buffer[:n], tuple(kernel), tuple(dilation))
    else:
        lags = _lag_gemms(buffer[:n].movedim(1, -1), tuple(kernel), tuple(dilation))

    d = channels * volume + bias
    factor = torch.empty((d, d), dtype=buffer.dtype)
    # Block (δ1, δ2) is lag δ2 - δ1; ordered (c, δ1) x (c', δ2) as PyTorch's weight columns.
    blocks = lags[_lag_pairs(tuple(kernel))].reshape(volume, volume, channels, channels)
    factor[:channels * volume, :channels * volume] = blocks.permute(2, 0, 3, 1).reshape(channels * volume, -1)
    slabs, extended = _slabs(kernel, padding, dilation, out_size)
    if bias:
        # Every offset sees every input value once.
        sums = buffer.sum((0, *range(2, 2 + ndim))).repeat_interleave(volume)
        factor[:-1, -1] = sums
        factor[-1, :-1] = sums
        factor[-1, -1] = n * int(np.prod([b - a for a, b in extended]))

    position_strides = buffer.stride()[2:]
    for positions, offsets in slabs:
        shape = (n, *(b - a for a, b in positions), channels, *(b - a for a, b in offsets))
        # Patch value at position p, offset δ: x[p + d δ - P], i.e. padded[p + d δ - P + lead].
        start = sum((a + dd * ka - p + l) * st for (a, _), (ka, _), p, dd, l, st in
                    zip(positions, offsets, padding, dilation, lead, position_strides))
        strides = (buffer.stride(0), *position_strides, buffer.stride(1),
                   *(dd * st for dd, st in zip(dilation, position_strides)))
        patches = torch.as_strided(buffer, shape, strides, start)
        width = int(np.prod(shape[1 + ndim:]))
        slab = torch.empty((int(np.prod(shape[:1 + ndim])), width + bias), dtype=buffer.dtype)
        slab[:, :width].view(shape).copy_(patches)  # one copy, straight beside the bias column
        if bias:
            slab[:, -1] = 1
        # The slab's columns (c, δ) are the factor's (C, *kernel) columns in the box of its
        # offsets, in the same order: subtract its Gram's upper triangle (all the factor's
        # upper triangle needs) through strided views of the factor, then the bias.
        gram = upper_gram(slab)
        box = (slice(None), *(slice(a, b) for a, b in offsets))
        sub = shape[1 + ndim:]
        factor[:channels * volume, :channels * volume].view(channels, *kernel, channels, *kernel)[
            box + box] -= gram[:width, :width].view(*sub, *sub)
        if bias:
            column = gram[:width, width].view(sub)
            factor[:-1, -1].view(channels, *kernel)[box] -= column  # finish_factor mirrors it below
            factor[-1, -1] -= gram[width, width]

    result = factor.numpy()
    result *= scale
    return finish_factor(result, packed)
