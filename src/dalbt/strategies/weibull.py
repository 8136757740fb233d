"""DALBT's Weibull (extreme-value) outlier sampling, paper Algorithm 1.

Per class, the latents of the correctly classified labelled samples give a class mean and the
distances of those samples to it; the largest distances (the tail) are fitted with a Weibull
exactly as libMR's ``FitHigh`` does. Each unlabelled sample is scored by the Weibull CDF of its
distance (its outlier probability) and the most outlying samples are queried first.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, get_args, overload

import numpy as np
import torch
from scipy.optimize import brentq
from torch import Tensor

from dalbt.options import Fraction, PositiveInt
from dalbt.strategies.base import (
    LABELLED_OUTPUTS,
    POOL_OUTPUTS,
    QueryContext,
    Strategy,
    top_k,
    top_k_balanced,
)

TRANSLATE_AMOUNT = 10000.0  # libMR's default shift of the tail before fitting
Distance = Literal["euclidean", "cosine", "eucos"]
Assignment = Literal["predicted", "nearest", "all"]
Direction = Literal["outlier", "inlier"]
DISTANCES: tuple[str, ...] = get_args(Distance)
ASSIGNMENTS: tuple[str, ...] = get_args(Assignment)
DIRECTIONS: tuple[str, ...] = get_args(Direction)

log = logging.getLogger(__name__)


def _classes(cs: list[int]) -> str:
    return ("class " if len(cs) == 1 else "classes ") + ", ".join(str(c) for c in cs)


@dataclass(frozen=True)
class WeibullTail:
    """A two-parameter Weibull fitted to the translated tail of one class (libMR FitHigh).

    Attributes:
        shape: Weibull shape k.
        scale: Weibull scale lambda (in translated units).
        small_score: The smallest value of the tail; data are shifted by
            ``TRANSLATE_AMOUNT - small_score`` before the CDF is evaluated.
    """

    shape: float
    scale: float
    small_score: float

    def translate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) + TRANSLATE_AMOUNT - self.small_score

    def log_hazard(self, x: np.ndarray) -> np.ndarray:
        """``log(-log(1 - CDF(x)))``: a strictly increasing function of the outlier probability
        that does not saturate at 1.0 in floating point, so it ranks exactly like the CDF."""
        t = self.translate(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = self.shape * (np.log(t) - math.log(self.scale))
        return np.where(t > 0, out, -np.inf)

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """Outlier probability ``1 - exp(-(t / scale) ** shape)`` (libMR ``W_score``), in [0, 1]."""
        return hazard_probability(self.log_hazard(x))


def hazard_probability(log_hazard: np.ndarray) -> np.ndarray:
    """The outlier probability ``1 - exp(-exp(h))`` of log cumulative hazards ``h``, in [0, 1]."""
    return -np.expm1(-np.exp(log_hazard))


def fit_weibull_mle(x: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood shape and scale of a two-parameter Weibull (location 0).

    Solves the profile equation ``sum(x^k ln x) / sum(x^k) - 1/k - mean(ln x) = 0`` for k on
    data rescaled by their maximum (so huge shapes, as libMR's translated tails give, do not
    overflow), then ``scale = (mean(x^k))^(1/k)``.

    Args:
        x: Positive samples, (n,) with n >= 2 and not all equal.

    Returns:
        (shape, scale).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2 or np.any(x <= 0) or np.ptp(x) == 0:
        raise ValueError("Weibull MLE needs at least two distinct positive values")
    top = x.max()
    lx = np.log(x / top)  # <= 0, with max 0
    mean_lx = lx.mean()

    def profile(k: float) -> float:
        w = np.exp(k * lx)
        return float((w * lx).sum() / w.sum() - 1.0 / k - mean_lx)

    lo, hi = 1e-6, 1.0
    while profile(hi) < 0:
        hi *= 4.0
        if hi > 1e15:
            raise ValueError("Weibull MLE did not converge")
    shape = brentq(profile, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=500)
    scale = top * math.exp(math.log(np.exp(shape * lx).mean()) / shape)
    return float(shape), float(scale)


def fit_high(data: np.ndarray, tailsize: int) -> WeibullTail:
    """libMR ``FitHigh``: fit the ``tailsize`` largest values after translating them.

    Args:
        data: Scores (here distances to a class mean), (n,).
        tailsize: Number of largest values to fit (clipped to n).

    Returns:
        The fitted :class:`WeibullTail`.
    """
    data = np.asarray(data, dtype=np.float64).ravel()
    tail = np.sort(data)[::-1][: max(1, min(int(tailsize), data.size))]
    small = float(tail[-1])
    shape, scale = fit_weibull_mle(tail + TRANSLATE_AMOUNT - small)
    return WeibullTail(shape=shape, scale=scale, small_score=small)


def pairwise_distance(z: Tensor, means: Tensor, metric: str, chunk: int = 65536) -> Tensor:
    """Distances of every row of ``z`` to every class mean, computed in row chunks.

    Args:
        z: Latents, (N, D).
        means: Class means, (K, D).
        metric: ``euclidean``, ``cosine`` (1 - cosine similarity) or ``eucos``
            (OpenMax: euclidean / 200 + cosine).
        chunk: Rows per block; memory stays O(chunk * D + N * K).

    Returns:
        (N, K) float64 array of distances computed in float32 (O(N K D) matmul work).
    """
    if metric not in DISTANCES:
        raise ValueError(f"unknown distance {metric!r}; choose one of {', '.join(DISTANCES)}")
    m = means.float()
    # Distances are shift-invariant: centring on the means keeps the norms small, so the
    # float32 expansion |z|^2 + |m|^2 - 2 z.m loses little to cancellation.
    centre = m.mean(0)
    m0 = m - centre
    m_sq = (m0 * m0).sum(1)
    m_unit = torch.nn.functional.normalize(m, dim=1)
    out = torch.empty(len(z), len(m), dtype=torch.float64)
    for start in range(0, len(z), chunk):
        zc = z[start : start + chunk].float()
        if metric in ("euclidean", "eucos"):
            z0 = zc - centre
            d2 = (z0 * z0).sum(1, keepdim=True) + m_sq - 2.0 * (z0 @ m0.T)
            d = d2.clamp_min_(0).sqrt_()
        if metric in ("cosine", "eucos"):
            cos = 1.0 - torch.nn.functional.normalize(zc, dim=1) @ m_unit.T
            d = cos if metric == "cosine" else d / 200.0 + cos
        out[start : start + chunk] = d
    return out


class WeibullStrategy(Strategy):
    """DALBT Weibull sampling (Mandivarapu et al., "Deep Active Learning using Barlow Twins",
    arXiv 2212.14658, Algorithm 1; tail fit as libMR / DAL-OSR).

    Args:
        distance: Latent distance to a class mean: ``euclidean`` (default), ``cosine`` or
            ``eucos``. The paper does not say which.
        assign: Which class an unlabelled sample is scored against: ``predicted`` (default, the
            classifier's prediction, as OpenMax), ``nearest`` (the nearest class mean) or
            ``all`` (outlier to every class: the minimum outlier probability over classes).
        tail_frac: Fraction of each class's correct samples fitted (libMR tail size).
        min_tail: Smallest tail size; a class with fewer correct samples (or whose tail
            distances are all equal) has no model of its own and uses the Weibull fitted on
            all classes' distances pooled.
        direction: ``outlier`` (default, the paper: highest outlier probability first) or
            ``inlier`` (lowest first, what DAL-OSR's code does by its sign bug; an ablation).
        balance: Take the batch round-robin over the assigned classes (the best-scoring sample
            of every class, then the second best, ...) instead of one global ranking, so that
            one class whose Weibull is tight cannot take the whole batch. Off in the paper.

    Samples are queried by decreasing outlier probability; probabilities that round to 1.0 are
    ordered by the exact log cumulative hazard, which is monotone in the probability.
    """

    name = "weibull"
    description = "DALBT: query the highest Weibull outlier probability of latent distances"
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})

    def __init__(self, distance: Distance = "euclidean", assign: Assignment = "predicted",
                 tail_frac: Fraction = 0.5, min_tail: PositiveInt = 3,
                 direction: Direction = "outlier", balance: bool = False) -> None:
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")
        if assign not in ASSIGNMENTS:
            raise ValueError(f"unknown class assignment {assign!r}; choose one of {ASSIGNMENTS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
        if not 0 < tail_frac <= 1:
            raise ValueError(f"tail_frac must be in (0, 1], got {tail_frac}")
        self.distance = distance
        self.assign = assign
        self.tail_frac = tail_frac
        self.min_tail = max(2, int(min_tail))
        self.direction = direction
        self.balance = bool(balance)

    def fit(self, latents: Tensor, targets: np.ndarray, predictions: np.ndarray, num_classes: int
            ) -> tuple[Tensor, list[WeibullTail | None]]:
        """Fit class means and tails on the correctly classified labelled latents.

        Args:
            latents: Labelled latents, (L, D).
            targets: Their labels, (L,).
            predictions: The model's predictions for them, (L,).
            num_classes: K.

        Returns:
            Class means (K, D) (NaN rows for classes with no correct sample) and one
            :class:`WeibullTail` per class (None where it could not be fitted).
        """
        correct = targets == predictions
        means = torch.full((num_classes, latents.shape[1]), float("nan"), dtype=torch.float64)
        dists: list[np.ndarray] = []
        for c in range(num_classes):
            zc = latents[torch.from_numpy(correct & (targets == c))]
            if len(zc):
                means[c] = zc.double().mean(0)
                dists.append(pairwise_distance(zc, means[c : c + 1], self.distance)[:, 0].numpy())
            else:
                dists.append(np.empty(0))
        tails = [self._tail(d) for d in dists]
        pooled = self._tail(np.concatenate(dists)) if dists else None
        self._warn_degenerate(dists, tails, pooled)
        return means, [t if t is not None else pooled for t in tails]

    def _warn_degenerate(self, dists: list[np.ndarray], tails: list[WeibullTail | None],
                         pooled: WeibullTail | None) -> None:
        """Log, as one warning, each class whose fit fell back, and the fallback used."""
        no_mean = [c for c, d in enumerate(dists) if not len(d)]
        no_tail = [c for c, (d, t) in enumerate(zip(dists, tails, strict=True))
                   if len(d) and t is None]
        notes = []
        if no_mean:
            notes.append(f"{_classes(no_mean)}: no correctly classified labelled image, so no "
                         "class mean; pool images assigned to them score +inf (most outlying) "
                         "and are ordered at random")
        if no_tail:
            fallback = ("the Weibull fitted on all classes' distances pooled" if pooled is not None
                        else "the raw distance to the class mean (no class has a tail either)")
            notes.append(f"{_classes(no_tail)}: fewer than min_tail={self.min_tail} distinct "
                         f"tail distances; scored with {fallback}")
        if notes:
            log.warning("%s: degenerate Weibull fit: %s", self.name, "; ".join(notes))

    def _tail(self, d: np.ndarray) -> WeibullTail | None:
        size = max(self.min_tail, math.ceil(self.tail_frac * len(d)))
        top = np.sort(d)[::-1][:size]
        if len(top) < self.min_tail or np.ptp(top) == 0:
            return None
        return fit_high(d, size)

    @overload
    def log_hazards(self, z: Tensor, predictions: Tensor, means: Tensor,
                    tails: list[WeibullTail | None], return_assigned: Literal[False] = ...
                    ) -> np.ndarray: ...

    @overload
    def log_hazards(self, z: Tensor, predictions: Tensor, means: Tensor,
                    tails: list[WeibullTail | None], return_assigned: Literal[True]
                    ) -> tuple[np.ndarray, np.ndarray]: ...

    def log_hazards(self, z: Tensor, predictions: Tensor, means: Tensor,
                    tails: list[WeibullTail | None], return_assigned: bool = False
                    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Outlier score of each sample as a log cumulative hazard (monotone in probability).

        Args:
            z: Pool latents, (N, D).
            predictions: Predicted classes, (N,).
            means: Class means, (K, D).
            tails: Per-class tails.
            return_assigned: Also return the class each sample was scored against.

        Returns:
            (N,) float64 scores; higher = more outlying. Where no class has a model the score is
            the raw distance to the assigned class mean (or +inf if no class has a mean).
            With ``return_assigned``, a tuple (scores, assigned classes (N,)); for ``all`` the
            assigned class is the one giving the minimum.
        """
        n, k = len(z), len(tails)
        valid = ~torch.isnan(means[:, 0])
        if not valid.any():
            out = np.full(n, np.inf)
            return (out, predictions.numpy()) if return_assigned else out
        d = pairwise_distance(z, torch.nan_to_num(means), self.distance).numpy()
        d[:, ~valid.numpy()] = np.inf  # classes with no mean: infinitely far
        u = np.full((n, k), np.inf)
        for c, tail in enumerate(tails):
            if tail is not None and valid[c]:
                u[:, c] = tail.log_hazard(d[:, c])
            elif valid[c]:
                u[:, c] = d[:, c]
        if self.assign == "predicted":
            assigned = predictions.numpy()
        elif self.assign == "nearest":
            assigned = d.argmin(axis=1)
        else:
            assigned = u.argmin(axis=1)
        out = u[np.arange(n), assigned]
        return (out, assigned) if return_assigned else out

    def rank(self, lab_latents: Tensor, lab_targets: np.ndarray, lab_predictions: np.ndarray,
             pool_latents: Tensor, pool_predictions: Tensor, pool_indices: np.ndarray, k: int,
             num_classes: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The ``k`` pool samples to query: fit on the labelled latents, score the pool, and
        take the most outlying (``direction="inlier"``: the least), one global ranking or, with
        ``balance``, round-robin over the classes the samples were scored against.

        Args:
            lab_latents: Labelled latents, (L, D).
            lab_targets: Their labels, (L,).
            lab_predictions: Their predicted classes, (L,).
            pool_latents: Pool latents, (U, D).
            pool_predictions: Pool predicted classes, (U,).
            pool_indices: Dataset indices of the pool, (U,).
            k: How many to return (<= U).
            num_classes: K.
            rng: The query's generator, which orders equal scores.

        Returns:
            (k,) int64 dataset indices in query order.
        """
        means, tails = self.fit(lab_latents, lab_targets, lab_predictions, num_classes)
        scores, assigned = self.log_hazards(pool_latents, pool_predictions, means, tails,
                                            return_assigned=True)
        if self.direction == "inlier":
            scores = -scores
        if self.balance:
            return top_k_balanced(scores, assigned, pool_indices, k, rng=rng)
        return top_k(scores, pool_indices, k, rng=rng)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        lab = ctx.labelled_outputs()
        pool = ctx.pool_outputs()
        return self.rank(lab.latents, ctx.labelled_targets, lab.predictions.numpy(),
                         pool.latents, pool.predictions, ctx.unlabelled, n, ctx.num_classes,
                         rng=ctx.rng)


class WeibullBalancedStrategy(WeibullStrategy):
    """DALBT's Weibull sampling with a class-balanced batch: the best variant of the Fashion-MNIST
    ablation in BENCHMARKS.md (``weibull`` with ``balance=True``; every other option as there).

    The batch is taken round-robin over the predicted classes, most outlying first within each,
    so one class whose Weibull is tight cannot take the whole batch (with the paper's global
    ranking up to 86 % of a Fashion-MNIST batch came from one class).
    """

    name = "weibull-balanced"
    description = ("DALBT Weibull outlier sampling, batch taken round-robin over predicted "
                   "classes")

    def __init__(self, distance: Distance = "euclidean", assign: Assignment = "predicted",
                 tail_frac: Fraction = 0.5, min_tail: PositiveInt = 3,
                 direction: Direction = "outlier", balance: bool = True) -> None:
        super().__init__(distance=distance, assign=assign, tail_frac=tail_frac,
                         min_tail=min_tail, direction=direction, balance=balance)


STRATEGY_CLASSES = (WeibullStrategy, WeibullBalancedStrategy)
