"""Query strategies: one registry ``STRATEGIES`` mapping name -> class.

A strategy's options are its constructor's keyword arguments; their annotations (see
:mod:`dalbt.options`) give each option's type and range. :mod:`dalbt.catalogue` reads the same
signatures without importing torch, for the command line.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any

from dalbt.errors import DalbtError
from dalbt.options import OptionSpec, check_options, option_spec
from dalbt.strategies import (
    badge,
    bayesian,
    coreset,
    dalbt,
    dalosr,
    ensemble,
    mobyv2al,
    pt4al,
    random,
    typicality,
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
            pt4al, mobyv2al, typicality, dalbt)
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for module in _MODULES for cls in module.STRATEGY_CLASSES
}


@functools.cache
def strategy_options(cls: type[Strategy]) -> dict[str, OptionSpec]:
    """The options of a strategy class, from its constructor's signature and annotations.

    Raises:
        TypeError: A constructor argument without a default or with an unsupported annotation.
    """
    if cls.__init__ is object.__init__:
        return {}
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    out = {}
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{cls.__name__}.__init__ takes *args or **kwargs: options must be "
                            "named")
        if param.default is param.empty or param.name not in hints:
            raise TypeError(f"{cls.__name__}.__init__: option {param.name} needs an annotation "
                            "and a default")
        out[param.name] = option_spec(param.name, hints[param.name], param.default)
    return out


def build_strategy(name: str, **options: Any) -> Strategy:
    """Instantiate a registered strategy.

    Options are checked against the constructor's annotations first (type, range, choices;
    ``bool`` options also take ``"true"``/``"false"``).

    Raises:
        DalbtError: Unknown name, unknown option (the message lists the valid ones) or a bad
            value (the message names the option and what it expects).
    """
    if name not in STRATEGIES:
        raise DalbtError(f"unknown strategy {name!r}; known strategies: "
                         f"{', '.join(sorted(STRATEGIES))} (see 'dalbt strategies')")
    # a class object is hashable; mypy says otherwise (python/mypy#20409)
    options = check_options(name, strategy_options(STRATEGIES[name]),  # type: ignore[arg-type]
                            options)
    try:
        return STRATEGIES[name](**options)
    except (TypeError, ValueError) as exc:
        raise DalbtError(f"bad options for strategy {name!r}: {exc}") from None


def register_strategy(cls: type[Strategy], *, replace: bool = False) -> type[Strategy]:
    """Add a strategy of your own to :data:`STRATEGIES` (usable as a decorator).

    A registered strategy works everywhere a name is taken in Python (``build_strategy``,
    ``dalbt.select``, ``ActiveLearner``, ``run_experiment``); the command line lists and checks
    only the strategies shipped with dalbt (it reads them without importing torch).

    Args:
        cls: A :class:`Strategy` subclass with a ``name`` and ``_select``; its options are its
            constructor's annotated keyword arguments.
        replace: Allow replacing a registered strategy of the same name.

    Returns:
        ``cls``.

    Raises:
        DalbtError: Not a Strategy subclass, no name, a name already taken, or options without
            annotation and default.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise DalbtError(f"register_strategy takes a Strategy subclass, got {cls!r}")
    if not cls.name:
        raise DalbtError(f"{cls.__name__} has no 'name': set the class attribute name = '...'")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls and not replace:
        raise DalbtError(f"a strategy named {cls.name!r} is already registered; choose another "
                         "name or pass replace=True")
    try:
        strategy_options(cls)  # type: ignore[arg-type]  # python/mypy#20409
    except TypeError as exc:
        raise DalbtError(str(exc)) from None
    STRATEGIES[cls.name] = cls
    return cls


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
    "register_strategy",
    "strategy_options",
    "top_k",
    "top_k_balanced",
]
