"""Classical uncertainty sampling on the softmax of the current model: entropy, least
confidence and margin.

All three score the pool from its logits in row chunks (float64, so that near-ties rank by the
exact value rather than by float32 rounding) and take the top of the scores with
:func:`~dalbt.strategies.base.top_k`, whose O(U) partition keeps a 1M x 10 pool well under a
second. Scores are computed from log-probabilities where the probability form saturates (a
least-confidence or margin score of exactly 0 or 1 in floating point), with the same ranking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from dalbt.strategies.base import POOL_OUTPUTS, QueryContext, Strategy, top_k

# Rows of (U, K) logits scored at a time: bounds the float64 temporaries to a few MiB per class.
CHUNK_ROWS = 1 << 17


def chunked_scores(logits: Tensor, fn: Callable[[Tensor], Tensor],
                   chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """Apply a row-wise score to logits in float64 chunks.

    Args:
        logits: (U, K) logits.
        fn: Maps (B, K) float64 logits to (B,) scores.
        chunk_rows: Rows per chunk.

    Returns:
        (U,) float64 scores.
    """
    out = torch.empty(len(logits), dtype=torch.float64)
    for start in range(0, len(logits), chunk_rows):
        out[start : start + chunk_rows] = fn(logits[start : start + chunk_rows].double())
    return out


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of the softmax of each row: (B, K) -> (B,)."""
    logp = torch.log_softmax(logits, dim=1)
    # 0 * log 0 = 0: rows are finite, so logp is finite and p * logp never gives NaN.
    return -(logp.exp() * logp).sum(dim=1)


def least_confidence_from_logits(logits: Tensor) -> Tensor:
    """``-log max_c p_c`` of each row: (B, K) -> (B,); monotone in ``1 - max_c p_c``."""
    return torch.logsumexp(logits, dim=1) - logits.max(dim=1).values


def margin_from_logits(logits: Tensor) -> Tensor:
    """``-log(p_(1) - p_(2))`` of each row: (B, K) -> (B,); monotone in the negated margin.

    Uses ``p_(1) - p_(2) = p_(1) * (1 - exp(l_(2) - l_(1)))``, so that margins that round to 1
    in probability space still rank, and an exact tie of the top two gives +inf.
    """
    if logits.shape[1] < 2:
        return torch.zeros(len(logits), dtype=logits.dtype)
    top2 = logits.topk(2, dim=1).values
    log_p1 = top2[:, 0] - torch.logsumexp(logits, dim=1)
    return -(log_p1 + torch.log(-torch.expm1(top2[:, 1] - top2[:, 0])))


class _SoftmaxUncertainty(Strategy):
    requires = frozenset({POOL_OUTPUTS})
    _score: Callable[[Tensor], Tensor]

    def scores(self, logits: Tensor) -> Tensor:
        """Uncertainty of each pool sample, higher = queried first.

        Args:
            logits: (U, K) logits.

        Returns:
            (U,) float64 scores.
        """
        return chunked_scores(logits, type(self)._score)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        return top_k(self.scores(ctx.pool_outputs().logits), ctx.unlabelled, n, rng=ctx.rng)


class EntropyStrategy(_SoftmaxUncertainty):
    """Maximum-entropy uncertainty sampling (Settles, "Active Learning Literature Survey",
    Computer Sciences Technical Report 1648, University of Wisconsin-Madison, 2009, Sec. 3.1).

    Queries the samples whose predictive distribution ``p = softmax(logits)`` has the largest
    Shannon entropy ``-sum_c p_c log p_c``, i.e. the samples the model is most uncertain about
    over all classes. A uniform prediction has the maximum entropy ``log K``.
    """

    name = "entropy"
    description = "Uncertainty sampling: query the highest softmax entropy"
    _score = staticmethod(entropy_from_logits)


class LeastConfidenceStrategy(_SoftmaxUncertainty):
    """Least-confidence uncertainty sampling (Lewis & Gale, "A Sequential Algorithm for
    Training Text Classifiers", SIGIR 1994; multi-class form as in Settles 2009, Sec. 3.1).

    Queries the samples whose most likely class has the lowest probability, i.e. the largest
    ``1 - max_c p_c``. Ranked by the equivalent ``-log max_c p_c``, which does not round to 0
    for confident predictions.
    """

    name = "least-confidence"
    description = "Uncertainty sampling: query the lowest top-class softmax probability"
    _score = staticmethod(least_confidence_from_logits)


class MarginStrategy(_SoftmaxUncertainty):
    """Margin sampling (Scheffer, Decomain & Wrobel, "Active Hidden Markov Models for
    Information Extraction", IDA 2001).

    Queries the samples with the smallest difference between the two most likely classes'
    probabilities ``p_(1) - p_(2)``: the samples closest to the decision boundary between their
    two best classes, regardless of the other classes. Ranked by ``-log(p_(1) - p_(2))``.
    """

    name = "margin"
    description = "Uncertainty sampling: query the smallest top-1 minus top-2 softmax margin"
    _score = staticmethod(margin_from_logits)


STRATEGY_CLASSES = (EntropyStrategy, LeastConfidenceStrategy, MarginStrategy)
