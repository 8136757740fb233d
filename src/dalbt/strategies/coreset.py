"""Core-set selection by greedy k-centre on the latent space (Sener & Savarese, 2018).

:func:`k_center_greedy` is the reusable greedy k-centre (2-approximation) with the labelled
points as initial centres. It keeps O(U) state: each pool point's squared distance to the
nearest centre, first computed against the initial centres in (chunk, L) blocks. Its default
lazy evaluation picks exactly what the textbook one-matvec-per-pick update picks, while touching
only the few points at the top of the distance order at each step.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from dalbt.options import PositiveInt
from dalbt.strategies.base import LABELLED_OUTPUTS, POOL_OUTPUTS, QueryContext, Strategy

DEFAULT_CHUNK = 16384


BLOCK_ELEMENTS = 1 << 24  # at most 64 MiB of float32 distances at once, whatever L is


def _shifted_sq_norms(x: Tensor, mu: Tensor, chunk: int) -> Tensor:
    """``||x_i - mu||^2`` of (N, D) ``x`` in chunks of rows, (N,) float32."""
    out = torch.empty(len(x), dtype=torch.float32)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = torch.linalg.vector_norm(x[start : start + chunk] - mu,
                                                              dim=1).square()
    return out


def _nearest(pool: Tensor, pool_sq: Tensor, cent: Tensor, cent_sq: Tensor, mu: Tensor,
             chunk: int) -> Tensor:
    """Squared distance of every pool point to its nearest centre, in (chunk, C) blocks.

    Args:
        pool: (U, D) float32.
        pool_sq: ``||pool - mu||^2``, (U,).
        cent: Centres minus ``mu``, (C, D), C >= 1.
        cent_sq: Their squared norms, (C,).
        mu: (D,) shift of the origin (distances are shift invariant; a central origin keeps
            the float32 expansion below accurate).
        chunk: Pool rows per block.

    Returns:
        (U,) float32 squared distances.
    """
    u = len(pool)
    min_d2 = torch.empty(u, dtype=torch.float32)
    chunk = max(1, min(chunk, BLOCK_ELEMENTS // max(len(cent), 1)))  # bound the (chunk, C) block
    for start in range(0, u, chunk):
        stop = min(start + chunk, u)
        # ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c (x, c relative to mu)
        d2 = torch.addmm(cent_sq.unsqueeze(0), pool[start:stop] - mu, cent.T, alpha=-2.0)
        d2 += pool_sq[start:stop, None]
        min_d2[start:stop] = d2.amin(dim=1).clamp_min_(0.0)
    return min_d2


def _full_greedy(pool: Tensor, pool_sq: Tensor, cent: Tensor, cent_sq: Tensor, mu: Tensor,
                 min_d2: Tensor, n_init: int, n: int) -> np.ndarray:
    """Plain greedy: after each pick, one (U, D) matvec updates every min distance."""
    md2 = min_d2.numpy()
    picks = np.empty(n, dtype=np.int64)
    for t in range(n):
        i = int(np.argmax(md2))
        picks[t] = i
        s = pool[i] - mu
        cent[n_init + t], cent_sq[n_init + t] = s, pool_sq[i]
        # (x - mu).s = x.s - mu.s
        d2 = torch.addmv(pool_sq, pool, s, alpha=-2.0).add_(pool_sq[i] + 2.0 * (mu @ s))
        d2.clamp_min_(0.0)
        np.minimum(md2, d2.numpy(), out=md2)
        md2[i] = -np.inf  # never picked twice
    return picks


def _lazy_greedy(pool: Tensor, pool_sq: Tensor, cent: Tensor, cent_sq: Tensor, mu: Tensor,
                 min_d2: Tensor, n_init: int, n: int, batch: int, hot: int) -> np.ndarray:
    """Lazy greedy: the same picks as :func:`_full_greedy`, touching few points per step.

    ``bound[x]`` is x's squared distance to the centres ``[0, seen[x])``, an upper bound of its
    distance to all centres that only decreases. A step refreshes (distances to the centres
    added since, as one small matrix product) only the points whose bound could beat the best
    exact value; these are looked for in a "hot" set of the largest bounds, every point outside
    of which has a bound <= ``tau``.
    """
    u = len(pool)
    bound = min_d2.numpy()
    seen = np.full(u, n_init, dtype=np.int64)
    picks = np.empty(n, dtype=np.int64)
    hot_size = min(hot, u)
    hot_idx = np.empty(0, dtype=np.int64)
    tau = np.inf
    for t in range(n):
        c = n_init + t  # centres so far
        while True:
            if len(hot_idx) == 0 or (hot_size < u and bound[hot_idx].max() <= tau):
                # (re)build the hot set: the hot_size largest bounds, sorted by position
                if hot_size >= u:
                    hot_idx, tau = np.arange(u), -np.inf
                else:
                    part = np.argpartition(-bound, hot_size)
                    hot_idx = np.sort(part[:hot_size])
                    tau = float(bound[part[hot_size]])
            b = bound[hot_idx]
            stale = seen[hot_idx] < c
            exact = b[~stale]
            best = exact.max() if len(exact) else -np.inf
            todo = np.flatnonzero(stale & (b >= best))
            if len(todo):
                if len(todo) > batch:
                    todo = todo[np.argpartition(-b[todo], batch - 1)[:batch]]
                rows = torch.from_numpy(hot_idx[todo])
                lo = int(seen[hot_idx[todo]].min())
                d2 = torch.addmm(cent_sq[None, lo:c], pool.index_select(0, rows) - mu,
                                 cent[lo:c].T, alpha=-2.0)
                d2 += pool_sq.index_select(0, rows)[:, None]
                fresh = d2.amin(dim=1).clamp_min_(0.0).numpy()
                bound[hot_idx[todo]] = np.minimum(b[todo], fresh)
                seen[hot_idx[todo]] = c
                continue
            if best > tau or hot_size >= u:
                break  # no point outside the hot set can reach best: it is the global max
            if best == tau:
                hot_size = min(2 * hot_size, u)  # a tie at the border: widen the hot set
            hot_idx = np.empty(0, dtype=np.int64)
        # the first maximum by position, as np.argmax over the whole pool would give
        i = int(hot_idx[np.flatnonzero(~stale & (b == best))[0]])
        picks[t] = i
        cent[c], cent_sq[c] = pool[i] - mu, pool_sq[i]
        bound[i], seen[i] = -np.inf, np.iinfo(np.int64).max  # never picked twice
    return picks


def k_center_greedy(pool: Tensor, centres: Tensor, n: int, chunk: int = DEFAULT_CHUNK,
                    rng: np.random.Generator | None = None, lazy: bool = True,
                    batch: int = 64, hot: int = 4096) -> np.ndarray:
    """Greedy k-centre: repeatedly pick the pool point farthest from all centres so far.

    Starts from every pool point's squared distance to its nearest initial centre, computed
    in (chunk, L) blocks, then keeps one O(U) min-distance vector. ``lazy=False`` updates it
    with one (U, D) matvec per pick (the textbook algorithm). ``lazy=True`` (default) gives the
    same picks (exact: it only skips work that cannot change them; float32 rounding aside)
    while refreshing only the points near the top of the min-distance order, against the
    centres added since their last refresh, as small matrix products. Squared distances use
    ``||x||^2 + ||c||^2 - 2 x.c`` in float32 with precomputed norms, relative to the pool mean
    (which keeps the expansion accurate for latents far from the origin).

    Cost: the initial (U, L) distances, O(U L D) as chunked matrix products, dominate; memory
    is O(U) plus a (chunk, L) block, and no copy of ``pool`` is made.

    Args:
        pool: Candidate points, (U, D); converted to float32 (no copy when already float32
            and contiguous).
        centres: Initial centres (the labelled points), (L, D); may be empty (L = 0).
        n: Number of points to pick (clipped to U).
        chunk: Pool rows per block of the initial distances.
        rng: Draws the first pick when there are no initial centres (required then); that
            pick then acts as the single initial centre.
        lazy: Use the lazy evaluation (default) instead of a full pass per pick.
        batch: Lazy: points refreshed per matrix product.
        hot: Lazy: size of the set of largest bounds searched before rescanning the pool.

    Returns:
        (min(n, U),) int64 positions in ``pool``, in pick order.

    Raises:
        ValueError: Non-finite inputs, no ``rng`` without centres, or chunk/batch/hot < 1.
    """
    if min(chunk, batch, hot) < 1:
        raise ValueError(f"chunk, batch and hot must be >= 1, got {chunk}, {batch}, {hot}")
    pool = pool.detach().to(torch.float32).contiguous()
    d = pool.shape[1]
    centres = centres.detach().to(torch.float32).reshape(-1, d)
    u, n = len(pool), min(int(n), len(pool))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    first = None
    if len(centres) == 0:
        if rng is None:
            raise ValueError("k_center_greedy needs rng when there are no initial centres")
        first = int(rng.integers(u))
        centres, n = pool[first : first + 1], n - 1
    chunk = int(chunk)
    mu = pool.mean(dim=0)
    pool_sq = _shifted_sq_norms(pool, mu, chunk)
    n_init = len(centres)
    # all centres relative to mu: the initial ones, then the picks as they are chosen
    cent = torch.empty(n_init + n, d, dtype=torch.float32)
    cent[:n_init] = centres - mu
    cent_sq = torch.empty(n_init + n, dtype=torch.float32)
    cent_sq[:n_init] = _shifted_sq_norms(centres, mu, chunk)
    # a NaN/inf coordinate makes its row's norm non-finite
    if not (torch.isfinite(pool_sq).all() and torch.isfinite(cent_sq[:n_init]).all()):
        raise ValueError("k_center_greedy: pool or centres contain NaN or infinite values")
    min_d2 = _nearest(pool, pool_sq, cent[:n_init], cent_sq[:n_init], mu, chunk)
    if first is not None:
        min_d2[first] = float("-inf")
    if n == 0:
        picks = np.empty(0, dtype=np.int64)
    elif lazy:
        picks = _lazy_greedy(pool, pool_sq, cent, cent_sq, mu, min_d2, n_init, n, int(batch),
                             int(hot))
    else:
        picks = _full_greedy(pool, pool_sq, cent, cent_sq, mu, min_d2, n_init, n)
    return picks if first is None else np.concatenate([[first], picks]).astype(np.int64)


class CoreSetStrategy(Strategy):
    """Core-set (Sener & Savarese, 2018, "Active Learning for Convolutional Neural Networks: A
    Core-Set Approach", ICLR).

    Active learning as core-set selection: choose the points whose addition minimises the
    largest distance of any pool point to its nearest labelled or chosen point, in the latent
    space of the current model. This is the paper's greedy k-centre 2-approximation (its
    Algorithm 1) with the labelled set as the initial centres, on Euclidean distances of the
    encoder latents z. The paper's robust mixed-integer refinement (outlier budget) is not
    implemented; as in the authors' and most public implementations, the greedy solution is
    the query. With an empty labelled set the first pick is uniform at random (from ``ctx.rng``).

    Args:
        lazy: Lazy greedy evaluation (default; same picks, much faster on large pools). False
            runs the textbook update, one (U, D) matvec per pick.
        chunk: Pool rows per block of the initial (chunk, L) distances (memory/speed).
    """

    name = "coreset"
    description = "Core-set: greedy k-centre on latents, labelled points as initial centres"
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})
    label_free = True

    def __init__(self, lazy: bool = True, chunk: PositiveInt = DEFAULT_CHUNK) -> None:
        if int(chunk) < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk}")
        self.lazy = bool(lazy)
        self.chunk = int(chunk)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        pool = ctx.pool_outputs().latents
        lab = ctx.labelled_outputs().latents if len(ctx.labelled) else pool[:0]
        pos = k_center_greedy(pool, lab, n, chunk=self.chunk, rng=ctx.rng, lazy=self.lazy)
        return ctx.unlabelled[pos]


STRATEGY_CLASSES = (CoreSetStrategy,)
