import numpy as np
import pytest
import torch

import dalbt.train
from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.ensemble import (
    EnsembleVarRatioStrategy,
    rank_by_variation_ratio,
    variation_ratio,
)
from tests.conftest import make_real_context


def test_variation_ratio_is_one_minus_modal_fraction():
    votes = np.array([[0, 0, 0, 2],
                      [0, 1, 1, 2],
                      [0, 1, 2, 1],
                      [0, 0, 2, 1]])  # (M=4, U=4)
    assert np.allclose(variation_ratio(votes, 3), [0.0, 0.5, 0.5, 0.5])
    assert np.allclose(variation_ratio(torch.tensor([[1, 2, 0]]), 3), [0.0, 0.0, 0.0])


def test_most_disagreement_first_ties_by_entropy():
    # M=4 members, pool of 5 samples with dataset indices 10..14
    votes = np.array([[0, 0, 0, 1, 0],
                      [0, 1, 1, 1, 1],
                      [0, 2, 0, 1, 2],
                      [0, 0, 0, 1, 1]])
    # variation ratios: 0, 0.5, 0.25, 0, 0.5
    mean_probs = np.array([
        [1 / 3, 1 / 3, 1 / 3],  # unanimous but maximal entropy: must still come last-ish
        [0.5, 0.3, 0.2],        # vr 0.5, lower entropy than index 14
        [0.6, 0.4, 0.0],        # vr 0.25
        [0.0, 1.0, 0.0],        # unanimous, zero entropy: last
        [0.4, 0.3, 0.3],        # vr 0.5, highest entropy among the vr 0.5 ones
    ])
    idx = np.arange(10, 15)
    got = rank_by_variation_ratio(votes, mean_probs, idx, 5)
    assert got.tolist() == [14, 11, 12, 10, 13]
    assert rank_by_variation_ratio(votes, mean_probs, idx, 2).tolist() == [14, 11]


def test_options_validated():
    for bad in ({"members": 1}, {"members": 2.5}, {"epochs": 0}, {"epochs": 1.5}):
        with pytest.raises(ValueError):
            EnsembleVarRatioStrategy(**bad)
    with pytest.raises(DalbtError, match="bad options"):
        build_strategy("ensemble-varratio", members=0)
    s = build_strategy("ensemble-varratio")
    assert s.members == 5 and s.epochs is None


def test_real_prepare_trains_members_on_labelled_only(monkeypatch):
    calls = []
    real = dalbt.train.train_round

    def spy(model, x, y, labelled, validation, cfg, g1, g2, **kw):
        calls.append((next(model.parameters()).detach().clone(), y.clone(), labelled.copy(),
                      len(validation), cfg.epochs))
        return real(model, x, y, labelled, validation, cfg, g1, g2, **kw)

    monkeypatch.setattr(dalbt.train, "train_round", spy)
    labelled = np.arange(0, 60, 4)
    ctx = make_real_context(labelled)
    state = torch.get_rng_state()
    s = EnsembleVarRatioStrategy(members=2, epochs=1)
    s.prepare(ctx)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert len(calls) == 2
    assert not torch.equal(calls[0][0], calls[1][0])  # independent initialisations
    for _, y, lab, n_val, epochs in calls:
        assert np.array_equal(lab, labelled) and n_val == 0 and epochs == 1
        assert np.array_equal(y[labelled].numpy(), ctx.labelled_targets)
        assert (np.delete(y.numpy(), labelled) == -1).all()
    _, votes, mean_probs = s._state
    assert votes.shape == (2, len(ctx.unlabelled))
    assert torch.allclose(mean_probs.sum(1), torch.ones(len(ctx.unlabelled), dtype=torch.float64))
    got = s.select(ctx, 6)
    assert len(set(got.tolist())) == 6 and np.isin(got, ctx.unlabelled).all()
    assert s._state is None  # nothing kept after the query
    # select without prepare trains the same ensemble from the same query seed
    again = EnsembleVarRatioStrategy(members=2, epochs=1).select(make_real_context(labelled), 6)
    assert np.array_equal(got, again)
