"""Uniform random sampling, the baseline every AL strategy must beat."""

from __future__ import annotations

import numpy as np

from dalbt.strategies.base import QueryContext, Strategy


class RandomStrategy(Strategy):
    """Uniform sampling without replacement from the unlabelled pool."""

    name = "random"
    description = "Uniform random sampling without replacement (baseline)"
    label_free = True

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        return ctx.rng.choice(ctx.unlabelled, size=n, replace=False)


STRATEGY_CLASSES = (RandomStrategy,)
