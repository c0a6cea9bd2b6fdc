"""Layer shapes of the models the scaling benchmark and the performance model use.

``resnet50()`` is ResNet-50 for ImageNet at 224x224 (torchvision's v1.5 layout:
stride on the 3x3 convolution of each bottleneck): 53 convolutions without bias
and one Linear with bias (54 Kronecker-factored blocks; the largest ``A`` is
4608x4608 from the 3x3 convolutions of 512 channels, the largest ``G`` 2048x2048)
and 53 BatchNorm layers. ``small_cnn()`` reads the shapes of the trainer's CNN
(``hpckfac.models``) by running it once. ``scaled()`` shrinks every channel
count so that a CPU can run the workload.

No PyTorch is needed except by ``small_cnn``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class KronShape:
    """A Conv2d (square kernel) or Linear layer as K-FAC sees it.

    A Linear layer is a 1x1 "convolution" on a 1x1 input: ``kernel = 1``,
    ``h_in = h_out = 1``.
    """

    name: str
    c_in: int
    c_out: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    h_in: int = 1
    h_out: int = 1
    bias: bool = False
    linear: bool = False

    @property
    def d_A(self) -> int:
        """Rows of ``A``: im2col patch length, plus 1 with a bias."""
        return self.c_in * self.kernel * self.kernel + int(self.bias)

    @property
    def d_G(self) -> int:
        """Rows of ``G``: output channels."""
        return self.c_out

    @property
    def positions(self) -> int:
        """Output positions ``|T|`` per example (1 for Linear)."""
        return self.h_out * self.h_out

    @property
    def params(self) -> int:
        """Weights plus bias."""
        return self.c_out * self.d_A

    @property
    def forward_flops(self) -> int:
        """Multiply-adds times 2 of the forward pass, per example."""
        return 2 * self.positions * self.c_out * self.c_in * self.kernel * self.kernel


@dataclass(frozen=True)
class BatchNormShape:
    """A BatchNorm2d layer: ``channels`` on an ``h x h`` feature map."""

    name: str
    channels: int
    h: int

    @property
    def params(self) -> int:
        """gamma and beta."""
        return 2 * self.channels

    @property
    def positions(self) -> int:
        """Spatial positions per example (an ``h x h`` map)."""
        return self.h * self.h


@dataclass(frozen=True)
class ModelShapes:
    """All curvature blocks of one model, in model order (the order in which the
    optimizer registers them, which the ``contiguous`` assignment follows)."""

    name: str
    layers: tuple[KronShape | BatchNormShape, ...]
    image: int

    @property
    def kron(self) -> tuple[KronShape, ...]:
        """The Kronecker-factored (Conv2d, Linear) layers."""
        return tuple(s for s in self.layers if isinstance(s, KronShape))

    @property
    def batchnorm(self) -> tuple[BatchNormShape, ...]:
        """The BatchNorm layers."""
        return tuple(s for s in self.layers if isinstance(s, BatchNormShape))

    @property
    def params(self) -> int:
        """Trainable parameters of the model (K-FAC layers and BatchNorm)."""
        return sum(s.params for s in self.kron) + sum(s.params for s in self.batchnorm)

    @property
    def forward_flops(self) -> int:
        """Forward flops per example of the K-FAC layers (BatchNorm, ReLU, pooling ignored)."""
        return sum(s.forward_flops for s in self.kron)


def _conv_out(h: int, kernel: int, stride: int, padding: int) -> int:
    return (h + 2 * padding - kernel) // stride + 1


def resnet50(image: int = 224, num_classes: int = 1000) -> ModelShapes:
    """ResNet-50 (bottlenecks [3, 4, 6, 3], expansion 4) at ``image x image`` input."""
    layers: list[KronShape | BatchNormShape] = []

    def conv(name: str, c_in: int, c_out: int, kernel: int, stride: int, h_in: int) -> int:
        padding = kernel // 2
        h_out = _conv_out(h_in, kernel, stride, padding)
        layers.append(KronShape(name, c_in, c_out, kernel, stride, padding, h_in, h_out))
        layers.append(BatchNormShape(name.replace("conv", "bn").replace("downsample.0", "downsample.1"),
                                  c_out, h_out))
        return h_out

    h = conv("conv1", 3, 64, 7, 2, image)
    h = _conv_out(h, 3, 2, 1)  # max pool
    c_in = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 1) else 1
            prefix = f"layer{stage}.{b}"
            h1 = conv(f"{prefix}.conv1", c_in, planes, 1, 1, h)
            h2 = conv(f"{prefix}.conv2", planes, planes, 3, stride, h1)
            conv(f"{prefix}.conv3", planes, planes * 4, 1, 1, h2)
            if b == 0:
                conv(f"{prefix}.downsample.0", c_in, planes * 4, 1, stride, h)
            c_in, h = planes * 4, h2
    layers.append(KronShape("fc", c_in, num_classes, bias=True, linear=True))
    return ModelShapes("resnet50", tuple(layers), image)


def scaled(model: ModelShapes, factor: int) -> ModelShapes:
    """``model`` with every channel count (and the class count) divided by ``factor``
    (at least 1); spatial sizes and kernels unchanged. ``factor=1`` returns ``model``."""
    if int(factor) < 1:
        raise ValueError(f"factor: expected an integer >= 1, got {factor!r}")
    if factor == 1:
        return model
    shrink = lambda c: max(1, c // factor)
    first = model.kron[0].name  # the image's colour channels stay
    layers = tuple(replace(s, channels=shrink(s.channels)) if isinstance(s, BatchNormShape)
                   else replace(s, c_in=s.c_in if s.name == first else shrink(s.c_in), c_out=shrink(s.c_out))
                   for s in model.layers)
    return ModelShapes(f"{model.name}/{factor}", layers, model.image)


def from_torch(name: str, model: nn.Module, input_shape: Sequence[int]) -> ModelShapes:
    """Shapes of a PyTorch ``model``'s Conv2d, Linear and BatchNorm2d layers, found
    by one forward pass of zeros shaped ``input_shape`` (batch first)."""
    import torch

    layers: list[KronShape | BatchNormShape] = []

    def hook(module, inputs, output) -> None:
        label = names[module]
        if isinstance(module, torch.nn.Conv2d):
            if module.kernel_size[0] != module.kernel_size[1] or module.groups != 1:
                raise ValueError(f"model: layer {label} is not a square, ungrouped convolution")
            layers.append(KronShape(label, module.in_channels, module.out_channels, module.kernel_size[0],
                                  module.stride[0], module.padding[0], inputs[0].shape[-1],
                                  output.shape[-1], module.bias is not None))
        elif isinstance(module, torch.nn.Linear):
            layers.append(KronShape(label, module.in_features, module.out_features,
                                  bias=module.bias is not None, linear=True))
        else:
            layers.append(BatchNormShape(label, module.num_features, output.shape[-1]))

    kinds = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.BatchNorm2d)
    names = {m: n for n, m in model.named_modules() if isinstance(m, kinds)}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*input_shape))
    finally:
        for h in handles:
            h.remove()
    return ModelShapes(name, tuple(layers), int(input_shape[-1]))


def small_cnn(image: int = 8) -> ModelShapes:
    """The trainer's CNN on its built-in digits (``hpckfac.models.digits_cnn``, ResNet-8 on 1-channel images)."""
    from hpckfac.models import digits_cnn

    return from_torch("small", digits_cnn(), (1, 1, image, image))


MODELS = {"resnet50": (resnet50, 224), "small": (small_cnn, 8)}


def get(name: str, image: int | None = None) -> ModelShapes:
    """Shapes of model ``name`` (``MODELS``) at ``image x image`` input (default: its own)."""
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    build, default = MODELS[name]
    return build(default if image is None else int(image))


def blocks(model: ModelShapes, batchnorm: str = "kfac") -> tuple[list, list]:
    """``hpckfac.layers`` blocks of ``model`` in model order: (the engine's blocks, the
    BatchNorm blocks whose gradients the allreduce averages instead with
    ``batchnorm="allreduce"``)."""
    from hpckfac.layers import BatchNormBlock, ConvBlock, LinearBlock

    if batchnorm not in ("kfac", "allreduce"):
        raise ValueError(f"batchnorm: expected 'kfac' or 'allreduce', got {batchnorm!r}")
    engine, reduced = [], []
    for s in model.layers:
        if isinstance(s, BatchNormShape):
            (engine if batchnorm == "kfac" else reduced).append(BatchNormBlock(s.name, s.channels, 1e-5))
        elif s.linear:
            engine.append(LinearBlock(s.name, s.c_in, s.c_out, s.bias))
        else:
            engine.append(ConvBlock(s.name, s.c_in, s.c_out, (s.kernel, s.kernel), (s.stride, s.stride),
                                    (s.padding, s.padding), (1, 1), s.bias))
    return engine, reduced
