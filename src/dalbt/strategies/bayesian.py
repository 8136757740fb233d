"""Bayesian (MC-dropout) acquisition functions: max entropy, BALD, variation ratios and
BatchBALD.

All of them score the T MC-dropout samples of the pool, ``ctx.mc_probs(T)`` of shape (U, T, K):
the run's models are trained with dropout ``dropout`` on the latent before the classifier
(``Strategy.train_dropout``) and the T dropout masks are drawn from the query's generator, so
the scores are reproducible. Deviation from Gal et al.: dropout is applied only before the
linear classifier (the package's DALBT network), not after every layer, so the encoder is
deterministic and MC sampling costs one encoder pass per image.

The MC probabilities are computed in :meth:`prepare` (timed as scoring); per-sample scores are
evaluated in chunks of the pool in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from dalbt.options import OpenUnit, PositiveInt, Range
from dalbt.strategies.base import QueryContext, Strategy, tie_keys, top_k

# Elements (rows x T x K, or configurations x rows x K for BatchBALD) processed at a time.
CHUNK_ELEMENTS = 1 << 21


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) along ``dim`` with 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(dim=dim)


def _chunked(probs: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a per-sample score to (U, T, K) MC probabilities in float64 row chunks.

    Args:
        probs: (U, T, K) probabilities.
        fn: Maps (B, T, K) float64 probabilities to (B,) scores.

    Returns:
        (U,) float64 scores.
    """
    u, t, k = probs.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, t * k))
    out = torch.empty(u, dtype=torch.float64)
    for start in range(0, u, rows):
        out[start : start + rows] = fn(probs[start : start + rows].double())
    return out


def mean_entropy(probs: Tensor) -> Tensor:
    """Entropy of the MC-averaged prediction ``H[mean_t p_t]``: (U, T, K) -> (U,)."""
    return _chunked(probs, lambda p: _entropy(p.mean(dim=1)))


def expected_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of the MC samples ``mean_t H[p_t]`` (the conditional entropy
    ``E_w H[y | x, w]``): (U, T, K) -> (U,)."""
    return _chunked(probs, lambda p: _entropy(p).mean(dim=1))


def bald_scores(probs: Tensor) -> Tensor:
    """BALD mutual information ``H[mean_t p_t] - mean_t H[p_t]``: (U, T, K) -> (U,) >= 0."""
    return _chunked(probs, lambda p: _entropy(p.mean(dim=1)) - _entropy(p).mean(dim=1))


def modal_counts(probs: Tensor) -> Tensor:
    """How many of the T samples predict the most frequent class: (U, T, K) -> (U,) int64."""
    def fn(p: Tensor) -> Tensor:
        counts = torch.zeros(p.shape[0], p.shape[2], dtype=torch.float64)
        counts.scatter_add_(1, p.argmax(dim=2), torch.ones(p.shape[:2], dtype=torch.float64))
        return counts.max(dim=1).values

    return _chunked(probs, fn).long()


class _McDropoutStrategy(Strategy):
    """Common options of the MC-dropout strategies.

    Args:
        samples: Number of MC-dropout samples T (>= 2).
        dropout: Dropout rate the run's models are trained with, in (0, 1).
    """

    def __init__(self, samples: Annotated[int, Range(2)] = 20, dropout: OpenUnit = 0.5) -> None:
        if isinstance(samples, bool) or int(samples) != samples or samples < 2:
            raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
        if not 0.0 < float(dropout) < 1.0:
            raise ValueError(f"dropout must be in (0, 1), got {dropout!r}")
        self.samples = int(samples)
        self.train_dropout = float(dropout)

    def prepare(self, ctx: QueryContext) -> None:
        self.mc_probs(ctx)

    def mc_probs(self, ctx: QueryContext) -> Tensor:
        """The pool's MC-dropout probabilities, (U, T, K), checked for shape."""
        probs = ctx.mc_probs(self.samples)
        expected = (len(ctx.unlabelled), self.samples, ctx.num_classes)
        if tuple(probs.shape) != expected:
            raise RuntimeError(f"MC scorer returned shape {tuple(probs.shape)}, "
                               f"expected {expected}")
        return probs


class McDropoutEntropyStrategy(_McDropoutStrategy):
    """Max entropy with MC dropout (Gal & Ghahramani, "Dropout as a Bayesian Approximation:
    Representing Model Uncertainty in Deep Learning", ICML 2016; as the "Max Entropy"
    acquisition of Gal, Islam & Ghahramani, "Deep Bayesian Active Learning with Image Data",
    ICML 2017).

    Queries the samples with the largest entropy of the predictive distribution approximated by
    averaging T dropout samples, ``H[(1/T) sum_t p(y | x, w_t)]``. It measures total
    uncertainty: both aleatoric (every sample uncertain) and epistemic (samples disagree).
    """

    name = "mc-dropout"
    description = "MC dropout: query the highest entropy of the mean dropout prediction"

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        return top_k(mean_entropy(self.mc_probs(ctx)), ctx.unlabelled, n, rng=ctx.rng)


class BaldStrategy(_McDropoutStrategy):
    """BALD with MC dropout (Houlsby, Huszar, Ghahramani & Lengyel, "Bayesian Active Learning
    for Classification and Preference Learning", arXiv 2011; MC-dropout estimator of Gal,
    Islam & Ghahramani, "Deep Bayesian Active Learning with Image Data", ICML 2017).

    Queries the samples with the largest mutual information between their label and the model
    weights, ``I[y; w | x] = H[mean_t p_t] - mean_t H[p_t]``: samples on which the dropout
    samples are individually confident but disagree (epistemic uncertainty), not those that
    every dropout sample finds ambiguous. The top-k batch ignores redundancy between the picks.
    """

    name = "bald"
    description = "BALD: query the highest MC-dropout mutual information between label and weights"

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        return top_k(bald_scores(self.mc_probs(ctx)), ctx.unlabelled, n, rng=ctx.rng)


class VariationRatioStrategy(_McDropoutStrategy):
    """Variation ratios with MC dropout (Freeman, "Elementary Applied Statistics", 1965; as
    used by Gal, Islam & Ghahramani, "Deep Bayesian Active Learning with Image Data", ICML 2017).

    Queries the samples with the largest ``1 - f_m / T``, where ``f_m`` is the number of the T
    dropout samples whose predicted class is the modal one: the samples on whose predicted
    class the dropout samples disagree most. The score has only T distinct values, so ties are
    broken by the entropy of the mean prediction (the score is ``(T - f_m) + H / (2 log K)``,
    whose fractional part never reaches the next integer), then by dataset index.
    """

    name = "var-ratio"
    description = "Variation ratios: query the most disagreement among MC-dropout predicted classes"

    def scores(self, probs: Tensor) -> Tensor:
        """Tie-broken variation-ratio scores: (U, T, K) -> (U,) float64."""
        disagree = (probs.shape[1] - modal_counts(probs)).double()
        k = probs.shape[2]
        if k < 2:
            return disagree
        return disagree + mean_entropy(probs) / (2.0 * math.log(k))

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        return top_k(self.scores(self.mc_probs(ctx)), ctx.unlabelled, n, rng=ctx.rng)


class BatchBaldStrategy(_McDropoutStrategy):
    """BatchBALD (Kirsch, van Amersfoort & Gal, "BatchBALD: Efficient and Diverse Batch
    Acquisition for Deep Bayesian Active Learning", NeurIPS 2019).

    Builds the batch greedily: pick ``n`` maximises the joint mutual information
    ``I[y_1..y_n; w] = H[y_1..y_n] - sum_i E_w H[y_i | w]`` with the ``n - 1`` earlier picks, so a
    sample whose information the batch already holds (a duplicate) gains nothing. The first pick
    is the BALD maximiser. The joint entropy of the picks ``y_1..y_m`` is over configurations
    of their labels: while there are at most ``max_exact_configs`` of them (``K^m``, default
    ``num_samples``, as the reference implementation) all are enumerated exactly; beyond that,
    ``num_samples`` configurations are sampled (``num_samples // T`` per dropout sample, from
    ``ctx.rng``) and the joint entropy is the importance-weighted estimate of the paper.
    With ``P_t(y)`` the probability of configuration y under dropout sample t, candidate x's
    joint entropy is ``H[y_1..y_m] + sum_y omega_y H[sum_t pi_yt p_t(.|x)]`` where
    ``pi_yt = P_t(y) / sum_t' P_t'(y)`` and ``omega_y = P(y)`` (exact) or ``1 / M`` (sampled);
    the first term is the same for every candidate, so only the second is computed (in log
    space, so long batches do not underflow).

    Deviations: sampled configurations are extended with a label drawn for each new pick (from
    the pick's prediction under the configuration's own dropout sample) instead of being
    redrawn from scratch at every step; both draw from the same joint distribution.

    Complexity: per pick O(U' * M * T * K) time, with U' the candidates and M the number of
    configurations; memory O(M * T) plus a candidate chunk of ``CHUNK_ELEMENTS`` (no tensor of
    size U' x M x T x K exists). ``max_pool`` restricts the candidates to the top-BALD ones
    (as the reference implementation's ``target_size``), at least ``n`` of them.

    Args:
        samples: Number of MC-dropout samples T (>= 2).
        dropout: Dropout rate the run's models are trained with, in (0, 1).
        num_samples: Number of sampled label configurations M.
        max_exact_configs: Largest number of configurations enumerated exactly (default
            ``num_samples``).
        max_pool: Keep only this many top-BALD candidates (None: the whole pool). The
            default 5,000 keeps a budget-100 Fashion-MNIST query near half a minute on 2 CPU
            cores; the whole 55,000 pool would take about ten times longer.
    """

    name = "batchbald"
    description = "BatchBALD: greedily maximise the batch's joint MC-dropout mutual information"

    def __init__(self, samples: Annotated[int, Range(2)] = 20, dropout: OpenUnit = 0.5,
                 num_samples: PositiveInt = 1000, max_exact_configs: PositiveInt | None = None,
                 max_pool: PositiveInt | None = 5000) -> None:
        super().__init__(samples=samples, dropout=dropout)
        for what, value in (("num_samples", num_samples), ("max_exact_configs", max_exact_configs),
                            ("max_pool", max_pool)):
            if value is None:  # the optional two; a None num_samples fails in int() below
                continue
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        self.num_samples = int(num_samples)
        self.max_exact_configs = int(max_exact_configs or num_samples)
        self.max_pool = None if max_pool is None else int(max_pool)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        probs = self.mc_probs(ctx)
        indices = ctx.unlabelled
        if self.max_pool is not None and self.max_pool < len(indices):
            top = top_k(bald_scores(probs), indices, max(self.max_pool, n), rng=ctx.rng)
            keep = np.flatnonzero(np.isin(indices, top))
            probs, indices = probs[torch.from_numpy(keep)], indices[keep]
        return indices[greedy_batchbald(probs, n, self.num_samples, self.max_exact_configs,
                                        ctx.torch_generator(), tie_keys(ctx.rng, indices))]


class _JointConfigurations:
    """Label configurations of the picks so far, as ``log P_t(y)`` of shape (M, T).

    Exact mode enumerates every configuration with non-zero probability; sampled mode holds M
    draws of (dropout sample t_m, configuration y_m ~ P_{t_m}), which it extends at each pick.
    """

    def __init__(self, t: int, max_exact: int, num_samples: int,
                 generator: torch.Generator) -> None:
        self.log_p = torch.zeros(1, t, dtype=torch.float64)  # the empty configuration
        self.sampled_t: Tensor | None = None  # (M,) dropout sample of each draw, sampled mode
        self.max_exact = max_exact
        self.per_t = max(1, num_samples // t)
        self.generator = generator

    def weights(self) -> tuple[Tensor, Tensor]:
        """(omega (M,), pi (M, T)): configuration weights and posteriors over dropout samples."""
        pi = torch.softmax(self.log_p, dim=1)
        if self.sampled_t is not None:
            return torch.full((len(pi),), 1.0 / len(pi), dtype=torch.float64), pi
        t = self.log_p.shape[1]
        return torch.exp(torch.logsumexp(self.log_p, dim=1) - math.log(t)), pi

    def add(self, p: Tensor) -> None:
        """Add a picked variable with MC probabilities p, (T, K)."""
        log_px = torch.log(p.double())  # (T, K)
        m, t = self.log_p.shape
        k = p.shape[1]
        if self.sampled_t is None and m * k <= self.max_exact:
            log_p = (self.log_p[:, None, :] + log_px.T[None]).reshape(m * k, t)
            self.log_p = log_p[torch.isfinite(log_p).any(dim=1)]  # drop impossible configurations
            return
        if self.sampled_t is None:
            # Switch to sampling: per dropout sample t, draw configurations of the picks so far
            # from P_t(y) over the exact ones, then extend them with the new pick below.
            w = torch.softmax(self.log_p.T, dim=1)  # (T, M): P_t(y) normalised per t
            rows = torch.multinomial(w, self.per_t, replacement=True, generator=self.generator)
            self.sampled_t = torch.arange(t).repeat_interleave(self.per_t)
            self.log_p = self.log_p[rows.reshape(-1)]
        probs_t = p.double()[self.sampled_t]  # (M, K): the pick's prediction under each draw's t
        y = torch.multinomial(probs_t, 1, generator=self.generator)[:, 0]
        self.log_p = self.log_p + log_px[:, y].T


def greedy_batchbald(probs: Tensor, n: int, num_samples: int, max_exact_configs: int,
                     generator: torch.Generator, tie_keys: np.ndarray | None = None) -> np.ndarray:
    """Greedy BatchBALD batch over candidates.

    Args:
        probs: Candidates' MC probabilities, (U, T, K).
        n: Batch size (<= U).
        num_samples: Sampled configurations M once exact enumeration is too large.
        max_exact_configs: Largest number of configurations enumerated exactly.
        generator: Source of the sampled configurations.
        tie_keys: (U,) keys breaking ties in the gain (smaller first); default positions.

    Returns:
        (n,) positions into ``probs``, in pick order.
    """
    u, t, k = probs.shape
    keys = np.arange(u) if tie_keys is None else np.asarray(tie_keys, dtype=np.int64)
    conditional = expected_entropy(probs)  # (U,) E_w H[y | w]
    configs = _JointConfigurations(t, max_exact_configs, num_samples, generator)
    available = torch.ones(u, dtype=torch.bool)
    positions = np.arange(u)
    picks: list[int] = []
    for _ in range(n):
        omega, pi = configs.weights()
        gain = _joint_entropy_term(probs, omega, pi) - conditional
        free = available.numpy()
        best_key = top_k(gain[available], keys[free], 1, rng=None)[0]
        pick = int(positions[free][np.flatnonzero(keys[free] == best_key)[0]])
        picks.append(pick)
        available[pick] = False
        if len(picks) < n:
            configs.add(probs[pick])
    return np.asarray(picks, dtype=np.int64)


def _joint_entropy_term(probs: Tensor, omega: Tensor, pi: Tensor) -> Tensor:
    """``sum_y omega_y H[sum_t pi_yt p_t(. | x)]`` for every candidate x, in chunks.

    Args:
        probs: (U, T, K) MC probabilities.
        omega: (M,) configuration weights.
        pi: (M, T) posterior of each configuration over the dropout samples.

    Returns:
        (U,) float64.
    """
    u, t, k = probs.shape
    m = len(omega)
    rows = max(1, CHUNK_ELEMENTS // (m * k))
    out = torch.empty(u, dtype=torch.float64)
    for start in range(0, u, rows):
        p = probs[start : start + rows].double()  # (B, T, K)
        b = len(p)
        r = (pi @ p.permute(1, 0, 2).reshape(t, b * k)).view(m, b, k)  # (M, B, K)
        out[start : start + b] = omega @ _entropy(r)
    return out


STRATEGY_CLASSES = (McDropoutEntropyStrategy, BaldStrategy, VariationRatioStrategy,
                    BatchBaldStrategy)
