"""The image files of a labelling project: finding them, hashing, decoding and watching them."""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dalbt.data.formats import (
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    image_error,
    image_warnings,
    pil_to_array,
)
from dalbt.errors import DalbtError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()



def _is_image(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def scan_images(root: Path) -> tuple[list[str], list[str]]:
    """Image files under ``root`` (recursively), as POSIX paths relative to it.

    Symbolic links are followed only when their target stays inside ``root``; hidden files
    and folders are skipped.

    Returns:
        ``(paths, warnings)``: sorted relative paths and one message per file left out.
    """
    root_real = Path(os.path.realpath(root))
    paths, warnings = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not _is_image(name):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if not is_inside(root_real, full):
                warnings.append(f"{rel}: links outside the image folder, left out")
                continue
            if not full.is_file():
                continue
            paths.append(rel)
    return sorted(paths), warnings


def is_inside(root_real: Path, path: Path) -> bool:
    """Whether ``path``, with every symbolic link resolved, lies inside ``root_real``."""
    real = os.path.realpath(path)
    return os.path.commonpath([str(root_real), real]) == str(root_real)


def decode_image(data: bytes, size: int, channels: int, name: str = "image",
                 log: Callable[[str], None] | None = None) -> np.ndarray:
    """Decode image bytes into a (C, size, size) uint8 array (see
    :func:`dalbt.data.formats.pil_to_array`).

    Args:
        data: The file's bytes.
        size: Side of the result.
        channels: 1 or 3.
        name: The image's path, named in errors and warnings.
        log: Where PIL's warnings about the image go (``"warning: <name>: ..."``); by default
            they are warned again with the name in front.

    Raises:
        DalbtError: Naming the image, if PIL cannot decode it.
    """
    from PIL import Image

    emit = None if log is None else (lambda m: log(f"warning: {m}"))
    try:
        with image_warnings(name, emit), Image.open(io.BytesIO(data)) as img:
            return pil_to_array(img, (size, size), channels)
    except Exception as exc:
        raise DalbtError(f"image {name} cannot be decoded: {image_error(exc, name)}") from exc


def file_stat(path: Path) -> str | None:
    """``size:mtime:ctime:inode`` of a file (symbolic links followed), None if it cannot be
    seen: a file whose signature is unchanged has not been written, replaced or touched."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def probe_images(root: Path, paths: Sequence[str], limit: int = 200,
                 log: Callable[[str], None] = print) -> tuple[int, int]:
    """Pick (image_size, channels) from the headers of up to ``limit`` images: the most common
    size (capped at 64 pixels) and 1 channel if all are grayscale."""
    from PIL import Image

    sides: Counter[int] = Counter()
    gray = True
    for rel in paths[:limit]:
        try:
            with image_warnings(rel, lambda m: log(f"warning: {m}")), \
                    Image.open(root / rel) as img:
                sides[max(img.size)] += 1
                gray = gray and img.mode in GRAY_MODES
        except Exception:
            continue
    side = sides.most_common(1)[0][0] if sides else 32
    return min(side, 64), 1 if gray else 3


__all__ = ["decode_image", "file_stat", "is_inside", "probe_images", "scan_images",
           "sha256_bytes"]
