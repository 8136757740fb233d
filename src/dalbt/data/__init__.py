"""Datasets: on-disk format readers and named, in-memory image datasets."""

# Public API of the data package; further modules (pool, augment, ...) add their imports here.
from dalbt.data.datasets import DATASETS, ImageDataset, list_datasets, load_dataset

__all__ = [
    "DATASETS",
    "ImageDataset",
    "list_datasets",
    "load_dataset",
]
