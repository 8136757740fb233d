"""Barlow Twins loss (Zbontar et al. 2021) and the joint DALBT objective (paper Eq. 2)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalbt.recipe import DEFAULT_GAMMA, DEFAULT_LAMBDA

#: ``all_reduce(t)``: the element-wise sum of ``t`` over the processes of a distributed run,
#: differentiable (see :attr:`dalbt.distributed.Dist.all_reduce`).
AllReduce = Callable[[Tensor], Tensor]


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5,
                      all_reduce: AllReduce | None = None) -> Tensor:
    """Cross-correlation matrix of two batches standardised along the batch axis.

    Args:
        z1: Projector outputs of the first view, (B, D).
        z2: Projector outputs of the second view, (B, D).
        eps: Added to the variance, as batch norm without affine parameters does.
        all_reduce: In a distributed run, the sum over processes: ``z1`` and ``z2`` are then
            this process's rows of a batch split across processes, and the standardisation
            and C are those of the whole batch (every process gets the same C; as the official
            implementation, which all-reduces C). None: the batch is all here.

    Returns:
        C, (D, D), with ``C[i, j] = sum_b z1n[b, i] * z2n[b, j] / B``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (B, D) tensors of equal shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    if all_reduce is not None:
        return _global_cross_correlation(z1, z2, eps, all_reduce)
    if z1.shape[0] < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2 samples")
    n = z1.shape[0]
    z1n = F.batch_norm(z1, None, None, training=True, eps=eps)
    z2n = F.batch_norm(z2, None, None, training=True, eps=eps)
    return z1n.T @ z2n / n


def _global_cross_correlation(z1: Tensor, z2: Tensor, eps: float, all_reduce: AllReduce
                              ) -> Tensor:
    """:func:`cross_correlation` of a batch split across processes (three all_reduce)."""
    d = z1.shape[1]
    count = z1.new_full((1,), z1.shape[0])
    sums = all_reduce(torch.cat([z1.sum(0), z2.sum(0), count]))
    n = float(sums[-1].detach())
    if n < 2:
        raise ValueError("Barlow Twins needs a batch of at least 2 samples")
    c1 = z1 - sums[:d] / n
    c2 = z2 - sums[d:2 * d] / n
    var = all_reduce(torch.cat([(c1 * c1).sum(0), (c2 * c2).sum(0)])) / n
    z1n = c1 * torch.rsqrt(var[:d] + eps)
    z2n = c2 * torch.rsqrt(var[d:] + eps)
    return all_reduce(z1n.T @ z2n) / n


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = DEFAULT_LAMBDA,
                      all_reduce: AllReduce | None = None) -> Tensor:
    """Barlow Twins loss ``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2``.

    Args:
        z1: Projector outputs of view 1, (B, D).
        z2: Projector outputs of view 2, (B, D).
        lambd: Weight of the redundancy-reduction (off-diagonal) term.
        all_reduce: Sum over processes when the batch is split across them (see
            :func:`cross_correlation`): every process then gets the loss of the whole batch,
            and its gradient is that of the sum over processes (DDP's averaging makes it the
            whole batch's gradient).

    Returns:
        Scalar loss (an unnormalised sum; hundreds are normal for wide projectors).
    """
    c = cross_correlation(z1, z2, all_reduce=all_reduce)
    diag = torch.diagonal(c)
    on_diag = (1.0 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambd * off_diag


def joint_loss(
    logits: Tensor,
    targets: Tensor,
    p1: Tensor | None,
    p2: Tensor | None,
    gamma: float = DEFAULT_GAMMA,
    lambd: float = DEFAULT_LAMBDA,
    all_reduce: AllReduce | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DALBT objective (Eq. 2): ``CE(C(E(x)), y) + gamma * BT(P(E(aug1 x)), P(E(aug2 x)))``.

    Args:
        logits: Classifier outputs on the undistorted inputs, (B, K).
        targets: Class indices, (B,).
        p1: Projections of view 1, (B', D), or None to skip the Barlow Twins term.
        p2: Projections of view 2, (B', D), or None.
        gamma: Weight of the Barlow Twins term (paper: 0.001).
        lambd: Barlow Twins off-diagonal weight.
        all_reduce: Sum over processes when the batch is split across them: both terms are
            then those of the whole batch (the cross-entropy is the mean over all processes'
            samples), the same on every process.

    Returns:
        (total, ce, bt) scalars; ``bt`` is 0 when no projections are given.
    """
    if all_reduce is None:
        ce = F.cross_entropy(logits, targets)
    else:
        ce_sum = F.cross_entropy(logits, targets, reduction="sum").view(1)
        sums = all_reduce(torch.cat([ce_sum, ce_sum.new_full((1,), targets.shape[0])]))
        ce = sums[0] / sums[1].detach().clamp_min(1.0)
    if p1 is None or p2 is None or gamma == 0.0:
        bt = ce.new_zeros(())
    else:
        bt = barlow_twins_loss(p1, p2, lambd, all_reduce=all_reduce)
    return ce + gamma * bt, ce, bt


class BarlowTwinsLoss(nn.Module):
    """Module wrapper of :func:`barlow_twins_loss`."""

    def __init__(self, lambd: float = DEFAULT_LAMBDA) -> None:
        super().__init__()
        self.lambd = lambd

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return barlow_twins_loss(z1, z2, self.lambd)


class JointLoss(nn.Module):
    """Module wrapper of :func:`joint_loss`; returns (total, ce, bt)."""

    def __init__(self, gamma: float = DEFAULT_GAMMA, lambd: float = DEFAULT_LAMBDA) -> None:
        super().__init__()
        self.gamma = gamma
        self.lambd = lambd

    def forward(
        self, logits: Tensor, targets: Tensor, p1: Tensor | None, p2: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        return joint_loss(logits, targets, p1, p2, self.gamma, self.lambd)
