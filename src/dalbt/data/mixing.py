"""Pools polluted with out-of-distribution (OOD) images, as in DALBT and DAL-OSR.

Two forms, both marking the OOD training images in :attr:`ImageDataset.ood` with label ``-1``:

* :func:`make_open_set`: some classes of the dataset itself become unknown (open-set AL).
* :func:`mix_in`: training images of another dataset are appended (cross-dataset OOD), resized
  and channel-matched to the target dataset; :func:`parse_mix` reads CLI specs for it.

The test split only ever holds known-class images, so accuracy is measured on known classes.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dalbt.data.datasets import DATASETS, ImageDataset
from dalbt.errors import DalbtError
from dalbt.rng import numpy_rng

__all__ = ["MIX_STREAM", "LUMA_WEIGHTS", "make_open_set", "match_images", "mix_in", "parse_mix"]

#: Seed stream of :func:`mix_in`: ``SeedSequence(seed, spawn_key=(MIX_STREAM,))``.
MIX_STREAM = 5
#: ITU-R BT.601 luma weights for R, G, B (colour -> grayscale).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: Images converted per chunk in :func:`match_images` (bounds the float32 working memory).
_CHUNK = 2048


def _ood_mask(data: ImageDataset) -> torch.Tensor:
    """The dataset's OOD mask ``(N,)`` bool (all ``False`` when it has none); a copy."""
    if data.ood is None:
        return torch.zeros(data.n_train, dtype=torch.bool)
    return data.ood.clone()


def _resolve_class(data: ImageDataset, entry: int | str) -> int:
    """Index of one class given by index or name (a name wins over a numeric string)."""
    k = data.num_classes
    if isinstance(entry, numbers.Integral) and not isinstance(entry, bool):
        if not 0 <= int(entry) < k:
            raise DalbtError(f"unknown class index {int(entry)} for {data.name}: use 0..{k - 1} "
                             f"or a class name ({', '.join(data.classes)})")
        return int(entry)
    if isinstance(entry, str):
        name = entry.strip()
        if name in data.classes:
            return data.classes.index(name)
        if name.isdecimal():
            return _resolve_class(data, int(name))
        raise DalbtError(f"unknown class {entry!r} for {data.name}: use a class name "
                         f"({', '.join(data.classes)}) or an index 0..{k - 1}")
    raise DalbtError(f"unknown class {entry!r}: give a class index (int) or name (str)")


def make_open_set(data: ImageDataset, unknown: Sequence[int | str]) -> ImageDataset:
    """Turn some classes of ``data`` into unknown (OOD) classes.

    Training images of the unknown classes stay in the pool with label ``-1`` and ``ood=True``;
    the known classes are renumbered ``0..K'-1`` in their original order and ``classes`` lists
    only their names; test images of unknown classes are removed. Images already marked OOD (or
    unlabelled, ``-1``) keep label ``-1`` and their mask entry. The name is kept.

    Args:
        data: The dataset, ``x_train (N, C, H, W)``, ``K`` classes.
        unknown: Unknown classes, as indices ``0..K-1`` or class names (a string that is not a
            class name but a decimal number is taken as an index).

    Returns:
        A new dataset: ``x_train``/``y_train``/``ood`` of length ``N``, labels in
        ``-1..K'-1``; ``x_test (M', C, H, W)`` with the known-class test images only.

    Raises:
        DalbtError: For an unknown class name or index, a class listed twice, or fewer than 2
            known classes left.
    """
    if isinstance(unknown, (str, bytes)):
        raise DalbtError(f"unknown classes must be a list, got the string {unknown!r}: pass "
                         f"e.g. [{unknown!r}]")
    resolved = [_resolve_class(data, u) for u in unknown]
    dupes = sorted({c for c in resolved if resolved.count(c) > 1})
    if dupes:
        names = ", ".join(repr(data.classes[c]) for c in dupes)
        raise DalbtError(f"class {names} listed more than once among the unknown classes of "
                         f"{data.name}: list each class once")
    k = data.num_classes
    known = [c for c in range(k) if c not in set(resolved)]
    if not known:
        raise DalbtError(f"all {k} classes of {data.name} are unknown: leave at least 2 classes "
                         f"known")
    if len(known) < 2:
        raise DalbtError(f"only {len(known)} known class ({data.classes[known[0]]!r}) would be "
                         f"left in {data.name}: make at most {k - 2} of its {k} classes unknown")
    # Lookup table over labels -1..K-1 (shifted by one): -1 -> -1, unknown -> -1, known -> new.
    table = torch.full((k + 1,), -1, dtype=torch.int64)
    table[torch.tensor(known) + 1] = torch.arange(len(known))
    y_train = table[data.y_train + 1]
    ood = _ood_mask(data)
    if resolved:
        ood |= torch.isin(data.y_train, torch.tensor(resolved, dtype=torch.int64))
    keep = ~torch.isin(data.y_test, torch.tensor(resolved, dtype=torch.int64))
    return ImageDataset(
        name=data.name,
        x_train=data.x_train,
        y_train=y_train,
        x_test=data.x_test[keep],
        y_test=table[data.y_test[keep] + 1],
        classes=[data.classes[c] for c in known],
        ood=ood,
    )


def match_images(x: torch.Tensor, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Resize images and match their channel count.

    Resizing is bilinear with antialiasing on float values; 1 channel becomes 3 by repetition,
    3 channels become 1 by ITU-R 601 luma (``0.299 R + 0.587 G + 0.114 B``); the result is
    rounded half up and clipped to ``0..255``.

    Args:
        x: Images ``(n, c, h, w)``, uint8.
        channels: Wanted channel count ``C``.
        size: Wanted ``(H, W)``.

    Returns:
        Images ``(n, C, H, W)``, uint8 (``x`` itself when nothing changes).

    Raises:
        DalbtError: For a channel conversion other than 1 -> 3 or 3 -> 1.
    """
    c, h, w = x.shape[1:]
    if c != channels and (c, channels) not in ((1, 3), (3, 1)):
        raise DalbtError(f"cannot convert {c}-channel images to {channels} channels: only "
                         f"grayscale (1) <-> colour (3) is supported; mix in a dataset with "
                         f"1 or 3 channels")
    if c == channels and (h, w) == tuple(size):
        return x
    weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32).view(1, 3, 1, 1)
    chunks = []
    for start in range(0, x.shape[0], _CHUNK):
        xf = x[start:start + _CHUNK].to(torch.float32)
        if c == 3 and channels == 1:
            xf = (xf * weights).sum(dim=1, keepdim=True)
        if (h, w) != tuple(size):
            xf = F.interpolate(xf, size=tuple(size), mode="bilinear", align_corners=False,
                               antialias=True)
        chunks.append(torch.floor(xf + 0.5).clamp_(0, 255).to(torch.uint8))
    out = torch.cat(chunks) if chunks else torch.empty(0, min(c, channels), *size,
                                                       dtype=torch.uint8)
    if c == 1 and channels == 3:
        out = out.repeat(1, 3, 1, 1)
    return out


def mix_in(data: ImageDataset, other: ImageDataset, count: int, seed: int) -> ImageDataset:
    """Append ``count`` training images of another dataset to the pool as OOD images.

    The images are drawn without replacement from ``other.x_train`` with
    ``numpy.random.default_rng(SeedSequence(seed, spawn_key=(5,)))`` (stream
    :data:`MIX_STREAM`; indices sorted), resized and channel-matched to ``data`` with
    :func:`match_images`, and appended with label ``-1`` and ``ood=True``; an existing OOD mask
    (e.g. from :func:`make_open_set`) is kept. Test split and classes are unchanged.

    Args:
        data: The target dataset, ``x_train (N, C, H, W)``.
        other: The OOD source, ``x_train (N2, C2, H2, W2)`` with ``C2`` equal to ``C`` or
            1 <-> 3.
        count: Images to draw, ``1..N2``.
        seed: Run seed.

    Returns:
        A dataset named ``"<data.name>+<other.name>"`` with ``x_train (N + count, C, H, W)``,
        ``y_train``/``ood`` of length ``N + count``.

    Raises:
        DalbtError: For ``count`` outside ``1..N2`` or unmatched channel counts.
    """
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        raise DalbtError(f"the number of {other.name} images to mix in must be an integer, "
                         f"got {count!r}")
    count = int(count)
    if not 0 < count <= other.n_train:
        raise DalbtError(f"cannot mix {count} {other.name} images into {data.name}: {other.name} "
                         f"has {other.n_train} training images; use a count in 1..{other.n_train}")
    idx = np.sort(numpy_rng(seed, MIX_STREAM).choice(other.n_train, size=count, replace=False))
    x_new = match_images(other.x_train[torch.from_numpy(idx)], data.channels,
                         (int(data.x_train.shape[2]), int(data.x_train.shape[3])))
    return ImageDataset(
        name=f"{data.name}+{other.name}",
        x_train=torch.cat([data.x_train, x_new]),
        y_train=torch.cat([data.y_train, torch.full((count,), -1, dtype=torch.int64)]),
        x_test=data.x_test,
        y_test=data.y_test,
        classes=list(data.classes),
        ood=torch.cat([_ood_mask(data), torch.ones(count, dtype=torch.bool)]),
    )


def parse_mix(spec: str) -> list[tuple[str, int]]:
    """Parse a CLI mix spec such as ``"svhn:5000,kmnist:5000"``.

    Args:
        spec: Comma-separated ``NAME:COUNT`` items; names as for ``load_dataset``
            (case-insensitive, ``_`` for ``-``), counts positive integers.

    Returns:
        ``[(name, count), ...]`` in the given order, names in their registry spelling.

    Raises:
        DalbtError: For an empty spec or item, a missing ``:``, an unknown dataset, a count
            that is not a positive integer, or a dataset listed twice.
    """
    example = "e.g. 'svhn:5000' or 'svhn:5000,kmnist:5000'"
    if not spec or not spec.strip():
        raise DalbtError(f"empty mix spec: give NAME:COUNT items separated by commas, {example}")
    out: list[tuple[str, int]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise DalbtError(f"empty item in mix spec {spec!r}: remove the stray comma, {example}")
        name, sep, count_text = item.partition(":")
        name, count_text = name.strip(), count_text.strip()
        if not sep or not name or not count_text:
            raise DalbtError(f"bad mix item {item!r} in {spec!r}: write NAME:COUNT, {example}")
        key = name.lower().replace("_", "-")
        if key not in DATASETS:
            raise DalbtError(f"unknown dataset {name!r} in mix spec {spec!r}; known datasets: "
                             f"{', '.join(DATASETS)}")
        if not count_text.isdecimal() or int(count_text) <= 0:
            raise DalbtError(f"bad count {count_text!r} for {name} in mix spec {spec!r}: give a "
                             f"positive integer, {example}")
        if any(key == k for k, _ in out):
            raise DalbtError(f"dataset {key!r} listed twice in mix spec {spec!r}: list it once "
                             f"with the total count")
        out.append((key, int(count_text)))
    return out
