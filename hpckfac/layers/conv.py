"""``ConvBlock``: K-FAC block of an n-d convolution by KFC (Grosse & Martens 2016).

Every output position ``t`` of example ``i`` contributes one row: the input
patch the kernel sees there (im2col; zero padding, stride and dilation as in
PyTorch), flattened in the order of PyTorch's ``weight.reshape(C_out, -1)``,
i.e. ``(C_in, k_1, ..., k_n)``, and the output gradient ``g[i, :, t]``. Rows
are ordered ``(i, t)`` with ``t`` the row-major output position. ``A`` sums
over positions, ``G`` averages (docs/design.md). One code path serves Conv1d,
Conv2d and Conv3d.

Grouped and depthwise convolutions (``groups > 1``) are block-diagonal over
groups: group ``j`` maps input channels ``j`` to output channels ``j``, and
gets its own Kronecker pair (``hpckfac.layers.kron``); the im2col rows are
the same, their columns already group after group.
"""
from __future__ import annotations

import abc
import numbers
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from hpckfac import arrays, ops
from hpckfac.checks import check_integer
from hpckfac.layers.block import Array, array_module, prod
from hpckfac.layers.conv_lags import lagged_a_factor, lags_pay
from hpckfac.layers.kron import KronBlock
from hpckfac.ops.factors import example_gram


def conv_tuple(value: Any, name: str, ndim: int, minimum: int) -> tuple[int, ...]:
    """``value`` (an int or a length-``ndim`` sequence of ints >= ``minimum``) as a tuple."""
    values = (value,) * ndim if not isinstance(value, Sequence) else tuple(value)
    valid = all(not isinstance(v, bool) and isinstance(v, numbers.Integral) and v >= minimum for v in values)
    if len(values) != ndim or not valid:
        raise ValueError(f"{name}: expected an int >= {minimum} or {ndim} of them, got {value!r}")
    return tuple(int(v) for v in values)


def _split_view(rows: Array, row_shape: tuple[int, ...], col_shape: tuple[int, ...]) -> Array:
    """View of a 2-D ``rows`` whose row axis is split into ``row_shape`` and column axis into ``col_shape``."""
    xp = array_module(rows)
    r, c = rows.strides
    strides = tuple(r * prod(row_shape[i + 1:]) for i in range(len(row_shape)))
    strides += tuple(c * prod(col_shape[i + 1:]) for i in range(len(col_shape)))
    return xp.lib.stride_tricks.as_strided(rows, row_shape + col_shape, strides)


def patch_rows(padded: Array, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
               out_size: tuple[int, ...], width: int, bias: bool, kernel_major: bool = False) -> Array:
    """im2col rows ``(N * T, width)`` from a zero-padded channels-last input ``(N, *spatial, C)``:
    the patch at every output position, columns ``(C, *kernel)`` (``(*kernel, C)`` with
    ``kernel_major``), then a 1 with ``bias``."""
    xp = array_module(padded)
    ndim = len(kernel)
    channels = padded.shape[-1]
    # Strided view (N, *out, C, *kernel): element [i, t, c, k] = padded[i, t*stride + k*dilation, c];
    # kernel-major (N, *out, *kernel, C) copies runs of C contiguous channels, several times faster.
    batch, *spatial, channel = padded.strides
    offsets = tuple(st * d for st, d in zip(spatial, dilation))
    if kernel_major:
        strides = (batch, *(st * s for st, s in zip(spatial, stride)), *offsets, channel)
        shape = (padded.shape[0], *out_size, *kernel, channels)
    else:
        strides = (batch, *(st * s for st, s in zip(spatial, stride)), channel, *offsets)
        shape = (padded.shape[0], *out_size, channels, *kernel)
    patches = xp.lib.stride_tricks.as_strided(padded, shape, strides)
    rows = xp.empty((padded.shape[0] * prod(out_size), width), dtype=padded.dtype)
    # The last copy, straight into the rows beside the bias column.
    _split_view(rows[:, :width - bias], shape[:ndim + 1], shape[ndim + 1:])[...] = patches
    if bias:
        rows[:, -1] = 1
    return rows


@lru_cache(maxsize=32)
def _channel_major(channels: int, volume: int, bias: bool, packed: bool) -> np.ndarray:
    """Gather index turning a factor over kernel-major columns ``(k, c)`` into the same factor
    over channel-major columns ``(c, k)`` (a bias column last in both): for the dense matrix,
    the permutation of rows and columns; packed, where each packed channel-major element sits
    in the packed kernel-major triangle."""
    d = channels * volume + bias
    perm = np.arange(d)
    perm[:channels * volume] = np.arange(channels * volume).reshape(volume, channels).T.reshape(-1)
    if not packed:
        return perm
    rows, cols = np.triu_indices(d)
    lo, hi = np.minimum(perm[rows], perm[cols]), np.maximum(perm[rows], perm[cols])
    return (lo * d - lo * (lo - 1) // 2 + (hi - lo)).astype(np.int32 if d * d < 2 ** 31 else np.int64)


def channel_major(factor: Array, channels: int, volume: int, bias: bool, packed: bool,
                  owner: object | None = None) -> Array:
    """``factor`` (dense or packed, over kernel-major columns) over channel-major columns
    (``owner``: the object whose life a device's gather index follows, ``arrays.constant``)."""
    xp = array_module(factor)
    index = arrays.constant(_channel_major(channels, volume, bias, packed), xp,
                            ("channel major", channels, volume, bias, packed), owner)
    if packed:
        return xp.take(factor, index)
    return xp.take(xp.take(factor, index, axis=0), index, axis=1)


class SpatialKronBlock(KronBlock):
    """What convolutions and transposed convolutions share: their validated arguments,
    the input shape check, the output-gradient rows, the positions ``|T|``, ``A`` from
    kernel-major patches and, on the CPU, ``G`` without a channels-last copy. Subclasses
    give the spatial ``output_size`` of an input size and the im2col ``input_rows``."""

    @abc.abstractmethod
    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for spatial input size ``input_size`` (PyTorch's formula)."""

    def a_factor(self, a: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """As ``KronBlock.a_factor``. With one group and a kernel larger than 1x1 the patches
        are copied kernel-major (runs of contiguous channels, several times faster than
        channel-major) and the factor's rows and columns put back in PyTorch's order."""
        volume = prod(self.kernel_size)
        if self.groups != 1 or volume == 1:
            return super().a_factor(a, scale, packed=packed)
        rows = self.input_rows(a, ones=self.has_bias, kernel_major=True)
        factor = ops.accumulate_factor(rows, scale, packed=packed)
        # On a device the gather index (as large as the packed factor) is shared by the blocks of
        # one shape and freed with the last of them.
        return channel_major(factor, (self.d_A - self.has_bias) // volume, volume, self.has_bias, packed, self)

    def add_input(self, stats: Array, a: Array) -> tuple[int, ...]:
        """Add ``a``'s ``A`` to ``stats``; return the output's spatial size, which
        ``add_output_grad`` checks the output gradient against."""
        super().add_input(stats, a)
        return self.output_size(a.shape[2:])

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: tuple[int, ...]) -> None:
        """Add ``g``'s ``G`` to ``stats``; ValueError unless ``g`` has the spatial size ``saved``
        that ``add_input`` expected: ``A``'s rows describe the output positions of that size."""
        if tuple(g.shape[2:]) != tuple(saved):
            raise ValueError(f"g: block {self.name!r} expected an output of spatial size {tuple(saved)} from "
                             f"its input, got {tuple(g.shape[2:])} ({self._output_size_cause()})")
        super().add_output_grad(stats, g, scale, saved)

    @abc.abstractmethod
    def _output_size_cause(self) -> str:
        """The settings ``output_size`` used and the likely cause when a call's output has
        another spatial size, for ``add_output_grad``'s error."""

    def _arguments(self, in_channels: int, out_channels: int, groups: int, kernel_size: tuple,
                   **tuples: tuple[Any, int]) -> int:
        """Validate and store the channels, ``kernel_size`` and each ``name=(value, minimum)``
        tuple argument as attributes; returns ``groups``."""
        self.in_channels = check_integer(in_channels, "in_channels", 1)
        self.out_channels = check_integer(out_channels, "out_channels", 1)
        groups = check_integer(groups, "groups", 1)
        if self.in_channels % groups or self.out_channels % groups:
            raise ValueError(f"groups: {groups} does not divide in_channels {self.in_channels} and "
                             f"out_channels {self.out_channels}")
        if not isinstance(kernel_size, Sequence) or not kernel_size:
            raise ValueError(f"kernel_size: expected a non-empty tuple of ints, got {kernel_size!r}")
        self.kernel_size = conv_tuple(kernel_size, "kernel_size", len(kernel_size), 1)
        for name, (value, minimum) in tuples.items():
            setattr(self, name, conv_tuple(value, name, len(kernel_size), minimum))
        return groups

    def _checked_output_size(self, a: Array) -> tuple[int, ...]:
        """The spatial output size for the input ``a``, checked: ValueError unless ``a`` is
        ``(N, in_channels, *spatial)`` and gives at least one output position."""
        ndim = len(self.kernel_size)
        if getattr(a, "ndim", None) != ndim + 2 or a.shape[1] != self.in_channels:
            raise ValueError(f"a: block {self.name!r} expects (N, {self.in_channels}, {ndim} spatial dims), "
                             f"got shape {getattr(a, 'shape', None)}")
        out_size = self.output_size(a.shape[2:])
        if min(out_size) < 1:
            raise ValueError(f"a: spatial size {a.shape[2:]} gives no output positions in {self.name!r}: the "
                             "(padded) input is smaller than the (dilated) kernel")
        return out_size

    def output_rows(self, g: Array) -> Array:
        """Rows ``(N * T, C_out)`` of the output gradients ``g`` of shape ``(N, C_out, *spatial)``."""
        self._check_output(g)
        return array_module(g).moveaxis(g, 1, -1).reshape(-1, self.out_channels)

    def _check_output(self, g: Array) -> None:
        if getattr(g, "ndim", None) != len(self.kernel_size) + 2 or g.shape[1] != self.out_channels:
            raise ValueError(f"g: block {self.name!r} expects (N, {self.out_channels}, "
                             f"{len(self.kernel_size)} spatial dims), got shape {getattr(g, 'shape', None)}")

    def positions(self, g: Array) -> int:
        """Spatial output positions ``|T|`` of ``g`` (N, C_out, *spatial)."""
        return prod(g.shape[2:])

    def g_factor(self, g: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """As ``KronBlock.g_factor``; on the CPU with one group, straight from ``g``'s
        ``(C_out, positions)`` matrices without copying its rows channels-last."""
        if not (isinstance(g, np.ndarray) and self.groups == 1):
            return super().g_factor(g, scale, packed=packed)
        self._check_output(g)
        return example_gram(g.reshape(g.shape[0], self.out_channels, -1), scale / self.positions(g), packed)


class ConvBlock(SpatialKronBlock):
    """Curvature block of ``torch.nn.ConvNd`` (zero padding).

    ``kernel_size`` is a tuple (its length is the number of spatial
    dimensions); ``stride``, ``padding`` and ``dilation`` are tuples of that
    length or ints. Per group, ``d_A = (in_channels / groups) * prod(kernel_size) + bias``
    and ``d_G = out_channels / groups``; the weight is
    ``(out_channels, in_channels / groups, *kernel_size)``.
    """

    def __init__(self, name: str, in_channels: int, out_channels: int, kernel_size: tuple, stride: tuple,
                 padding: tuple, dilation: tuple, bias: bool, groups: int = 1) -> None:
        groups = self._arguments(in_channels, out_channels, groups, kernel_size, stride=(stride, 1),
                                 padding=(padding, 0), dilation=(dilation, 1))
        cin, cout = self.in_channels // groups, self.out_channels // groups
        super().__init__(name, cin * prod(self.kernel_size), cout, bias, (self.out_channels, cin, *self.kernel_size),
                         groups)

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                     zip(input_size, self.kernel_size, self.stride, self.padding, self.dilation))

    def a_factor(self, a: Array, scale: float = 1.0, *, packed: bool = False) -> Array:
        """As ``KronBlock.a_factor``. On the CPU, a stride-1 convolution with one group whose
        lag products cost less than the patch Gram (``hpckfac.layers.conv_lags``) takes its
        factor from them, without a patch matrix; the others from patches."""
        if (isinstance(a, np.ndarray) and self.groups == 1 and all(s == 1 for s in self.stride)
                and prod(self.kernel_size) > 1):
            self._checked_output_size(a)
            if lags_pay(a.shape[0], self.in_channels, a.shape[2:], self.kernel_size, self.padding,
                        self.dilation):
                return lagged_a_factor(a, self.kernel_size, self.padding, self.dilation, self.has_bias, scale,
                                       packed)
        return super().a_factor(a, scale, packed=packed)

    def _output_size_cause(self) -> str:
        # A subclass that pads in forward (timm's Conv2dSame) convolves another input than the one
        # its hook sees: the patches of A would not be those of the output positions of G.
        return (f"padding {self.padding}, stride {self.stride}, dilation {self.dilation}: the layer's forward "
                "does not convolve its input with the module's own settings (a subclass that pads in forward, "
                "as timm's Conv2dSame?); list it in skip_layers, or register_layer its type with a block that "
                "describes it")

    def input_rows(self, a: Array, ones: bool = False, kernel_major: bool = False) -> Array:
        """im2col rows ``(N * T, in_channels * prod(kernel) + ones)`` of the input ``(N, C_in, *spatial)``,
        columns ``(C_in, *kernel)`` (``(*kernel, C_in)`` with ``kernel_major``)."""
        out_size = self._checked_output_size(a)
        xp = array_module(a)
        channels_last = a.strides[1] == a.itemsize  # e.g. torch's channels_last memory format
        pointwise = all(k == 1 for k in self.kernel_size)
        if any(self.padding) or not (pointwise or channels_last):
            # One copy pads and moves channels last: the window copy then reads runs of
            # channels contiguously, measurably faster than gathering from (N, C, *spatial).
            padded = xp.zeros((a.shape[0], *(n + 2 * p for n, p in zip(a.shape[2:], self.padding)),
                               self.in_channels), dtype=a.dtype)
            interior = tuple(slice(p, p + n) for n, p in zip(a.shape[2:], self.padding))
            padded[(slice(None), *interior, slice(None))] = xp.moveaxis(a, 1, -1)
        else:
            # A view, so the window copy is the only copy: measured 6x faster for 1x1 kernels, whose
            # windows are single positions; larger kernels read faster from a channels-last copy.
            padded = xp.moveaxis(a, 1, -1)
        return patch_rows(padded, self.kernel_size, self.stride, self.dilation, out_size,
                          self.in_channels * prod(self.kernel_size) + ones, ones, kernel_major)
