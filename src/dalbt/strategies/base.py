"""The strategy contract and the per-round query context.

A strategy receives a :class:`QueryContext` and a budget and returns *dataset indices* of
unlabelled samples. It asks the context for what it needs (pool probabilities, embeddings, ...);
the context computes each such quantity at most once per round, in batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from dalbt.outputs import Outputs

# Names of quantities a strategy may declare in ``Strategy.requires``; the loop prefetches them
# (timed as "score") before calling ``select`` (timed as "select").
POOL_OUTPUTS = "pool_outputs"
LABELLED_OUTPUTS = "labelled_outputs"


Scorer = Callable[[np.ndarray], Outputs]
# (indices (N,), samples T, generator) -> MC-dropout class probabilities (N, T, K)
McScorer = Callable[[np.ndarray, int, torch.Generator], Tensor]


@dataclass
class QueryContext:
    """Everything a strategy may use in one round.

    Attributes:
        unlabelled: Dataset indices of the unlabelled pool, (U,) int64.
        labelled: Dataset indices of the labelled set, (L,) int64.
        labelled_targets: Oracle labels of ``labelled``, (L,) int64.
        num_classes: Number of classes K.
        rng: This query's numpy Generator (derived from the run seed and the round).
        scorer: Maps dataset indices to :class:`Outputs` of the current model.
        round: The AL round that is querying (0 = the first query).
        total_rounds: Number of query rounds of the run.
        mc_scorer: MC-dropout probabilities of the current model (needs a model trained with
            dropout: see ``Strategy.train_dropout``).
        images: All training images, (N, C, H, W) uint8, for strategies that train models of
            their own (VAAL, ensembles, ...). Index it with dataset indices.
        train_config: The run's training recipe (a ``dalbt.train.TrainConfig``), for
            strategies that train models of their own with the same recipe.
        model_factory: ``model_factory(seed) -> DALBTNet``: a fresh model of the run's kind
            (architecture, dropout), initialised from ``seed``, on ``device``; when the run
            pre-trains, its encoder and projector are the run's shared pre-trained ones.
        device: torch device of the run.
        candidates: Every dataset index that can ever be in the pool or labelled (all training
            images outside the validation split), fixed for the whole run.
    """

    unlabelled: np.ndarray
    labelled: np.ndarray
    labelled_targets: np.ndarray
    num_classes: int
    rng: np.random.Generator
    scorer: Scorer | None = None
    round: int = 0
    total_rounds: int = 1
    mc_scorer: McScorer | None = None
    images: Tensor | None = None
    train_config: Any = None
    model_factory: Callable[[int], Any] | None = None
    device: str = "cpu"
    candidates: np.ndarray | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.unlabelled = np.ascontiguousarray(self.unlabelled, dtype=np.int64)
        self.labelled = np.ascontiguousarray(self.labelled, dtype=np.int64)
        self.labelled_targets = np.asarray(self.labelled_targets, dtype=np.int64)

    def _outputs(self, key: str, indices: np.ndarray) -> Outputs:
        if key not in self._cache:
            if self.scorer is None:
                raise RuntimeError(f"this context has no model to compute {key}")
            out = self.scorer(indices)
            if len(out.indices) != len(indices) or not np.array_equal(out.indices, indices):
                raise RuntimeError("scorer returned outputs for other indices than asked")
            self._cache[key] = out
        return self._cache[key]

    def pool_outputs(self) -> Outputs:
        """Model outputs on the unlabelled pool, in the order of ``unlabelled``."""
        return self._outputs(POOL_OUTPUTS, self.unlabelled)

    def labelled_outputs(self) -> Outputs:
        """Model outputs on the labelled set, in the order of ``labelled``."""
        return self._outputs(LABELLED_OUTPUTS, self.labelled)

    def mc_probs(self, samples: int) -> Tensor:
        """MC-dropout probabilities on the unlabelled pool, (U, T, K), computed once per T.

        The dropout masks come from this query's generator, so they are reproducible.
        """
        key = f"mc_probs:{samples}"
        if key not in self._cache:
            if self.mc_scorer is None:
                raise RuntimeError("this context has no MC-dropout scorer")
            self._cache[key] = self.mc_scorer(self.unlabelled, samples, self.torch_generator())
        return self._cache[key]

    def torch_generator(self) -> torch.Generator:
        """A CPU torch.Generator seeded from this query's rng (a new stream at each call)."""
        g = torch.Generator()
        g.manual_seed(int(self.rng.integers(0, 2**63 - 1)))
        return g

    def require(self, what: str) -> Any:
        """``getattr(self, what)``, failing clearly when the loop did not provide it."""
        value = getattr(self, what)
        if value is None:
            raise RuntimeError(f"this context has no {what}")
        return value

    def prefetch(self, names: frozenset[str]) -> None:
        """Compute the named quantities now (so that the loop can time scoring apart)."""
        for name in sorted(names):
            getattr(self, name)()


class Strategy:
    """Base class: subclasses set ``name``, ``description``, ``requires`` and ``_select``.

    Options are keyword arguments of ``__init__``; unknown options raise ``TypeError``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    # Dropout on the latent before the classifier that the run's models are trained with
    # (MC-dropout strategies need > 0; everything else trains the plain DALBT model).
    train_dropout: float = 0.0
    # True when the strategy reads no label and no classifier output, so that it can choose
    # the first images to label (the cold start: features of a self-supervised encoder only).
    label_free: ClassVar[bool] = False

    def prepare(self, ctx: QueryContext) -> None:
        """Hook run before scoring each round: strategies that train models of their own
        (VAAL, ensembles, DAL-OSR, ...) do it here. Its time counts as scoring time."""

    def train_model(self, model: Any, x_train: Tensor, y_train: Tensor, labelled: np.ndarray,
                    validation: np.ndarray, cfg: Any, shuffle_gen: torch.Generator,
                    augment_gen: torch.Generator, on_epoch: Callable | None = None,
                    unlabelled: np.ndarray | None = None, dist: Any = None) -> Any:
        """Hook that trains the run's model each round (default: :func:`dalbt.train.train_round`
        with the same arguments). Strategies whose method trains the task model differently
        (MoBYv2AL's joint contrastive training) override it; the loop only calls this hook.

        ``y_train`` holds labels at ``labelled`` only; ``unlabelled`` are the pool's indices,
        whose labels must never be read. ``dist`` (a ``dalbt.distributed.Dist``) is this
        process's place in a distributed run: every rank calls the hook; an override that
        ignores it trains the same model on every rank, and the loop then gives every rank
        rank 0's weights.
        """
        from dalbt.distributed import SINGLE
        from dalbt.train import train_round

        return train_round(model, x_train, y_train, labelled, validation, cfg, shuffle_gen,
                           augment_gen, on_epoch=on_epoch, unlabelled=unlabelled,
                           dist=dist or SINGLE)

    def select(self, ctx: QueryContext, budget: int) -> np.ndarray:
        """Choose up to ``budget`` unlabelled samples.

        Args:
            ctx: This round's context.
            budget: Number of samples wanted (> 0). If the pool is smaller, all of it is returned.

        Returns:
            Dataset indices, (min(budget, U),) int64, unique, all in ``ctx.unlabelled``, in
            query order (most wanted first).
        """
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        n = min(int(budget), len(ctx.unlabelled))
        if n == 0:
            return np.empty(0, dtype=np.int64)
        chosen = np.asarray(self._select(ctx, n), dtype=np.int64)
        if len(chosen) != n or len(np.unique(chosen)) != n:
            raise RuntimeError(f"strategy {self.name!r} returned {len(chosen)} indices "
                               f"({len(np.unique(chosen))} unique) instead of {n}")
        if not np.isin(chosen, ctx.unlabelled).all():
            raise RuntimeError(f"strategy {self.name!r} returned indices outside the pool")
        return chosen

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        raise NotImplementedError

    def query(self, budget: int, *, probs: Any = None, logits: Any = None,
              embeddings: Any = None, mc_probs: Any = None, labelled_embeddings: Any = None,
              labelled_probs: Any = None, labelled_logits: Any = None,
              labelled_targets: Any = None, indices: Any = None, num_classes: int | None = None,
              seed: int = 0) -> np.ndarray:
        """Choose ``budget`` pool samples from arrays of a model's outputs (numpy or torch).

        The same as ``dalbt.selection.select(self, budget, ...)``; see there for the
        arguments (probs/logits (N, K), embeddings (N, D), mc_probs (N, T, K), the labelled
        set's arrays, ``indices`` (N,)).

        Returns:
            (min(budget, N),) int64 row positions (or entries of ``indices``), best first.
        """
        from dalbt.selection import select  # dalbt.selection imports this module

        return select(self, budget, probs=probs, logits=logits, embeddings=embeddings,
                      mc_probs=mc_probs, labelled_embeddings=labelled_embeddings,
                      labelled_probs=labelled_probs, labelled_logits=labelled_logits,
                      labelled_targets=labelled_targets, indices=indices,
                      num_classes=num_classes, seed=seed)


def tie_keys(rng: np.random.Generator | None, indices: np.ndarray) -> np.ndarray:
    """Secondary sort keys that order tied scores, (N,).

    With a generator: a random permutation of 0..N-1 (distinct keys) from a child stream of
    ``rng`` (spawned, so ``rng`` itself draws on as if nothing was taken, and a strategy that
    ranks and then samples sees the same stream as before). With None: the dataset indices
    (ties to the smaller index; for callers that want a fixed order, never for a query).
    """
    if rng is None:
        return np.asarray(indices)
    try:
        child = rng.spawn(1)[0]
    except (TypeError, ValueError, AttributeError):  # a generator without a SeedSequence
        child = rng
    return child.permutation(len(indices))


def _as_scores(scores: np.ndarray | Tensor) -> np.ndarray:
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores)
    return np.where(np.isnan(s), -np.inf, s.astype(np.float64))


def top_k(scores: np.ndarray | Tensor, indices: np.ndarray, k: int, *,
          rng: np.random.Generator | None) -> np.ndarray:
    """Dataset indices of the ``k`` highest scores; ties in random order from ``rng``.

    Args:
        scores: One score per candidate, (N,); higher is queried first. NaN ranks last.
        indices: Dataset indices of the candidates, (N,).
        k: How many to return (<= N).
        rng: The query's generator; it orders equal scores (e.g. several +inf), so that a
            degenerate score never turns into a query by dataset index. None: ties to the
            smaller index.

    Returns:
        (k,) int64 dataset indices, best first.
    """
    s = _as_scores(scores)
    indices = np.asarray(indices, dtype=np.int64)
    if k < len(s):
        # O(N) partition to the candidates at or above the k-th score, then an exact sort.
        kth = np.partition(-s, k - 1)[k - 1]
        keep = np.flatnonzero(-s <= kth)
        s, indices = s[keep], indices[keep]
    order = np.lexsort((tie_keys(rng, indices), -s))[:k]
    return indices[order]


def top_k_balanced(scores: np.ndarray | Tensor, groups: np.ndarray | Tensor, indices: np.ndarray,
                   k: int, *, rng: np.random.Generator | None) -> np.ndarray:
    """Dataset indices of ``k`` high scores taken round-robin over groups (e.g. predicted class).

    The best of every group comes first (ordered by score), then the second best of every
    group, and so on; a group that runs out simply drops out of later turns.

    Args:
        scores: One score per candidate, (N,); higher is queried first. NaN ranks last.
        groups: Group of each candidate, (N,) integers.
        indices: Dataset indices of the candidates, (N,).
        k: How many to return (<= N).
        rng: The query's generator, which orders equal scores (None: the smaller index).

    Returns:
        (k,) int64 dataset indices, in query order.
    """
    s = _as_scores(scores)
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    indices = np.asarray(indices, dtype=np.int64)
    tie = tie_keys(rng, indices)
    # rank of each candidate within its group (0 = best), from one sort by (group, -score, tie)
    order = np.lexsort((tie, -s, g))
    g_sorted = g[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - run_start
    return indices[np.lexsort((tie, -s, rank))[:k]]
