"""Readers for the on-disk formats of the supported image datasets.

Every reader returns NumPy arrays: images as ``uint8`` of shape ``(N, C, H, W)`` and labels as
``int64`` of shape ``(N,)``. Problems with the files (corrupt, truncated, wrong layout) raise
:class:`dalbt.errors.DalbtError` naming the offending file.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import re
import struct
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from dalbt.errors import DalbtError

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_error",
    "image_warnings",
    "load_images",
    "oriented_size",
    "pil_to_array",
    "read_cifar10",
    "read_cifar10_classes",
    "read_idx",
    "read_image_folder",
    "read_svhn",
    "scan_image_folder",
]

# IDX data type code (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

#: File suffixes (lower case) treated as images by :func:`read_image_folder`.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
     ".pnm"}
)
# PIL modes holding a single luminance channel (possibly with alpha).
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, KMNIST)
# --------------------------------------------------------------------------------------------


def _read_gunzipped(path: Path) -> bytes:
    """The bytes of ``path``, decompressed when they start with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DalbtError(f"cannot read IDX file {path}: {exc.strerror or exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DalbtError(f"corrupt or truncated gzip file {path}: {exc}") from exc
    elif path.suffix == ".gz":
        raise DalbtError(f"{path} has a .gz suffix but is not gzip-compressed (bad magic bytes)")
    return raw


def _idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """The data type, dimensions and header length in bytes of the IDX data ``raw``."""
    if len(raw) < 4:
        raise DalbtError(f"{path} is too short ({len(raw)} bytes) to be an IDX file")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise DalbtError(
            f"{path} is not an IDX file: magic number 0x{raw[:4].hex()} should start with 0x0000"
        )
    if type_code not in _IDX_DTYPES:
        raise DalbtError(f"{path}: unknown IDX data type code 0x{type_code:02x}")
    if ndim == 0:
        raise DalbtError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DalbtError(f"{path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    return _IDX_DTYPES[type_code], dims, header_len


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (as used by MNIST and friends), gzip-compressed or not.

    Compression is detected from the gzip magic bytes, so a ``.gz`` suffix is not required.

    Args:
        path: The IDX file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        The array with the dimensions stored in the header, e.g. ``(N, 28, 28)`` for images or
        ``(N,)`` for labels. Unsigned-byte data comes back as ``uint8``; other types in native
        byte order.

    Raises:
        DalbtError: If the file cannot be read, is not IDX, or is truncated.
    """
    path = Path(path)
    raw = _read_gunzipped(path)
    dtype, dims, header_len = _idx_header(raw, path)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise DalbtError(
            f"{path} is truncated: header declares shape {tuple(dims)} ({expected} data bytes) "
            f"but only {actual} bytes follow"
        )
    if actual > expected:
        raise DalbtError(
            f"{path} is corrupt: {actual - expected} unexpected bytes after the declared "
            f"shape {tuple(dims)}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # astype copies, which also makes the array writable (frombuffer on bytes is read-only).
    return arr.astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)
# --------------------------------------------------------------------------------------------


def _load_pickle(path: Path) -> dict:
    # The official CIFAR-10 python batches are pickles; only open files you trust.
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError as exc:
        raise DalbtError(f"missing CIFAR-10 file {path}") from exc
    except Exception as exc:  # pickle raises many exception types on corrupt input
        raise DalbtError(f"corrupt CIFAR-10 batch {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DalbtError(f"corrupt CIFAR-10 batch {path}: expected a dict, got {type(obj)}")
    return obj


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_pickle(path)
    if b"data" not in batch or b"labels" not in batch:
        raise DalbtError(f"CIFAR-10 batch {path} lacks the b'data' or b'labels' key")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DalbtError(
            f"CIFAR-10 batch {path}: b'data' should be uint8 of shape (N, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise DalbtError(
            f"CIFAR-10 batch {path}: {labels.shape[0]} labels for {data.shape[0]} images"
        )
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(
    directory: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 from its python pickle batches (the ``cifar-10-batches-py`` directory).

    Args:
        directory: Directory holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: uint8 images ``(50000, 3, 32, 32)`` and
        ``(10000, 3, 32, 32)``, int64 labels ``(50000,)`` and ``(10000,)``.

    Raises:
        DalbtError: If a batch is missing or malformed.
    """
    directory = Path(directory)
    train = [_read_cifar_batch(directory / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_cifar_batch(directory / "test_batch")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def read_cifar10_classes(directory: str | os.PathLike) -> list[str]:
    """Read the class names from CIFAR-10's ``batches.meta`` (``b'label_names'``).

    Args:
        directory: The ``cifar-10-batches-py`` directory.

    Returns:
        The class names in label order, e.g. ``['airplane', 'automobile', ...]``.
    """
    path = Path(directory) / "batches.meta"
    meta = _load_pickle(path)
    names = meta.get(b"label_names")
    if not isinstance(names, list | tuple) or not names:
        raise DalbtError(f"{path} lacks a b'label_names' list")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


# --------------------------------------------------------------------------------------------
# SVHN (MATLAB .mat, cropped digits)
# --------------------------------------------------------------------------------------------


def read_svhn(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN cropped-digits file (``train_32x32.mat`` or ``test_32x32.mat``).

    The file stores ``X`` as ``(32, 32, 3, N)`` and ``y`` as ``(N, 1)`` with label 10 for the
    digit 0; labels are mapped so that digit ``d`` has label ``d``.

    Args:
        path: The ``.mat`` file.

    Returns:
        ``(x, y)``: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)`` in ``0..9``.

    Raises:
        DalbtError: If the file is missing, unreadable or has the wrong layout.
    """
    import scipy.io  # deferred: scipy.io is slow to import and only needed here

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except FileNotFoundError as exc:
        raise DalbtError(f"missing SVHN file {path}") from exc
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise DalbtError(
            f"{path} is a MATLAB v7.3 file; SVHN's original (v5) .mat files are needed"
        ) from exc
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError on corrupt files
        raise DalbtError(f"corrupt SVHN file {path}: {type(exc).__name__}: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise DalbtError(f"SVHN file {path} lacks the 'X' or 'y' variable")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DalbtError(f"SVHN file {path}: X should have shape (H, W, 3, N), got {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise DalbtError(f"SVHN file {path}: {y.shape[0]} labels for {x.shape[3]} images")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DalbtError(f"SVHN file {path}: labels outside 0..10")
    y[y == 10] = 0
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)
    return x, y


# --------------------------------------------------------------------------------------------
# The user's own images (a folder of image files)
# --------------------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and (
        path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if _is_image_file(p))


def scan_image_folder(root: str | os.PathLike) -> tuple[list[Path], list[str | None]]:
    """List the images in a folder and the class each belongs to, without decoding them.

    With one sub-folder per class, each image's class is its sub-folder's name; with a flat
    folder of images the class is ``None``. Hidden files and non-image suffixes are skipped.

    Args:
        root: The folder.

    Returns:
        ``(paths, class_names)``: image files in a deterministic order and their class names.

    Raises:
        DalbtError: If the folder is missing, holds no images, or mixes loose images with
            class sub-folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DalbtError(f"image folder {root} does not exist or is not a directory")
    loose = _image_files(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _image_files(d) for d in subdirs}
    per_class = {name: files for name, files in per_class.items() if files}
    if loose and per_class:
        raise DalbtError(
            f"image folder {root} mixes loose images ({loose[0].name}, ...) with class "
            f"sub-folders ({', '.join(per_class)}); use either one sub-folder per class or a "
            "flat folder of unlabelled images"
        )
    if loose:
        return loose, [None] * len(loose)
    if not per_class:
        raise DalbtError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} "
            "files in it and in its sub-folders)"
        )
    paths: list[Path] = []
    names: list[str | None] = []
    for name, files in per_class.items():
        paths.extend(files)
        names.extend([name] * len(files))
    return paths, names


def _to_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise ``image_size`` to ``(H, W)``."""
    if isinstance(image_size, int):
        h = w = image_size
    else:
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise DalbtError(f"image size must be positive, got {image_size!r}")
    return h, w


def _to_uint8_mode(img, channels: int):
    """Convert a PIL image to mode ``L`` (channels=1) or ``RGB`` (channels=3)."""
    from PIL import Image

    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte rather than clip
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    return img.convert("L" if channels == 1 else "RGB")


# How Python shows an in-memory or open file object (PIL puts it in its messages).
_FILE_OBJECT = re.compile(r"<_io\.\w+ (?:object at 0x[0-9a-fA-F]+|name=[^>]*)>")


def image_error(exc: BaseException | Warning | str, name: str) -> str:
    """The message of an error or warning PIL gave for an image, about ``name`` (the image's
    path) rather than the file object it was read from (``<_io.BytesIO object at 0x...>``).

    Args:
        exc: The exception or warning (or its text).
        name: The image's path as the user knows it.

    Returns:
        A one-line message (without ``name`` in front).
    """
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read (unknown or damaged format)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return _FILE_OBJECT.sub(repr(name), text)


@contextlib.contextmanager
def image_warnings(name: str, emit: Callable[[str], None] | None = None) -> Iterator[None]:
    """Give the warnings raised while reading one image (PIL's decompression-bomb, EXIF and
    palette warnings) with the image's path in front, so that each says which file it is about.

    Args:
        name: The image's path as the user knows it.
        emit: Where the messages go (``"<name>: <warning>"``); by default they are warned
            again (same category).
    """
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        msg = f"{name}: {image_error(w.message, name)}"
        if emit is not None:
            emit(msg)
        else:
            warnings.warn(msg, w.category, stacklevel=3)


def oriented_size(img) -> tuple[int, int]:
    """``(H, W)`` of a PIL image once its EXIF orientation is applied (as :func:`pil_to_array`
    applies it): height and width swap for the orientations rotated by 90 degrees."""
    w, h = img.size
    if img.getexif().get(0x0112) in (5, 6, 7, 8):
        w, h = h, w
    return h, w


def pil_to_array(img, size: tuple[int, int], channels: int) -> np.ndarray:
    """An open PIL image as a (C, H, W) uint8 array: EXIF orientation applied, converted to
    ``channels`` (1 or 3), resized (bilinear) to ``size`` = (H, W)."""
    from PIL import Image, ImageOps

    img = _to_uint8_mode(ImageOps.exif_transpose(img), channels)
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_images(
    paths: Sequence[str | os.PathLike],
    image_size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Decode image files into one array of a common size and channel count.

    Images are resized (bilinear) to ``image_size``, or to the most common size among them
    when it is ``None``. They get 1 channel if every image is grayscale, else 3 (RGB; alpha is
    dropped). EXIF orientation is applied.

    Args:
        paths: The image files.
        image_size: Target size, an int ``S`` for ``S x S`` or ``(H, W)``; ``None`` for the most
            common size.

    Returns:
        uint8 images ``(N, C, H, W)`` with ``C`` 1 or 3.

    Raises:
        DalbtError: Naming the file, if an image cannot be decoded.
    """
    from PIL import Image

    paths = [Path(p) for p in paths]
    # Pass 1: headers only (cheap) to pick the common size and channel count.
    sizes: list[tuple[int, int]] = []
    all_gray = True
    for path in paths:
        try:
            with image_warnings(str(path)), Image.open(path) as img:
                sizes.append(oriented_size(img))
                all_gray = all_gray and img.mode in GRAY_MODES
        except Exception as exc:
            raise DalbtError(f"cannot read image {path}: {image_error(exc, str(path))}"
                             ) from exc
    if image_size is not None:
        target = _to_size(image_size)
    elif sizes:
        target = Counter(sizes).most_common(1)[0][0]
    else:
        target = (1, 1)
    channels = 1 if all_gray else 3
    out = np.empty((len(paths), channels, *target), dtype=np.uint8)
    # Pass 2: decode, convert and resize into the preallocated array.
    for i, path in enumerate(paths):
        try:
            with image_warnings(str(path)), Image.open(path) as img:
                out[i] = pil_to_array(img, target, channels)
        except Exception as exc:
            raise DalbtError(f"cannot read image {path}: {image_error(exc, str(path))}"
                             ) from exc
    return out


def read_image_folder(
    root: str | os.PathLike,
    image_size: int | Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a folder of the user's images.

    With one sub-folder per class the images are labelled by sorted class-folder name; a flat
    folder of images gives unlabelled images (label ``-1``). See :func:`load_images` for how
    sizes and channels are made uniform.

    Args:
        root: The folder.
        image_size: Target size (``S`` or ``(H, W)``); ``None`` for the most common size.

    Returns:
        ``(x, y, classes)``: uint8 images ``(N, C, H, W)``, int64 labels ``(N,)`` and the class
        names (empty for an unlabelled folder).

    Raises:
        DalbtError: If the folder holds no images or an image cannot be read.
    """
    paths, names = scan_image_folder(root)
    classes = sorted({n for n in names if n is not None})
    index = {name: i for i, name in enumerate(classes)}
    y = np.array([index[n] if n is not None else -1 for n in names], dtype=np.int64)
    return load_images(paths, image_size), y, classes
