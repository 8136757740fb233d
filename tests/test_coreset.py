import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.coreset import k_center_greedy


def brute_force(pool, centres, n, first=None):
    """Textbook greedy k-centre in float64 with explicit distances."""
    p = torch.as_tensor(pool, dtype=torch.float64)
    c = torch.as_tensor(centres, dtype=torch.float64)
    picks = []
    if len(c) == 0:
        picks, c, n = [first], p[first : first + 1], n - 1
    m = torch.cdist(p, c).min(1).values
    m[picks] = -1.0
    for _ in range(n):
        i = int(torch.argmax(m))
        picks.append(i)
        m = torch.minimum(m, torch.cdist(p, p[i : i + 1])[:, 0])
        m[picks] = -1.0
    return np.array(picks)


def _ctx(context_factory, latents, n_lab, seed=0):
    latents = np.asarray(latents, dtype=np.float32)
    logits = np.zeros((len(latents), 2), dtype=np.float32)
    return context_factory(logits, latents, np.arange(n_lab), np.zeros(n_lab, dtype=int),
                           seed=seed)


def test_far_unlabelled_cluster_is_queried_first(context_factory):
    rng = np.random.default_rng(0)
    lab = np.concatenate([rng.normal(0, 1, (10, 2)), rng.normal((10, 0), 1, (10, 2))])
    near = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal((10, 0), 1, (30, 2))])
    far = rng.normal((60, 60), 1, (5, 2))
    ctx = _ctx(context_factory, np.concatenate([lab, near, far]), len(lab))
    far_idx = set(range(80, 85))
    got = build_strategy("coreset").select(ctx, 1)
    assert got[0] in far_idx
    # the farthest point from both labelled clusters
    d = np.linalg.norm(far[:, None] - lab[None], axis=2).min(1)
    assert got[0] == 80 + int(np.argmax(d))


def test_picks_are_spread(context_factory):
    # cluster A (around (60, 0)) is farther from the labelled origin than cluster B (around
    # (0, 50)): ranking by distance would take two points of A; k-centre takes A then B
    rng = np.random.default_rng(1)
    lab = rng.normal(0, 1, (10, 2))
    a = rng.normal((60, 0), 1, (10, 2))
    b = rng.normal((0, 50), 1, (10, 2))
    ctx = _ctx(context_factory, np.concatenate([lab, a, b]), 10)
    got = build_strategy("coreset").select(ctx, 2)
    assert 10 <= got[0] < 20 and 20 <= got[1] < 30
    first, second = np.concatenate([lab, a, b])[got]
    assert np.linalg.norm(first - second) > 50


@pytest.mark.parametrize("n_lab", [0, 1, 25])
@pytest.mark.parametrize("lazy", [True, False])
def test_k_center_greedy_equals_brute_force(n_lab, lazy):
    g = torch.Generator().manual_seed(n_lab)
    pool = torch.randn(400, 6, generator=g) * torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.1]) + 4.0
    centres = torch.randn(n_lab, 6, generator=g) + 4.0
    first = int(np.random.default_rng(7).integers(400)) if n_lab == 0 else None
    expected = brute_force(pool, centres, 60, first)
    got = k_center_greedy(pool, centres, 60, rng=np.random.default_rng(7), lazy=lazy)
    assert np.array_equal(got, expected)
    # tiny hot sets and refresh batches (many rebuilds) give the same picks
    small = k_center_greedy(pool, centres, 60, rng=np.random.default_rng(7), batch=1, hot=2,
                            chunk=7)
    assert np.array_equal(small, expected)


def test_k_center_greedy_whole_pool_and_duplicates():
    pool = torch.tensor([[0.0], [1.0], [1.0], [1.0], [5.0], [5.0]])
    for lazy in (True, False):
        got = k_center_greedy(pool, torch.tensor([[0.0]]), 10, lazy=lazy, hot=1, batch=1)
        assert sorted(got.tolist()) == list(range(6))
        assert got[0] in (4, 5) and got[1] in (1, 2, 3)  # far end first, then the middle


def test_empty_labelled_set_starts_from_rng(context_factory):
    latents = np.random.default_rng(0).normal(size=(40, 3))
    firsts = {int(build_strategy("coreset").select(_ctx(context_factory, latents, 0, seed=s),
                                                   5)[0]) for s in range(12)}
    assert len(firsts) > 3
    a = build_strategy("coreset").select(_ctx(context_factory, latents, 0, seed=3), 5)
    b = build_strategy("coreset").select(_ctx(context_factory, latents, 0, seed=3), 5)
    assert np.array_equal(a, b)


def test_options_and_bad_inputs():
    with pytest.raises(DalbtError):
        build_strategy("coreset", chunk=0)
    with pytest.raises(DalbtError):
        build_strategy("coreset", prune=True)
    pool = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="rng"):
        k_center_greedy(pool, torch.zeros(0, 2), 2)
    with pytest.raises(ValueError, match=">= 1"):
        k_center_greedy(pool, torch.ones(1, 2), 2, hot=0)
    pool[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        k_center_greedy(pool, torch.ones(1, 2), 2)
    assert len(k_center_greedy(torch.zeros(0, 2), torch.ones(1, 2), 3)) == 0
