"""Query strategies: one registry ``STRATEGIES`` mapping name -> class."""

from __future__ import annotations

from typing import Any

from dalbt.errors import DalbtError
from dalbt.strategies import (
    badge,
    bayesian,
    coreset,
    dalosr,
    ensemble,
    mobyv2al,
    pt4al,
    random,
    uncertainty,
    vaal,
    waal,
    weibull,
)
from dalbt.strategies.base import (
    LABELLED_OUTPUTS,
    POOL_OUTPUTS,
    Outputs,
    QueryContext,
    Strategy,
    top_k,
    top_k_balanced,
)

# Every strategy module lists its classes in STRATEGY_CLASSES.
_MODULES = (random, weibull, uncertainty, bayesian, coreset, badge, ensemble, vaal, waal, dalosr,
            pt4al, mobyv2al)
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for module in _MODULES for cls in module.STRATEGY_CLASSES
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
    "top_k_balanced",
]
