"""Model outputs over a set of dataset indices (shared by training and the strategies)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Outputs:
    """Model outputs for a set of dataset indices.

    ``logits`` and ``latents`` may be given as numpy arrays (or nested sequences): they are
    converted to float32 CPU tensors. Tensors are kept as given. ``indices`` becomes an int64
    numpy array.

    Attributes:
        indices: Dataset indices, (N,) int64.
        logits: Classifier logits, (N, K) float32.
        latents: Encoder outputs z, (N, D) float32.
    """

    indices: np.ndarray
    logits: Tensor
    latents: Tensor

    def __post_init__(self) -> None:
        # frozen: fields can only be replaced through object.__setattr__
        indices = self.indices
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu().numpy()
        object.__setattr__(self, "indices", np.asarray(indices, dtype=np.int64))
        for name in ("logits", "latents"):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                object.__setattr__(self, name,
                                   torch.as_tensor(np.asarray(value, dtype=np.float32)))

    @property
    def probs(self) -> Tensor:
        """Softmax probabilities, (N, K)."""
        return torch.softmax(self.logits, dim=1)

    @property
    def predictions(self) -> Tensor:
        """Predicted classes, (N,) int64."""
        return self.logits.argmax(dim=1)
