"""What dalbt offers, without importing torch: strategies (with their typed options), models,
datasets and the shipped bench presets.

Listing commands and the validation of names and ``-O`` options read this catalogue, so they
answer in a fraction of a second; the implementations load only when a run starts.

The strategy entries are derived from the strategy modules' source (``STRATEGY_CLASSES``, each
class's ``name``, ``description`` and ``__init__`` signature) without executing them: annotations
and defaults are evaluated against the modules' torch-free constants (``Literal`` aliases,
``Range``, ``DEFAULT_*``). ``tests/test_cli_catalogue.py`` checks that the result equals what
``dalbt.strategies.STRATEGIES`` gives when imported.
"""

from __future__ import annotations

import ast
import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dalbt.errors import DalbtError
from dalbt.options import OptionSpec, check_options, option_spec

__all__ = [
    "DATASETS",
    "MODELS",
    "StrategyInfo",
    "check_cold_start",
    "check_dataset",
    "check_model",
    "is_backbone",
    "min_image_size",
    "check_preset",
    "check_strategy",
    "dataset_key",
    "list_datasets",
    "list_models",
    "list_presets",
    "list_strategies",
    "preset_names",
    "strategies",
]

#: Model name -> one-line description (the registry with the builders is
#: ``dalbt.models.MODELS``).
MODELS: dict[str, str] = {
    "lenet": "LeNet-5 style CNN (paper's MNIST/Fashion-MNIST encoder), latent 60",
    "vgg16": "VGG16 with batch norm, CIFAR-style (paper's CIFAR-10 encoder), latent 512",
    "resnet18": "CIFAR-style ResNet-18 (3x3 stem, no max pooling), latent 512",
    "resnet18-w16": "CIFAR-style ResNet-18 at a quarter width (16-32-64-128), latent 128: "
                    "the benchmarks' CPU-pre-trained Barlow Twins encoder",
}

#: Library prefixes of ``--model LIBRARY:NAME`` (``dalbt.models.backbones``).
BACKBONE_LIBRARIES = ("timm", "torchvision")

#: Model name -> smallest image side it supports (``dalbt.models.MODELS`` takes it from here).
MODEL_MIN_IMAGE_SIZE: dict[str, int] = {"lenet": 8, "vgg16": 1, "resnet18": 1,
                                        "resnet18-w16": 1}

#: Dataset name -> one-line description, in listing order (the loaders are
#: ``dalbt.data.DATASETS``).
DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; embedded, "
              "always available)",
    "mnist": "MNIST handwritten digits (28x28 grayscale, 60000/10000, 10 classes)",
    "fashion-mnist": "Fashion-MNIST clothing (28x28 grayscale, 60000/10000, 10 classes)",
    "kmnist": "Kuzushiji-MNIST cursive hiragana (28x28 grayscale, 60000/10000, 10 classes)",
    "cifar10": "CIFAR-10 objects (32x32 colour, 50000/10000, 10 classes)",
    "svhn": "SVHN street-view house-number digits (32x32 colour, 73257/26032, 10 classes)",
    "folder": "your own images: --data-root DIR with one sub-folder per class (or train/ and "
              "test/), or a flat folder of unlabelled images",
}


@dataclass(frozen=True)
class StrategyInfo:
    """A strategy as the catalogue knows it.

    Attributes:
        name: Registry name (``--strategy``).
        description: One line for listings.
        options: Its options (``-O KEY=VALUE``), by name, in signature order.
        label_free: It reads no label and no classifier output, so it can choose the first
            images to label (a cold start).
    """

    name: str
    description: str
    options: Mapping[str, OptionSpec] = field(default_factory=dict)
    label_free: bool = False


# --------------------------------------------------------------------------------------------
# Strategies: read from the modules' source
# --------------------------------------------------------------------------------------------

_PACKAGE = Path(__file__).resolve().parent
# Modules whose names are taken from the real (torch-free) module rather than its source.
_REAL_MODULES = ("typing", "math", "dalbt.options")
_BUILTINS = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple,
             "frozenset": frozenset, "dict": dict, "list": list}


class _Namespace(dict):
    """A module's evaluable constants; names imported from other dalbt modules are looked up
    (and those modules parsed) only when an expression uses them."""

    def __init__(self, imported: dict[str, tuple[str, str]]) -> None:
        super().__init__()
        self.imported = imported

    def __missing__(self, key: str) -> Any:
        if key not in self.imported:
            raise KeyError(key)
        module, name = self.imported[key]
        value = self[key] = _module(module).constants[name]
        return value


@dataclass
class _Module:
    """What a module's source defines: evaluable constants, classes, imported names."""

    constants: _Namespace
    classes: dict[str, ast.ClassDef]
    imported: dict[str, tuple[str, str]]  # local name -> (module, name)


def _eval(node: ast.expr, namespace: dict[str, Any]) -> Any:
    code = compile(ast.Expression(body=node), "<catalogue>", "eval")
    return eval(code, {"__builtins__": _BUILTINS}, namespace)  # noqa: S307 - dalbt's own source


def _add_import_from(mod: _Module, stmt: ast.ImportFrom) -> None:
    """``from x import y``: the real value for a module we may import, a lazy link for a
    dalbt module, nothing otherwise."""
    assert stmt.module is not None
    for alias in stmt.names:
        local = alias.asname or alias.name
        if stmt.module in _REAL_MODULES:
            real = importlib.import_module(stmt.module)
            if hasattr(real, alias.name):
                mod.constants[local] = getattr(real, alias.name)
        elif stmt.module.startswith("dalbt."):
            mod.imported[local] = (stmt.module, alias.name)


def _add_import(mod: _Module, stmt: ast.Import) -> None:
    """``import x`` of a top-level module we may import (no alias)."""
    for alias in stmt.names:
        if alias.name in _REAL_MODULES and alias.asname is None and "." not in alias.name:
            mod.constants[alias.name] = importlib.import_module(alias.name)


def _add_assign(mod: _Module, stmt: ast.Assign | ast.AnnAssign) -> None:
    """``NAME = expr``: the value, when it evaluates from the constants known so far."""
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    if len(targets) == 1 and isinstance(targets[0], ast.Name):
        assert stmt.value is not None
        try:
            mod.constants[targets[0].id] = _eval(stmt.value, mod.constants)
        except Exception:  # needs torch, numpy, a function...: not a constant for us
            pass


@functools.cache
def _module(name: str) -> _Module:
    parts = name.split(".")[1:]
    path = _PACKAGE.joinpath(*parts)
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    imported: dict[str, tuple[str, str]] = {}
    mod = _Module(_Namespace(imported), {}, imported)
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            _add_import_from(mod, stmt)
        elif isinstance(stmt, ast.Import):
            _add_import(mod, stmt)
        elif isinstance(stmt, ast.ClassDef):
            mod.classes[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None:
            _add_assign(mod, stmt)
    return mod


def _class_attr(module: str, cls: str, attr: str) -> tuple[str, ast.AST] | None:
    """The defining module and node of a class attribute (``__init__`` or an assignment),
    searched along the bases as Python would (single inheritance suffices here)."""
    mod = _module(module)
    node = mod.classes.get(cls)
    if node is None:
        if cls in mod.imported:
            return _class_attr(*mod.imported[cls], attr)
        return None
    for stmt in node.body:
        if attr == "__init__" and isinstance(stmt, ast.FunctionDef) and stmt.name == attr:
            return module, stmt
        if isinstance(stmt, ast.Assign | ast.AnnAssign) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return module, stmt.value
    for base in node.bases:
        if isinstance(base, ast.Name):
            found = _class_attr(module, base.id, attr)
            if found is not None:
                return found
    return None


def _attr_value(module: str, cls: str, attr: str) -> Any:
    found = _class_attr(module, cls, attr)
    if found is None:
        return None
    where, node = found
    assert isinstance(node, ast.expr)
    return _eval(node, _module(where).constants)


def _options(module: str, cls: str) -> dict[str, OptionSpec]:
    found = _class_attr(module, cls, "__init__")
    if found is None:
        return {}
    where, init = found
    assert isinstance(init, ast.FunctionDef)
    ns = _module(where).constants
    args = init.args
    if args.vararg or args.kwarg:
        raise TypeError(f"{cls}.__init__ takes *args or **kwargs: options must be named")
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True))[1:]  # drop self
    pairs += list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    out = {}
    for arg, default in pairs:
        if arg.annotation is None or default is None:
            raise TypeError(f"{cls}.__init__: option {arg.arg} needs an annotation and a default")
        out[arg.arg] = option_spec(arg.arg, _eval(arg.annotation, ns), _eval(default, ns))
    return out


@functools.cache
def strategies() -> dict[str, StrategyInfo]:
    """Every registered strategy, by name, read from the strategy modules' source."""
    out = {}
    for path in sorted((_PACKAGE / "strategies").glob("*.py")):
        module = f"dalbt.strategies.{path.stem}"
        if path.stem == "__init__" or "STRATEGY_CLASSES" not in path.read_text(encoding="utf-8"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for stmt in tree.body:
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id == "STRATEGY_CLASSES"
                    and isinstance(stmt.value, ast.Tuple | ast.List)):
                for elt in stmt.value.elts:
                    if not isinstance(elt, ast.Name):
                        raise TypeError(f"{module}.STRATEGY_CLASSES must name classes")
                    name = _attr_value(module, elt.id, "name")
                    if not isinstance(name, str) or not name:
                        raise TypeError(f"{module}.{elt.id} has no 'name'")
                    out[name] = StrategyInfo(name, _attr_value(module, elt.id, "description") or "",
                                             _options(module, elt.id),
                                             bool(_attr_value(module, elt.id, "label_free")))
    return out


def list_strategies() -> list[tuple[str, str]]:
    """(name, one-line description) of every strategy, sorted by name."""
    return [(name, info.description) for name, info in sorted(strategies().items())]


def check_strategy(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate a strategy name and its options, without importing the strategy.

    Args:
        name: Strategy name.
        options: Its options (``-O KEY=VALUE``).

    Returns:
        The options as :func:`dalbt.options.check_options` returns them.

    Raises:
        DalbtError: Unknown strategy (the message lists the known ones), unknown option (lists
            the valid ones) or a value of the wrong type or range.
    """
    known = strategies()
    if name not in known:
        raise DalbtError(f"unknown strategy {name!r}; known strategies: "
                         f"{', '.join(sorted(known))} (see 'dalbt strategies')")
    return check_options(name, known[name].options, options or {})


def check_cold_start(name: str) -> None:
    """Check that strategy ``name`` can choose images before any label exists.

    Raises:
        DalbtError: Unknown strategy, or one that needs labels or a trained classifier.
    """
    check_strategy(name)
    if not strategies()[name].label_free:
        free = ", ".join(n for n, info in sorted(strategies().items()) if info.label_free)
        raise DalbtError(f"strategy {name!r} needs labels, so it cannot choose the first images "
                         f"to label; cold-start strategies: {free}")


# --------------------------------------------------------------------------------------------
# Models and datasets
# --------------------------------------------------------------------------------------------


def list_models() -> list[tuple[str, str]]:
    """(name, description) of every model, sorted by name."""
    return sorted(MODELS.items())


def is_backbone(name: str) -> bool:
    """Whether ``name`` is a ``timm:NAME`` / ``torchvision:NAME`` backbone."""
    library, sep, _ = name.partition(":")
    return bool(sep) and library in BACKBONE_LIBRARIES


def min_image_size(name: str) -> int:
    """Smallest image side a model takes (a backbone resizes its input: 1)."""
    return 1 if is_backbone(name) else MODEL_MIN_IMAGE_SIZE[name]


def check_model(name: str, weights: str | None = None, input_size: int | None = None) -> None:
    """Raise :class:`DalbtError` naming the known models if ``name`` is not one.

    A ``timm:NAME`` / ``torchvision:NAME`` backbone is checked by creating it with random
    weights (its library loads; nothing is downloaded), with the weights file's existence and
    the input size it is fed; registered models take no ``weights``.
    """
    if is_backbone(name):
        from dalbt.models.backbones import backbone_info
        from dalbt.weightfiles import check_weights

        check_weights(weights)
        backbone_info(name, input_size)
        return
    if weights is not None:
        raise DalbtError(f"--weights is for timm:NAME or torchvision:NAME backbones, not "
                         f"model {name!r}")
    if input_size is not None:
        raise DalbtError(f"--input-size is for timm:NAME or torchvision:NAME backbones, not "
                         f"model {name!r}")
    if name not in MODELS:
        raise DalbtError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
                         "(see 'dalbt models'), or timm:NAME / torchvision:NAME")


def dataset_key(name: str) -> str:
    """A dataset name as the registry spells it (case-insensitive; ``_`` may stand for ``-``)."""
    return name.strip().lower().replace("_", "-")


def list_datasets() -> list[tuple[str, str]]:
    """(name, description) of every dataset, in registry order."""
    return list(DATASETS.items())


def check_dataset(name: str) -> None:
    """Raise :class:`DalbtError` naming the known datasets if ``name`` is not one."""
    if dataset_key(name) not in DATASETS:
        raise DalbtError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} "
                         "(see 'dalbt datasets')")


# --------------------------------------------------------------------------------------------
# Bench presets
# --------------------------------------------------------------------------------------------


def _presets_dir() -> Any:
    return resources.files("dalbt").joinpath("presets")


def preset_names() -> list[str]:
    """Names of the presets shipped with dalbt."""
    return sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every shipped preset (read from its ``description`` key; the
    preset is validated only when it is run)."""
    import yaml

    out = []
    for name in preset_names():
        raw = yaml.safe_load(_presets_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
        out.append((name, str(raw.get("description") or "") if isinstance(raw, dict) else ""))
    return out


def check_preset(name: str) -> None:
    """Raise :class:`DalbtError` naming the shipped presets if ``name`` is not one."""
    names = preset_names()
    if name not in names:
        raise DalbtError(f"unknown preset {name!r}; presets: {', '.join(names)} "
                         "(see 'dalbt bench --list-presets')")

