"""Deep ensembles with the variation ratio (Beluch et al. 2018)."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np
import torch
from torch import Tensor

from dalbt.options import PositiveInt, Range
from dalbt.strategies.base import QueryContext, Strategy, tie_keys


def variation_ratio(votes: np.ndarray | Tensor, num_classes: int) -> np.ndarray:
    """Variation ratio ``1 - (votes of the modal class) / M`` of each sample.

    Args:
        votes: Predicted class of each member for each sample, (M, U) int.
        num_classes: K.

    Returns:
        (U,) float64 in [0, 1 - 1/min(M, K)]; 0 where all members agree.
    """
    v = votes.cpu().numpy() if isinstance(votes, Tensor) else np.asarray(votes)
    m, u = v.shape
    counts = np.zeros((u, num_classes), dtype=np.int64)
    cols = np.arange(u)
    for member in v:  # a loop over the M members, vectorised over the pool
        counts[cols, member] += 1
    return 1.0 - counts.max(axis=1) / max(m, 1)


def mean_entropy(mean_probs: np.ndarray | Tensor) -> np.ndarray:
    """Entropy (nats) of the ensemble's mean class probabilities, (U, K) -> (U,) float64."""
    p = mean_probs.double() if isinstance(mean_probs, Tensor) else torch.from_numpy(
        np.asarray(mean_probs, dtype=np.float64))
    return -(p * p.clamp_min(1e-300).log()).sum(dim=1).numpy()


def rank_by_variation_ratio(votes: np.ndarray | Tensor, mean_probs: np.ndarray | Tensor,
                            indices: np.ndarray, k: int,
                            rng: np.random.Generator | None = None) -> np.ndarray:
    """The ``k`` samples the ensemble disagrees on most.

    Ranked by decreasing variation ratio, ties by decreasing entropy of the mean probabilities,
    remaining ties in random order from ``rng`` (None: increasing dataset index).

    Args:
        votes: Member predictions, (M, U) int.
        mean_probs: Mean of the members' softmax probabilities, (U, K).
        indices: Dataset indices of the U samples, (U,).
        k: How many to return (<= U).
        rng: The query's generator (orders exact ties).

    Returns:
        (k,) int64 dataset indices, most wanted first.
    """
    indices = np.asarray(indices, dtype=np.int64)
    vr = variation_ratio(votes, mean_probs.shape[1])
    ent = mean_entropy(mean_probs)
    order = np.lexsort((tie_keys(rng, indices), -ent, -vr))[:k]
    return indices[order]


class EnsembleVarRatioStrategy(Strategy):
    """Ensemble variation ratio (Beluch, Genewein, Nürnberger & Köhler, 2018, "The power of
    ensembles for active learning in image classification", CVPR).

    Each round ``members`` models of the run's kind are trained from independent random
    initialisations (seeds drawn from the query rng; mini-batch order and augmentations from
    their own query-derived generators) with the run's recipe on the labelled set, and each
    predicts the pool. Samples are queried by decreasing variation ratio
    ``1 - f_m / M`` (``f_m``: members voting for the modal class); the many ties of this discrete
    score are broken by the entropy of the ensemble's mean probabilities, then by dataset index.
    Members are discarded after the query (none is kept across rounds).

    Deviation: the context has no validation split, so members get no model selection: an empty
    validation set is passed to ``train_round``, which keeps the last epoch's weights.

    Args:
        members: Ensemble size M (>= 2).
        epochs: Training epochs of each member (the epoch recipe, also in a run with the step
            recipe); ``None`` uses the run's recipe.
    """

    name = "ensemble-varratio"
    description = "Deep ensemble of M retrained models: query the highest variation ratio"

    def __init__(self, members: Annotated[int, Range(2)] = 5,
                 epochs: PositiveInt | None = None) -> None:
        if int(members) != members or members < 2:
            raise ValueError(f"members must be an integer >= 2, got {members}")
        if epochs is not None and (int(epochs) != epochs or epochs < 1):
            raise ValueError(f"epochs must be a positive integer or None, got {epochs}")
        self.members = int(members)
        self.epochs = None if epochs is None else int(epochs)
        # (context, member votes (M, U), mean probabilities (U, K)) of the current query
        self._state: tuple[QueryContext, Tensor, Tensor] | None = None

    def prepare(self, ctx: QueryContext) -> None:
        """Train the ensemble on the labelled set and record its votes on the pool."""
        from dalbt.train import infer, train_round  # dalbt.train imports this package

        images: Tensor = ctx.require("images")
        factory = ctx.require("model_factory")
        cfg = ctx.require("train_config")
        if self.epochs is not None:  # its own epochs: the epoch recipe
            cfg = dataclasses.replace(cfg, epochs=self.epochs, steps=None, eval_every_steps=None)
        # train_round indexes labels by dataset index: -1 marks samples it must never use.
        y = torch.full((len(images),), -1, dtype=torch.int64)
        y[torch.from_numpy(ctx.labelled)] = torch.from_numpy(ctx.labelled_targets)
        no_validation = np.empty(0, dtype=np.int64)
        votes, prob_sum = [], torch.zeros(len(ctx.unlabelled), ctx.num_classes,
                                          dtype=torch.float64)
        for _ in range(self.members):
            model = factory(int(ctx.rng.integers(0, 2**63 - 1)))
            # train_round isolates torch's global RNG itself, seeded from the shuffle generator
            train_round(model, images, y, ctx.labelled, no_validation, cfg,
                        ctx.torch_generator(), ctx.torch_generator())
            out = infer(model, images, ctx.unlabelled)
            votes.append(out.predictions)
            prob_sum += out.probs.double()
            del model
        self._state = (ctx, torch.stack(votes), prob_sum / self.members)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        if self._state is None or self._state[0] is not ctx:
            self.prepare(ctx)
        assert self._state is not None
        _, votes, mean_probs = self._state
        self._state = None
        return rank_by_variation_ratio(votes, mean_probs, ctx.unlabelled, n, rng=ctx.rng)


STRATEGY_CLASSES = (EnsembleVarRatioStrategy,)
