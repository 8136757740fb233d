"""MoBY's contrastive objective (Xie et al. 2021, "Self-Supervised Learning with Swin
Transformers"), as lifted to active learning by MoBYv2AL (Caramalau et al., BMVC 2022).

MoBY combines MoCo v2 and BYOL: an online (query) encoder + projector + predictor, a key
encoder + projector that are exponential moving averages of the online ones, and an InfoNCE loss
of each view's prediction against the other view's key, with a FIFO queue of past keys as
negatives. Everything here is a pure function except :class:`KeyQueue` (the ring buffer of keys)
and :class:`MoBYLoss` (a thin module wrapper of :func:`moby_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_TEMPERATURE = 0.2
DEFAULT_QUEUE_SIZE = 4096
DEFAULT_MOMENTUM = 0.99


def moby_contrastive(q: Tensor, k: Tensor, queue: Tensor,
                     temperature: float = DEFAULT_TEMPERATURE,
                     reduction: str = "mean") -> Tensor:
    """InfoNCE of predictions against their positive keys and a queue of negative keys.

    All vectors are L2-normalised first, so the logits are cosine similarities over the
    temperature: ``loss_b = -log(exp(q_b.k_b / T) / (exp(q_b.k_b / T) + sum_j exp(q_b.n_j / T)))``.
    ``k`` and ``queue`` are treated as constants (no gradient flows into them).

    Args:
        q: Online predictor outputs, (B, D).
        k: Positive keys from the momentum branch, (B, D).
        queue: Negative keys, (Q, D); Q may be 0 (then the loss is 0).
        temperature: Softmax temperature T > 0.
        reduction: ``"mean"`` (scalar, mean over the batch) or ``"none"`` ((B,) per sample).

    Returns:
        Scalar, or (B,) per-sample losses.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if q.dim() != 2 or q.shape != k.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"expected q, k (B, D) and queue (Q, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(queue.shape)}")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    neg = F.normalize(queue.detach().to(q.dtype), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ neg.T  # (B, Q)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    # -log softmax of the positive (column 0)
    loss = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return loss.mean() if reduction == "mean" else loss


def moby_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, queue1: Tensor, queue2: Tensor,
              temperature: float = DEFAULT_TEMPERATURE, reduction: str = "mean") -> Tensor:
    """MoBY's symmetric loss: view 1's prediction against view 2's key (negatives: queue of
    view-2 keys) plus view 2's prediction against view 1's key (negatives: queue of view-1 keys).

    Args:
        q1: Online predictions of view 1, (B, D).
        q2: Online predictions of view 2, (B, D).
        k1: Momentum keys of view 1, (B, D).
        k2: Momentum keys of view 2, (B, D).
        queue1: Past view-1 keys, (Q1, D).
        queue2: Past view-2 keys, (Q2, D).
        temperature: Softmax temperature T > 0.
        reduction: ``"mean"`` or ``"none"`` (per sample, (B,)).

    Returns:
        The sum of the two directions (as MoBY), scalar or (B,).
    """
    return (moby_contrastive(q1, k2, queue2, temperature, reduction)
            + moby_contrastive(q2, k1, queue1, temperature, reduction))


@torch.no_grad()
def momentum_update(online: nn.Module | Iterable[Tensor], target: nn.Module | Iterable[Tensor],
                    m: float) -> None:
    """``target = m * target + (1 - m) * online``, parameter-wise, in place, without gradient.

    Args:
        online: The online module (or its parameters).
        target: The momentum copy (same architecture), updated in place.
        m: Momentum in [0, 1] (1 keeps ``target`` unchanged).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    src = list(online.parameters() if isinstance(online, nn.Module) else online)
    dst = list(target.parameters() if isinstance(target, nn.Module) else target)
    if len(src) != len(dst):
        raise ValueError(f"online has {len(src)} parameters but target has {len(dst)}")
    for o, t in zip(src, dst, strict=True):
        if o.shape != t.shape:
            raise ValueError(f"parameter shapes differ: {tuple(o.shape)} vs {tuple(t.shape)}")
        t.mul_(m).add_(o.detach(), alpha=1.0 - m)


def momentum_schedule(step: int, total: int, base: float = DEFAULT_MOMENTUM) -> float:
    """MoBY's momentum, rising from ``base`` at step 0 to 1 at step ``total`` on a cosine:
    ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``.

    Args:
        step: Current step (0-based; clipped to [0, total]).
        total: Number of steps of the schedule (>= 1).
        base: Momentum at step 0, in [0, 1].

    Returns:
        The momentum, in [base, 1].
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"base momentum must be in [0, 1], got {base}")
    t = min(max(step, 0), total) / total
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


class KeyQueue:
    """FIFO ring buffer of (detached) keys, the negatives of :func:`moby_contrastive`.

    It starts empty (instead of MoBY's random vectors) and fills up to ``size`` keys; after that
    each enqueue overwrites the oldest keys.

    Args:
        dim: Key dimension D.
        size: Capacity Q (>= 1).
        device: Where the buffer lives.
        dtype: Buffer dtype.
    """

    def __init__(self, dim: int, size: int = DEFAULT_QUEUE_SIZE,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if int(size) < 1 or int(dim) < 1:
            raise ValueError(f"queue size and dim must be >= 1, got {size}, {dim}")
        self.size = int(size)
        self.buffer = torch.zeros(self.size, int(dim), device=device, dtype=dtype)
        self.ptr = 0  # next slot to write
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Append keys (B, D) (detached), dropping the oldest ones beyond the capacity."""
        keys = keys.detach().to(self.buffer.dtype)
        if keys.dim() != 2 or keys.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"expected keys (B, {self.buffer.shape[1]}), got {tuple(keys.shape)}")
        if len(keys) > self.size:
            # only the newest `size` keys survive; they land where a key-by-key write would
            self.ptr = (self.ptr + len(keys) - self.size) % self.size
            keys = keys[-self.size:]
        b = len(keys)
        first = min(b, self.size - self.ptr)
        self.buffer[self.ptr : self.ptr + first] = keys[:first]
        self.buffer[: b - first] = keys[first:]
        self.ptr = (self.ptr + b) % self.size
        self.filled = min(self.filled + b, self.size)

    @property
    def keys(self) -> Tensor:
        """The stored keys, (len, D), in storage order (the loss does not depend on order)."""
        return self.buffer[: self.filled]

    def ordered(self) -> Tensor:
        """The stored keys from the oldest to the newest, (len, D)."""
        if self.filled < self.size:
            return self.buffer[: self.filled]
        return torch.cat([self.buffer[self.ptr :], self.buffer[: self.ptr]])


class MoBYLoss(nn.Module):
    """Module form of :func:`moby_loss`.

    Args:
        temperature: Softmax temperature T > 0.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, queue1: Tensor,
                queue2: Tensor) -> Tensor:
        """Scalar symmetric MoBY loss of (B, D) predictions/keys and (Q, D) queues."""
        return moby_loss(q1, q2, k1, k2, queue1, queue2, self.temperature)
