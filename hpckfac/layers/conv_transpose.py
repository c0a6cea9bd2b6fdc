"""``ConvTransposeBlock``: K-FAC block of an n-d transposed convolution.

A transposed convolution is an ordinary convolution (stride 1, the same
dilation) of its input with ``stride - 1`` zeros inserted between neighbours,
padded by ``dilation * (kernel - 1) - padding`` on each side (plus
``output_padding`` at the end; a negative pad crops), with the kernel flipped
and its two channel axes swapped. In that form it is a ``ConvBlock``: every
*output* position contributes one im2col row of the dilated input and one
output-gradient row, ``A`` sums over output positions and ``G`` averages, and
the bias rides on ``A``'s column of ones. ``weight_matrix`` applies the flip
and the swap, so ``grad_matrix`` of ``weight.grad`` is the equivalent
convolution's weight gradient. Groups work as for ``ConvBlock``.
"""
from __future__ import annotations

from typing import Sequence

from hpckfac.layers.block import Array, array_module, check_positive_int, prod
from hpckfac.layers.conv import conv_tuple, patch_rows
from hpckfac.layers.kron import KronBlock


class ConvTransposeBlock(KronBlock):
    """Curvature block of ``torch.nn.ConvTransposeNd`` (zero padding).

    Arguments as PyTorch's; the weight is ``(in_channels, out_channels / groups, *kernel_size)``.
    Per group ``d_A = (in_channels / groups) * prod(kernel_size) + bias``,
    ``d_G = out_channels / groups``.
    """

    def __init__(self, name: str, in_channels: int, out_channels: int, kernel_size: tuple, stride: tuple,
                 padding: tuple, output_padding: tuple, dilation: tuple, bias: bool, groups: int = 1) -> None:
        in_channels = check_positive_int(in_channels, "in_channels")
        out_channels = check_positive_int(out_channels, "out_channels")
        groups = check_positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: {groups} does not divide in_channels {in_channels} and "
                             f"out_channels {out_channels}")
        if not isinstance(kernel_size, Sequence) or not kernel_size:
            raise ValueError(f"kernel_size: expected a non-empty tuple of ints, got {kernel_size!r}")
        ndim = len(kernel_size)
        self.kernel_size = conv_tuple(kernel_size, "kernel_size", ndim, 1)
        self.stride = conv_tuple(stride, "stride", ndim, 1)
        self.padding = conv_tuple(padding, "padding", ndim, 0)
        self.output_padding = conv_tuple(output_padding, "output_padding", ndim, 0)
        self.dilation = conv_tuple(dilation, "dilation", ndim, 1)
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"output_padding: {self.output_padding} must be smaller than stride or dilation")
        super().__init__(name, in_channels // groups * prod(self.kernel_size), out_channels // groups, bias,
                         (in_channels, out_channels // groups, *self.kernel_size), groups)
        self.in_channels, self.out_channels = in_channels, out_channels

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for spatial input size ``input_size`` (PyTorch's formula)."""
        return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, op, d in
                     zip(input_size, self.kernel_size, self.stride, self.padding, self.output_padding,
                         self.dilation))

    def input_rows(self, a: Array, ones: bool = False) -> Array:
        """im2col rows ``(N * T, in_channels * prod(kernel) + ones)`` of the zero-inserted,
        padded input, ``T`` the output positions."""
        ndim = len(self.kernel_size)
        if getattr(a, "ndim", None) != ndim + 2 or a.shape[1] != self.in_channels:
            raise ValueError(f"a: block {self.name!r} expects (N, {self.in_channels}, {ndim} spatial dims), "
                             f"got shape {getattr(a, 'shape', None)}")
        out_size = self.output_size(a.shape[2:])
        if min(out_size) < 1:
            raise ValueError(f"a: spatial size {a.shape[2:]} gives no output positions in {self.name!r}")
        xp = array_module(a)
        # The equivalent convolution's input, channels last: a[j] lands at lo + j*stride.
        sizes, target, source = [], [], []
        for n, k, s, p, op, d in zip(a.shape[2:], self.kernel_size, self.stride, self.padding,
                                     self.output_padding, self.dilation):
            lo = d * (k - 1) - p
            length = (n - 1) * s + 1 + 2 * lo + op
            first = 0 if lo >= 0 else (s - 1 - lo) // s  # the first input index a negative pad keeps
            last = min(n, (length - 1 - lo) // s + 1)
            sizes.append(length)
            target.append(slice(lo + first * s, lo + (last - 1) * s + 1, s) if last > first else slice(0, 0))
            source.append(slice(first, max(first, last)))
        padded = xp.zeros((a.shape[0], *sizes, self.in_channels), dtype=a.dtype)
        padded[(slice(None), *target, slice(None))] = xp.moveaxis(a[(slice(None), slice(None), *source)], 1, -1)
        return patch_rows(padded, self.kernel_size, (1,) * ndim, self.dilation, out_size,
                          self.in_channels * prod(self.kernel_size) + ones, ones)

    def add_input(self, stats: Array, a: Array) -> tuple[int, ...]:
        super().add_input(stats, a)
        return self.output_size(a.shape[2:])

    def add_output_grad(self, stats: Array, g: Array, scale: float, saved: tuple[int, ...]) -> None:
        # forward(x, output_size=...) changes the output padding per call, which the rows of A,
        # built from the module's output_padding, would not match.
        if tuple(g.shape[2:]) != tuple(saved):
            raise ValueError(f"g: block {self.name!r} expected an output of spatial size {tuple(saved)} "
                             f"(output_padding {self.output_padding}), got {tuple(g.shape[2:])}; "
                             f"forward(..., output_size=...) is not supported, set output_padding instead")
        super().add_output_grad(stats, g, scale, saved)

    def output_rows(self, g: Array) -> Array:
        """Rows ``(N * T, C_out)`` of the output gradients ``g`` of shape ``(N, C_out, *spatial)``."""
        if getattr(g, "ndim", None) != len(self.kernel_size) + 2 or g.shape[1] != self.out_channels:
            raise ValueError(f"g: block {self.name!r} expects (N, {self.out_channels}, "
                             f"{len(self.kernel_size)} spatial dims), got shape {getattr(g, 'shape', None)}")
        return array_module(g).moveaxis(g, 1, -1).reshape(-1, self.out_channels)

    def positions(self, g: Array) -> int:
        """Spatial output positions ``|T|`` of ``g``."""
        return prod(g.shape[2:])

    def _spatial_axes(self) -> tuple[int, ...]:
        return tuple(range(3, 3 + len(self.kernel_size)))

    def weight_matrix(self, weight: Array) -> Array:
        """``(C_in, C_out/g, *k)`` -> the equivalent convolution's ``(C_out, C_in/g * prod(k))``."""
        xp = array_module(weight)
        w = weight.reshape(self.groups, self.in_channels // self.groups, self.d_G, *self.kernel_size)
        w = xp.flip(w.swapaxes(1, 2), axis=self._spatial_axes())
        return w.reshape(self.groups * self.d_G, -1)

    def weight_from_matrix(self, mat: Array) -> Array:
        xp = array_module(mat)
        w = mat.reshape(self.groups, self.d_G, self.in_channels // self.groups, *self.kernel_size)
        w = xp.flip(w, axis=self._spatial_axes()).swapaxes(1, 2)
        return w.reshape(self.weight_shape)
