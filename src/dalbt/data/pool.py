"""Labelled / unlabelled state over dataset indices, and the seed's shared splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dalbt import rng as rngs
from dalbt.errors import DalbtError

UNLABELLED = -1
HELD_OUT = -2  # validation images and images set aside: never in the pool


@dataclass(frozen=True)
class Splits:
    """A seed's validation split and initial labelled set (identical for every strategy).

    Attributes:
        validation: Dataset indices held out for model selection, (V,).
        initial: Dataset indices labelled before round 0, (I,).
    """

    validation: np.ndarray
    initial: np.ndarray


def make_splits(n_train: int, val_size: int, initial: int, seed: int,
                candidates: np.ndarray | None = None) -> Splits:
    """Draw the validation split and the initial labelled set from the seed's SPLIT stream.

    Args:
        n_train: Number of training images.
        val_size: Validation images held out of the pool.
        initial: Size of the initial labelled set.
        seed: The run seed.
        candidates: Dataset indices eligible for both (default: all).

    Returns:
        The :class:`Splits`; depends only on (n_train, val_size, initial, seed, candidates).
    """
    cand = np.arange(n_train) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if val_size < 0 or initial <= 0:
        raise DalbtError(f"need initial > 0 and val size >= 0, got initial={initial}, "
                         f"val size={val_size}")
    if val_size + initial > len(cand):
        raise DalbtError(f"validation ({val_size}) + initial ({initial}) exceed the "
                         f"{len(cand)} training images; lower --val-size or --initial")
    perm = rngs.numpy_rng(seed, rngs.SPLIT).permutation(cand)
    return Splits(validation=np.sort(perm[:val_size]), initial=np.sort(perm[val_size:val_size
                                                                           + initial]))


class Pool:
    """Which dataset indices are labelled, and in which round.

    ``state[i]`` is the round in which index i was labelled (0 for the initial set),
    ``UNLABELLED`` if it is in the pool, ``HELD_OUT`` if it may never be queried.

    Args:
        n: Number of training images.
        held_out: Indices never in the pool (validation), (V,).
        initial: Indices labelled at round 0, (I,).
    """

    def __init__(self, n: int, held_out: np.ndarray, initial: np.ndarray) -> None:
        self.state = np.full(n, UNLABELLED, dtype=np.int64)
        self.state[np.asarray(held_out, dtype=np.int64)] = HELD_OUT
        self.label(initial, 0)

    @classmethod
    def from_splits(cls, n: int, splits: Splits) -> Pool:
        return cls(n, splits.validation, splits.initial)

    def label(self, indices: np.ndarray, round_: int) -> None:
        """Mark unlabelled ``indices`` as labelled in ``round_``.

        Raises:
            ValueError: An index is not unlabelled (already labelled, held out, or repeated).
        """
        idx = np.asarray(indices, dtype=np.int64)
        if len(np.unique(idx)) != len(idx) or (self.state[idx] != UNLABELLED).any():
            raise ValueError("can only label distinct indices of the unlabelled pool")
        self.state[idx] = round_

    def set_aside(self, indices: np.ndarray) -> None:
        """Take unlabelled ``indices`` out of the pool for good (e.g. out-of-distribution)."""
        idx = np.asarray(indices, dtype=np.int64)
        if (self.state[idx] != UNLABELLED).any():
            raise ValueError("can only set aside indices of the unlabelled pool")
        self.state[idx] = HELD_OUT

    @property
    def labelled(self) -> np.ndarray:
        """Labelled dataset indices, ascending, (L,)."""
        return np.flatnonzero(self.state >= 0)

    @property
    def unlabelled(self) -> np.ndarray:
        """Unlabelled dataset indices, ascending, (U,)."""
        return np.flatnonzero(self.state == UNLABELLED)

    def labelled_in(self, round_: int) -> np.ndarray:
        """Indices labelled in one round, ascending."""
        return np.flatnonzero(self.state == round_)
