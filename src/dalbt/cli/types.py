"""argparse argument types of the ``dalbt`` command line, and its defaults.

Each one turns the text of an argument into its value or raises ``ArgumentTypeError``, which
argparse reports as ``dalbt: error: argument --lr: expected a finite number > 0, got 'nan'``
(exit code 2). They import nothing heavy, so bad input is rejected before torch loads.

The command line's defaults are those of the config dataclasses (:class:`~dalbt.recipe.RunConfig`,
:class:`~dalbt.recipe.TrainConfig`, :class:`~dalbt.labelling.config.ProjectConfig`), read
through :func:`field_defaults` where a class cannot be made without arguments.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from collections.abc import Callable
from typing import Any

from dalbt.labelling.config import MAX_BUDGET, MAX_IMAGE_SIZE
from dalbt.recipe import FLOAT32_MAX, MAX_BATCH, MAX_LR, MAX_SEED, MAX_WIDTH

__all__ = [
    "add_backbone_options",
    "batch_size",
    "dims",
    "field_defaults",
    "finite_float",
    "fraction",
    "image_size",
    "int_range",
    "name_list",
    "non_negative_float",
    "non_negative_int",
    "option",
    "port",
    "positive_float",
    "positive_int",
    "query_budget",
    "seed",
    "seed_list",
    "threads",
    "width",
]


def field_defaults(cls: type) -> dict[str, Any]:
    """The default of every field of a dataclass that has one (default factories called).

    Args:
        cls: A dataclass, e.g. :class:`~dalbt.labelling.config.ProjectConfig`.

    Returns:
        Field name -> default value.
    """
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``: the value as a Python literal if it is one (``3``,
    ``0.5``, ``True``, ``None``), else the text; ``-`` in the key reads as ``_``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        parsed = value
    return key.strip().replace("-", "_"), parsed


def positive_int(text: str) -> int:
    """An integer > 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


MAX_THREADS = 1024  # more than any machine has cores; a bigger value overflows torch


def int_range(low: int, high: int, what: str = "") -> Callable[[str], int]:
    """An argument type for an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"expected {what or 'an integer'} from {low} to "
                                             f"{high}, got {text}")
        return v

    parse.__name__ = "integer"
    return parse


#: A number of CPU threads (``--threads``).
threads = int_range(1, MAX_THREADS, "a number of threads")
#: A training batch size (``--batch-size``, ``--pretrain-batch``).
batch_size = int_range(2, MAX_BATCH, "a batch size")
#: A layer width (``--latent-dim``).
width = int_range(1, MAX_WIDTH, "a width")
#: A run's seed (``--seed``).
seed = int_range(0, MAX_SEED, "a seed")
#: A TCP port (``--port``; 0: any free one).
port = int_range(0, 65535, "a TCP port")
#: Images per query of a labelling project (``--budget`` of ``query`` and ``serve``).
query_budget = int_range(1, MAX_BUDGET, "a number of images")
#: The side images are resized to (``--image-size``).
image_size = int_range(1, MAX_IMAGE_SIZE, "an image side in pixels")


def finite_float(low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> Callable[[str], float]:
    """An argument type for a finite number in a range (nan and inf are always rejected).

    Args:
        low: Smallest allowed value, or ``None``.
        high: Largest allowed value, or ``None``.
        low_open: ``low`` itself is not allowed.
        high_open: ``high`` itself is not allowed.

    Returns:
        ``text -> float``, raising ``ArgumentTypeError`` with the allowed range.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    expected = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        ok = math.isfinite(v)
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v < high if high_open else v <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if abs(v) > FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"expected {expected} that float32 can hold (at "
                                             f"most {FLOAT32_MAX:.1e}), got {text!r}")
        return v

    parse.__name__ = "finite number"  # what argparse names the type in its own messages
    return parse


#: A finite number > 0 (``--lr``).
positive_float = finite_float(0, MAX_LR, low_open=True)
#: A finite number >= 0 (``--gamma``, ``--lambd``, ``--weight-decay``).
non_negative_float = finite_float(0)
#: A share in [0, 1) (``--val-fraction``).
fraction = finite_float(0, 1, high_open=True)


def dims(text: str) -> tuple[int, ...]:
    """Layer widths like ``256-256-256`` (or ``256,256``), each > 0."""
    try:
        out = tuple(int(t) for t in text.replace(",", "-").split("-") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 256-256-256, got {text!r}"
                                         ) from None
    if not out or min(out) <= 0 or max(out) > MAX_WIDTH:
        raise argparse.ArgumentTypeError(f"expected widths from 1 to {MAX_WIDTH}, got {text!r}")
    return out


def seed_list(text: str) -> list[int]:
    """Seeds like ``0,1,2`` (integers >= 0)."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected seeds (integers >= 0) like 0,1,2, got "
                                         f"{text!r}")
    return seeds


def name_list(text: str) -> list[str]:
    """Names like ``a,b,c`` (empty items dropped)."""
    return [c for c in text.split(",") if c]


def add_backbone_options(p: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--input-size``, for ``timm:NAME`` / ``torchvision:NAME`` models."""
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="a backbone's weights: a .pth/.safetensors file, 'default' (the "
                        "library's download, needs internet; the default for a backbone) or "
                        "'none' (random)")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="N",
                   help="side a backbone's input is resized to (default: the backbone's own, "
                        "e.g. 224; smaller is much faster on a CPU)")
