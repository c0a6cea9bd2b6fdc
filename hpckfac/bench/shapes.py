"""Layer shapes of the models the scaling benchmark and the performance model use.

Both models are the torch modules of ``hpckfac.models``, their shapes read by
``from_torch`` from one forward pass (the one definition of each model).
``resnet50()`` is ResNet-50 for ImageNet at 224x224 (torchvision's v1.5 layout:
stride on the 3x3 convolution of each bottleneck): 53 convolutions without bias
and one Linear with bias (54 Kronecker-factored blocks; the largest ``A`` is
4608x4608 from the 3x3 convolutions of 512 channels, the largest ``G`` 2048x2048)
and 53 BatchNorm layers; its forward pass has zero examples and uninitialised
weights, so it costs milliseconds. ``small_cnn()`` reads the shapes of the
trainer's CNN by running it once. ``scaled()`` shrinks every channel count so that
a CPU can run the workload.

PyTorch is imported by ``resnet50``, ``small_cnn`` and ``from_torch`` only.
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


def resnet50(image: int = 224, num_classes: int = 1000) -> ModelShapes:
    """ResNet-50 (``hpckfac.models.resnet50``) at ``image x image`` input, read by
    ``from_torch`` from a forward pass of zero examples: nothing is computed."""
    import torch

    from hpckfac.models import resnet50 as torch_resnet50

    # Built on the meta device (no weight initialisation), then given uninitialised CPU
    # tensors, which a batch of zero examples never reads. (A forward pass of meta tensors
    # would need no memory, but its first call imports sympy: about a second.)
    with torch.device("meta"):
        model = torch_resnet50(num_classes)
    model.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()},
                          assign=True)
    return from_torch("resnet50", model, (0, 3, image, image))


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

    from hpckfac.torch.registry import conv_padding

    layers: list[KronShape | BatchNormShape] = []

    def hook(module, inputs, output) -> None:
        label = names[module]
        if isinstance(module, torch.nn.Conv2d):
            if module.kernel_size[0] != module.kernel_size[1] or module.groups != 1:
                raise ValueError(f"model: layer {label} is not a square, ungrouped convolution")
            # padding="same" or "valid" as the zeros it stands for, as the preconditioner's block takes it.
            layers.append(KronShape(label, module.in_channels, module.out_channels, module.kernel_size[0],
                                  module.stride[0], conv_padding(module)[0], inputs[0].shape[-1],
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

    # A batch of zero examples: the shapes without the activations (which grow with the image).
    return from_torch("small", digits_cnn(), (0, 1, image, image))


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
