"""Weights files of backbones, without torch: their run-key digest and the early checks."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from dalbt.errors import DalbtError

#: ``weights`` values that are not paths: the library's own download, random weights.
DEFAULT_WEIGHTS, NO_WEIGHTS = "default", "none"


def is_keyword(weights: str | None) -> bool:
    """Whether ``weights`` is None, ``default`` or ``none`` rather than a path."""
    return weights is None or weights.lower() in (DEFAULT_WEIGHTS, NO_WEIGHTS)


def file_key(path: str) -> tuple[str, int, int]:
    """(resolved path, modification time in ns, size) of an existing weights file."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        raise DalbtError(f"--weights file {path} does not exist; give the path of a .pth or "
                         ".safetensors file of the backbone's weights") from None
    return str(p.resolve()), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=8)
def _digest(key: tuple[str, int, int]) -> str:
    h = hashlib.sha256()
    with open(key[0], "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(weights: str | None) -> str:
    """What the run key records of ``weights``: the file's SHA-256 (16 hex digits), so that a
    moved file keeps its runs and a changed one starts new ones; or the keyword."""
    if weights is None or is_keyword(weights):
        return (weights or DEFAULT_WEIGHTS).lower()
    return "sha256:" + _digest(file_key(weights))[:16]


def check_weights(weights: str | None) -> None:
    """Fail early on a weights file that does not exist (the fit is checked at build time)."""
    if weights is not None and not is_keyword(weights):
        file_key(weights)
        if not os.access(weights, os.R_OK):
            raise DalbtError(f"--weights file {weights} is not readable; check its permissions")

__all__ = ["DEFAULT_WEIGHTS", "NO_WEIGHTS", "check_weights", "file_key", "is_keyword",
           "weights_digest"]
