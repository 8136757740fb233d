"""WAAL: constructed cases with known answers, the score's direction, options."""

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.waal import UNCERTAINTIES, waal_scores, worst_case_loss

# three pool predictions: confident, uncertain between two classes, uniform
LOGITS = np.log(np.array([[0.98, 0.01, 0.01], [0.49, 0.49, 0.02], [1 / 3, 1 / 3, 1 / 3]]))


@pytest.mark.parametrize("kind", UNCERTAINTIES)
def test_zero_diversity_ranks_by_uncertainty_uniform_first(kind):
    log_probs = torch.log_softmax(torch.tensor(LOGITS), dim=1)
    scores = waal_scores(log_probs, torch.zeros(3), selection=10.0, kind=kind)
    assert scores.argsort(descending=True).tolist() == [2, 1, 0]


def test_worst_case_loss_values():
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    nll = -log_probs.double()
    assert torch.allclose(worst_case_loss(log_probs, "worst"), nll.max(1).values)
    assert torch.allclose(worst_case_loss(log_probs, "l1"), nll.sum(1))
    assert torch.allclose(worst_case_loss(log_probs, "l2"), nll.norm(dim=1))
    assert torch.allclose(worst_case_loss(log_probs, "mixed"),
                          0.5 * (nll.sum(1) + nll.norm(dim=1)))
    # the uniform prediction has the smallest worst-case loss, log K
    assert worst_case_loss(log_probs, "worst")[1].item() == pytest.approx(np.log(3))


def test_selection_trades_diversity_against_uncertainty():
    log_probs = torch.log_softmax(torch.tensor(LOGITS), dim=1)
    diversity = torch.tensor([0.9, 0.0, 0.0])  # the confident sample is the most novel
    assert waal_scores(log_probs, diversity, 0.0).argmax().item() == 2
    assert waal_scores(log_probs, diversity, 100.0).argmax().item() == 0


def _separable(context_factory, seed=0):
    """Uniform predictions everywhere; a labelled cluster around the origin, a pool made of
    copies of the labelled latents (dataset indices 30..59) and three samples out at distances
    2, 4 and 8 (indices 60, 61, 62)."""
    rng = np.random.default_rng(seed)
    lab = rng.normal(0, 0.3, size=(30, 2))
    far = np.array([[2.0, 0.0], [4.0, 0.0], [8.0, 0.0]])
    latents = np.concatenate([lab, lab, far])
    logits = np.zeros((63, 3))
    return context_factory(logits, latents, np.arange(30), np.zeros(30, dtype=int), seed=seed)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_with_equal_uncertainty_the_farthest_sample_ranks_first(context_factory, seed):
    ctx = _separable(context_factory, seed)
    got = build_strategy("waal", steps=200).select(ctx, 3)
    assert got.tolist() == [62, 61, 60]


def test_diversity_is_relative_to_the_labelled_set(context_factory):
    ctx = _separable(context_factory)
    s = build_strategy("waal", steps=200)
    s.prepare(ctx)
    diversity = s._diversity[1]
    assert diversity[-3:].min() > 0.4  # far samples: much more unlabelled-like
    assert diversity[:30].abs().max() < 0.25  # copies of labelled samples: about zero


def test_selection_zero_is_pure_uncertainty(context_factory):
    logits = np.tile(LOGITS, (11, 1))  # dataset index % 3: confident, two-way, uniform
    latents = np.random.default_rng(0).normal(size=(33, 4))
    ctx = context_factory(logits, latents, np.arange(3), np.zeros(3, dtype=int))
    s = build_strategy("waal", selection=0.0)
    got = s.select(ctx, 12)
    assert s.critic is None  # no critic trained
    # the 10 uniform predictions first (tied: in random order), then 2 of the two-way ones
    assert sorted(got[:10].tolist()) == [5, 8, 11, 14, 17, 20, 23, 26, 29, 32]
    assert set(got[10:].tolist()) <= {4, 7, 10, 13, 16, 19, 22, 25, 28, 31}


def test_leaves_global_random_state_alone(context_factory):
    ctx = _separable(context_factory)
    before = torch.random.get_rng_state()
    build_strategy("waal", steps=5).select(ctx, 2)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("options", [
    {"selection": -1.0}, {"uncertainty": "entropy"}, {"steps": -1}, {"batch": 0},
    {"lr": 0.0}, {"gp_weight": -1.0}, {"hidden": 0}, {"steps": 1.5}, {"penalty": "both"},
    {"nope": 1},
])
def test_option_validation(options):
    with pytest.raises(DalbtError, match="bad options"):
        build_strategy("waal", **options)
