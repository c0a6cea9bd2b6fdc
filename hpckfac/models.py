"""Small ResNet-style CNNs with BatchNorm for 8x8 digits and CIFAR-like 32x32 inputs.

``resnet(depth=20, width=16)`` is He et al.'s CIFAR ResNet-20: a 3x3 stem,
three stages of ``(depth - 2) // 6`` basic blocks with ``width``, ``2*width``,
``4*width`` channels (stride 1, 2, 2), global average pooling and a Linear
classifier. Global pooling makes it work for any input of at least 4x4
(``digits_cnn`` is the small one the trainer uses on 8x8 digits).
"""
from __future__ import annotations

from torch import nn


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

    def forward(self, x):
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

    def forward(self, x):
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
