"""Typical samples for the low-budget regime: TypiClust and ProbCover.

Both strategies read only the round's encoder latents (labelled set and pool), never a label nor
a classifier output, so they also choose the first images to label (a cold start).

- :class:`TypiClustStrategy` (Hacohen, Dekel & Weinshall, ICML 2022, "Active learning on a
  budget"): k-means on the features, then the most *typical* point (highest inverse mean
  distance to its K nearest neighbours) of the clusters that hold the fewest labelled points.
- :class:`ProbCoverStrategy` (Yehuda, Dekel, Hacohen & Weinshall, NeurIPS 2022, "Active learning
  through a covering lens"): greedy max coverage of the delta-ball graph on L2-normalised
  features, with delta chosen by the paper's ball-purity rule (:func:`purity_delta`).

Facts taken from the authors' reference code (github.com/avihu111/TypiClust,
``deep-al/pycls/al/typiclust.py`` and ``prob_cover.py``; features loaded through
``deep-al/pycls/datasets/utils/features.py``, which L2-normalises them by default), with the
deviations stated where they occur. Memory is never N x N: nearest-neighbour and ball distances
come from blocked matrix products of at most 16M entries, and the delta-ball graph is stored as
sparse (CSR) arrays.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from dalbt.errors import DalbtError
from dalbt.options import NonNegativeInt, OpenUnit, PositiveFloat, PositiveInt
from dalbt.strategies.base import (
    LABELLED_OUTPUTS,
    POOL_OUTPUTS,
    QueryContext,
    Strategy,
    tie_keys,
)

# TypiClust's constants, as in the reference code (class TypiClust).
MAX_NUM_CLUSTERS = 500
MIN_CLUSTER_SIZE = 5
K_NN = 20
# The reference clusters with KMeans up to 50 clusters, MiniBatchKMeans (batch 5000) above.
FULL_KMEANS_MAX_CLUSTERS = 50
MINIBATCH_SIZE = 5000
# ProbCover: the purity rule's alpha (paper: 0.95), the points whose purity is measured, the
# cap on the graph's mean out-degree (memory), and the query rows per distance block.
DEFAULT_ALPHA = 0.95
DEFAULT_PURITY_SAMPLE = 10_000
DEFAULT_MAX_DEGREE = 1000
DEFAULT_CHUNK = 1024
BLOCK_ELEMENTS = 1 << 24  # at most 64 MiB of float32 distances at once
# Added to the mean neighbour distance before inverting it, as in the reference code.
TYPICALITY_EPS = 1e-5


def _seed(rng: np.random.Generator) -> int:
    """A scikit-learn ``random_state`` drawn from the query's generator."""
    return int(rng.integers(0, 2**31 - 1))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero).

    Args:
        x: Features, (N, D).

    Returns:
        (N, D) float32.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means cluster of every row, as the TypiClust reference clusters.

    ``KMeans`` (k-means++, 10 initialisations, the default of the scikit-learn of the reference)
    up to :data:`FULL_KMEANS_MAX_CLUSTERS` clusters, ``MiniBatchKMeans`` (batch 5000, 3
    initialisations) above. Fewer distinct points than ``k`` is allowed (some clusters are
    then empty).

    Args:
        x: Features, (N, D).
        k: Number of clusters, 1 <= k <= N.
        seed: The k-means ``random_state``.

    Returns:
        (N,) int64 cluster ids in [0, k).
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    km: KMeans | MiniBatchKMeans
    if k <= FULL_KMEANS_MAX_CLUSTERS:
        km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=k, batch_size=MINIBATCH_SIZE, n_init=3,
                             random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k
        return np.asarray(km.fit(x).labels_, dtype=np.int64)


def mean_knn_distance(x: np.ndarray, k: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Mean Euclidean distance of every row to its ``k`` nearest other rows.

    Brute force: the neighbours from (rows, N) blocks of at most :data:`BLOCK_ELEMENTS` float32
    squared distances (each row's own entry excluded; a duplicate of it still counts, at
    distance 0), then their distances recomputed exactly in float64. Memory: one block; time
    O(N^2 D). No per-call set-up, which matters for TypiClust's many small clusters.

    Args:
        x: Features, (N, D), N >= 2.
        k: Neighbours per row, 1 <= k <= N - 1.
        chunk: Most query rows per block.

    Returns:
        (N,) float64.
    """
    x64 = torch.from_numpy(np.asarray(x, dtype=np.float64))
    xt = x64.to(torch.float32)
    sq = (xt * xt).sum(dim=1)
    total = len(xt)
    rows = max(1, min(int(chunk), BLOCK_ELEMENTS // max(total, 1)))
    out = torch.empty(total, dtype=torch.float64)
    for s in range(0, total, rows):
        stop = min(s + rows, total)
        _, d2 = next(_sq_distance_blocks(xt[s:stop], sq[s:stop], xt, sq, total))
        d2[torch.arange(stop - s), torch.arange(s, stop)] = float("inf")
        nn = d2.topk(k, dim=1, largest=False, sorted=False).indices
        del d2
        out[s:stop] = (x64[nn] - x64[s:stop, None]).norm(dim=2).mean(dim=1)
    return out.numpy()


def typicality(x: np.ndarray, k: int = K_NN) -> np.ndarray:
    """TypiClust's typicality: the inverse mean distance to the ``k`` nearest neighbours.

    ``1 / (mean_j ||x - x_j||_2 + 1e-5)`` over the k nearest other rows (the paper's
    definition; the reference code, through faiss ``IndexFlatL2``, averages *squared*
    distances, which can order points differently).

    Args:
        x: Features, (N, D), N >= 2.
        k: Neighbours (capped at N - 1).

    Returns:
        (N,) float64, higher = more typical.
    """
    return 1.0 / (mean_knn_distance(x, min(int(k), len(x) - 1)) + TYPICALITY_EPS)


def _best(candidates: np.ndarray, scores: np.ndarray, tie: np.ndarray) -> int:
    """The candidate of highest score; exact ties go to the smallest tie key."""
    top = np.flatnonzero(scores == scores.max())
    return int(candidates[top[np.argmin(tie[candidates[top]])]])


def typiclust_positions(x: np.ndarray, n_labelled: int, n: int, rng: np.random.Generator,
                        max_clusters: int = MAX_NUM_CLUSTERS,
                        min_cluster_size: int = MIN_CLUSTER_SIZE, k_nn: int = K_NN
                        ) -> np.ndarray:
    """TypiClust's selection (the paper's Algorithm 1, as the reference code runs it).

    k-means on all rows into ``min(L + n, max_clusters)`` clusters (and at most N). Clusters
    with at most ``min_cluster_size`` points are skipped; the others are ordered by their
    number of labelled points (fewest first), then by size (largest first), and visited in
    that fixed order, one pick per cluster per pass, as many passes as the budget needs. A
    pick is the most typical unlabelled, not yet picked member of the cluster, typicality
    being measured among those members only with K = min(k_nn, members // 2) neighbours (the
    reference's cap for small clusters). Where the reference fails (every cluster small, or
    the clusters' unlabelled members exhausted), this goes on: exhausted clusters drop out of
    the passes and the skipped small clusters are visited, in the same order, once the others
    are exhausted.

    Cost: k-means, O(N k D) per iteration; each pick, a K-NN query within one cluster, O(m^2 D)
    for m members, memory one (rows, m) block of at most 16M distances.

    Args:
        x: Features, (L + U, D): the L labelled rows first, then the U pool rows.
        n_labelled: L.
        n: Number of picks, 1 <= n <= U.
        rng: Draws the k-means seed and orders exact ties.
        max_clusters: Cap on the number of clusters (reference: 500).
        min_cluster_size: Clusters of at most this many points are skipped (reference: 5).
        k_nn: Neighbours of the typicality (reference: 20).

    Returns:
        (n,) int64 positions in the pool (0..U-1), in pick order.
    """
    total = len(x)
    u = total - n_labelled
    k = max(1, min(n_labelled + n, max_clusters, total))
    labels = kmeans_labels(x, k, _seed(rng))
    sizes = np.bincount(labels, minlength=k)
    lab_counts = np.bincount(labels[:n_labelled], minlength=k)
    pool_labels = labels[n_labelled:]
    # unlabelled members of every cluster (pool positions, ascending)
    order = np.argsort(pool_labels, kind="stable")
    bounds = np.searchsorted(pool_labels[order], np.arange(k + 1))
    members = [order[bounds[c]:bounds[c + 1]] for c in range(k)]
    cluster_tie = tie_keys(rng, np.arange(k))
    ranked = np.lexsort((cluster_tie, -sizes, lab_counts))
    ranked = ranked[sizes[ranked] > 0]
    phases = [ranked[sizes[ranked] > min_cluster_size], ranked[sizes[ranked] <= min_cluster_size]]
    point_tie = tie_keys(rng, np.arange(u))
    picked = np.zeros(u, dtype=bool)
    picks: list[int] = []
    for phase in phases:
        while len(picks) < n:
            live = [c for c in phase if not picked[members[c]].all()]
            if not live:
                break
            for c in live:
                cand = members[c][~picked[members[c]]]
                if len(cand) == 1:
                    best = int(cand[0])
                else:
                    kk = max(1, min(k_nn, len(cand) // 2))
                    best = _best(cand, typicality(x[n_labelled + cand], kk), point_tie)
                picked[best] = True
                picks.append(best)
                if len(picks) == n:
                    break
    return np.asarray(picks, dtype=np.int64)


def _sq_distance_blocks(q: Tensor, q_sq: Tensor, x: Tensor, sq: Tensor, block: int
                        ) -> Iterator[tuple[int, Tensor]]:
    """Squared distances of the rows ``q`` to every row of ``x``, one column block at a time.

    ``||q||^2 + ||x||^2 - 2 q.x`` in float32, clamped at 0: at most (len(q), block) floats at
    once.

    Args:
        q: Query rows, (Q, D) float32.
        q_sq: Their squared norms, (Q,).
        x: All rows, (N, D) float32.
        sq: Their squared norms, (N,).
        block: Columns per block.

    Yields:
        (first column of the block, (Q, <= block) float32 squared distances).
    """
    for c0 in range(0, len(x), block):
        c1 = min(c0 + block, len(x))
        d2 = torch.addmm(sq[None, c0:c1], q, x[c0:c1].T, alpha=-2.0)
        yield c0, d2.add_(q_sq[:, None]).clamp_min_(0.0)


def _blocking(n: int, chunk: int) -> tuple[int, int]:
    """(query rows, columns) per distance block: about :data:`BLOCK_ELEMENTS` floats."""
    rows = max(1, min(int(chunk), n))
    return rows, max(1, min(n, BLOCK_ELEMENTS // rows))


def delta_ball_graph(x: np.ndarray, delta: float, max_degree: int = DEFAULT_MAX_DEGREE,
                     chunk: int = DEFAULT_CHUNK) -> sparse.csr_array:
    """The directed delta-ball graph: an edge i -> j when ``||x_i - x_j|| < delta``.

    Every node has its self-loop (its ball holds it, as in the reference, where the distance 0
    is below delta). Distances are computed in (rows, N) float32 blocks of at most ~16M entries
    (rows <= chunk) as matrix products and only the edges are kept, so memory is O(E) plus one
    block; time O(N^2 D).

    Args:
        x: Features, (N, D).
        delta: Ball radius (> 0).
        max_degree: Cap on the mean out-degree: memory stays O(N max_degree).
        chunk: Most query rows per block.

    Returns:
        (N, N) CSR adjacency, int8 ones, int32 column indices sorted within each row.

    Raises:
        DalbtError: The graph would hold more than ``max_degree`` edges per node on average.
    """
    total = len(x)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sq = (xt * xt).sum(dim=1)
    limit = int(max_degree) * total
    thr = float(delta) ** 2
    # one (rows, N) block per step: its nonzeros come in CSR order (by row, then column)
    rows = max(1, min(int(chunk), BLOCK_ELEMENTS // max(total, 1)))
    counts = np.zeros(total, dtype=np.int64)
    cols: list[np.ndarray] = []
    edges = 0
    for s in range(0, total, rows):
        stop = min(s + rows, total)
        _, d2 = next(_sq_distance_blocks(xt[s:stop], sq[s:stop], xt, sq, total))
        mask = d2 < thr
        del d2
        # self-loops whatever the rounding says (a point's ball holds it)
        mask[torch.arange(stop - s), torch.arange(s, stop)] = True
        counts[s:stop] = np.count_nonzero(mask.numpy(), axis=1)  # ~15x torch's bool sum
        edges += int(counts[s:stop].sum())
        if edges > limit:
            raise DalbtError(
                f"probcover: delta={delta:.4g} puts more than {max_degree} points in a ball on "
                f"average (over {edges:,} edges among {total:,} points); pass a smaller delta "
                f"(-O delta=..., unset = the purity rule) or a larger -O max_degree=... "
                f"(memory: about 25 bytes per edge at peak)")
        cols.append(mask.nonzero()[:, 1].to(torch.int32).numpy())
        del mask
    # int32 offsets while they fit, so that scipy keeps the int32 indices (4 bytes an edge)
    index_type = np.int32 if edges < np.iinfo(np.int32).max else np.int64
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(index_type)
    indices = np.concatenate(cols) if cols else np.empty(0, dtype=np.int32)
    del cols
    return sparse.csr_array((np.ones(len(indices), dtype=np.int8), indices, indptr),
                            shape=(total, total))


def purity_delta(x: np.ndarray, num_classes: int, rng: np.random.Generator,
                 alpha: float = DEFAULT_ALPHA, sample: int = DEFAULT_PURITY_SAMPLE,
                 chunk: int = DEFAULT_CHUNK) -> float:
    """ProbCover's delta: the largest radius at which ``alpha`` of the balls are pure.

    The paper's rule: pseudo-labels from k-means with k = ``num_classes``; the ball of radius
    delta around x is pure when every point in it has x's pseudo-label; delta is the largest
    value whose fraction of pure balls is at least ``alpha``. Exactly computed, not searched on
    a grid: the ball around x is pure iff ``delta <= r(x)``, the distance from x to the nearest
    point of another pseudo-label, so the answer is the ``(1 - alpha)`` order statistic of
    ``r``. Purity is measured on up to ``sample`` points drawn from ``rng`` (all when there are
    fewer).

    Cost: k-means with k = num_classes on all N rows (10 initialisations), then the distances
    of the S sampled points to all N rows as blocked float32 matrix products, O(S N D) time,
    O(S) memory plus one (chunk, ~16M / chunk) block. Run once per query.

    Args:
        x: Features, (N, D) (ProbCover passes them L2-normalised).
        num_classes: k of the k-means pseudo-labels.
        rng: Draws the k-means seed and the sample.
        alpha: Fraction of pure balls required, in (0, 1).
        sample: Points whose ball purity is measured.
        chunk: Sampled points per block.

    Returns:
        delta (> 0 unless points of different pseudo-labels coincide). When one pseudo-label
        holds every point, every ball is pure: just over the diameter of the data's bounding
        box.
    """
    total = len(x)
    labels = kmeans_labels(x, max(1, min(int(num_classes), total)), _seed(rng))
    if total > sample:
        chosen = np.sort(rng.choice(total, size=int(sample), replace=False))
    else:
        chosen = np.arange(total)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sq = (xt * xt).sum(dim=1)
    lab = torch.from_numpy(labels)
    rows, block = _blocking(len(chosen), chunk)
    r2 = torch.empty(len(chosen), dtype=torch.float32)
    for s in range(0, len(chosen), rows):
        q = torch.from_numpy(chosen[s : s + rows])
        best = torch.full((len(q),), float("inf"))
        q_lab = lab[q, None]
        for c0, d2 in _sq_distance_blocks(xt[q], sq[q], xt, sq, block):
            d2.masked_fill_(lab[None, c0 : c0 + d2.shape[1]] == q_lab, float("inf"))
            best = torch.minimum(best, d2.amin(dim=1))
        r2[s : s + rows] = best
    r = r2.clamp_min_(0.0).sqrt_().numpy().astype(np.float64)
    need = max(1, math.ceil(alpha * len(r)))
    delta = float(np.sort(r)[len(r) - need])
    if not math.isfinite(delta):
        span = np.asarray(x, dtype=np.float64).max(axis=0) - np.asarray(x).min(axis=0)
        delta = math.nextafter(float(np.linalg.norm(span)), math.inf)
    return delta


def probcover_positions(x: np.ndarray, n_labelled: int, n: int, delta: float,
                        rng: np.random.Generator, max_degree: int = DEFAULT_MAX_DEGREE,
                        chunk: int = DEFAULT_CHUNK, graph: sparse.csr_array | None = None
                        ) -> np.ndarray:
    """ProbCover's greedy max coverage on the delta-ball graph.

    The balls of the labelled points are covered at the start. Each step picks the pool point
    whose ball holds the most uncovered points (its out-degree once edges into covered points
    are removed) and covers its ball. Once every point is covered (all out-degrees 0), the rest
    of the budget is drawn uniformly from the pool (the reference code then keeps taking the
    argmax of all-zero degrees, i.e. its first row, which can repeat a point or return a
    labelled one). Exact ties go to a random point (the reference: the first row).

    Cost: the graph (:func:`delta_ball_graph`, O(N^2 D) time; E edges, about 10 bytes per edge
    for it and its transpose, 25 at peak while building them); each pick, O(N) for the argmax
    plus the in-edges of the points it covers (O(E) over the whole query).

    Args:
        x: L2-normalised features, (L + U, D): the L labelled rows first, then the pool.
        n_labelled: L.
        n: Number of picks, 1 <= n <= U.
        delta: Ball radius.
        rng: Orders ties and draws the random rest.
        max_degree: Cap on the graph's mean out-degree (see :func:`delta_ball_graph`).
        chunk: Query rows per distance block.
        graph: The delta-ball graph of ``x`` when the caller has it already (not rebuilt).

    Returns:
        (n,) int64 positions in the pool (0..U-1), in pick order.
    """
    total = len(x)
    u = total - n_labelled
    out = delta_ball_graph(x, delta, max_degree, chunk) if graph is None else graph
    into = out.T.tocsr()  # in-neighbours (the graph need not be exactly symmetric in floats)
    covered = np.zeros(total, dtype=bool)
    covered[out.indices[: out.indptr[n_labelled]]] = True
    # uncovered out-neighbours of every pool row (every row holds its self-loop: none is empty)
    starts = out.indptr[n_labelled:-1]
    degree = np.add.reduceat((~covered)[out.indices].view(np.int8), starts, dtype=np.int64)
    tie = tie_keys(rng, np.arange(u))
    # one int64 key per pool point: degree first, then the random tie order (all keys distinct)
    key = degree * u + (u - 1 - tie)
    picks: list[int] = []
    while len(picks) < n:
        i = int(np.argmax(key))
        if key[i] < u:  # every out-degree is 0: everything is covered
            break
        picks.append(i)
        ball = out.indices[out.indptr[n_labelled + i]: out.indptr[n_labelled + i + 1]]
        new = ball[~covered[ball]]
        covered[new] = True
        sources = into[new].indices.astype(np.int64) - n_labelled
        np.subtract.at(key, sources[sources >= 0], u)
    if len(picks) < n:
        rest = np.setdiff1d(np.arange(u), picks)
        picks.extend(rest[np.argsort(tie[rest])][: n - len(picks)].tolist())
    return np.asarray(picks, dtype=np.int64)


def round_features(ctx: QueryContext, normalise: bool) -> tuple[np.ndarray, int]:
    """(labelled latents then pool latents, (L + U, D) float32; L)."""
    pool: Tensor = ctx.pool_outputs().latents
    parts = [pool]
    if len(ctx.labelled):
        parts.insert(0, ctx.labelled_outputs().latents)
    x = np.concatenate([p.detach().cpu().numpy().astype(np.float32) for p in parts])
    if not np.isfinite(x).all():
        raise DalbtError("the latents hold NaN or infinite values: the encoder diverged; "
                         "retrain it (or lower the learning rate)")
    return (l2_normalise(x) if normalise else x), len(ctx.labelled)


class TypiClustStrategy(Strategy):
    """TypiClust (Hacohen, Dekel & Weinshall, 2022, "Active Learning on a Budget: Opposite
    Strategies Suit High and Low Budgets", ICML).

    At low budgets, label typical points of regions not yet represented: cluster the encoder
    latents of the labelled set and the pool with k-means into ``min(L + budget, 500)``
    clusters, visit the clusters with the fewest labelled points first (then the largest,
    skipping clusters of at most 5 points), and from each take its most typical unlabelled
    point, typicality being the inverse mean distance to the K = 20 nearest neighbours within
    the cluster (fewer in small clusters). See :func:`typiclust_positions` for the details and
    the behaviour where the reference code fails.

    Deviations from the reference code: typicality uses Euclidean distances, as the paper
    defines it (the reference averages squared distances); features are the round's encoder
    latents (the reference: fixed SimCLR features), L2-normalised as the reference loads them
    unless ``normalize=False``; ties go to random points from the query's generator.

    Args:
        max_clusters: Cap on the number of k-means clusters (paper: 500).
        min_cluster_size: Skip clusters of at most this many points (reference: 5).
        k_nn: Neighbours of the typicality (paper: 20).
        normalize: L2-normalise the latents first (as the reference's features).
    """

    name = "typiclust"
    description = ("TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): most typical point of "
                   "the least-labelled k-means clusters")
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})
    label_free = True

    def __init__(self, max_clusters: PositiveInt = MAX_NUM_CLUSTERS,
                 min_cluster_size: NonNegativeInt = MIN_CLUSTER_SIZE,
                 k_nn: PositiveInt = K_NN, normalize: bool = True) -> None:
        if int(max_clusters) < 1 or int(k_nn) < 1 or int(min_cluster_size) < 0:
            raise ValueError("max_clusters and k_nn must be >= 1, min_cluster_size >= 0")
        self.max_clusters = int(max_clusters)
        self.min_cluster_size = int(min_cluster_size)
        self.k_nn = int(k_nn)
        self.normalize = bool(normalize)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        x, n_lab = round_features(ctx, self.normalize)
        pos = typiclust_positions(x, n_lab, n, ctx.rng, self.max_clusters,
                                  self.min_cluster_size, self.k_nn)
        return ctx.unlabelled[pos]


class ProbCoverStrategy(Strategy):
    """ProbCover (Yehuda, Dekel, Hacohen & Weinshall, 2022, "Active Learning Through a Covering
    Lens", NeurIPS).

    Max probability coverage: on L2-normalised encoder latents, put a ball of radius delta
    around every point and greedily pick the pool point whose ball covers the most points not
    yet covered, the labelled points' balls being covered from the start; once everything is
    covered, the rest of the budget is uniform. delta defaults to the paper's purity rule
    (:func:`purity_delta`: the largest delta at which ``alpha`` = 0.95 of the balls are pure
    with respect to k-means pseudo-labels with k = number of classes), computed on the query's
    features; it costs a k-means and an O(S N D) neighbour query (S = ``purity_sample``),
    which a fixed ``delta`` avoids. A later query on the same images with the same features (a
    frozen encoder) reuses delta and the ball graph. See :func:`probcover_positions`.

    Deviations from the reference code: features are the round's encoder latents (the
    reference: fixed SimCLR features, given delta); when everything is covered the rest is
    random (the reference repeats its first row); ties go to random points.

    Args:
        delta: Ball radius on the unit sphere; None (default): the purity rule.
        alpha: Fraction of pure balls the purity rule requires (paper: 0.95).
        purity_sample: Points whose ball purity the rule measures.
        max_degree: Refuse a delta whose graph has more edges per point than this on average
            (memory: about 10 bytes per edge, 25 at peak).
    """

    name = "probcover"
    description = ("ProbCover (Yehuda et al., NeurIPS 2022): greedy max coverage of delta-balls "
                   "on latents, delta by ball purity")
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})
    label_free = True

    def __init__(self, delta: PositiveFloat | None = None, alpha: OpenUnit = DEFAULT_ALPHA,
                 purity_sample: PositiveInt = DEFAULT_PURITY_SAMPLE,
                 max_degree: PositiveInt = DEFAULT_MAX_DEGREE) -> None:
        if delta is not None and not float(delta) > 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if not 0 < float(alpha) < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.delta = None if delta is None else float(delta)
        self.alpha = float(alpha)
        self.purity_sample = int(purity_sample)
        self.max_degree = int(max_degree)
        self.last_delta: float | None = None  # the radius of the last query (for reports)
        # (digest of the features by dataset index, delta, graph in dataset-index order)
        self._cache: tuple[bytes, float, sparse.csr_array] | None = None

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        x, n_lab = round_features(ctx, True)
        rows = np.concatenate([np.asarray(ctx.labelled, dtype=np.int64)[:n_lab], ctx.unlabelled])
        order = np.argsort(rows, kind="stable")
        digest = hashlib.blake2b(np.ascontiguousarray(x[order]).tobytes()
                                 + rows[order].tobytes() + repr(self.delta).encode(),
                                 digest_size=16).digest()
        if self._cache is not None and self._cache[0] == digest:
            # The same points and features as the last query (a frozen encoder): delta and
            # the graph are functions of them, reused in this query's row order.
            delta, sorted_graph = self._cache[1], self._cache[2]
        else:
            if self.delta is not None:
                delta = self.delta
            elif ctx.num_classes < 1:
                raise DalbtError("probcover chooses delta from k-means with k = the number "
                                 "of classes, which is unknown here: pass num_classes=... "
                                 "or a delta (-O delta=...)")
            else:
                delta = purity_delta(x, ctx.num_classes, ctx.rng, self.alpha,
                                     self.purity_sample)
            sorted_graph = delta_ball_graph(x[order], delta, self.max_degree)
            self._cache = (digest, delta, sorted_graph)
        self.last_delta = delta
        where = np.empty_like(order)
        where[order] = np.arange(len(order))  # row i of x is row where[i] of the sorted graph
        graph = sparse.csr_array(sorted_graph[where][:, where])
        graph.sort_indices()
        pos = probcover_positions(x, n_lab, n, delta, ctx.rng, self.max_degree, graph=graph)
        return ctx.unlabelled[pos]


STRATEGY_CLASSES = (TypiClustStrategy, ProbCoverStrategy)
