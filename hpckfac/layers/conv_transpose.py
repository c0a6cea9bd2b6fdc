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

from hpckfac.layers.block import Array, array_module, prod
from hpckfac.layers.conv import SpatialKronBlock, patch_rows


class ConvTransposeBlock(SpatialKronBlock):
    """Curvature block of ``torch.nn.ConvTransposeNd`` (zero padding).

    Arguments as PyTorch's; the weight is ``(in_channels, out_channels / groups, *kernel_size)``.
    Per group ``d_A = (in_channels / groups) * prod(kernel_size) + bias``,
    ``d_G = out_channels / groups``.
    """

    def __init__(self, name: str, in_channels: int, out_channels: int, kernel_size: tuple, stride: tuple,
                 padding: tuple, output_padding: tuple, dilation: tuple, bias: bool, groups: int = 1) -> None:
        groups = self._arguments(in_channels, out_channels, groups, kernel_size, stride=(stride, 1),
                                 padding=(padding, 0), output_padding=(output_padding, 0), dilation=(dilation, 1))
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(f"output_padding: {self.output_padding} must be smaller than stride or dilation")
        cin, cout = self.in_channels // groups, self.out_channels // groups
        super().__init__(name, cin * prod(self.kernel_size), cout, bias, (self.in_channels, cout, *self.kernel_size),
                         groups)
        self._by_output_padding: dict[tuple[int, ...], ConvTransposeBlock] = {}

    def output_size(self, input_size: Sequence[int]) -> tuple[int, ...]:
        return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, k, s, p, op, d in
                     zip(input_size, self.kernel_size, self.stride, self.padding, self.output_padding,
                         self.dilation))

    def add_input(self, stats: Array, a: Array, output_size: Sequence[int] | None = None) -> tuple[int, ...]:
        """As ``SpatialKronBlock.add_input``; ``output_size``, the spatial size of this call's
        output, when a call (``forward(x, output_size=...)``, a U-Net matching its skip
        connection) chose another than ``output_padding`` gives: ``A`` then takes the rows of
        that call's output positions, as PyTorch pads the output for it."""
        if output_size is None or tuple(output_size) == self.output_size(a.shape[2:]):
            return super().add_input(stats, a)
        return self._with_output_size(a, output_size).add_input(stats, a)

    def _with_output_size(self, a: Array, output_size: Sequence[int]) -> ConvTransposeBlock:
        """This block with the output padding that gives ``a`` the spatial ``output_size``
        (its factors' layout is the same), built once per padding. ValueError naming this block
        where no padding below ``max(stride, dilation)`` gives that size, as PyTorch refuses."""
        padding = tuple(int(o) - (n - op) for o, n, op in
                        zip(output_size, self.output_size(a.shape[2:]), self.output_padding))
        if len(padding) != len(self.kernel_size) or any(
                not 0 <= op < max(s, d) for op, s, d in zip(padding, self.stride, self.dilation)):
            raise ValueError(f"output_size: block {self.name!r} cannot give an input of spatial size "
                             f"{tuple(a.shape[2:])} the output size {tuple(output_size)}")
        if padding not in self._by_output_padding:
            self._by_output_padding[padding] = ConvTransposeBlock(
                self.name, self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                padding, self.dilation, self.has_bias, self.groups)
        return self._by_output_padding[padding]

    def input_rows(self, a: Array, ones: bool = False, kernel_major: bool = False) -> Array:
        """im2col rows ``(N * T, in_channels * prod(kernel) + ones)`` of the zero-inserted,
        padded input, ``T`` the output positions; columns ``(C_in, *kernel)`` (``(*kernel, C_in)``
        with ``kernel_major``)."""
        ndim = len(self.kernel_size)
        out_size = self._checked_output_size(a)
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
                          self.in_channels * prod(self.kernel_size) + ones, ones, kernel_major)

    def _output_size_cause(self) -> str:
        # A call's output size (forward(x, output_size=...)) reaches add_input from the hooks;
        # a size other than the one A was built for means the output seen is not this call's.
        return (f"output_padding {self.output_padding}: a subclass whose forward changes its output, or a "
                "forward(..., output_size=...) whose output size add_input was not given")

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
