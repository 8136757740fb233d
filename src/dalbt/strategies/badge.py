"""BADGE: k-means++ seeding on last-layer gradient embeddings (Ash et al., 2020).

The gradient embedding of a sample is the gradient of the cross-entropy at its predicted label
with respect to the classifier's weights and bias, ``g = (p - onehot(yhat)) (x) [z, 1]``, a
(K * (D + 1))-vector. It is never built: with ``a = p - onehot(yhat)`` and ``x = [z, 1]``,

    ||g_i - g_j||^2 = ||a_i||^2 ||x_i||^2 + ||a_j||^2 ||x_j||^2 - 2 (a_i . a_j) (x_i . x_j),

so distances to a centre cost O(K + D) per sample and memory stays O(U (K + D)).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dalbt.options import PositiveInt
from dalbt.strategies.base import POOL_OUTPUTS, QueryContext, Strategy

DEFAULT_CHUNK = 16384
# Squared distances below this fraction of ||g_i||^2 + ||g_c||^2 are float32 rounding noise
# of the factorised formula (duplicates of a centre): they count as 0.
_REL_ZERO = 1e-6


def gradient_factors(logits: Tensor) -> Tensor:
    """``a = p - onehot(argmax p)``, the class factor of the gradient embedding, (N, K) float32.

    The entry at the predicted class is minus the sum of the other probabilities (not
    ``p - 1``), so a confident prediction gives an exact (or tiny) zero instead of rounding
    noise.
    """
    p = torch.softmax(logits.float(), dim=1)
    yhat = p.argmax(dim=1, keepdim=True)
    a = p.scatter(1, yhat, 0.0)
    return a.scatter_(1, yhat, -a.sum(dim=1, keepdim=True))


def factorised_sq_dists(a: Tensor, z: Tensor, a_c: Tensor, z_c: Tensor,
                        g_sq: Tensor | None = None, gc_sq: Tensor | None = None) -> Tensor:
    """Squared distances between gradient embeddings ``a (x) [z, 1]``, never built.

    Args:
        a: Class factors of the rows, (N, K).
        z: Latents of the rows, (N, D) (the bias input 1 is implicit).
        a_c: Class factors of the centres, (C, K).
        z_c: Latents of the centres, (C, D).
        g_sq: ``||a||^2 (||z||^2 + 1)``, the rows' squared embedding norms, (N,) (computed
            when None).
        gc_sq: The same for the centres, (C,).

    Returns:
        (N, C) float32 squared distances, clamped at 0.
    """
    if g_sq is None:
        g_sq = embedding_sq_norms(a, z)
    if gc_sq is None:
        gc_sq = embedding_sq_norms(a_c, z_c)
    d2 = (a @ a_c.T).mul_(torch.addmm(torch.ones(()), z, z_c.T)).mul_(-2.0)
    d2 += g_sq[:, None]
    d2 += gc_sq[None, :]
    # below the rounding error of the expansion the points coincide
    d2[d2 <= _REL_ZERO * (g_sq[:, None] + gc_sq[None, :])] = 0.0
    return d2


def embedding_sq_norms(a: Tensor, z: Tensor) -> Tensor:
    """``||a (x) [z, 1]||^2 = ||a||^2 (||z||^2 + 1)``, (N,) float32."""
    return a.square().sum(1) * (torch.linalg.vector_norm(z, dim=1).square() + 1.0)


class _Embedding:
    """The pool's gradient embedding in factorised form, with its centres so far."""

    def __init__(self, a: Tensor, z: Tensor, n: int, chunk: int) -> None:
        self.a, self.z, self.chunk = a, z, chunk
        self.g_sq = torch.cat([embedding_sq_norms(a[i : i + chunk], z[i : i + chunk])
                               for i in range(0, len(a), chunk)])
        self.a_c = torch.empty(n, a.shape[1], dtype=torch.float32)
        self.z_c = torch.empty(n, z.shape[1], dtype=torch.float32)
        self.gc_sq = torch.empty(n, dtype=torch.float32)
        self.count = 0

    def add_centre(self, i: int) -> None:
        c = self.count
        self.a_c[c], self.z_c[c], self.gc_sq[c] = self.a[i], self.z[i], self.g_sq[i]
        self.count += 1

    def min_sq_dist(self, rows: Tensor | None, lo: int) -> np.ndarray:
        """Squared distance of ``rows`` (all when None) to their nearest centre of
        ``[lo, count)``, in chunks of rows, (N,) float64."""
        cs = slice(lo, self.count)
        n = len(self.a) if rows is None else len(rows)
        out = np.empty(n)
        for start in range(0, n, self.chunk):
            r = slice(start, min(start + self.chunk, n)) if rows is None else \
                rows[start : start + self.chunk]
            d2 = factorised_sq_dists(self.a[r], self.z[r], self.a_c[cs], self.z_c[cs],
                                     self.g_sq[r], self.gc_sq[cs])
            out[start : start + len(d2)] = d2.amin(dim=1).numpy()
        return out


def _refresh_bounds(emb: _Embedding, bound: np.ndarray, seen: np.ndarray,
                   rows: np.ndarray) -> None:
    """Tighten ``bound`` of ``rows`` against the centres each has not seen yet, in place."""
    lo = int(seen[rows].min())
    bound[rows] = np.minimum(bound[rows], emb.min_sq_dist(torch.from_numpy(rows), lo))
    seen[rows] = emb.count


def _draw_centre(emb: _Embedding, bound: np.ndarray, seen: np.ndarray, chosen: np.ndarray,
                 rng: np.random.Generator, batch: int) -> int:
    """One D^2 draw by rejection sampling on the upper bounds ``bound`` (U,), which cover the
    centres ``[0, seen)`` of each row and are tightened in place as rows are checked; uniform
    over the rows not ``chosen`` when every bound is zero.

    Returns:
        The drawn row.
    """
    u, c = len(bound), emb.count
    while True:
        cdf = np.cumsum(bound)
        total = cdf[-1]
        if not total > 0:
            return int(rng.choice(np.flatnonzero(~chosen)))
        # proposals ~ bound (side="right" skips zero weights), accepted w.p. exact / bound
        r = rng.random(2 * batch)
        prop = np.minimum(np.searchsorted(cdf, r[:batch] * total, side="right"), u - 1)
        snap = bound[prop]
        stale = np.unique(prop[seen[prop] < c])
        if len(stale):
            _refresh_bounds(emb, bound, seen, stale)
        exact = bound[prop]
        accept = np.flatnonzero(r[batch:] * snap < exact)
        if len(accept):
            return int(prop[accept[0]])
        if np.mean(exact / np.maximum(snap, np.finfo(float).tiny)) < 0.5:
            # bounds too loose: refresh the whole pool against the recent centres
            old = np.flatnonzero(seen < c)
            if len(old):
                _refresh_bounds(emb, bound, seen, old)


def kmeans_pp(a: Tensor, z: Tensor, n: int, rng: np.random.Generator, lazy: bool = True,
              chunk: int = DEFAULT_CHUNK, batch: int = 64) -> np.ndarray:
    """k-means++ seeding of the gradient embeddings ``a (x) [z, 1]`` (BADGE's selection).

    The first centre is the largest embedding norm (as BADGE's reference code); each next one
    is drawn with probability proportional to its squared distance to the nearest centre so far
    (D^2 sampling). If every remaining point coincides with a centre (all-zero distances) the
    rest are drawn uniformly.

    ``lazy=False`` updates every point's distance with each new centre (one O(U (K + D)) pass
    per pick). ``lazy=True`` (default) draws from the same distribution by rejection sampling:
    proposals are drawn proportionally to stale upper bounds of the distances, refreshed
    against the centres added since (small matrix products), and accepted with probability
    ``exact / bound``; the whole pool is refreshed only when the acceptance rate drops below
    one half.

    Args:
        a: Class factors ``p - onehot(yhat)``, (U, K).
        z: Latents, (U, D).
        n: Number of picks (clipped to U).
        rng: Source of the D^2 draws.
        lazy: Rejection sampling on stale bounds (default) instead of a full pass per pick.
        chunk: Rows per block of the full passes.
        batch: Lazy: proposals drawn at once.

    Returns:
        (min(n, U),) int64 positions, in pick order.
    """
    if chunk < 1 or batch < 1:
        raise ValueError(f"chunk and batch must be >= 1, got {chunk}, {batch}")
    a = a.detach().float().contiguous()
    z = z.detach().float().contiguous()
    u, n = len(a), min(int(n), len(a))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    emb = _Embedding(a, z, n, int(chunk))
    g_sq = emb.g_sq.numpy()
    if not np.isfinite(g_sq).all():
        raise ValueError("kmeans_pp: non-finite gradient embeddings (NaN/inf logits or latents)")
    picks = np.empty(n, dtype=np.int64)
    picks[0] = int(np.argmax(g_sq))
    emb.add_centre(int(picks[0]))
    bound = emb.min_sq_dist(None, 0)  # exact for the first centre
    chosen = np.zeros(u, dtype=bool)
    chosen[picks[0]] = True
    bound[picks[0]] = 0.0
    seen = np.ones(u, dtype=np.int64)  # bound[i] covers the centres [0, seen[i])
    for t in range(1, n):
        c = emb.count
        if not lazy:
            bound = np.minimum(bound, emb.min_sq_dist(None, c - 1))
            bound[chosen] = 0.0
            seen[:] = c
        pick = _draw_centre(emb, bound, seen, chosen, rng, batch)
        picks[t] = pick
        chosen[pick] = True
        bound[pick] = 0.0
        emb.add_centre(pick)
    return picks


class BadgeStrategy(Strategy):
    """BADGE (Ash, Zhang, Krishnamurthy, Langford & Agarwal, 2020, "Deep Batch Active Learning
    by Diverse, Uncertain Gradient Lower Bounds", ICLR).

    Each pool sample is represented by the gradient of the cross-entropy loss with respect to
    the last layer's parameters, taking the model's own prediction as the label:
    ``g = (p - onehot(yhat)) (x) [z, 1]`` (the classifier has a bias, hence the 1). Its norm is
    large for uncertain samples and it points in directions that differ between dissimilar
    samples; the batch is chosen by k-means++ seeding on these embeddings, which trades off
    magnitude (uncertainty) and diversity. As in the reference code, the first centre is the
    largest gradient norm and the next ones are D^2-sampled from ``ctx.rng``. The embeddings
    are never built (factorised distances, see :func:`factorised_sq_dists`); the default lazy
    seeding samples from the same distribution with far fewer distance computations
    (:func:`kmeans_pp`). Deviations: the bias gradient (the ``a`` block of the 1) is part of the
    embedding, whereas the reference code embeds the weight gradient only; when all remaining
    samples coincide with a centre (e.g. all confident), where the reference code would loop,
    the rest of the batch is uniform.

    Args:
        lazy: Rejection-sampled k-means++ on stale bounds (default) instead of a full pass per
            pick; same distribution.
        chunk: Pool rows per block of the full passes.
    """

    name = "badge"
    description = "BADGE: k-means++ seeding on last-layer gradient embeddings at the prediction"
    requires = frozenset({POOL_OUTPUTS})

    def __init__(self, lazy: bool = True, chunk: PositiveInt = DEFAULT_CHUNK) -> None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk}")
        self.lazy = bool(lazy)
        self.chunk = int(chunk)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        out = ctx.pool_outputs()
        pos = kmeans_pp(gradient_factors(out.logits), out.latents, n, ctx.rng, lazy=self.lazy,
                        chunk=self.chunk)
        return ctx.unlabelled[pos]


STRATEGY_CLASSES = (BadgeStrategy,)
