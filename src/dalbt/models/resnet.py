"""CIFAR-style ResNet-18 encoders (3x3 stem, no max pooling): full width (latent 512) and a
quarter-width one for CPU pre-training (``resnet18-w16``, latent 128)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution and of the shortcut.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_planes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-18 for small images: 3x3 stem, four stages of two blocks, global average pooling.

    Works for any channel count and any image size (stride-2 convolutions with padding 1 never
    shrink a map below 1x1). The ``8 * width`` pooled features are ``z``; when ``latent_dim``
    differs a linear layer maps them to ``latent_dim``.

    Args:
        in_channels: Number of input channels.
        image_size: Unused (accepted for a uniform builder signature).
        latent_dim: Dimension of the output ``z``.
        width: Channels of the stem and first stage (64: ResNet-18; the stages double it, so
            the pooled features are ``8 * width``).
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 512,
                 width: int = 64) -> None:
        super().__init__()
        del image_size
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_planes = width
        for planes, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            stages.append(
                nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))
            )
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head: nn.Module = (
            nn.Identity() if latent_dim == in_planes else nn.Linear(in_planes, latent_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode normalised images.

        Args:
            x: ``(B, C, H, W)`` normalised images.

        Returns:
            ``(B, latent_dim)`` latents.
        """
        return self.head(self.pool(self.stages(self.stem(x))))


def narrow_resnet18(in_channels: int, image_size: int, latent_dim: int = 128) -> ResNetEncoder:
    """The quarter-width CIFAR ResNet-18 (stages 16-32-64-128, 0.7 M weights): about 6 min of
    Barlow Twins per Fashion-MNIST epoch on 2 CPU cores, where full width takes about 90."""
    return ResNetEncoder(in_channels, image_size, latent_dim, width=16)
