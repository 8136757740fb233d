import logging

import numpy as np
import pytest
import scipy.stats as st
import torch

from dalbt.strategies import build_strategy
from dalbt.strategies.weibull import (
    TRANSLATE_AMOUNT,
    WeibullStrategy,
    fit_high,
    fit_weibull_mle,
    pairwise_distance,
)


def test_mle_matches_scipy_on_weibull_samples():
    x = st.weibull_min.rvs(2.5, scale=3.0, size=400, random_state=1)
    shape, scale = fit_weibull_mle(x)
    c, _, s = st.weibull_min.fit(x, floc=0)
    assert shape == pytest.approx(c, rel=1e-3)
    assert scale == pytest.approx(s, rel=1e-4)
    assert shape == pytest.approx(2.5, rel=0.15)


def test_fit_high_is_libmr_translated_tail_fit():
    d = np.random.default_rng(0).gamma(2.0, 1.0, size=60)
    t = fit_high(d, 20)
    tail = np.sort(d)[::-1][:20]
    assert t.small_score == tail[-1]
    c, _, s = st.weibull_min.fit(tail + TRANSLATE_AMOUNT - tail[-1], floc=0)
    assert t.shape == pytest.approx(c, rel=1e-3)
    assert t.scale == pytest.approx(s, rel=1e-6)
    # W_score is the Weibull CDF at the translated value
    x = np.array([tail[-1], tail[5], tail[0]])
    expected = st.weibull_min.cdf(x + TRANSLATE_AMOUNT - tail[-1], c, scale=s)
    assert np.allclose(t.cdf(x), expected, atol=1e-3)
    assert np.all(np.diff(t.cdf(np.linspace(0, 20, 50))) >= 0)
    # far outliers saturate at probability 1 but their log-hazard still orders them
    assert t.cdf(np.array([50.0]))[0] == 1.0
    assert t.log_hazard(np.array([60.0]))[0] > t.log_hazard(np.array([50.0]))[0]


def test_mle_rejects_degenerate_data():
    with pytest.raises(ValueError):
        fit_weibull_mle(np.array([3.0, 3.0, 3.0]))
    with pytest.raises(ValueError):
        fit_weibull_mle(np.array([1.0]))


def test_distances():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    m = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    e = pairwise_distance(z, m, "euclidean")
    assert e[0, 0].item() == pytest.approx(5.0)
    cos = pairwise_distance(z, m, "cosine")
    assert cos[1, 1].item() == pytest.approx(1.0)
    assert cos[0, 1].item() == pytest.approx(1 - 0.6)
    eucos = pairwise_distance(z, m, "eucos")
    assert eucos[0, 1].item() == pytest.approx(e[0, 1].item() / 200 + 0.4)


def _two_clusters(rng, n_per=30):
    """Labelled latents around (10, 0) for class 0 and (0, 10) for class 1."""
    z0 = rng.normal(0, 0.5, size=(n_per, 2)) + [10, 0]
    z1 = rng.normal(0, 0.5, size=(n_per, 2)) + [0, 10]
    lat = np.concatenate([z0, z1])
    y = np.array([0] * n_per + [1] * n_per)
    logits = np.eye(2)[y] * 5
    return lat, y, logits


@pytest.mark.parametrize("assign", ["predicted", "nearest", "all"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine", "eucos"])
def test_weibull_queries_the_outliers_first(context_factory, assign, distance):
    rng = np.random.default_rng(0)
    lat, y, logits = _two_clusters(rng)
    # pool: two typical points of each class and two far outliers (direction changed too, so
    # that cosine distance sees them as well)
    pool_lat = np.array([[10.1, -0.2], [0.2, 10.1], [9.7, 0.2], [-0.2, 9.9],
                         [-40.0, 35.0], [30.0, -45.0]])
    pool_logits = np.array([[5, 0], [0, 5], [5, 0], [0, 5], [5, 0], [0, 5]], dtype=float)
    latents = np.concatenate([lat, pool_lat])
    all_logits = np.concatenate([logits, pool_logits])
    n_lab = len(lat)
    ctx = context_factory(all_logits, latents, np.arange(n_lab), y)
    s = WeibullStrategy(distance=distance, assign=assign)
    chosen = s.select(ctx, 2)
    assert set(chosen) == {n_lab + 4, n_lab + 5}
    # the full ranking puts the typical points last: the DAL-OSR sign bug would invert this
    full = s.select(ctx, 6)
    assert set(full[:2]) == {n_lab + 4, n_lab + 5}
    assert set(full[2:]) == {n_lab, n_lab + 1, n_lab + 2, n_lab + 3}


def test_weibull_uses_only_correctly_classified_labelled_samples(context_factory):
    rng = np.random.default_rng(1)
    lat, y, logits = _two_clusters(rng)
    # a misclassified labelled sample far away would inflate class 0's tail if it were used
    lat = np.concatenate([lat, [[100.0, 100.0]]])
    y = np.append(y, 0)
    logits = np.concatenate([logits, [[0.0, 5.0]]])
    s = WeibullStrategy()
    means, tails = s.fit(torch.tensor(lat, dtype=torch.float32), y, logits.argmax(1), 2)
    assert np.allclose(means[0].numpy(), lat[:30].mean(0), atol=1e-5)
    # the tail holds the largest distances of correct samples only: the misclassified point
    # (about 141 away) would make the scale exceed the translation by far more than 10
    d0 = np.linalg.norm(lat[:30] - lat[:30].mean(0), axis=1)
    t0 = tails[0]
    assert t0 is not None and t0.scale < TRANSLATE_AMOUNT + d0.max() - t0.small_score + 1


def test_weibull_class_without_correct_samples_uses_pooled_fit(context_factory):
    rng = np.random.default_rng(2)
    lat, y, logits = _two_clusters(rng)
    logits[y == 1] = [5, 0]  # every class-1 sample misclassified: class 1 has no mean
    s = WeibullStrategy()
    means, tails = s.fit(torch.tensor(lat, dtype=torch.float32), y, logits.argmax(1), 2)
    assert torch.isnan(means[1]).all() and tails[1] is not None
    ctx = context_factory(np.concatenate([logits, [[0, 5.0], [5, 0]]]),
                          np.concatenate([lat, [[0.0, 10.0], [10.1, 0.1]]]), np.arange(60), y)
    # a pool sample predicted as the class with no model is queried first
    assert s.select(ctx, 1)[0] == 60


@pytest.mark.parametrize("name", ["weibull", "weibull-balanced"])
def test_degenerate_fit_is_warned_and_ties_are_broken_at_random(context_factory, caplog, name):
    # 30 labelled images of 3 classes; the model gets one image of class 0 right and none of
    # classes 1 and 2; every pool image is predicted as class 2: all pool scores are +inf.
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(130, 4))
    y = np.arange(30) % 3
    logits = np.zeros((130, 3))
    logits[np.arange(30), (y + 1) % 3] = 5.0  # labelled: all predicted wrong ...
    logits[0] = [5.0, 0, 0]  # ... except image 0 (class 0)
    logits[30:, 2] = 5.0
    picks = []
    for seed in (0, 0, 1):
        ctx = context_factory(logits, lat, np.arange(30), y, seed=seed)
        with caplog.at_level(logging.WARNING, logger="dalbt.strategies.weibull"):
            picks.append(build_strategy(name).select(ctx, 20).tolist())
    assert picks[0] == picks[1]  # the query's stream decides: reproducible
    assert picks[0] != picks[2]  # ... and another seed breaks the ties otherwise
    assert picks[0] != list(range(30, 50))  # never the pool in index order
    assert sorted(set(picks[0])) != sorted(range(30, 50))
    text = caplog.text
    assert "degenerate Weibull fit" in text and "classes 1, 2: no correctly classified" in text
    assert "class 0: fewer than min_tail=3" in text and "raw distance" in text


def test_weibull_options_are_validated():
    with pytest.raises(ValueError):
        WeibullStrategy(distance="manhattan")
    with pytest.raises(ValueError):
        WeibullStrategy(assign="random")
    with pytest.raises(ValueError):
        WeibullStrategy(tail_frac=0)
    s = build_strategy("weibull", distance="cosine", tail_frac=0.2)
    assert s.distance == "cosine" and s.tail_frac == 0.2


def test_top_k_balanced_takes_turns_over_groups():
    from dalbt.strategies import top_k_balanced

    scores = np.array([9.0, 8.0, 7.0, 1.0, 0.5, 6.0, np.nan])
    groups = np.array([0, 0, 0, 1, 1, 2, 2])
    idx = np.array([10, 11, 12, 13, 14, 15, 16])
    # turn 1: best of each group by score (10, 15, 13); turn 2: 11, 14, 16 (NaN last); then 12
    assert top_k_balanced(scores, groups, idx, 7, rng=None).tolist() == [10, 15, 13, 11, 14, 16, 12]
    assert top_k_balanced(scores, groups, idx, 2, rng=None).tolist() == [10, 15]
    # one group only: the plain ranking
    assert top_k_balanced(scores[:3], groups[:3], idx[:3], 3, rng=None).tolist() == [10, 11, 12]


def _lopsided_pool(context_factory):
    """Labelled clusters of two classes; the pool holds three far outliers predicted as class 0,
    one mild outlier predicted as class 1 and typical points of both classes."""
    rng = np.random.default_rng(3)
    lat, y, logits = _two_clusters(rng)
    pool_lat = np.array([[40.0, -30.0], [45.0, -35.0], [50.0, -25.0], [-3.0, 13.0],
                         [10.1, -0.2], [0.2, 10.1]])
    pool_logits = np.array([[5, 0], [5, 0], [5, 0], [0, 5], [5, 0], [0, 5]], dtype=float)
    return len(lat), context_factory(np.concatenate([logits, pool_logits]),
                                     np.concatenate([lat, pool_lat]), np.arange(len(lat)), y)


def test_weibull_balance_spreads_the_batch_over_predicted_classes(context_factory):
    n_lab, ctx = _lopsided_pool(context_factory)
    far0 = {n_lab, n_lab + 1, n_lab + 2}
    # the global ranking gives class 0's three far outliers the first three places
    assert set(WeibullStrategy().select(ctx, 3)) == far0
    # balanced, first turn: the most outlying of each predicted class (one far class-0 point and
    # class 1's mild outlier); second turn: the next of each (another far one, a typical class 1)
    got = WeibullStrategy(balance=True).select(ctx, 4)
    assert n_lab + 3 in got[:2] and len(set(got[:2]) & far0) == 1
    assert n_lab + 5 in got[2:] and len(set(got[2:]) & far0) == 1
    assert build_strategy("weibull", balance=True).select(ctx, 4).tolist() == got.tolist()


def test_weibull_inlier_direction_reverses_the_ranking(context_factory):
    n_lab, ctx = _lopsided_pool(context_factory)
    out = WeibullStrategy().select(ctx, 6)
    inl = WeibullStrategy(direction="inlier").select(ctx, 6)
    assert inl.tolist() == out[::-1].tolist()
    assert set(inl[:2]) == {n_lab + 4, n_lab + 5}
    with pytest.raises(ValueError):
        WeibullStrategy(direction="up")


def test_weibull_balanced_is_the_balanced_weibull(context_factory):
    n_lab, ctx = _lopsided_pool(context_factory)
    named = build_strategy("weibull-balanced")
    assert named.balance and named.distance == "euclidean" and named.tail_frac == 0.5
    assert named.select(ctx, 4).tolist() == WeibullStrategy(balance=True).select(ctx, 4).tolist()
    assert build_strategy("weibull-balanced", balance=False).select(ctx, 3).tolist() == \
        WeibullStrategy().select(ctx, 3).tolist()
