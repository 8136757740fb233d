"""Seed streams: every random stream of a run is derived from its one seed.

Each stream is ``SeedSequence(seed, spawn_key=(stream, *key))``; a stream never depends on
how many numbers another stream drew, so resuming a run or adding a strategy leaves every other
stream unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

SPLIT = 0  # validation split and initial labelled set (shared by all strategies of a seed)
INIT = 1  # model initialisation, per round
SHUFFLE = 2  # mini-batch order, per round
AUGMENT = 3  # augmentation parameters, per round
QUERY = 4  # a strategy's own randomness, per round
MIX = 5  # which images of another dataset are mixed into the pool
PRETRAIN = 6  # Barlow Twins pre-training on the pool (model init, order, augmentation)

#: The round number whose streams a cold-start choice of the initial set uses (before round 0;
#: never a real round).
COLD_START_ROUND = 1 << 30


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


@contextmanager
def isolated_torch_rng(seed: int, device: str | torch.device) -> Iterator[None]:
    """Run a block under torch's global generators seeded with ``seed`` and restore them after.

    For modules that draw from the global generators during training (dropout), so that the
    training is reproducible from the query rng and the caller's random state is left untouched.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda else 0
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield
