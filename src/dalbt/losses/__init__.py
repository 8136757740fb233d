"""Losses: Barlow Twins, the joint DALBT objective and MoBY's contrastive loss."""

from dalbt.losses.barlow import (
    DEFAULT_GAMMA,
    DEFAULT_LAMBDA,
    BarlowTwinsLoss,
    JointLoss,
    barlow_twins_loss,
    cross_correlation,
    joint_loss,
)
from dalbt.losses.moby import (
    KeyQueue,
    MoBYLoss,
    moby_contrastive,
    moby_loss,
    momentum_schedule,
    momentum_update,
)

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_LAMBDA",
    "BarlowTwinsLoss",
    "JointLoss",
    "KeyQueue",
    "MoBYLoss",
    "barlow_twins_loss",
    "cross_correlation",
    "joint_loss",
    "moby_contrastive",
    "moby_loss",
    "momentum_schedule",
    "momentum_update",
]
