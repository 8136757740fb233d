"""Batched inference and the training summary: what training, the frozen-encoder head
(:mod:`dalbt.probe`) and the strategies share, below :mod:`dalbt.train` (which re-exports them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from dalbt.distributed import SINGLE, Dist
from dalbt.outputs import Outputs

if TYPE_CHECKING:
    from dalbt.models.net import DALBTNet

#: Images per inference pass unless the model says (``DALBTNet.inference_batch``).
INFERENCE_BATCH = 2048


@dataclass
class TrainResult:
    """What a round's training produced.

    Attributes:
        val_acc: Validation accuracy of the selected model (NaN without validation split).
        best_epoch: Epoch (1-based), or step with the step recipe (``TrainConfig.steps``), of
            the selected model (the last one with ``select="last"`` or without validation).
        train_ce: Mean cross-entropy of the selected epoch (with the step recipe: of the steps
            since the previous checkpoint).
        train_bt: Mean Barlow Twins loss of the same steps (0 when gamma = 0).
        history: Per validation: (epoch, or step with the step recipe; val_acc).
    """

    val_acc: float
    best_epoch: int
    train_ce: float
    train_bt: float
    history: list[tuple[int, float]] = field(default_factory=list)


def to_float(x: Tensor, device: torch.device | str) -> Tensor:
    """uint8 images (B, C, H, W) -> float in [0, 1] on ``device``."""
    return x.to(device, non_blocking=True).float().div_(255.0)


@torch.inference_mode()
def infer(model: DALBTNet, images: Tensor, indices: np.ndarray,
          batch_size: int | None = None, progress: Callable[[int], None] | None = None,
          dist: Dist = SINGLE) -> Outputs:
    """Logits and latents of the model for dataset indices, in one batched pass.

    Args:
        model: A DALBTNet (``embed`` and ``classifier``).
        images: All training images, (N, C, H, W) uint8.
        indices: Dataset indices to score, (M,).
        batch_size: Images per forward pass (None: the model's ``inference_batch``, else
            :data:`INFERENCE_BATCH`).
        progress: Called with the number of images done after each batch.
        dist: In a distributed run (a collective call: every rank calls it with the same
            indices), each rank scores its contiguous slice of ``indices`` and every rank gets
            all outputs, in the order of ``indices``.

    Returns:
        :class:`Outputs` with CPU float32 logits (M, K) and latents (M, D).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start, stop = dist.shard(len(indices))
    idx = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64))[start:stop]
    if batch_size is None:
        batch_size = int(getattr(model, "inference_batch", INFERENCE_BATCH))
    logits, latents = [], []
    for chunk in idx.split(batch_size):
        z = model.embed(to_float(images[chunk], device))
        latents.append(z.float().cpu())
        logits.append(model.classifier(z).float().cpu())
        if progress is not None:
            progress(len(chunk) * dist.world_size)
    model.train(was_training)
    k = model.num_classes
    d = model.latent_dim
    logits_t = torch.cat(logits) if logits else torch.empty(0, k)
    latents_t = torch.cat(latents) if latents else torch.empty(0, d)
    return Outputs(
        indices=np.asarray(indices, dtype=np.int64),
        logits=dist.gather_rows(logits_t, len(indices)),
        latents=dist.gather_rows(latents_t, len(indices)),
    )


__all__ = ["INFERENCE_BATCH", "TrainResult", "infer", "to_float"]
