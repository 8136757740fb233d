"""One self-supervised encoder per seed, shared by every strategy.

Barlow Twins pre-training (``TrainConfig.pretrain_epochs > 0``) depends only on the data as the
run sees it (dataset, open-set classes, mixed-in datasets, the seed's validation split), the
model (name, latent and projector widths), the seed and the pre-training settings (epochs,
batch, learning rate, weight decay, lambda, mixed precision): not on the strategy nor on the
recipe of the rounds. Its weights are computed once for these and cached under a content key,
``<dir>/encoders/<key>.pt`` (with its ``.sha256`` and a ``<key>.json`` of what the key
covers), where ``<dir>`` is the experiment directory or ``RunConfig.pretrain_cache``, a
directory several experiment directories can share. A process pre-trains under an exclusive
``flock`` on ``<key>.lock``, so that another one that needs the same encoder waits and then
reads it. The weights are those a run pre-trained before the cache (same seed streams).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalbt import rng as rngs
from dalbt.checkpoint import apply_state, read_checkpoint, save_state
from dalbt.distributed import SINGLE, Dist
from dalbt.errors import DalbtError
from dalbt.models.net import DALBTNet
from dalbt.progress import ProgressReporter
from dalbt.recipe import RunConfig
from dalbt.train import pretrain_barlow

ENCODERS = "encoders"  # sub-directory of the experiment or cache directory
# The version of what a key's weights are: raise it when pre-training changes its results.
VERSION = 1

Log = Callable[[str], None]
NewModel = Callable[[int], DALBTNet]


def encoder_covers(cfg: RunConfig, n_train: int, val_size: int) -> dict[str, Any]:
    """What the shared encoder of ``cfg`` depends on (the content of its key).

    Args:
        cfg: The run's config (its strategy and round recipe play no part).
        n_train: Training images of the data as the run sees it (scenario applied).
        val_size: Size of the seed's validation split (the encoder never sees it).
    """
    from dalbt.catalogue import dataset_key

    t = cfg.train
    extra: dict[str, Any] = {}
    if cfg.weights is not None or cfg.input_size is not None:  # a backbone's (absent before)
        from dalbt.weightfiles import weights_digest

        extra = {"weights": weights_digest(cfg.weights), "input_size": cfg.input_size}
    return {**extra, "version": VERSION, "dataset": dataset_key(cfg.dataset),
            "n_train": int(n_train),
            "unknown_classes": [str(c) for c in cfg.unknown_classes], "mix": cfg.mix or None,
            "model": cfg.model, "latent_dim": cfg.latent_dim,
            "projector_dims": [int(d) for d in cfg.projector_dims], "seed": int(cfg.seed),
            "val_size": int(val_size),
            "pretrain": {"epochs": int(t.pretrain_epochs), "batch": int(t.pretrain_batch),
                         "lr": float(t.lr), "weight_decay": float(t.weight_decay),
                         "lambd": float(t.lambd), "amp": t.amp}}


def encoder_key(covers: dict[str, Any]) -> str:
    """The content key of an encoder: SHA-256 of the canonical JSON of ``covers`` (16 hex
    digits, as run keys)."""
    text = json.dumps(covers, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def legacy_path(directory: Path, run_id: int) -> Path:
    """Where a run pre-trained before the shared cache kept its weights (still read)."""
    return directory / "checkpoints" / f"run-{run_id}-pretrained.pt"


@contextmanager
def _exclusive(lock: Path | None, log: Log) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock`` (nothing when None); say so when waiting."""
    if lock is None:
        yield
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DalbtError(f"cannot write the encoder cache {lock.parent}: "
                         f"{exc.strerror or exc}; give a writable --pretrain-cache directory"
                         ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process pre-training {lock.with_suffix('.pt')}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class SharedEncoder:
    """The shared pre-trained encoder of one run's config, and where it is cached.

    Args:
        cfg: The run's config.
        root: The cache directory (``cfg.pretrain_cache`` or the experiment directory; None:
            no cache, as on the ranks other than 0 of a distributed run).
        n_train: Training images of the data as the run sees it.
        val_size: Size of the seed's validation split.
    """

    def __init__(self, cfg: RunConfig, root: Path | None, n_train: int, val_size: int) -> None:
        self.cfg = cfg
        self.covers = encoder_covers(cfg, n_train, val_size)
        self.key = encoder_key(self.covers)
        self.path = root / ENCODERS / f"{self.key}.pt" if root is not None else None
        self.what = f"pre-trained encoder {self.key}"
        self.fix = ("delete it and its .sha256 to pre-train again (same seed, same weights), or "
                    "restore them from a backup")

    def exists(self) -> bool:
        return self.path is not None and self.path.exists()

    def state(self, x_train: torch.Tensor, images: np.ndarray, new_model: NewModel,
              progress: bool, log: Log, dist: Dist = SINGLE) -> dict:
        """The encoder's weights: read from the cache, or pre-trained (and cached) now.

        Rank 0 looks, reads and writes; every rank pre-trains together when it must, and the
        other ranks get read weights by broadcast.
        """
        with _exclusive(self._lock(), log):
            if dist.from_main(self.exists):
                log(f"[{self.cfg.strategy} seed {self.cfg.seed}] {self.what} read from "
                    f"{self.path}")
                return read_shared(self.path, self.what, self.fix, self.cfg.train.device,
                                   new_model, dist)
            return self._pretrain(x_train, images, new_model, progress, log, dist)

    def ensure(self, x_train: torch.Tensor, images: np.ndarray, new_model: NewModel,
               progress: bool, log: Log) -> bool:
        """Pre-train and cache the encoder unless the cache holds it (in this process).

        Returns:
            Whether it was pre-trained now.
        """
        if self.exists():
            return False
        with _exclusive(self._lock(), log):
            if self.exists():  # another process made it while this one waited
                return False
            self._pretrain(x_train, images, new_model, progress, log, SINGLE)
            return True

    def _lock(self) -> Path | None:
        return self.path.with_suffix(".lock") if self.path is not None else None

    def _pretrain(self, x_train: torch.Tensor, images: np.ndarray, new_model: NewModel,
                  progress: bool, log: Log, dist: Dist) -> dict:
        """Barlow Twins pre-training from the seed's PRETRAIN streams; cached when there is a
        cache."""
        cfg, epochs = self.cfg, self.cfg.train.pretrain_epochs
        model = new_model(rngs.int_seed(cfg.seed, rngs.PRETRAIN, 0))
        report = ProgressReporter(bars=progress, desc=f"pre-train {self.key}")
        t0 = time.perf_counter()
        with report.phase("pre-training", epochs, "epoch") as phase:
            losses = pretrain_barlow(model, x_train, images, cfg.train,
                                     rngs.torch_generator(cfg.seed, rngs.PRETRAIN, 1),
                                     rngs.torch_generator(cfg.seed, rngs.PRETRAIN, 2),
                                     on_epoch=phase.on_epoch("bt"), dist=dist)
        seconds = time.perf_counter() - t0
        log(f"[seed {cfg.seed}] Barlow Twins pre-training of encoder {self.key} on "
            f"{len(images)} images: {epochs} epochs, loss {losses[0]:.1f} -> {losses[-1]:.1f}, "
            f"{seconds:.1f}s")
        state = model.state_dict()
        if self.path is not None:
            self._save(state, {"images": len(images), "losses": losses, "seconds": seconds})
        return state

    def _save(self, state: dict, facts: dict[str, Any]) -> None:
        """Write ``<key>.json`` (what the key covers, and how the weights came about), then
        the weights and their digest, each atomically."""
        assert self.path is not None
        from dalbt import __version__

        note = {"key": self.key, "covers": self.covers, "dalbt": __version__, **facts}
        meta = self.path.with_suffix(".json")
        tmp = meta.with_name(f"{meta.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(note, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, meta)
        save_state(self.path, state)


def read_shared(path: Path | None, what: str, fix: str, device: str, new_model: NewModel,
                dist: Dist) -> dict:
    """Weights that rank 0 reads from ``path`` (the others get them by broadcast), checked
    against the run's model here rather than in a round."""
    def read() -> dict:
        assert path is not None  # rank 0 found it
        return read_checkpoint(path, device if not dist.active else "cpu", what, fix)

    state = dist.from_main(read)
    apply_state(new_model(0), state, path, what, fix)
    return state
