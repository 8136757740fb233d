
import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.uncertainty import (
    entropy_from_logits,
    least_confidence_from_logits,
    margin_from_logits,
)
from tests.conftest import make_context


def _ctx(probs, unlabelled=None, logits=None):
    """Context whose pool logits are log(probs) (softmax gives back probs)."""
    if logits is None:
        logits = np.log(np.asarray(probs, dtype=np.float64))
    logits = np.asarray(logits, dtype=np.float32)
    return make_context(logits, np.zeros((len(logits), 2)), labelled=[], targets=[],
                        unlabelled=unlabelled)


def test_entropy_queries_the_uniform_prediction_first():
    probs = [[0.8, 0.1, 0.1], [0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.4, 0.1],
             [0.6, 0.2, 0.2]]
    got = build_strategy("entropy").select(_ctx(probs), 5)
    h = [-(np.array(p) * np.log(p)).sum() for p in probs]
    assert got[0] == 2
    assert got.tolist() == np.argsort(h)[::-1].tolist()
    assert got.tolist() == [2, 4, 3, 0, 1]


def test_least_confidence_and_margin_disagree_where_they_should():
    # a: top-2 almost tied but top-1 fairly high; b: lower top-1 but clear margin over #2
    a, b = [0.5, 0.49, 0.01], [0.4, 0.3, 0.3]
    pool = np.array([7, 3])  # dataset indices of a and b
    probs = np.zeros((8, 3)) + 1 / 3
    probs[7], probs[3] = a, b
    assert build_strategy("least-confidence").select(_ctx(probs, pool), 1).tolist() == [3]
    assert build_strategy("margin").select(_ctx(probs, pool), 1).tolist() == [7]
    assert build_strategy("entropy").select(_ctx(probs, pool), 1).tolist() == [3]


def test_scores_rank_beyond_float_saturation():
    # 1 - max p rounds to 0 for both confident rows; the less confident one (index 1) must still
    # be queried first (a saturating score would tie and pick the smaller index 0).
    logits = np.array([[40.0, 0.0, 0.0], [30.0, 0.0, 0.0]])
    assert 1 - torch.softmax(torch.tensor(logits), 1).max().item() == 0.0
    for name in ("least-confidence", "margin", "entropy"):
        assert build_strategy(name).select(_ctx(None, logits=logits), 1).tolist() == [1], name


def test_margin_exact_top2_tie_is_most_uncertain():
    logits = np.array([[0.0, -0.1, -5.0], [2.0, 2.0, -9.0], [1.0, 0.9, 0.8]])
    s = margin_from_logits(torch.tensor(logits))
    assert torch.isinf(s[1]) and s[1] > 0
    assert build_strategy("margin").select(_ctx(None, logits=logits), 1).tolist() == [1]


def test_scores_match_the_textbook_formulas():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(0, 2, size=(500, 6)))
    p = torch.softmax(logits, 1)
    h = -(p * p.log()).sum(1)
    assert torch.allclose(entropy_from_logits(logits), h, atol=1e-12)
    lc = least_confidence_from_logits(logits)
    assert torch.allclose(lc, -p.max(1).values.log(), atol=1e-12)
    top2 = p.topk(2, 1).values
    assert torch.allclose(margin_from_logits(logits), -(top2[:, 0] - top2[:, 1]).log(),
                          atol=1e-9)
    # the selections are the textbook ones: highest H, lowest max p, smallest margin
    ctx_logits = logits.float().numpy()
    margins = (top2[:, 0] - top2[:, 1]).numpy()
    for name, order in (("entropy", np.argsort(-h.numpy())),
                        ("least-confidence", np.argsort(p.max(1).values.numpy())),
                        ("margin", np.argsort(margins))):
        got = build_strategy(name).select(_ctx(None, logits=ctx_logits), 20)
        assert got.tolist() == order[:20].tolist(), name


def test_single_class_does_not_crash():
    logits = np.zeros((4, 1))
    for name in ("entropy", "least-confidence", "margin"):
        got = build_strategy(name).select(_ctx(None, logits=logits), 2).tolist()
        assert len(set(got)) == 2 and set(got) <= {0, 1, 2, 3}  # all tied: drawn at random


def test_no_options_and_needs_a_model():
    with pytest.raises(DalbtError, match="bad options"):
        build_strategy("margin", samples=3)
    from dalbt.strategies import QueryContext
    ctx = QueryContext(unlabelled=np.arange(3), labelled=np.arange(3, 5),
                       labelled_targets=np.zeros(2), num_classes=2,
                       rng=np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="no model"):
        build_strategy("entropy").select(ctx, 1)


def test_large_pool_matches_a_full_sort():
    # speed is measured by benchmarks/selection_scaling.py; here: the chunked scores and the
    # O(N) partition in top_k give the same picks as a plain full sort on a large pool
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((300_000, 10), dtype=np.float32)
    ctx = _ctx(None, logits=logits)
    p = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    ent = -(p * np.log(p)).sum(1)
    got = build_strategy("entropy").select(ctx, 1000)
    assert np.array_equal(np.sort(got), np.sort(ctx.unlabelled[np.argsort(-ent)[:1000]]))
