"""The ``dalbt`` rule on constructed problems whose answers are known."""

import numpy as np
import pytest

from dalbt.strategies import build_strategy
from dalbt.strategies.dalbt import typical_count
from tests.conftest import make_context

D = 8
PER_CLASS = 40


def _problem(seed=0):
    """Three classes around 10 e0, 10 e1, 10 e2 (rows 0-119, the first 10 of each class
    labelled) whose spread (2.5 per axis, about 7 from the mean) is as wide as half the gap
    between them, as classes of real latents overlap; four boundary points half-way between
    class 0 and class 1 (rows 120-123); and four far outliers (rows 124-127) whose softmax is
    uniform, the most uncertain of all.

    Returns:
        (logits (N, 3), latents (N, D), labelled rows, their targets, kind of every row:
        class id, 3 = boundary, 4 = outlier).
    """
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(D)[:3]
    z = np.concatenate([c + rng.normal(0, 2.5, size=(PER_CLASS, D)) for c in centres])
    kind = np.repeat(np.arange(3), PER_CLASS)
    boundary = (centres[0] + centres[1]) / 2 + rng.normal(0, 0.3, size=(4, D))
    far = 40 * np.array([np.eye(D)[4], np.eye(D)[5], np.eye(D)[6], -np.eye(D)[0]])
    z = np.concatenate([z, boundary, far]).astype(np.float32)
    kind = np.concatenate([kind, [3] * 4, [4] * 4])
    logits = np.zeros((len(z), 3), dtype=np.float32)
    logits[kind < 3, kind[kind < 3]] = 6.0  # confident, correct
    logits[kind == 3, 0] = logits[kind == 3, 1] = 3.0  # torn between 0 and 1 (margin 0)
    logits[kind == 3, 2] = -3.0
    # the outliers: uniform (margin exactly 0 too, and the highest entropy)
    labelled = np.concatenate([np.arange(c * PER_CLASS, c * PER_CLASS + 10) for c in range(3)])
    return logits, z, labelled, kind[labelled], kind


@pytest.mark.parametrize(("n", "labelled", "classes", "scale", "want"), [
    (100, 100, 10, 2.0, 17),  # round(100 * 2 / (2 + 10))
    (10, 10, 10, 2.0, 7),  # round(10 * 2 / 3)
    (100, 1000, 10, 2.0, 2),  # round(100 * 2 / 102)
    (100, 0, 10, 2.0, 100),  # before any label: all typical
    (100, 100, 10, 0.0, 0),
    (5, 1, 1, 1000.0, 5),
])
def test_typical_count_follows_the_formula(n, labelled, classes, scale, want):
    assert typical_count(n, labelled, classes, scale) == want


def test_outlier_probability_is_high_only_for_outliers_to_every_class():
    logits, z, labelled, targets, kind = _problem()
    pool = np.setdiff1d(np.arange(len(z)), labelled)
    prob = build_strategy("dalbt").outlier_probability(make_context(logits, z, labelled, targets))
    assert prob.shape == (len(pool),)
    assert (prob[kind[pool] == 4] > 0.99).all()
    assert np.median(prob[kind[pool] < 3]) < 0.5  # class members are mostly inliers
    # the boundary points lie within the classes' spread: inliers
    assert (prob[kind[pool] == 3] < 0.95).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margin_part_takes_the_boundary_points_never_the_outliers(seed):
    logits, z, labelled, targets, kind = _problem(seed)
    ctx = make_context(logits, z, labelled, targets, seed=seed)
    got = build_strategy("dalbt", typical_scale=0).select(ctx, 4)
    assert sorted(kind[got].tolist()) == [3, 3, 3, 3]
    # without the Weibull cut, the equally uncertain outliers compete for the batch
    no_cut = build_strategy("dalbt", typical_scale=0, outlier_cut=1.0).select(
        make_context(logits, z, labelled, targets, seed=seed), 8)
    assert sorted(kind[no_cut].tolist()) == [3, 3, 3, 3, 4, 4, 4, 4]


def test_typical_share_goes_to_typical_inliers_then_margin():
    logits, z, labelled, targets, kind = _problem()
    # 30 labels over 3 classes: s = 10 gives round(6 * 10 / 20) = 3 typical picks, then 3 margin
    got = build_strategy("dalbt", typical_scale=10).select(
        make_context(logits, z, labelled, targets), 6)
    assert sorted(kind[got[3:]].tolist()) == [3, 3, 3]
    # TypiClust among the inliers: class members (the outliers are cut, the boundary points
    # are too few to make a cluster)
    assert (kind[got[:3]] < 3).all()


def test_cold_start_is_typiclust():
    _, z, _, _, kind = _problem()
    keep = kind != 3
    z = z[keep]
    logits = np.zeros((len(z), 3), dtype=np.float32)
    empty = np.empty(0, dtype=np.int64)
    ours = build_strategy("dalbt").select(make_context(logits, z, empty, empty, seed=4), 3)
    theirs = build_strategy("typiclust").select(make_context(logits, z, empty, empty, seed=4), 3)
    np.testing.assert_array_equal(ours, theirs)
    assert sorted(kind[keep][ours].tolist()) == [0, 1, 2]


def test_fewer_inliers_than_budget_fills_with_the_least_outlying():
    logits, z, labelled, targets, kind = _problem()
    ctx = make_context(logits, z, labelled, targets)
    pool = len(z) - len(labelled)
    got = build_strategy("dalbt", typical_scale=0, outlier_cut=1e-9).select(ctx, pool - 2)
    # every sample but the two most outlying
    left = np.setdiff1d(np.setdiff1d(np.arange(len(z)), labelled), got)
    assert (kind[left] == 4).all()


def test_options_are_checked():
    from dalbt.errors import DalbtError

    with pytest.raises(DalbtError, match="outlier_cut"):
        build_strategy("dalbt", outlier_cut=1.5)
    with pytest.raises(DalbtError, match="typical_scale"):
        build_strategy("dalbt", typical_scale=-1)


def test_no_cut_until_every_class_has_its_own_weibull():
    logits, z, labelled, targets, kind = _problem()
    # class 2 has only 2 labels (min_tail = 3): far samples may be its unlabelled region
    keep = np.concatenate([np.flatnonzero(targets < 2), np.flatnonzero(targets == 2)[:2]])
    ctx = make_context(logits, z, labelled[keep], targets[keep])
    got = build_strategy("dalbt", typical_scale=0).select(ctx, 8)
    assert sorted(kind[got].tolist()) == [3, 3, 3, 3, 4, 4, 4, 4]
    # with three labels of class 2 the cut applies again
    keep3 = np.concatenate([np.flatnonzero(targets < 2), np.flatnonzero(targets == 2)[:3]])
    got3 = build_strategy("dalbt", typical_scale=0).select(
        make_context(logits, z, labelled[keep3], targets[keep3]), 4)
    assert sorted(kind[got3].tolist()) == [3, 3, 3, 3]
