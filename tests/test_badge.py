import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.badge import factorised_sq_dists, gradient_factors, kmeans_pp


def explicit_embedding(logits, latents):
    """(N, K * (D + 1)) float64 gradient embeddings, built explicitly."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    a = p - torch.nn.functional.one_hot(p.argmax(1), p.shape[1])
    z = torch.as_tensor(latents, dtype=torch.float64)
    x = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], dim=1)
    return (a[:, :, None] * x[:, None, :]).reshape(len(z), -1)


def test_factorised_distance_equals_outer_product_distance():
    g = torch.Generator().manual_seed(0)
    logits, z = torch.randn(9, 4, generator=g) * 2, torch.randn(9, 5, generator=g)
    a = gradient_factors(logits)
    emb = explicit_embedding(logits, z)
    assert torch.allclose(a.double(), emb.reshape(9, 4, 6)[:, :, -1], atol=1e-6)
    got = factorised_sq_dists(a, z, a[:3], z[:3])
    assert torch.allclose(got.double(), torch.cdist(emb, emb[:3]) ** 2, rtol=1e-4, atol=1e-5)


def test_confident_prediction_has_exactly_zero_embedding():
    logits = torch.tensor([[200.0, 0.0, 0.0], [30.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    a = gradient_factors(logits)
    assert torch.equal(a[0], torch.zeros(3))
    assert 0 < a[1].abs().max() < 1e-12  # tiny, not rounding noise of p - 1
    assert a[2, 1] < 0 and a[2, 0] > 0 and torch.isclose(a[2].sum(), torch.tensor(0.0))


def _problem(n_uncertain, n_confident, seed=0, dup=0):
    """Uncertain samples with spread latents, confident ones (zero embedding)."""
    rng = np.random.default_rng(seed)
    k, d = 4, 8
    n = n_uncertain + n_confident + dup
    logits = np.zeros((n, k), dtype=np.float32)
    logits[:n_uncertain] = rng.normal(0, 0.5, (n_uncertain, k))
    logits[n_uncertain:, 0] = 300.0  # confident (and duplicates below are re-set)
    latents = rng.normal(0, 3, (n, d)).astype(np.float32)
    if dup:
        # dup copies of one very uncertain sample with a large latent
        logits[-dup:] = 0.0
        logits[-dup:, 1] = 0.1
        latents[-dup:] = 10.0
    return logits, latents


def test_first_pick_is_largest_gradient_norm(context_factory):
    logits, latents = _problem(12, 20)
    ctx = context_factory(logits, latents, np.array([], dtype=np.int64), np.array([], int))
    norms = (explicit_embedding(logits, latents) ** 2).sum(1).numpy()
    for seed in range(5):
        ctx.rng = np.random.default_rng(seed)
        assert build_strategy("badge").select(ctx, 3)[0] == int(np.argmax(norms))


@pytest.mark.parametrize("lazy", [True, False])
def test_confident_samples_are_at_most_one_and_uncertain_all_taken(context_factory, lazy):
    # zero embeddings coincide: once one is a centre the others have zero D^2 weight, so a
    # batch of (uncertain + 1) holds every uncertain sample
    logits, latents = _problem(6, 40)
    for seed in range(10):
        ctx = context_factory(logits, latents, np.array([], dtype=np.int64), np.array([], int),
                              seed=seed)
        got = build_strategy("badge", lazy=lazy).select(ctx, 7)
        assert got[0] < 6
        assert set(range(6)) <= set(got.tolist())


@pytest.mark.parametrize("lazy", [True, False])
def test_duplicates_of_an_uncertain_sample_are_not_all_chosen(context_factory, lazy):
    logits, latents = _problem(10, 0, dup=8)
    dups = set(range(10, 18))
    for seed in range(10):
        ctx = context_factory(logits, latents, np.array([], dtype=np.int64), np.array([], int),
                              seed=seed)
        got = build_strategy("badge", lazy=lazy).select(ctx, 6)
        assert got[0] in dups  # largest norm
        assert len(dups & set(got.tolist())) == 1


@pytest.mark.slow
@pytest.mark.parametrize("lazy", [True, False])
def test_d2_sampling_distribution(lazy):
    # joint law of the 2nd and 3rd picks against the exact k-means++ probabilities
    g = torch.Generator().manual_seed(3)
    logits, z = torch.randn(6, 3, generator=g) * 1.5, torch.randn(6, 4, generator=g)
    emb = explicit_embedding(logits, z)
    first = int(torch.argmax((emb**2).sum(1)))
    d1 = ((emb - emb[first]) ** 2).sum(1).numpy()
    exact = {}
    for j in np.flatnonzero(d1 > 0):
        d2 = np.minimum(d1, ((emb - emb[j]) ** 2).sum(1).numpy())
        for k in np.flatnonzero(d2 > 0):
            exact[(j, k)] = d1[j] / d1.sum() * d2[k] / d2.sum()
    a = gradient_factors(logits)
    trials = 2500
    counts: dict = {}
    for seed in range(trials):
        p = kmeans_pp(a, z, 3, np.random.default_rng(seed), lazy=lazy, batch=2)
        assert p[0] == first
        counts[(p[1], p[2])] = counts.get((p[1], p[2]), 0) + 1
    assert set(counts) <= set(exact)
    worst = max(abs(counts.get(key, 0) / trials - prob) for key, prob in exact.items())
    assert worst < 0.03  # ~3 standard errors


def test_all_confident_pool_falls_back_to_uniform(context_factory):
    logits = np.zeros((30, 3), dtype=np.float32)
    logits[:, 2] = 500.0
    latents = np.random.default_rng(0).normal(size=(30, 4))
    firsts = set()
    for seed in range(8):
        ctx = context_factory(logits, latents, np.array([], dtype=np.int64), np.array([], int),
                              seed=seed)
        got = build_strategy("badge").select(ctx, 10)
        assert len(set(got.tolist())) == 10
        firsts.add(tuple(sorted(got[1:].tolist())))
    assert len(firsts) > 1


def test_options_and_bad_inputs():
    with pytest.raises(DalbtError):
        build_strategy("badge", chunk=0)
    with pytest.raises(DalbtError):
        build_strategy("badge", foo=1)
    with pytest.raises(ValueError, match=">= 1"):
        kmeans_pp(torch.zeros(3, 2), torch.zeros(3, 2), 2, np.random.default_rng(0), batch=0)
    z = torch.zeros(3, 2)
    z[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kmeans_pp(torch.ones(3, 2), z, 2, np.random.default_rng(0))


def test_lazy_refreshes_the_pool_when_bounds_go_stale(monkeypatch):
    # 50 copies of one sample hold most of the D^2 mass after the first centre; once one copy
    # is picked the others' stale bounds make proposals fail, which triggers a full refresh
    from dalbt.strategies import badge

    sizes = []
    original = badge._Embedding.min_sq_dist

    def spy(self, rows, lo):
        sizes.append(len(self.a) if rows is None else len(rows))
        return original(self, rows, lo)

    monkeypatch.setattr(badge._Embedding, "min_sq_dist", spy)
    rng = np.random.default_rng(0)
    z = torch.cat([torch.full((1, 4), 20.0), torch.full((50, 4), -6.0),
                   torch.as_tensor(rng.normal(0, 0.3, (10, 4)), dtype=torch.float32)])
    logits = torch.zeros(61, 3)
    logits[:, 0] = 0.5
    for seed in range(5):
        sizes.clear()
        picks = kmeans_pp(gradient_factors(logits), z, 6, np.random.default_rng(seed), batch=4)
        assert picks[0] == 0 and len(set(picks.tolist())) == 6
        assert len(set(range(1, 51)) & set(picks.tolist())) == 1
        assert max(sizes[1:]) > 4  # a full refresh (more than one proposal batch) happened
