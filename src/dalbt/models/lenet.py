"""LeNet-5 style encoder (the paper's MNIST / Fashion-MNIST encoder, latent 60)."""

from __future__ import annotations

import torch
from torch import nn


class LeNetEncoder(nn.Module):
    """LeNet-5 style convolutional encoder.

    ``conv5x5(6, pad 2) - ReLU - maxpool2 - conv5x5(16) - ReLU - maxpool2 - adaptive avgpool 5x5
    - Linear(400, 120) - ReLU - Linear(120, latent_dim)``. On 28x28 inputs this is the classic
    LeNet-5 (the adaptive pooling is then the identity). Smaller inputs get padding on the second
    convolution and skip the second pooling when the map is already 1 pixel wide, so any size
    >= 8 works. The latent ``z`` is the output of the last linear layer (no activation).

    Args:
        in_channels: Number of input channels.
        image_size: Side of the (square) input images the layer sizes are chosen for.
        latent_dim: Dimension of the output ``z``.
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 60) -> None:
        super().__init__()
        side = image_size // 2  # after conv1 ("same" padding) and the first pooling
        pad2 = 0 if side >= 9 else 2  # keep at least a 5x5 map after conv2
        side = side - 4 + 2 * pad2
        pool2: nn.Module = nn.MaxPool2d(2) if side >= 2 else nn.Identity()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=pad2),
            nn.ReLU(inplace=True),
            pool2,
            nn.AdaptiveAvgPool2d((5, 5)),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, latent_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode normalised images.

        Args:
            x: ``(B, C, H, W)`` normalised images.

        Returns:
            ``(B, latent_dim)`` latents.
        """
        return self.head(self.features(x))
