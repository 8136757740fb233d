"""TypiClust and ProbCover on constructed problems whose answers are known."""

import numpy as np
import pytest

from dalbt import catalogue
from dalbt.errors import DalbtError
from dalbt.strategies import build_strategy
from dalbt.strategies.typicality import (
    delta_ball_graph,
    l2_normalise,
    mean_knn_distance,
    probcover_positions,
    purity_delta,
    typicality,
)
from tests.conftest import make_context

D = 8
PER_CLUSTER = 50


def _clusters(seed=0, spread=0.03, outliers=True):
    """Three tight clusters around 10 e0, 10 e1, 10 e2 (rows 0-49, 50-99, 100-149), then six
    outliers in directions far from all three (rows 150-155). Returns (latents, cluster id of
    every row (-1: outlier))."""
    rng = np.random.default_rng(seed)
    centres = 10 * np.eye(D)[:3]
    x = np.concatenate([c + rng.normal(0, spread * 10, size=(PER_CLUSTER, D)) for c in centres])
    y = np.repeat(np.arange(3), PER_CLUSTER)
    if outliers:
        far = 10 * np.array([np.eye(D)[3], np.eye(D)[4], np.eye(D)[5], -np.eye(D)[0],
                             -np.eye(D)[1], (np.eye(D)[6] + np.eye(D)[7]) / np.sqrt(2)])
        x = np.concatenate([x, far])
        y = np.concatenate([y, -np.ones(len(far), dtype=np.int64)])
    return x.astype(np.float32), y


def _ctx(x, labelled=(), seed=0, num_classes=3):
    labelled = np.asarray(labelled, dtype=np.int64)
    logits = np.zeros((len(x), num_classes), dtype=np.float32)
    return make_context(logits, x, labelled, np.zeros(len(labelled), dtype=np.int64), seed=seed,
                        num_classes=num_classes)


def _densest(x, rows, k=20):
    """The most typical row of ``rows`` (brute force, on normalised features)."""
    z = l2_normalise(x[rows])
    d = np.linalg.norm(z[:, None] - z[None], axis=2)
    d.sort(axis=1)
    return rows[np.argmin(d[:, 1 : k + 1].mean(axis=1))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_typiclust_picks_one_core_point_per_cluster_never_an_outlier(seed):
    x, y = _clusters(seed)
    got = build_strategy("typiclust").select(_ctx(x, seed=seed), 3)
    assert sorted(y[got].tolist()) == [0, 1, 2]
    for c in range(3):
        # the densest point of the cluster (its 20-NN mean distance is the smallest)
        assert got[y[got] == c][0] == _densest(x, np.flatnonzero(y == c))


def test_typiclust_goes_to_unlabelled_clusters_first():
    x, y = _clusters()
    ctx = _ctx(x, labelled=[3])  # one point of cluster 0 is labelled
    got = build_strategy("typiclust").select(ctx, 2)
    assert sorted(y[got].tolist()) == [1, 2]
    # budget 3: k = 1 + 3 = 4 clusters (the outliers make the 4th); the three without labels
    # come first, so cluster 0 is still not visited
    got3 = build_strategy("typiclust").select(_ctx(x, labelled=[3]), 3)
    assert 0 not in y[got3] and sorted(y[got3].tolist()) == [-1, 1, 2]
    # a second pass returns to the labelled cluster, after the unlabelled ones
    got5 = build_strategy("typiclust", min_cluster_size=10).select(_ctx(x, labelled=[3]), 5)
    # (min_cluster_size=10 drops the outliers' cluster, so cluster 0 comes third)
    assert sorted(y[got5[:2]].tolist()) == [1, 2] and y[got5[2]] == 0


def test_typiclust_skips_small_clusters_until_the_big_ones_are_used_up():
    x, y = _clusters()
    # labelled: three points; k = 3 + 4 = 7 clusters: the three big ones and the outliers
    # (each outlier alone, 6 points in 4 clusters of at most 5): a 4th pick goes to a big one
    got = build_strategy("typiclust").select(_ctx(x, labelled=[0, 50, 100]), 4)
    assert (y[got] >= 0).all()


def test_typicality_is_inverse_mean_knn_distance():
    x = np.array([[0.0], [1.0], [3.0], [7.0]], dtype=np.float32)
    # 2 nearest: 0 -> (1, 3): mean 2; 1 -> (1, 2): 1.5; 3 -> (2, 3): 2.5; 7 -> (4, 6): 5
    np.testing.assert_allclose(1 / typicality(x, 2) - 1e-5, [2.0, 1.5, 2.5, 5.0], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_probcover_picks_one_point_per_cluster(seed):
    x, y = _clusters(seed)
    got = build_strategy("probcover", delta=0.5).select(_ctx(x, seed=seed), 3)
    assert sorted(y[got].tolist()) == [0, 1, 2]


def test_probcover_skips_a_labelled_cluster():
    x, y = _clusters()
    got = build_strategy("probcover", delta=0.5).select(_ctx(x, labelled=[7]), 2)
    assert sorted(y[got].tolist()) == [1, 2]


def test_probcover_covers_greedily_then_draws_the_rest_at_random():
    x, y = _clusters()
    # 3 clusters + 6 isolated outliers: 9 balls cover everything; the 10th pick is random
    a = build_strategy("probcover", delta=0.5).select(_ctx(x, seed=0), 12)
    b = build_strategy("probcover", delta=0.5).select(_ctx(x, seed=1), 12)
    for q in (a, b):
        assert sorted(y[q[:3]].tolist()) == [0, 1, 2]
        assert sorted(q[3:9].tolist()) == list(range(150, 156))  # each outlier's own ball
        assert (y[q[9:]] >= 0).all()
    assert a[9:].tolist() != b[9:].tolist()  # the rest comes from the query's generator


def test_purity_delta_separates_the_clusters():
    x, y = _clusters(outliers=False)
    z = l2_normalise(x)
    delta = purity_delta(z, 3, np.random.default_rng(0))
    d = np.linalg.norm(z[:, None] - z[None], axis=2)
    same = y[:, None] == y[None]
    assert d[same].max() < delta < np.sqrt(2)  # balls hold whole clusters, not the centres' gap
    # the rule itself (brute force, up to float32 rounding): >= 95 % pure balls just below
    # delta, fewer just above
    pure = lambda r: np.mean([(y[d[i] < r] == y[i]).all() for i in range(len(y))])  # noqa: E731
    assert pure(delta * (1 - 1e-5)) >= 0.95 and pure(delta * (1 + 1e-5)) < 0.95


def test_delta_ball_graph_is_the_strict_radius_graph_with_self_loops():
    rng = np.random.default_rng(0)
    z = l2_normalise(rng.normal(size=(40, 3)))
    g = delta_ball_graph(z, 0.7, chunk=7).toarray()
    d = np.linalg.norm(z[:, None] - z[None], axis=2)
    assert np.array_equal(g.astype(bool), (d < 0.7) | np.eye(40, dtype=bool))


def test_probcover_refuses_a_delta_that_fills_memory():
    x, _ = _clusters()
    with pytest.raises(DalbtError, match="smaller delta"):
        build_strategy("probcover", delta=3.0, max_degree=10).select(_ctx(x), 3)


@pytest.mark.parametrize("name", ["typiclust", "probcover"])
def test_cold_start_and_catalogue(name):
    x, y = _clusters()
    got = build_strategy(name).select(_ctx(x, labelled=[]), 5)
    assert sorted(y[got[:3]].tolist()) == [0, 1, 2]  # with no label, one per cluster first
    info = catalogue.strategies()[name]
    assert info.label_free and "2022" in info.description
    catalogue.check_cold_start(name)


def test_mean_knn_distance_blocked_matches_brute_force_with_duplicates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    x[5] = x[4]  # a duplicate is a neighbour at distance 0, the row itself is not
    d = np.linalg.norm(x[:, None].astype(np.float64) - x[None], axis=2)
    np.fill_diagonal(d, np.inf)
    want = np.sort(d, axis=1)[:, :6].mean(axis=1)
    np.testing.assert_allclose(mean_knn_distance(x, 6, chunk=4), want, rtol=1e-12)


def test_probcover_greedy_takes_a_ball_of_most_uncovered_points_at_every_step():
    rng = np.random.default_rng(0)
    z = l2_normalise(rng.normal(size=(120, 3)))
    n_lab, delta = 10, 0.6
    picks = probcover_positions(z, n_lab, 30, delta, np.random.default_rng(1))
    ball = delta_ball_graph(z, delta).toarray().astype(bool)
    covered = ball[:n_lab].any(axis=0)
    for t, i in enumerate(picks):
        gain = (ball[n_lab:] & ~covered).sum(axis=1)
        if gain.max() == 0:  # everything covered: the rest is random, without repeats
            assert len(set(picks[t:].tolist()) | set(picks[:t].tolist())) == len(picks)
            break
        assert gain[i] == gain.max(), f"step {t}"
        covered |= ball[n_lab + i]
    else:
        pytest.fail("30 balls were expected to cover the 120 points")


def test_probcover_without_num_classes_asks_for_it_or_a_delta():
    from dalbt.selection import select

    x, y = _clusters()
    with pytest.raises(DalbtError, match="num_classes"):
        select("probcover", 3, embeddings=x)
    got = select("probcover", 3, embeddings=x, num_classes=3)
    assert sorted(y[got].tolist()) == [0, 1, 2]
    assert sorted(y[select("probcover", 3, embeddings=x, delta=0.5)].tolist()) == [0, 1, 2]


def test_probcover_reuses_delta_and_graph_for_the_same_features(monkeypatch):
    from dalbt.strategies import typicality as typ

    x, _ = _clusters()
    builds = []
    real = typ.delta_ball_graph

    def counting(*args, **kw):
        builds.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(typ, "delta_ball_graph", counting)
    cached = build_strategy("probcover", delta=0.3)
    cached.select(_ctx(x, labelled=[0]), 2)
    # a later query over the same images (a frozen encoder), with one more label
    second = cached.select(_ctx(x, labelled=[0, 60], seed=5), 3)
    assert len(builds) == 1
    fresh = build_strategy("probcover", delta=0.3).select(_ctx(x, labelled=[0, 60], seed=5), 3)
    np.testing.assert_array_equal(second, fresh)
    assert len(builds) == 2
    # other features: rebuilt
    cached.select(_ctx(x * 1.5 + 1, labelled=[0, 60]), 3)
    assert len(builds) == 3
