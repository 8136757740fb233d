"""The user's own data as an in-memory :class:`~dalbt.data.datasets.ImageDataset`.

Four entry points, all returning uint8 images ``(N, C, H, W)`` with ``C`` 1 or 3, int64 labels
``(N,)`` (``-1`` for an image without a label), class names and an empty test split:

- :func:`from_tensors`: arrays or tensors of images (and labels).
- :func:`from_dataset`: any torch ``Dataset`` or sequence of ``(image, label)`` pairs whose
  images are PIL images, tensors or NumPy arrays.
- :func:`from_image_folder`: torchvision's ``ImageFolder`` layout (one sub-folder per class).
- :func:`from_hf`: a Hugging Face ``datasets`` split with an image column (``datasets`` is
  never imported here: any object with ``features``, ``len`` and rows as dicts works).

Images are read once, item by item, and converted and resized with the same code as dalbt's
image folders and labelling projects (:func:`dalbt.data.formats.pil_to_array`: bilinear, EXIF
orientation applied, RGB to gray by ITU-R 601-2 luma).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalbt.data import formats
from dalbt.data.datasets import ImageDataset
from dalbt.errors import DalbtError

__all__ = ["from_dataset", "from_hf", "from_image_folder", "from_tensors"]

#: Channel counts an image may have (gray, RGB).
CHANNELS = (1, 3)
#: How much the image buffer of a dataset without ``len()`` grows at first.
_FIRST_CAPACITY = 1024

ImageSize = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# Arrays: layout, dtype, labels, classes
# --------------------------------------------------------------------------------------------


def _as_numpy(a: Any, what: str) -> np.ndarray:
    """A tensor or array-like as a NumPy array (half floats widened to float32)."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t.numpy()
    arr = np.asarray(a)
    if arr.dtype == object:
        raise DalbtError(f"{what} is not a numeric array (dtype object); pass a uint8 or float "
                         "NumPy array or tensor")
    return arr


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels from uint8, integer (0..255) or float ([0, 1], rounded half up) values."""
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = arr.min(), arr.max()
        if not (lo >= 0 and hi <= 1):  # also catches NaN
            raise DalbtError(
                f"{what}: float images must lie in [0, 1], found values {lo:.4g}..{hi:.4g}; "
                "divide 0..255 values by 255 or undo the normalisation (x * std + mean)")
        return np.floor(arr * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi > 255:
            raise DalbtError(f"{what}: integer images must lie in 0..255, found {lo}..{hi}; "
                             "rescale them to 0..255 (uint8) or to [0, 1] (float)")
        return arr.astype(np.uint8)
    raise DalbtError(f"{what}: images of dtype {arr.dtype} are not supported; pass uint8 "
                     "(0..255) or float ([0, 1]) values")


def _channel_error(what: str, shape: tuple[int, ...], layouts: str) -> DalbtError:
    return DalbtError(
        f"{what} has shape {shape}: expected {layouts} with C = 1 (gray) or 3 (RGB); drop an "
        "alpha channel (x[..., :3]) or convert other channel counts first")


def _batch_layout(arr: np.ndarray, what: str) -> np.ndarray:
    """``(N, H, W)``, ``(N, C, H, W)`` or unambiguous ``(N, H, W, C)`` as ``(N, C, H, W)``."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim != 4:
        raise DalbtError(f"{what} has shape {arr.shape}: expected images (N, C, H, W), "
                         "(N, H, W) for gray or (N, H, W, C)")
    if arr.shape[1] in CHANNELS:  # channels first wins a tie such as (N, 3, 8, 3)
        return arr
    if arr.shape[3] in CHANNELS:
        return arr.transpose(0, 3, 1, 2)
    raise _channel_error(what, arr.shape, "(N, C, H, W) or (N, H, W, C)")


def _item_layout(arr: np.ndarray, what: str) -> np.ndarray:
    """``(H, W)``, ``(C, H, W)`` or unambiguous ``(H, W, C)`` as ``(C, H, W)``."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise DalbtError(f"{what} has shape {arr.shape}: expected an image (C, H, W), (H, W) "
                         "or (H, W, C)")
    if arr.shape[0] in CHANNELS:
        return arr
    if arr.shape[2] in CHANNELS:
        return arr.transpose(2, 0, 1)
    raise _channel_error(what, arr.shape, "(C, H, W) or (H, W, C)")


def _label_array(y: Any, n: int) -> np.ndarray:
    """Labels ``(n,)`` int64 from an array, tensor or sequence (``None`` entries are -1)."""
    if y is None:
        return np.full(n, -1, dtype=np.int64)
    if isinstance(y, list | tuple):
        return np.array([_label(v, f"y[{i}]") for i, v in enumerate(y)], dtype=np.int64
                        ).reshape(len(y))
    arr = _as_numpy(y, "y")
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise DalbtError(f"y has dtype {arr.dtype}: labels must be integers (-1 for unknown); "
                         "convert them with y.astype(int) or map class names to indices")
    if arr.shape != (n,):
        raise DalbtError(f"y has shape {arr.shape} but there are {n} images: pass one label "
                         "per image, shape (N,)")
    return arr.astype(np.int64)


def _label(v: Any, what: str) -> int:
    """One label: an int, a NumPy integer, a one-element integer tensor/array, or None (-1)."""
    if v is None:
        return -1
    if (isinstance(v, np.ndarray) and v.size == 1) or (
            isinstance(v, torch.Tensor) and v.numel() == 1):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, int | np.integer):
        raise DalbtError(f"{what} is {v!r} ({type(v).__name__}): a label must be an int class "
                         "index, or None / -1 for an image without a label")
    return int(v)


def _resolve_classes(y: np.ndarray, classes: Sequence[Any] | None, what: str) -> list[str]:
    """The class names (given, or ``'0'..'K-1'`` for the largest label K-1); checks labels."""
    if y.size and y.min() < -1:
        raise DalbtError(f"{what}: label {int(y.min())} is invalid; labels are class indices "
                         "0..K-1, or -1 for an image without a label")
    if classes is None:
        k = int(y.max()) + 1 if y.size else 0
        return [str(i) for i in range(k)]
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise DalbtError(f"{what}: class names repeat ({names}); pass each class once")
    if y.size and y.max() >= len(names):
        raise DalbtError(f"{what}: label {int(y.max())} lies outside the {len(names)} classes "
                         f"{names}; pass classes naming every label, or fix the labels")
    return names


def _make(name: str, x: np.ndarray, y: np.ndarray, classes: list[str]) -> ImageDataset:
    x_t = torch.from_numpy(np.ascontiguousarray(x))
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return ImageDataset(name=name, x_train=x_t, y_train=y_t, x_test=x_t[:0].clone(),
                        y_test=y_t[:0].clone(), classes=classes)


def from_tensors(x: Any, y: Any = None, classes: Sequence[Any] | None = None,
                 name: str = "tensors") -> ImageDataset:
    """Images (and labels) held in arrays or tensors.

    Layouts: ``(N, C, H, W)``; ``(N, H, W)`` for gray; ``(N, H, W, C)`` when it is
    unambiguous (``C`` in 1, 3 last and not second; ``(N, 3, 8, 3)`` is read as channels
    first). Values: uint8 (or other integers in 0..255), or floats in ``[0, 1]``, which are
    scaled by 255 and rounded half up.

    Args:
        x: NumPy array or tensor of ``N`` images.
        y: Labels ``(N,)``, integers with ``-1`` for an image without a label, or a sequence
            of ints and ``None``; ``None`` for no labels at all.
        classes: Class names (label ``k`` is ``classes[k]``); by default ``'0'..'K-1'`` for
            the largest label ``K-1``.
        name: The dataset's name.

    Returns:
        The dataset: ``x_train`` uint8 ``(N, C, H, W)`` with ``C`` 1 or 3, ``y_train`` int64
        ``(N,)``, empty test split.

    Raises:
        DalbtError: On an empty, wrongly shaped or out-of-range array, labels of the wrong
            length or outside ``classes``.
    """
    arr = _batch_layout(_as_numpy(x, "x"), "x")
    if arr.shape[0] == 0:
        raise DalbtError("x holds no images (N = 0); pass at least one image")
    arr = _to_uint8(arr, "x")
    labels = _label_array(y, arr.shape[0])
    return _make(name, arr, labels, _resolve_classes(labels, classes, name))


# --------------------------------------------------------------------------------------------
# Datasets of (image, label) items
# --------------------------------------------------------------------------------------------


def _check_channels(channels: int | None) -> None:
    if channels is not None and channels not in CHANNELS:
        raise DalbtError(f"channels={channels!r} is not supported; pass 1 (gray), 3 (RGB) or "
                         "None (as the first image)")


def _check_size(image_size: ImageSize) -> tuple[int, int]:
    try:
        return formats._to_size(image_size)
    except (TypeError, ValueError):
        raise DalbtError(f"image_size={image_size!r} is not a size; pass an int S (S x S) or "
                         "(H, W)") from None


class _Converter:
    """Turns images into ``(C, H, W)`` uint8 arrays of one size and channel count: the given
    ones, else the first image's (later images must then match it)."""

    def __init__(self, image_size: ImageSize | None, channels: int | None) -> None:
        _check_channels(channels)
        self.size = _check_size(image_size) if image_size is not None else None
        self.channels = channels
        self.fixed_size = image_size is not None
        self.fixed_channels = channels is not None
        self.first = ""

    def __call__(self, image: Any, what: str) -> np.ndarray:
        from PIL import Image

        if isinstance(image, Image.Image):
            size, channels = formats.oriented_size(image), (
                1 if image.mode in formats.GRAY_MODES else 3)
        elif isinstance(image, torch.Tensor | np.ndarray):
            image = _to_uint8(_item_layout(_as_numpy(image, what), what), what)
            size, channels = (int(image.shape[1]), int(image.shape[2])), int(image.shape[0])
        else:
            raise DalbtError(
                f"{what} is a {type(image).__name__}: images must be PIL images, tensors "
                "(C, H, W) or NumPy arrays; load files first (or use from_image_folder)")
        self._settle(size, channels, what)
        assert self.size is not None and self.channels is not None
        if isinstance(image, np.ndarray):
            if (channels, *size) == (self.channels, *self.size):
                return image
            image = Image.fromarray(image[0] if channels == 1 else image.transpose(1, 2, 0))
        return formats.pil_to_array(image, self.size, self.channels)

    def _settle(self, size: tuple[int, int], channels: int, what: str) -> None:
        """Take the first image's size and channels, or check a later image against them."""
        if self.size is None or self.channels is None:
            self.first = what
            self.size = self.size or size
            self.channels = self.channels or channels
            return
        if not self.fixed_size and size != self.size:
            raise DalbtError(
                f"images differ in size: {self.first} is {self.size[0]}x{self.size[1]} but "
                f"{what} is {size[0]}x{size[1]}; pass image_size=S (or (H, W)) to resize all")
        if not self.fixed_channels and channels != self.channels:
            raise DalbtError(
                f"images differ in channels: {self.first} has {self.channels} but {what} has "
                f"{channels}; pass channels=1 (gray) or channels=3 (RGB) to convert all")


class _Buffer:
    """Grows a ``(N, C, H, W)`` uint8 array and ``(N,)`` labels row by row."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity if capacity else _FIRST_CAPACITY
        self.x: np.ndarray | None = None
        self.y = np.empty(self.capacity, dtype=np.int64)
        self.n = 0

    def add(self, image: np.ndarray, label: int) -> None:
        if self.x is None:
            self.x = np.empty((self.capacity, *image.shape), dtype=np.uint8)
        elif self.n == self.x.shape[0]:
            self.x = np.concatenate([self.x, np.empty_like(self.x)])
            self.y = np.concatenate([self.y, np.empty_like(self.y)])
        self.x[self.n] = image
        self.y[self.n] = label
        self.n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.x is not None
        if self.n == self.x.shape[0]:
            return self.x, self.y
        return self.x[: self.n].copy(), self.y[: self.n].copy()  # free the spare rows


def _pair(item: Any, what: str) -> tuple[Any, Any]:
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    kind = f"a {len(item)}-tuple" if isinstance(item, tuple | list) else type(item).__name__
    raise DalbtError(f"{what} is {kind}: expected an (image, label) pair (label None or -1 when "
                     "unknown); for arrays of images use from_tensors")


def _items(ds: Any) -> tuple[Iterable[Any], int | None]:
    """The items of a map-style dataset by index (with their count), else by iteration."""
    if isinstance(ds, torch.utils.data.IterableDataset) or not (
            hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
        try:
            n = len(ds)
        except TypeError:
            n = None
        try:
            return iter(ds), n
        except TypeError:
            raise DalbtError(f"a {type(ds).__name__} is not a dataset: pass a torch Dataset or "
                             "a sequence of (image, label) pairs") from None
    n = len(ds)
    return (ds[i] for i in range(n)), n


def _collect(pairs: Iterable[tuple[Any, Any]], n: int | None, convert: _Converter,
             progress: bool, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read every ``(image, label)`` pair once into uint8 images and int64 labels."""
    from tqdm import tqdm

    buf = _Buffer(n)
    for i, (image, label) in enumerate(tqdm(pairs, total=n, desc=f"loading {name}",
                                            unit="img", disable=not progress)):
        buf.add(convert(image, f"item {i}"), _label(label, f"the label of item {i}"))
    if buf.n == 0:
        raise DalbtError(f"{name} holds no images; pass a dataset with at least one image")
    return buf.arrays()


def _dataset_classes(ds: Any) -> list[str] | None:
    """``ds.classes`` when it is a list of names (torchvision datasets have one)."""
    names = getattr(ds, "classes", None)
    if isinstance(names, list | tuple) and all(isinstance(c, str) for c in names):
        return list(names)
    return None


def from_dataset(ds: Any, image_size: ImageSize | None = None, channels: int | None = None,
                 classes: Sequence[Any] | None = None, progress: bool = False, *,
                 name: str | None = None) -> ImageDataset:
    """Load a torch ``Dataset`` (or any sequence or iterable) of ``(image, label)`` pairs.

    Each image is a PIL image, a tensor ``(C, H, W)`` or ``(H, W)``, or a NumPy array
    ``(H, W, C)``, ``(C, H, W)`` or ``(H, W)``, with uint8 values or floats in ``[0, 1]``.
    Labels are ints, with ``None`` or ``-1`` for an image without one. The dataset is read
    once, item by item (its transforms run once); resizing is bilinear.

    Args:
        ds: The dataset: indexed ``ds[i]`` for ``i < len(ds)`` when it has both, else iterated.
        image_size: Resize every image to ``S x S`` (int) or ``(H, W)``; ``None`` keeps the size
            all the images must then share.
        channels: 1 (gray) or 3 (RGB) to convert every image; ``None`` keeps the channel count
            all the images must then share.
        classes: Class names; by default ``ds.classes`` when present, else ``'0'..'K-1'``.
        progress: Show a progress bar (tqdm).
        name: The dataset's name; by default its type's name.

    Returns:
        The dataset: ``x_train`` uint8 ``(N, C, H, W)``, ``y_train`` int64 ``(N,)``, empty test
        split.

    Raises:
        DalbtError: On mixed sizes or channel counts without ``image_size``/``channels``, an
            item that is not an ``(image, label)`` pair or an image of an unsupported type, a
            label outside ``classes``, or an empty dataset.
    """
    name = name or type(ds).__name__
    items, n = _items(ds)
    pairs = (_pair(item, f"item {i}") for i, item in enumerate(items))
    x, y = _collect(pairs, n, _Converter(image_size, channels), progress, name)
    names = classes if classes is not None else _dataset_classes(ds)
    return _make(name, x, y, _resolve_classes(y, names, name))


# --------------------------------------------------------------------------------------------
# Image folders and Hugging Face splits
# --------------------------------------------------------------------------------------------


def _open_image(path: str) -> Any:
    """Decode an image file as it is (mode kept, so gray stays gray), naming it in errors."""
    from PIL import Image

    try:
        with formats.image_warnings(path), open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img
    except Exception as exc:
        raise DalbtError(f"cannot read image {path}: {formats.image_error(exc, path)}"
                         ) from exc


def _is_image_file(path: str) -> bool:
    return formats._is_image_file(Path(path))


def from_image_folder(root: str | os.PathLike[str], image_size: ImageSize | None,
                      channels: int | None = None, *, progress: bool = False,
                      name: str = "folder") -> ImageDataset:
    """Load torchvision's ``ImageFolder`` layout: ``root/<class>/<image>``, classes sorted.

    Read through ``torchvision.datasets.ImageFolder`` (its class order and file order) and
    :func:`from_dataset`; files are decoded as they are (a gray folder gives 1 channel), hidden
    files and suffixes outside :data:`dalbt.data.formats.IMAGE_EXTENSIONS` are skipped.

    Args:
        root: The folder holding one sub-folder per class.
        image_size: Resize every image to ``S x S`` or ``(H, W)``; ``None`` when all the images
            already share one size.
        channels: 1 (gray) or 3 (RGB); ``None`` when all the images share a channel count.
        progress: Show a progress bar (tqdm).
        name: The dataset's name.

    Returns:
        The dataset: ``x_train`` uint8 ``(N, C, H, W)``, ``y_train`` int64 ``(N,)`` (the class
        folder's index), ``classes`` the folder names, empty test split.

    Raises:
        DalbtError: If ``root`` is missing, has no class folder or an empty one, or an image
            cannot be read (see :func:`from_dataset` for the rest).
    """
    from torchvision.datasets import ImageFolder

    path = Path(root).expanduser()
    if not path.is_dir():
        raise DalbtError(f"image folder {path} does not exist or is not a directory")
    try:
        folder = ImageFolder(str(path), loader=_open_image, is_valid_file=_is_image_file)
    except FileNotFoundError as exc:
        raise DalbtError(f"image folder {path}: {exc}; put the images in one sub-folder per "
                         "class (root/<class>/<image>)") from exc
    return from_dataset(folder, image_size, channels, folder.classes, progress, name=name)


def _columns(split: Any) -> list[str]:
    features = getattr(split, "features", None)
    if features is None or not hasattr(split, "__iter__"):
        kind = type(split).__name__
        hint = " (a DatasetDict: pick a split, e.g. ds['train'])" if isinstance(split, dict) else ""
        raise DalbtError(f"from_hf takes one Hugging Face datasets split with .features, got a "
                         f"{kind}{hint}")
    return list(features)


def _missing_column(role: str, column: str, columns: list[str], arg: str) -> DalbtError:
    extra = f", or {arg}=None for images without labels" if arg == "label_column" else ""
    return DalbtError(f"the split has no {role} column {column!r} (columns: "
                      f"{', '.join(columns)}); pass {arg}=NAME{extra}")


def _class_label_names(feature: Any, column: str) -> list[str] | None:
    """The names of a ``ClassLabel`` feature (``None`` for plain ints); string labels are
    refused with the call that encodes them."""
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        raise DalbtError(f"label column {column!r} holds strings; encode them first: "
                         f"split = split.class_encode_column({column!r})")
    names = getattr(feature, "names", None)
    return [str(c) for c in names] if names else None


def from_hf(split: Any, image_column: str = "image", label_column: str | None = "label",
            image_size: ImageSize | None = None, channels: int | None = None, *,
            classes: Sequence[Any] | None = None, progress: bool = False,
            name: str = "hf") -> ImageDataset:
    """Load a Hugging Face ``datasets`` split (e.g. ``load_dataset("mnist")["train"]``).

    The split is used through its interface only (``.features``, ``len()``, rows as dicts):
    ``datasets`` is not imported. Only the two columns are read (``select_columns`` when the
    split has it). The image column holds PIL images (``datasets.Image()``), or arrays.

    Args:
        split: The split.
        image_column: The column of images.
        label_column: The column of int labels (``-1`` for unknown); ``None`` when the split
            has no labels.
        image_size: Resize every image to ``S x S`` or ``(H, W)``; ``None`` when all the images
            share one size.
        channels: 1 (gray) or 3 (RGB); ``None`` when all the images share a channel count.
        classes: Class names; by default the label column's ``ClassLabel`` names when it has
            them, else ``'0'..'K-1'``.
        progress: Show a progress bar (tqdm).
        name: The dataset's name.

    Returns:
        The dataset: ``x_train`` uint8 ``(N, C, H, W)``, ``y_train`` int64 ``(N,)``, empty test
        split.

    Raises:
        DalbtError: If ``split`` is not a split or lacks a column (see :func:`from_dataset`
            for the rest).
    """
    columns = _columns(split)
    if image_column not in columns:
        raise _missing_column("image", image_column, columns, "image_column")
    if label_column is not None:
        if label_column not in columns:
            raise _missing_column("label", label_column, columns, "label_column")
        names = _class_label_names(split.features[label_column], label_column)
        classes = names if classes is None else classes
    wanted = [image_column] if label_column is None else [image_column, label_column]
    if hasattr(split, "select_columns") and len(wanted) < len(columns):
        split = split.select_columns(wanted)
    try:
        n: int | None = len(split)
    except TypeError:  # a streaming (iterable) split
        n = None

    def pairs() -> Iterator[tuple[Any, Any]]:
        for row in split:
            yield row[image_column], (None if label_column is None else row[label_column])

    x, y = _collect(pairs(), n, _Converter(image_size, channels), progress, name)
    return _make(name, x, y, _resolve_classes(y, classes, name))
