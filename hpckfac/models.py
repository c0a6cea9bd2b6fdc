"""ResNet-style CNNs with BatchNorm: small ones for 8x8 digits and CIFAR-like
32x32 inputs, and ImageNet's ResNet-50 for benchmarks at real layer shapes; and a
small causal transformer LM (``transformer``: ``python -m hpckfac.bench step --model
transformer``, a deep model of many small layers).

``resnet(depth=20, width=16)`` is He et al.'s CIFAR ResNet-20: a 3x3 stem,
three stages of ``(depth - 2) // 6`` basic blocks with ``width``, ``2*width``,
``4*width`` channels (stride 1, 2, 2), global average pooling and a Linear
classifier. Global pooling makes it work for any input of at least 4x4
(``digits_cnn`` is ResNet-8 on 1x8x8 digits: the model ``hpckfac train`` builds for
its built-in data set).

``resnet50()`` is He et al.'s ImageNet ResNet-50 (bottleneck blocks [3, 4, 6,
3], stride on the 3x3 convolution), with torchvision's module names. It is also
the benchmarks' ResNet-50: ``hpckfac.bench.shapes.resnet50()`` reads its layer
shapes from it.

``transformer(depth, width)`` is a causal language model of ``depth`` pre-LayerNorm
GPT-style blocks: many small layers (eight per block: two LayerNorms, the four
attention projections as ``nn.Linear``, the two of the MLP), the case where the
host work per layer counts (``python -m hpckfac.bench step --model transformer``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two 3x3 convolutions with BatchNorm, plus the shortcut, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, three stages of ``blocks`` basic blocks each, pooling, Linear head."""

    def __init__(self, blocks: int, width: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, channels = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2 ** stage
            for b in range(blocks):
                layers.append(BasicBlock(channels, out, stride if b == 0 else 1))
                channels = out
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, in_channels, H, W)``."""
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


def resnet(depth: int = 20, width: int = 16, in_channels: int = 3, num_classes: int = 10) -> ResNet:
    """CIFAR-style ResNet of ``depth = 6n + 2`` layers (20, 32, 44, 56, ...; 8 is the smallest)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth: expected 6n+2 with n >= 1 (8, 14, 20, ...), got {depth!r}")
    if width < 1 or in_channels < 1 or num_classes < 1:
        raise ValueError(f"width, in_channels, num_classes: expected positive integers, "
                         f"got {width!r}, {in_channels!r}, {num_classes!r}")
    return ResNet((depth - 2) // 6, width, in_channels, num_classes)


def digits_cnn(width: int = 8, num_classes: int = 10) -> ResNet:
    """ResNet-8 for 1x8x8 inputs (scikit-learn digits)."""
    return resnet(depth=8, width=width, in_channels=1, num_classes=num_classes)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), each with BN; shortcut downsample when the shape changes."""

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """1x1, 3x3, 1x1 convolutions with BatchNorm, plus the shortcut, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ImageNet ResNet-50: 7x7/2 stem, 3x3/2 max pool, four bottleneck stages, pooling, Linear head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(channels, planes, 2 if (b == 0 and stage > 1) else 1))
                channels = planes * 4
            setattr(self, f"layer{stage}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, 3, H, W)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes: int = 1000) -> ResNet50:
    """ImageNet ResNet-50 (25,557,032 parameters with 1000 classes)."""
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    return ResNet50(num_classes)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm causal self-attention and a GELU MLP (``4 * width`` hidden), each added to
    its input. The attention projections are ``nn.Linear`` modules of their own (query, key,
    value and output), each its own K-FAC block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, T, width)`` through attention over earlier positions, then the MLP."""
        n, t, width = x.shape
        y = self.ln1(x)
        q, k, v = (layer(y).view(n, t, self.heads, width // self.heads).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, t, width))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nn.Module):
    """Token and position embeddings, ``depth`` blocks, a final LayerNorm and a Linear head."""

    def __init__(self, depth: int, width: int, heads: int, vocab: int, positions: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(positions, width)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(N, T, vocab)`` of token ids ``(N, T)``, ``T`` at most ``positions``."""
        # Positions as (1, T): one input shared by the batch, which K-FAC's Embedding expands.
        at = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.head(self.ln(self.blocks(self.tokens(ids) + self.positions(at))))


def transformer(depth: int = 24, width: int = 64, heads: int = 4, vocab: int = 512,
                positions: int = 128) -> TransformerLM:
    """Causal transformer LM of ``depth`` blocks of ``width`` features (``heads`` heads)."""
    if min(depth, width, heads, vocab, positions) < 1 or width % heads:
        raise ValueError(f"depth, width, heads, vocab, positions: expected positive integers with width a "
                         f"multiple of heads, got {depth!r}, {width!r}, {heads!r}, {vocab!r}, {positions!r}")
    return TransformerLM(depth, width, heads, vocab, positions)
