"""Query strategies: one registry ``STRATEGIES`` mapping name -> class."""

from __future__ import annotations

from typing import Any

from dalbt.errors import DalbtError
from dalbt.strategies.base import (
    LABELLED_OUTPUTS,
    POOL_OUTPUTS,
    Outputs,
    QueryContext,
    Strategy,
    top_k,
)
from dalbt.strategies.random import RandomStrategy
from dalbt.strategies.weibull import WeibullStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RandomStrategy, WeibullStrategy)
}


def build_strategy(name: str, **options: Any) -> Strategy:
    """Instantiate a registered strategy.

    Raises:
        DalbtError: Unknown name or bad options.
    """
    if name not in STRATEGIES:
        raise DalbtError(f"unknown strategy {name!r}; known strategies: "
                         f"{', '.join(sorted(STRATEGIES))} (see 'dalbt strategies')")
    try:
        return STRATEGIES[name](**options)
    except (TypeError, ValueError) as exc:
        raise DalbtError(f"bad options for strategy {name!r}: {exc}") from None


def list_strategies() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered strategy."""
    return [(name, cls.description) for name, cls in sorted(STRATEGIES.items())]


__all__ = [
    "LABELLED_OUTPUTS",
    "POOL_OUTPUTS",
    "STRATEGIES",
    "Outputs",
    "QueryContext",
    "Strategy",
    "build_strategy",
    "list_strategies",
    "top_k",
]
