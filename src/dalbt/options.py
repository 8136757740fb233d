"""Typed strategy options: the annotations of strategy constructors and their validation.

A strategy's options are the keyword arguments of its ``__init__``. Their annotations say what
each option accepts: ``int``, ``float``, ``bool``, ``str``, a ``Literal[...]`` of choices, any of
these ``| None``, and an allowed interval as ``Annotated[int, Range(2)]`` (or one of the aliases
below). :func:`option_spec` turns an annotation and default into an :class:`OptionSpec`, and
:func:`check_options` validates user-given values against them with messages that name the
strategy, the option and what it expects.

This module imports neither torch nor numpy: the command line validates ``-O KEY=VALUE``
against it before anything heavy loads.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from dalbt.errors import DalbtError

__all__ = [
    "Fraction",
    "NonNegativeFloat",
    "NonNegativeInt",
    "OpenUnit",
    "OptionSpec",
    "PositiveFloat",
    "PositiveInt",
    "Range",
    "UnitInterval",
    "check_options",
    "option_spec",
]


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric option, for ``Annotated[float, Range(0, 1)]``.

    Attributes:
        low: Lower bound, or ``None`` for none.
        high: Upper bound, or ``None`` for none.
        low_open: Exclude ``low`` itself.
        high_open: Exclude ``high`` itself.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


#: An integer >= 1.
PositiveInt = Annotated[int, Range(1)]
#: An integer >= 0.
NonNegativeInt = Annotated[int, Range(0)]
#: A finite number > 0.
PositiveFloat = Annotated[float, Range(0, low_open=True)]
#: A finite number >= 0.
NonNegativeFloat = Annotated[float, Range(0)]
#: A finite number in (0, 1].
Fraction = Annotated[float, Range(0, 1, low_open=True)]
#: A finite number in [0, 1].
UnitInterval = Annotated[float, Range(0, 1)]
#: A finite number in (0, 1).
OpenUnit = Annotated[float, Range(0, 1, low_open=True, high_open=True)]

_KINDS = {int: "int", float: "float", bool: "bool", str: "str"}
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


@dataclass(frozen=True)
class OptionSpec:
    """What one strategy option accepts.

    Attributes:
        name: The keyword argument's name.
        kind: ``int``, ``float``, ``bool``, ``str`` or ``choice``.
        default: Its default value.
        nullable: ``None`` is allowed too.
        range: Allowed interval of a number, or ``None``.
        choices: The allowed values of a ``choice``.
    """

    name: str
    kind: str
    default: Any
    nullable: bool = False
    range: Range | None = None
    choices: tuple[Any, ...] = ()

    def expects(self) -> str:
        """What the option expects, in words: ``an integer >= 2``, ``one of 'a', 'b'``, ..."""
        within = f" {self.range}" if self.range is not None and str(self.range) else ""
        text = {"int": f"an integer{within}", "float": f"a finite number{within}",
                "bool": "true or false", "str": "a string",
                "choice": "one of " + ", ".join(repr(c) for c in self.choices)}[self.kind]
        return f"{text} or None" if self.nullable else text

    def check(self, value: Any, strategy: str) -> Any:
        """Validate one value; return it (``bool`` options get a real bool).

        Raises:
            DalbtError: The value has the wrong type or lies outside the range.
        """
        if value is None and self.nullable:
            return None
        ok, out = self._convert(value)
        if not ok:
            raise DalbtError(f"bad options for strategy {strategy!r}: option {self.name} "
                             f"expects {self.expects()}, got {value!r}")
        return out

    def _convert(self, value: Any) -> tuple[bool, Any]:
        if self.kind == "bool":
            if isinstance(value, bool):
                return True, value
            if isinstance(value, int) and value in (0, 1):
                return True, bool(value)
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return True, value.strip().lower() in _TRUE
            return False, None
        if self.kind == "choice":
            return value in self.choices and not isinstance(value, bool), value
        if self.kind == "str":
            return isinstance(value, str), value
        if isinstance(value, bool):
            return False, None
        if self.kind == "int":
            ok = isinstance(value, int)
        else:
            ok = isinstance(value, int | float) and math.isfinite(value)
        return ok and (self.range is None or value in self.range), value


def option_spec(name: str, annotation: Any, default: Any) -> OptionSpec:
    """The :class:`OptionSpec` of a constructor argument from its annotation and default.

    Args:
        name: The argument's name.
        annotation: Its (evaluated) annotation.
        default: Its default value.

    Raises:
        TypeError: For an annotation that is not one of the supported option types.
    """
    nullable = False
    if get_origin(annotation) in (Union, types.UnionType):
        arms = [a for a in get_args(annotation) if a is not type(None)]
        if len(arms) != 1:
            raise TypeError(f"option {name}: unsupported annotation {annotation!r}")
        nullable, annotation = True, arms[0]
    bounds = None
    if get_origin(annotation) is Annotated:
        annotation, *meta = get_args(annotation)
        bounds = next((m for m in meta if isinstance(m, Range)), None)
    if get_origin(annotation) is Literal:
        return OptionSpec(name, "choice", default, nullable, None, get_args(annotation))
    if annotation not in _KINDS:
        raise TypeError(f"option {name}: unsupported annotation {annotation!r}")
    return OptionSpec(name, _KINDS[annotation], default, nullable, bounds)


def check_options(strategy: str, specs: Mapping[str, OptionSpec],
                  options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a strategy's options.

    Args:
        strategy: The strategy's name (for messages).
        specs: Its options, by name.
        options: The given values, by option name.

    Returns:
        The options, with ``bool`` options as real bools.

    Raises:
        DalbtError: An unknown option (the message lists the valid ones) or a bad value.
    """
    out = {}
    for key, value in options.items():
        if key not in specs:
            valid = (f"its options: {', '.join(specs)}" if specs
                     else "it takes no options")
            raise DalbtError(f"bad options for strategy {strategy!r}: no option {key!r}; "
                             f"{valid}")
        out[key] = specs[key].check(value, strategy)
    return out
