"""Model outputs over a set of dataset indices (shared by training and the strategies)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Outputs:
    """Model outputs for a set of dataset indices.

    Attributes:
        indices: Dataset indices, (N,) int64.
        logits: Classifier logits, (N, K) float32.
        latents: Encoder outputs z, (N, D) float32.
    """

    indices: np.ndarray
    logits: Tensor
    latents: Tensor

    @property
    def probs(self) -> Tensor:
        """Softmax probabilities, (N, K)."""
        return torch.softmax(self.logits, dim=1)

    @property
    def predictions(self) -> Tensor:
        """Predicted classes, (N,) int64."""
        return self.logits.argmax(dim=1)
