"""Seed streams: every random stream of a run is derived from its one seed.

Each stream is ``SeedSequence(seed, spawn_key=(stream, *key))``; a stream never depends on
how many numbers another stream drew, so resuming a run or adding a strategy leaves every other
stream unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

SPLIT = 0  # validation split and initial labelled set (shared by all strategies of a seed)
INIT = 1  # model initialisation, per round
SHUFFLE = 2  # mini-batch order, per round
AUGMENT = 3  # augmentation parameters, per round
QUERY = 4  # a strategy's own randomness, per round


def seed_sequence(seed: int, stream: int, *key: int) -> np.random.SeedSequence:
    """The SeedSequence of one named stream of a run."""
    return np.random.SeedSequence(int(seed), spawn_key=(int(stream), *map(int, key)))


def numpy_rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    """A numpy Generator for one stream."""
    return np.random.default_rng(seed_sequence(seed, stream, *key))


def int_seed(seed: int, stream: int, *key: int) -> int:
    """A 63-bit integer seed for one stream (for torch)."""
    return int(seed_sequence(seed, stream, *key).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def torch_generator(seed: int, stream: int, *key: int) -> torch.Generator:
    """A CPU torch.Generator for one stream."""
    g = torch.Generator()
    g.manual_seed(int_seed(seed, stream, *key))
    return g
