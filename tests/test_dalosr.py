import math

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.dalosr import DalOsrStrategy, kl_divergence
from tests.conftest import make_real_context


def test_kl_matches_closed_form():
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # sample 0: 0.5 * ((1 + 1 - 1 - 0) + (4 + 2 - 1 - ln 2)); sample 1: standard normal -> 0
    expected = torch.tensor([0.5 * (6.0 - math.log(2.0)), 0.0])
    assert torch.allclose(kl_divergence(mu, logvar), expected)
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()),
        torch.distributions.Normal(torch.zeros(3), torch.ones(3))).sum(1)
    assert torch.allclose(kl_divergence(mu, logvar), ref, atol=1e-5)


def _angle(deg, r=1.0):
    a = np.deg2rad(deg)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=-1)


def test_selection_queries_the_cosine_outliers_first():
    rng = np.random.default_rng(0)
    # labelled: class 0 at angles around 0 deg, class 1 around 90 deg, radii varying (cosine
    # distance ignores them); one misclassified class-0 sample far off that must not count
    ang0 = rng.normal(0, 3, 40)
    ang1 = 90 + rng.normal(0, 3, 40)
    lab = np.concatenate([_angle(ang0, rng.uniform(1, 5, 40)), _angle(ang1, rng.uniform(1, 5, 40)),
                          _angle(np.array([60.0]))])
    y = np.array([0] * 40 + [1] * 40 + [0])
    pred = np.array([0] * 40 + [1] * 40 + [1])
    # pool (dataset indices 100..105): typical points (tiny angles, large radii: a euclidean
    # score would call them outliers) and two directional outliers
    pool = np.concatenate([_angle(np.array([0.5, 89.5, -0.5, 90.2]), 20.0),
                           _angle(np.array([50.0, 35.0]))])
    pool_pred = torch.tensor([0, 1, 0, 1, 1, 0])
    s = DalOsrStrategy()
    got = s.weibull.rank(torch.tensor(lab, dtype=torch.float32), y, pred,
                         torch.tensor(pool, dtype=torch.float32), pool_pred, np.arange(100, 106),
                         6, 2)
    assert set(got[:2].tolist()) == {104, 105}
    assert set(got[2:].tolist()) == {100, 101, 102, 103}


def _cosine_case():
    """Labelled classes at 0 and 90 degrees; pool 100-103 typical, 104-105 outliers."""
    rng = np.random.default_rng(0)
    lab = np.concatenate([_angle(rng.normal(0, 3, 40), rng.uniform(1, 5, 40)),
                          _angle(90 + rng.normal(0, 3, 40), rng.uniform(1, 5, 40))])
    y = np.array([0] * 40 + [1] * 40)
    pool = np.concatenate([_angle(np.array([0.5, 89.5, -0.5, 90.2]), 20.0),
                           _angle(np.array([50.0, 35.0]))])
    return (torch.tensor(lab, dtype=torch.float32), y, y,
            torch.tensor(pool, dtype=torch.float32), torch.tensor([0, 1, 0, 1, 1, 0]))


@pytest.mark.parametrize("k", [2, 4])
def test_reference_direction_queries_the_least_outlying_split_over_classes(k):
    lab, y, pred, pool, pool_pred = _cosine_case()
    s = DalOsrStrategy(direction="inlier", balance=True)
    got = s.weibull.rank(lab, y, pred, pool, pool_pred, np.arange(100, 106), k, 2,
                         rng=np.random.default_rng(1))
    assert set(got.tolist()) <= {100, 101, 102, 103}  # never an outlier
    classes = pool_pred.numpy()[got - 100]
    assert (classes == 0).sum() == (classes == 1).sum() == k // 2  # budget / classes each
    default = DalOsrStrategy().weibull.rank(lab, y, pred, pool, pool_pred, np.arange(100, 106),
                                            2, 2, rng=np.random.default_rng(1))
    assert set(default.tolist()) == {104, 105}  # the paper's direction, unchanged


def test_options_validated():
    for bad in ({"beta": -1.0}, {"beta": float("nan")}, {"epochs": 0}, {"tail_frac": 0.0},
                {"tail_frac": 1.5}, {"assign": "foo"}, {"direction": "sideways"}):
        with pytest.raises(ValueError):
            DalOsrStrategy(**bad)
    with pytest.raises(DalbtError, match="bad options"):
        build_strategy("dal-osr", beta=-2)
    s = build_strategy("dal-osr")
    assert s.beta == 0.1 and s.epochs is None
    assert s.weibull.distance == "cosine" and s.weibull.tail_frac == 0.05


def test_real_prepare_trains_a_variational_classifier():
    labelled = np.arange(0, 60, 3)
    ctx = make_real_context(labelled)
    state = torch.get_rng_state()
    s = DalOsrStrategy(epochs=1)
    net = s.fit_model(ctx)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert net.mu.out_features == net.logvar.out_features == 60  # the LeNet's latent size
    assert net.classifier.out_features == 3 and not net.training
    s.prepare(make_real_context(labelled))
    _, lab_mu, lab_pred, pool_mu, pool_pred = s._state
    assert lab_mu.shape == (20, 60) and pool_mu.shape == (40, 60)
    assert lab_pred.shape == (20,) and pool_pred.shape == (40,)
    got = s.select(make_real_context(labelled), 5)
    assert len(set(got.tolist())) == 5 and np.isin(got, ctx.unlabelled).all()
    assert s._state is None
