import numpy as np
import pytest

from dalbt import rng as rngs
from dalbt.data.pool import HELD_OUT, UNLABELLED, Pool, make_splits
from dalbt.errors import DalbtError


def test_splits_depend_only_on_seed():
    a = make_splits(1000, 100, 20, seed=3)
    b = make_splits(1000, 100, 20, seed=3)
    c = make_splits(1000, 100, 20, seed=4)
    assert np.array_equal(a.initial, b.initial) and np.array_equal(a.validation, b.validation)
    assert not np.array_equal(a.initial, c.initial)
    assert len(a.validation) == 100 and len(a.initial) == 20
    assert not set(a.validation) & set(a.initial)


def test_splits_reject_impossible_sizes():
    with pytest.raises(DalbtError, match="exceed"):
        make_splits(100, 90, 20, seed=0)
    with pytest.raises(DalbtError):
        make_splits(100, 10, 0, seed=0)


def test_pool_records_rounds_and_rejects_bad_labels():
    s = make_splits(50, 10, 5, seed=0)
    pool = Pool.from_splits(50, s)
    assert len(pool.labelled) == 5 and len(pool.unlabelled) == 35
    assert (pool.state[s.validation] == HELD_OUT).all()
    new = pool.unlabelled[:3]
    pool.label(new, 1)
    assert np.array_equal(pool.labelled_in(1), np.sort(new))
    assert np.array_equal(pool.labelled_in(0), s.initial)
    assert len(pool.unlabelled) == 32 and (pool.state[new] == 1).all()
    with pytest.raises(ValueError):
        pool.label(new[:1], 2)  # already labelled
    with pytest.raises(ValueError):
        pool.label(s.validation[:1], 2)  # held out
    u = pool.unlabelled[0]
    with pytest.raises(ValueError):
        pool.label(np.array([u, u]), 2)  # repeated
    assert pool.state[u] == UNLABELLED


def test_streams_are_independent_and_reproducible():
    assert rngs.int_seed(0, rngs.INIT, 1) == rngs.int_seed(0, rngs.INIT, 1)
    seeds = {rngs.int_seed(0, s, r) for s in range(5) for r in range(5)}
    assert len(seeds) == 25
    assert 0 <= rngs.int_seed(7, rngs.QUERY, 3) < 2**63
    g1, g2 = rngs.torch_generator(1, rngs.AUGMENT, 2), rngs.torch_generator(1, rngs.AUGMENT, 2)
    import torch

    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    a = rngs.numpy_rng(1, rngs.QUERY, 0).integers(1 << 30, size=4)
    b = rngs.numpy_rng(1, rngs.QUERY, 1).integers(1 << 30, size=4)
    assert not np.array_equal(a, b)
