"""Encoders, the Barlow Twins projector and the DALBT network."""

from dalbt.models.net import (
    MODELS,
    DALBTNet,
    ModelSpec,
    Normalize,
    build_model,
    list_models,
    make_projector,
)

__all__ = [
    "MODELS",
    "DALBTNet",
    "ModelSpec",
    "Normalize",
    "build_model",
    "list_models",
    "make_projector",
]
