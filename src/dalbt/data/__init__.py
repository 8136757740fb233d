"""Datasets: on-disk format readers, named in-memory image datasets and adapters for the
user's own data (arrays, torch datasets, image folders, Hugging Face splits).

The names below load lazily, so that ``dalbt.data.formats`` (image decoding for the labelling
project) is importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dalbt.data.adapters import from_dataset, from_hf, from_image_folder, from_tensors
    from dalbt.data.datasets import DATASETS, ImageDataset, list_datasets, load_dataset

# Public name -> the module defining it.
_MODULES = {
    "DATASETS": "dalbt.data.datasets",
    "ImageDataset": "dalbt.data.datasets",
    "list_datasets": "dalbt.data.datasets",
    "load_dataset": "dalbt.data.datasets",
    "from_dataset": "dalbt.data.adapters",
    "from_hf": "dalbt.data.adapters",
    "from_image_folder": "dalbt.data.adapters",
    "from_tensors": "dalbt.data.adapters",
}

__all__ = [
    "DATASETS",
    "ImageDataset",
    "from_dataset",
    "from_hf",
    "from_image_folder",
    "from_tensors",
    "list_datasets",
    "load_dataset",
]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'dalbt.data' has no attribute {name!r}")
