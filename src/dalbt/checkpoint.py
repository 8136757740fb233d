"""Model weights on disk: atomic writes with a SHA-256 sidecar, and reads that turn a damaged
or foreign file into a one-line :class:`~dalbt.errors.DalbtError` naming the way out."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from dalbt.errors import DalbtError


def digest_path(path: Path) -> Path:
    """The checkpoint's SHA-256 (damage inside the tensor data would load silently)."""
    return path.with_name(path.name + ".sha256")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a state dict to ``path`` and its digest next to it, each atomically (a temporary
    file of this process, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    digest_path(path).unlink(missing_ok=True)  # killed before the new digest: torch checks
    os.replace(tmp, path)
    side_tmp = path.with_name(f"{path.name}.sha256.{os.getpid()}.tmp")
    side_tmp.write_text(digest + "\n")
    os.replace(side_tmp, digest_path(path))


def save_checkpoint(path: Path, model: torch.nn.Module) -> None:
    """Write ``model``'s state dict to ``path`` (see :func:`save_state`)."""
    save_state(path, model.state_dict())


def remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    digest_path(path).unlink(missing_ok=True)


def read_checkpoint(path: Path, map_location: Any, what: str, fix: str) -> dict:
    """``torch.load`` of a state dict, with a damaged file as a one-line DalbtError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DalbtError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    side = digest_path(path)
    if side.exists() and side.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise DalbtError(f"the {what} {path} does not match its checksum {side.name}, the "
                         f"file is damaged: {fix}")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location)
    except Exception as exc:  # a truncated or garbled file fails in many ways
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DalbtError(f"cannot read the {what} {path} ({type(exc).__name__}: {first}); the "
                         f"file is truncated or damaged: {fix}") from None
    if not isinstance(state, dict):
        raise DalbtError(f"the {what} {path} holds a {type(state).__name__}, not model "
                         f"weights: {fix}")
    return state


def apply_state(model: torch.nn.Module, state: dict, path: Path | None, what: str,
                fix: str) -> None:
    """``model.load_state_dict`` with weights of another model as a one-line DalbtError."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DalbtError(f"the {what} {path} does not fit the run's model ({first}): {fix}"
                         ) from None
