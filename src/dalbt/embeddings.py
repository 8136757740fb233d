"""The embedding cache: a frozen encoder's latents of a whole image set, on disk.

With a frozen encoder (``--finetune head``, a labelling project on a pretrained backbone,
:class:`dalbt.ActiveLearner` with ``TrainConfig(finetune="head")``) the latents of the pool do
not change between rounds, strategies or runs. They are computed once, in chunks with a
progress bar, into ``<dir>/embeddings/<key>.npy`` (a NumPy file read back memory-mapped, so a
million-image pool is not held in RAM), with a ``<key>.json`` of what the key covers. The key is
the SHA-256 of:

* the images' content (their bytes, shape and dtype),
* the encoder's weights and buffers (:func:`encoder_fingerprint`) and its architecture (the
  module tree, which holds the input size and the resizing of a backbone),
* the stored dtype (float32, or float16 at half the size).

So a second run, round or strategy on the same images and encoder reads the file, and any change
of either computes a new one. A file is written to a temporary name and renamed, so a crash
leaves no half-written entry; a damaged one (wrong size, shape or dtype, unreadable) is reported
in one line naming the file to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dalbt.errors import DalbtError

SUBDIR = "embeddings"
#: Stored dtypes.
DTYPES = {"float32": np.float32, "float16": np.float16}
#: Raise when the way latents are computed changes.
VERSION = 1


def images_digest(images: Tensor) -> str:
    """SHA-256 (hex) of an image tensor's shape, dtype and bytes."""
    h = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}".encode())
    flat = images.detach().cpu().contiguous().view(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):  # in blocks: no second copy of a large set
        h.update(flat[start:start + step].numpy().tobytes())
    return h.hexdigest()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A digest of an encoder's weights, buffers and architecture: equal digests, equal
    latents."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(encoder).encode())
    for name, t in encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(images_sha: str, fingerprint: str, dtype: str) -> str:
    """16 hex digits of the SHA-256 of what the entry depends on."""
    text = json.dumps({"version": VERSION, "images": images_sha, "encoder": fingerprint,
                       "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _damaged(path: Path, why: str) -> DalbtError:
    return DalbtError(f"embedding cache {path} is damaged ({why}); delete it (and its .json) "
                      "to embed the images again")


class EmbeddingCache:
    """One directory of cached embeddings.

    Args:
        root: The directory that holds ``embeddings/`` (an experiment, project or
            ``--pretrain-cache`` directory).
        dtype: ``float32`` (exact) or ``float16`` (half the disk and page cache).
    """

    def __init__(self, root: str | os.PathLike, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise DalbtError(f"embedding dtype must be {' or '.join(DTYPES)}, got {dtype!r}")
        self.directory = Path(root).expanduser() / SUBDIR
        self.dtype = dtype

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lies."""
        return self.directory / f"{key}.npy"

    def read(self, key: str, n: int | None = None) -> np.ndarray | None:
        """The (N, D) memory-mapped latents of ``key``, or None when not cached."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            raise _damaged(path, str(exc).splitlines()[0][:100] or type(exc).__name__) from None
        if arr.ndim != 2 or arr.dtype != DTYPES[self.dtype] or (n is not None and len(arr) != n):
            raise _damaged(path, f"holds {arr.dtype} {arr.shape}, expected {self.dtype} "
                                 f"({n if n is not None else 'N'}, D)")
        return arr

    def write(self, key: str, n: int, dim: int,
              fill: Callable[[np.ndarray], None], covers: dict[str, Any]) -> np.ndarray:
        """Create the entry: ``fill`` writes the (n, dim) rows into a memory-mapped array;
        the file appears under its name only once complete."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DalbtError(f"cannot write the embedding cache {self.directory}: "
                             f"{exc.strerror or exc}; give a writable directory") from None
        path = self.path(key)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[self.dtype],
                                            shape=(n, dim))
            fill(out)
            out.flush()
            del out
            meta = path.with_suffix(".json")
            meta.write_text(json.dumps({"key": key, "n": n, "dim": dim, **covers}, indent=1,
                                       sort_keys=True) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        arr = self.read(key, n)
        assert arr is not None
        return arr


def embed(encoder_of: Callable[[Tensor], Tensor], images: Tensor, batch: int,
          out: np.ndarray, progress: Callable[[int], None] | None = None) -> None:
    """Fill ``out`` (N, D) with ``encoder_of`` of every image, ``batch`` at a time.

    Args:
        encoder_of: (B, C, H, W) uint8 -> (B, D) latents.
        images: (N, C, H, W) uint8.
        batch: Images per pass.
        out: (N, D) array to fill.
        progress: Called with the images done after each chunk.
    """
    for start in range(0, len(images), batch):
        z = encoder_of(images[start:start + batch])
        out[start:start + len(z)] = z.float().cpu().numpy()
        if progress is not None:
            progress(len(z))


__all__ = ["DTYPES", "EmbeddingCache", "cache_key", "embed", "encoder_fingerprint",
           "images_digest"]
