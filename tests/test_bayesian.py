import itertools
import math

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import QueryContext, build_strategy
from dalbt.strategies.bayesian import (
    _joint_entropy_term,
    _JointConfigurations,
    bald_scores,
    expected_entropy,
    greedy_batchbald,
    mean_entropy,
)
from tests.conftest import make_real_context

BAYESIAN = ("mc-dropout", "bald", "var-ratio", "batchbald")

# T = 4 dropout samples, K = 2 classes
DISAGREE = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]  # confident, but samples disagree
AMBIGUOUS = [[0.5, 0.5]] * 4  # every sample uncertain
CONFIDENT = [[0.95, 0.05]] * 4


class FixedMc:
    """MC scorer returning fixed (N, T, K) probabilities per dataset index."""

    def __init__(self, probs):
        self.probs = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
        self.calls = 0

    def __call__(self, idx, t, generator):
        assert t == self.probs.shape[1]
        assert isinstance(generator, torch.Generator)
        self.calls += 1
        return self.probs[torch.as_tensor(np.asarray(idx, dtype=np.int64))]


def mc_context(probs, unlabelled=None, seed=0):
    probs = np.asarray(probs, dtype=np.float64)
    if unlabelled is None:
        unlabelled = np.arange(len(probs))
    return QueryContext(unlabelled=np.asarray(unlabelled), labelled=np.empty(0, dtype=np.int64),
                        labelled_targets=np.empty(0, dtype=np.int64),
                        num_classes=probs.shape[2], rng=np.random.default_rng(seed),
                        mc_scorer=FixedMc(probs))


def test_bald_prefers_disagreement_over_ambiguity():
    # ambiguous at the smaller index: a wrong (e.g. entropy-only) score would tie and pick it
    probs = [CONFIDENT, AMBIGUOUS, DISAGREE]
    p = torch.tensor(probs)
    assert mean_entropy(p)[1].item() == pytest.approx(math.log(2))
    assert mean_entropy(p)[2].item() == pytest.approx(math.log(2))
    s = bald_scores(p)
    assert s[2].item() == pytest.approx(math.log(2))
    assert s[1].item() == pytest.approx(0.0, abs=1e-12)
    assert s[0].item() == pytest.approx(0.0, abs=1e-7)
    assert build_strategy("bald", samples=4).select(mc_context(probs), 1).tolist() == [2]


def test_mc_dropout_entropy_ranks_both_uncertain_above_confident():
    probs = [CONFIDENT, DISAGREE, AMBIGUOUS]
    got = build_strategy("mc-dropout", samples=4).select(mc_context(probs), 3)
    # equal mean entropy log 2 for 1 and 2 (tie to the smaller index), confident last
    assert got.tolist() == [1, 2, 0]


def test_var_ratio_ranks_disagreement_highest():
    probs = [AMBIGUOUS, CONFIDENT, DISAGREE]  # argmax of [0.5, 0.5] is class 0 in every sample
    got = build_strategy("var-ratio", samples=4).select(mc_context(probs), 3)
    assert got[0] == 2
    # ties in the variation ratio (0 for 0 and 1) go to the higher mean entropy: 0 then 1
    assert got.tolist() == [2, 0, 1]
    # 3 of 4 agree (ratio 0.25) ranks between disagreement (0.5) and unanimity (0)
    three = [[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]
    got = build_strategy("var-ratio", samples=4).select(mc_context([CONFIDENT, three, DISAGREE]),
                                                         3)
    assert got.tolist() == [2, 1, 0]


def _duplicates_pool():
    distinct = [[0.95, 0.05], [0.05, 0.95], [0.95, 0.05], [0.05, 0.95]]  # splits t differently
    pool = [CONFIDENT, CONFIDENT, DISAGREE, DISAGREE, CONFIDENT, DISAGREE, distinct, CONFIDENT]
    return pool  # duplicates of the top-BALD sample at 2, 3 and 5; distinct at 6


@pytest.mark.parametrize("options", [{}, {"max_exact_configs": 1, "num_samples": 400}])
def test_batchbald_skips_duplicates_that_bald_takes(options):
    probs = _duplicates_pool()
    bald = build_strategy("bald", samples=4).select(mc_context(probs), 2)
    assert bald.tolist() == [2, 3]
    bb = build_strategy("batchbald", samples=4, **options).select(mc_context(probs), 2)
    # once 2 is known, a duplicate adds no information about w; the distinct sample does
    assert bb.tolist() == [2, 6]


def test_batchbald_max_pool_keeps_only_top_bald_candidates():
    probs = _duplicates_pool()
    got = build_strategy("batchbald", samples=4, max_pool=2).select(mc_context(probs), 2)
    assert got.tolist() == [2, 3]


def _brute_force_joint_mi(probs, idx):
    """Exact I[y_idx; w] by enumerating every label configuration."""
    t, k = probs.shape[1:]
    h = 0.0
    for conf in itertools.product(range(k), repeat=len(idx)):
        pt = torch.ones(t, dtype=torch.float64)
        for j, c in zip(idx, conf, strict=True):
            pt = pt * probs[j, :, c]
        p = pt.mean().item()
        h -= p * math.log(p) if p > 0 else 0.0
    return h - expected_entropy(probs)[list(idx)].sum().item()


def test_batchbald_is_greedy_joint_mutual_information():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(12, 6, 3, generator=g, dtype=torch.float64) * 2, -1)
    expected: list[int] = []
    for _ in range(3):
        cands = [i for i in range(12) if i not in expected]
        expected.append(max(cands, key=lambda i: _brute_force_joint_mi(probs, expected + [i])))
    assert expected[0] == int(bald_scores(probs).argmax())
    for exact in (1000, 1):  # exact enumeration, and sampling from the second pick on
        got = greedy_batchbald(probs, 3, 6000, exact, torch.Generator().manual_seed(1))
        assert got.tolist() == expected


def test_sampled_joint_entropy_estimates_the_exact_one():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(20, 8, 3, generator=g, dtype=torch.float64) * 2, -1)
    exact = _JointConfigurations(8, 10**6, 1, torch.Generator().manual_seed(0))
    sampled = _JointConfigurations(8, 1, 16000, torch.Generator().manual_seed(0))
    for j in (3, 7, 11):
        exact.add(probs[j])
        sampled.add(probs[j])
    assert exact.sampled_t is None and len(exact.log_p) == 27
    assert sampled.sampled_t is not None and len(sampled.log_p) == 16000
    a = _joint_entropy_term(probs, *exact.weights())
    b = _joint_entropy_term(probs, *sampled.weights())
    assert torch.allclose(a, b, atol=0.02)


def test_mc_probs_reproducible_for_a_fixed_seed_and_cached():
    labelled = np.arange(0, 60, 3)
    a = make_real_context(labelled, seed=3).mc_probs(5)
    b = make_real_context(labelled, seed=3).mc_probs(5)
    c = make_real_context(labelled, seed=4).mc_probs(5)
    assert a.shape == (40, 5, 3)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[:, 0], a[:, 1])  # different masks per sample
    for name in BAYESIAN:
        s = build_strategy(name, samples=5)
        x = s.select(make_real_context(labelled, seed=3), 6)
        y = s.select(make_real_context(labelled, seed=3), 6)
        assert np.array_equal(x, y), name
    # prepare computes the MC probabilities once; select reuses them
    ctx = mc_context([CONFIDENT, DISAGREE])
    s = build_strategy("bald", samples=4)
    s.prepare(ctx)
    s.select(ctx, 1)
    assert ctx.mc_scorer.calls == 1


def test_options_and_training_dropout():
    for name in BAYESIAN:
        assert build_strategy(name).train_dropout == 0.5
        assert build_strategy(name).samples == 20
        assert build_strategy(name, dropout=0.3).train_dropout == 0.3
        for bad in ({"samples": 1}, {"samples": 2.5}, {"samples": True}, {"dropout": 0.0},
                    {"dropout": 1.0}, {"foo": 1}):
            with pytest.raises(DalbtError, match="bad options"):
                build_strategy(name, **bad)
    for bad in ({"num_samples": 0}, {"max_pool": 0}, {"max_exact_configs": -1},
                {"max_pool": 1.5}):
        with pytest.raises(DalbtError, match="bad options"):
            build_strategy("batchbald", **bad)
    bb = build_strategy("batchbald", num_samples=500)
    assert bb.max_exact_configs == 500 and bb.max_pool == 5000
    assert build_strategy("batchbald", max_pool=None).max_pool is None


def test_wrong_mc_shape_and_missing_scorer_fail_clearly():
    ctx = mc_context([CONFIDENT, DISAGREE])
    with pytest.raises(AssertionError):  # FixedMc checks T
        build_strategy("bald", samples=5).select(ctx, 1)
    ctx = mc_context([CONFIDENT, DISAGREE])
    ctx.num_classes = 3
    with pytest.raises(RuntimeError, match="expected"):
        build_strategy("bald", samples=4).select(ctx, 1)
    ctx = mc_context([CONFIDENT, DISAGREE])
    ctx.mc_scorer = None
    with pytest.raises(RuntimeError, match="MC-dropout"):
        build_strategy("mc-dropout", samples=4).select(ctx, 1)
