"""VGG16 with batch normalisation, CIFAR-style (the paper's CIFAR-10 encoder, latent 512)."""

from __future__ import annotations

import torch
from torch import nn

#: Output channels of the 3x3 conv-BN-ReLU layers of VGG16, per stage; each stage ends with a
#: 2x2 max pooling.
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class VGGEncoder(nn.Module):
    """VGG16-BN convolutional stack followed by global average pooling.

    On 32x32 inputs the five poolings reduce the map to 1x1, as in the usual CIFAR VGG16. For
    smaller inputs a pooling that would shrink the map below 1x1 is skipped; larger inputs are
    reduced to 1x1 by the final adaptive average pooling. The 512 pooled features are ``z``
    (after the last ReLU); when ``latent_dim != 512`` a linear layer maps them to ``latent_dim``.

    Args:
        in_channels: Number of input channels.
        image_size: Side of the (square) input images the poolings are planned for.
        latent_dim: Dimension of the output ``z``.
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for stage in VGG16_STAGES:
            for out_channels in stage:
                layers += [
                    nn.Conv2d(channels, out_channels, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                channels = out_channels
            if side >= 2:  # skip poolings that would shrink the map below 1x1
                layers.append(nn.MaxPool2d(2))
                side //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head: nn.Module = (
            nn.Identity() if latent_dim == channels else nn.Linear(channels, latent_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode normalised images.

        Args:
            x: ``(B, C, H, W)`` normalised images.

        Returns:
            ``(B, latent_dim)`` latents.
        """
        return self.head(self.features(x))
