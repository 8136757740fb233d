"""Datasets: on-disk format readers and named, in-memory image datasets.

The names below load lazily, so that ``dalbt.data.formats`` (image decoding for the labelling
project) is importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dalbt.data.datasets import DATASETS, ImageDataset, list_datasets, load_dataset

__all__ = [
    "DATASETS",
    "ImageDataset",
    "list_datasets",
    "load_dataset",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dalbt.data.datasets"), name)
    raise AttributeError(f"module 'dalbt.data' has no attribute {name!r}")
