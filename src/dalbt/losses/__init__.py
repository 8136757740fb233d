"""Losses: Barlow Twins and the joint DALBT objective."""

from dalbt.losses.barlow import (
    DEFAULT_GAMMA,
    DEFAULT_LAMBDA,
    BarlowTwinsLoss,
    JointLoss,
    barlow_twins_loss,
    cross_correlation,
    joint_loss,
)

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_LAMBDA",
    "BarlowTwinsLoss",
    "JointLoss",
    "barlow_twins_loss",
    "cross_correlation",
    "joint_loss",
]
