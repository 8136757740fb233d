"""``dalbt``: the DALBT family's budget-aware rule (Weibull inliers, typical first, then margin).

The paper's Weibull sampling queries the samples that are most outlying to their class, which on
Fashion-MNIST loses to random (BENCHMARKS.md): an extreme-value model is an open-set detector,
and the most outlying images are the least useful ones to label, or images of no known class at
all. This rule uses the per-class Weibull models for what they are good at, telling inliers from
outliers, and spends the budget where measurements show labels pay at each budget:

1. Outliers to every class are skipped: once every class has its own Weibull model (at least
   ``min_tail`` correctly classified labels), a pool sample whose Weibull outlier probability
   exceeds ``outlier_cut`` for every class (the minimum over classes) is not queried while
   enough other samples remain. Before that, a sample far from every class mean may just be
   an unlabelled region of a known class, which the typical picks are there to cover.
2. While classes are thinly labelled, typical samples first: a share
   ``typical_scale / (typical_scale + L / K)`` of the batch (L labels, K classes; the whole
   batch before any label) is picked by TypiClust among the inliers.
3. The rest of the batch: the smallest softmax margin among the remaining inliers.
"""

from __future__ import annotations

import numpy as np
import torch

from dalbt.options import Fraction, NonNegativeFloat, PositiveInt
from dalbt.strategies.base import LABELLED_OUTPUTS, POOL_OUTPUTS, QueryContext, Strategy, top_k
from dalbt.strategies.typicality import (
    K_NN,
    MAX_NUM_CLUSTERS,
    MIN_CLUSTER_SIZE,
    round_features,
    typiclust_positions,
)
from dalbt.strategies.uncertainty import chunked_scores, margin_from_logits
from dalbt.strategies.weibull import WeibullStrategy, hazard_probability

#: Defaults of the rule, fixed for every dataset (see README, "The dalbt rule").
TYPICAL_SCALE = 2.0
OUTLIER_CUT = 0.5


def typical_count(n: int, n_labelled: int, num_classes: int, scale: float) -> int:
    """How many of a batch of ``n`` are typical picks: ``round(n * s / (s + L / K))``.

    Args:
        n: Batch size.
        n_labelled: L, labels so far.
        num_classes: K.
        scale: s (``typical_scale``); 0 gives no typical pick once any label exists.

    Returns:
        An int in [0, n]; n before any label.
    """
    if n_labelled == 0:
        return n
    if scale <= 0:
        return 0
    per_class = n_labelled / max(1, num_classes)
    return int(min(n, max(0, round(n * scale / (scale + per_class)))))


class DalbtStrategy(Strategy):
    """The DALBT family's rule: typical first while classes are thin, then margin, both among
    the per-class Weibull inliers (Mandivarapu et al., arXiv 2212.14658, for the Weibull models;
    Hacohen et al., ICML 2022, for the typical picks).

    With L labels over K classes, a batch of n takes ``n_t = round(n s / (s + L / K))`` typical
    picks (TypiClust on the L2-normalised latents) and ``n - n_t`` of the smallest softmax
    margin; both choose only among the pool samples whose outlier probability to their
    best-fitting class is at most ``outlier_cut`` (all samples, ordered by that probability,
    when fewer than n remain). Before any label the whole batch is TypiClust's, which makes the
    rule a cold-start strategy too.

    Args:
        typical_scale: s, the labels per class at which half the batch is typical (0: margin
            only once any label exists).
        outlier_cut: Pool samples whose Weibull outlier probability to every class exceeds this
            are skipped (1: none are).
        tail_frac: Fraction of each class's correct labelled samples in its Weibull tail.
        min_tail: Smallest Weibull tail.
        k_nn: TypiClust's neighbours (paper: 20).
        max_clusters: TypiClust's cap on clusters (paper: 500).
    """

    name = "dalbt"
    description = ("DALBT rule (this library): typical first while classes are thin "
                   "(TypiClust, ICML 2022), then margin, among per-class Weibull inliers "
                   "(DALBT, arXiv 2212.14658)")
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})
    label_free = True

    def __init__(self, typical_scale: NonNegativeFloat = TYPICAL_SCALE,
                 outlier_cut: Fraction = OUTLIER_CUT, tail_frac: Fraction = 0.5,
                 min_tail: PositiveInt = 3, k_nn: PositiveInt = K_NN,
                 max_clusters: PositiveInt = MAX_NUM_CLUSTERS) -> None:
        if typical_scale < 0 or not 0 < outlier_cut <= 1:
            raise ValueError("need typical_scale >= 0 and outlier_cut in (0, 1]")
        self.typical_scale = float(typical_scale)
        self.outlier_cut = float(outlier_cut)
        # DALBT's per-class models; "all": the minimum outlier probability over the classes
        self.weibull = WeibullStrategy(assign="all", tail_frac=tail_frac, min_tail=min_tail)
        self.k_nn = int(k_nn)
        self.max_clusters = int(max_clusters)

    def outlier_probability(self, ctx: QueryContext) -> np.ndarray | None:
        """Each pool sample's Weibull outlier probability to its best-fitting class, (U,).

        The per-class models are DALBT's (class means and libMR tails of the correctly
        classified labelled latents, Euclidean distances); the minimum over classes is high
        only for an outlier to every class. None until every class has ``min_tail`` correctly
        classified labels (its own model).
        """
        if len(ctx.labelled) == 0:
            return None
        lab, pool = ctx.labelled_outputs(), ctx.pool_outputs()
        targets, predicted = np.asarray(ctx.labelled_targets), lab.predictions.numpy()
        correct = targets[predicted == targets]
        if np.bincount(correct, minlength=ctx.num_classes).min() < self.weibull.min_tail:
            return None
        means, tails = self.weibull.fit(lab.latents, targets, predicted, ctx.num_classes)
        return hazard_probability(self.weibull.log_hazards(pool.latents, pool.predictions,
                                                           means, tails))

    def inlier_positions(self, ctx: QueryContext, n: int) -> np.ndarray:
        """Pool positions the rule may choose from: the Weibull inliers, or the ``n`` least
        outlying when fewer remain; all positions until every class has its own Weibull model
        (see :meth:`outlier_probability`). (M,) ascending."""
        prob = self.outlier_probability(ctx) if self.outlier_cut < 1 else None
        if prob is None:
            return np.arange(len(ctx.unlabelled))
        inliers = np.flatnonzero(prob <= self.outlier_cut)
        if len(inliers) >= n:
            return inliers
        return np.sort(np.argsort(prob, kind="stable")[:n])

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        allowed = self.inlier_positions(ctx, n)
        n_typ = typical_count(n, len(ctx.labelled), ctx.num_classes, self.typical_scale)
        picks = np.empty(0, dtype=np.int64)
        if n_typ:
            x, n_lab = round_features(ctx, normalise=True)
            x = np.concatenate([x[:n_lab], x[n_lab + allowed]])
            picks = allowed[typiclust_positions(x, n_lab, n_typ, ctx.rng, self.max_clusters,
                                                MIN_CLUSTER_SIZE, self.k_nn)]
        if n_typ == n:
            return ctx.unlabelled[picks]
        rest = np.setdiff1d(allowed, picks)
        logits = ctx.pool_outputs().logits[torch.as_tensor(rest)]
        margin = chunked_scores(logits, margin_from_logits)
        more = top_k(margin, ctx.unlabelled[rest], n - n_typ, rng=ctx.rng)
        return np.concatenate([ctx.unlabelled[picks], more])


STRATEGY_CLASSES = (DalbtStrategy,)
