"""Benchmark runner: a grid of strategies x seeds (x settings) over one AL protocol.

A bench config (YAML) names the protocol (any :class:`~dalbt.recipe.RunConfig` or
:class:`~dalbt.train.TrainConfig` field, flat), the ``strategies`` (a name, or a mapping with
``name``, ``options``, ``train`` overrides and ``label``), the ``seeds`` and an optional
``grid`` of settings crossed with strategies x seeds::

    dataset: digits
    initial: 30
    budget: 30
    rounds: 5
    epochs: 50
    val_size: 200
    strategies:
      - random
      - {name: random, train: {ssl_unlabelled: true}}
      - {name: weibull, options: {distance: cosine}, label: weibull-cos}
    seeds: [0, 1]
    grid:
      gamma: [0.001, 0]

Every run goes through :func:`dalbt.loop.run_experiment` with ``resume=True``: runs of a seed
share the initial labelled set, finished runs are skipped and interrupted ones continue, so a
bench can be stopped and restarted at will. Runs can execute in parallel worker processes that
write to the same experiment store (SQLite in WAL mode; each run writes only its own rows).
With ``pretrain_epochs > 0``, each shared pre-trained encoder the runs need (one per seed and
pre-training settings, see :mod:`dalbt.encoders`) is pre-trained once, before the workers
start; they only read it.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np

from dalbt import catalogue
from dalbt.errors import DalbtError
from dalbt.recipe import OOD_POLICIES, RunConfig
from dalbt.store import FULL_DATA, config_key
from dalbt.train import TrainConfig

MANIFEST = "bench.json"

# RunConfig fields a bench sets per run itself, never from the protocol.
_PER_RUN = ("strategy", "strategy_options", "seed", "train")
_RUN_TYPES = get_type_hints(RunConfig)
_TRAIN_TYPES = get_type_hints(TrainConfig)
RUN_SETTINGS = tuple(f.name for f in fields(RunConfig) if f.name not in _PER_RUN)
TRAIN_SETTINGS = tuple(f.name for f in fields(TrainConfig))
SETTINGS = RUN_SETTINGS + TRAIN_SETTINGS
_META = ("name", "description")
TOP_LEVEL = (*_META, "strategies", "seeds", "grid", *SETTINGS)
_STRATEGY_KEYS = ("name", "options", "train", "label")


@dataclass(frozen=True)
class StrategySpec:
    """One strategy entry of a bench.

    Attributes:
        name: Registered strategy name.
        options: Keyword options of the strategy.
        train: Training-recipe overrides for this strategy (TrainConfig fields).
        label: Name of the entry in progress lines and the manifest.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass
class BenchConfig:
    """A parsed, validated bench.

    Attributes:
        name: Bench name (preset name or config file stem).
        description: One line for listings.
        settings: Protocol settings shared by every run (RunConfig and TrainConfig fields).
        strategies: The strategy entries.
        seeds: The seeds; each strategy runs once per seed (and grid point).
        grid: Settings crossed with strategies x seeds, name -> values.
    """

    name: str
    description: str
    settings: dict[str, Any]
    strategies: list[StrategySpec]
    seeds: list[int]
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannedRun:
    """One run of an expanded bench.

    Attributes:
        label: Strategy label, with the grid point when the bench has a grid.
        config: The run's config.
        key: The run's identity in the store (as :func:`dalbt.loop.run_experiment` computes it).
        full_data: A full-data reference run rather than an AL run.
    """

    label: str
    config: RunConfig
    key: str
    full_data: bool = False


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce_union(value: Any, tp: Any) -> tuple[bool, Any]:
    """The first member of the union ``tp`` that ``value`` fits."""
    for arg in get_args(tp):
        ok, v = _coerce(value, arg)
        if ok:
            return True, v
    return False, value


def _coerce_float(value: Any) -> tuple[bool, Any]:
    """A number, or a string such as ``"1e-3"`` that reads as one, as a float."""
    if isinstance(value, str):
        try:
            return True, float(value)
        except ValueError:
            return False, value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return True, float(value)
    return False, value


def _coerce_list(value: Any, tp: Any) -> tuple[bool, Any]:
    """A list or tuple whose items all fit the item type of ``tp``, as a list."""
    if not isinstance(value, list | tuple):
        return False, value
    args = [a for a in get_args(tp) if a is not Ellipsis]
    out = []
    for item in value:
        ok, v = _coerce(item, args[0]) if args else (True, item)
        if not ok:
            return False, value
        out.append(v)
    return True, out


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(fits, value converted to ``tp``); YAML 1.1 reads ``1e-3`` as a string: accept it."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return _coerce_float(value)
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        return _coerce_list(value, tp)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value


def _setting(key: str, value: Any, where: str) -> Any:
    """Check one protocol setting against its field type; return it converted."""
    tp = _RUN_TYPES.get(key) or _TRAIN_TYPES[key]
    if key == "unknown_classes" and isinstance(value, list):  # names or class indices
        value = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    ok, converted = _coerce(value, tp)
    if not ok:
        raise DalbtError(f"{where}: {key} must be {_type_name(tp)}, got {value!r}")
    return converted


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise DalbtError(f"{where}: unknown key {unknown[0]!r}; allowed keys: "
                         f"{', '.join(allowed)}")


def _strategy_label(spec: StrategySpec) -> str:
    label = spec.name
    if spec.options:
        label += "(" + ",".join(f"{k}={v}" for k, v in sorted(spec.options.items())) + ")"
    for k, v in sorted(spec.train.items()):
        label += "+ssl" if k == "ssl_unlabelled" and v is True else f"+{k}={v}"
    return label


def _parse_strategy(item: Any, i: int, source: str) -> StrategySpec:
    from dalbt.strategies import build_strategy

    where = f"{source}: strategies[{i}]"
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise DalbtError(f"{where} must be a strategy name or a mapping with 'name', got "
                         f"{item!r}")
    _check_keys(item, _STRATEGY_KEYS, where)
    name = item.get("name")
    if not isinstance(name, str):
        raise DalbtError(f"{where} needs a 'name' (a strategy name), got {name!r}")
    options = item.get("options") or {}
    train = item.get("train") or {}
    for key, value in (("options", options), ("train", train)):
        if not isinstance(value, dict):
            raise DalbtError(f"{where}: {key} must be a mapping, got {value!r}")
    _check_keys(train, TRAIN_SETTINGS, f"{where}.train")
    train = {k: _setting(k, v, f"{where}.train") for k, v in train.items()}
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    try:
        build_strategy(name, **options)
    except DalbtError as exc:
        raise DalbtError(f"{where}: {exc}") from None
    label = item.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise DalbtError(f"{where}: label must be a non-empty string, got {label!r}")
    spec = StrategySpec(name=name, options=options, train=train)
    return StrategySpec(name=name, options=options, train=train,
                        label=label.strip() if label else _strategy_label(spec))


def _parse_settings(raw: dict, source: str) -> dict[str, Any]:
    """The top-level protocol settings, checked and converted (dataset, model, widths, mix)."""
    from dalbt.data import DATASETS
    from dalbt.models import MODELS

    settings = {k: _setting(k, v, source) for k, v in raw.items() if k in SETTINGS}
    dataset = str(settings.get("dataset", RunConfig.dataset)).lower().replace("_", "-")
    if dataset not in DATASETS:
        raise DalbtError(f"{source}: unknown dataset {dataset!r}; known datasets: "
                         f"{', '.join(DATASETS)}")
    settings["dataset"] = dataset
    model = settings.get("model", RunConfig.model)
    if catalogue.is_backbone(model):
        try:
            catalogue.check_model(model, settings.get("weights"), settings.get("input_size"))
        except DalbtError as exc:
            raise DalbtError(f"{source}: {exc}") from None
    elif model not in MODELS:
        raise DalbtError(f"{source}: unknown model {model!r}; known models: "
                         f"{', '.join(sorted(MODELS))}")
    if "projector_dims" in settings:
        dims = settings["projector_dims"]
        if not dims or min(dims) <= 0:
            raise DalbtError(f"{source}: projector_dims must be positive widths, got {dims!r}")
        settings["projector_dims"] = tuple(dims)
    if settings.get("mix"):
        from dalbt.data.mixing import parse_mix

        try:
            parse_mix(settings["mix"])
        except (ValueError, DalbtError) as exc:
            raise DalbtError(f"{source}: bad mix {settings['mix']!r}: {exc}") from None
    return settings


def _parse_strategies(raw: dict, source: str) -> list[StrategySpec]:
    """The ``strategies`` list, each checked, with distinct labels."""
    items = raw.get("strategies")
    if not isinstance(items, list) or not items:
        raise DalbtError(f"{source}: 'strategies' must be a non-empty list of strategy names "
                         "or mappings")
    strategies = [_parse_strategy(item, i, source) for i, item in enumerate(items)]
    labels = [s.label for s in strategies]
    dup = next((lb for lb in labels if labels.count(lb) > 1), None)
    if dup is not None:
        raise DalbtError(f"{source}: two strategies are labelled {dup!r}; give one a distinct "
                         "'label'")
    return strategies


def _parse_seeds(raw: dict, source: str) -> list[int]:
    """The ``seeds`` list (a single integer counts as a list of one); default ``[0]``."""
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                       for s in seeds)):
        raise DalbtError(f"{source}: 'seeds' must be a non-empty list of integers >= 0, got "
                         f"{seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise DalbtError(f"{source}: 'seeds' lists a seed twice: {seeds!r}")
    return list(seeds)


def _parse_grid(raw: dict, strategies: list[StrategySpec], source: str) -> dict[str, list[Any]]:
    """The ``grid`` mapping: settings the bench varies, none fixed by a strategy's ``train``."""
    grid_raw = raw.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise DalbtError(f"{source}: 'grid' must be a mapping of setting -> list of values")
    grid: dict[str, list[Any]] = {}
    for key, values in grid_raw.items():
        if key not in SETTINGS:
            raise DalbtError(f"{source}: grid: unknown setting {key!r}; the grid can vary: "
                             f"{', '.join(SETTINGS)}")
        if key in ("dataset", "model"):
            raise DalbtError(f"{source}: grid: {key} cannot vary within a bench; write one "
                             "bench per dataset and model")
        if not isinstance(values, list) or not values:
            raise DalbtError(f"{source}: grid: {key} must be a non-empty list of values")
        grid[key] = [_setting(key, v, f"{source}: grid") for v in values]
        for spec in strategies:
            if key in spec.train:
                raise DalbtError(f"{source}: strategy {spec.label!r} sets train.{key}, which "
                                 "the grid varies; set it in one place")
    return grid


def parse_config(raw: Any, source: str = "bench config", name: str = "bench") -> BenchConfig:
    """Validate a bench config mapping (as read from YAML).

    Args:
        raw: The mapping.
        source: What to call it in error messages (the file or preset).
        name: Bench name when the mapping has none.

    Returns:
        The :class:`BenchConfig`.

    Raises:
        DalbtError: Unknown keys, unknown strategy, dataset or model, bad types or values.
    """
    if not isinstance(raw, dict):
        raise DalbtError(f"{source}: expected a mapping of settings, got "
                         f"{type(raw).__name__}")
    _check_keys(raw, TOP_LEVEL, source)
    settings = _parse_settings(raw, source)
    strategies = _parse_strategies(raw, source)
    seeds = _parse_seeds(raw, source)
    grid = _parse_grid(raw, strategies, source)
    bench = BenchConfig(name=str(raw.get("name") or name),
                        description=str(raw.get("description") or ""),
                        settings=settings, strategies=strategies, seeds=seeds, grid=grid)
    for run in expand(bench)[0]:  # protocol checks that need no data
        _check_protocol(run.config, f"{source} ({run.label})")
    return bench


def _check_protocol(cfg: RunConfig, where: str) -> None:
    for name, value in (("initial", cfg.initial), ("budget", cfg.budget),
                        ("epochs", cfg.train.epochs), ("batch_size", cfg.train.batch_size),
                        ("eval_every", cfg.train.eval_every),
                        ("pretrain_batch", cfg.train.pretrain_batch)):
        if value <= 0:
            raise DalbtError(f"{where}: {name} must be positive, got {value}")
    for name, value in (("rounds", cfg.rounds), ("gamma", cfg.train.gamma),
                        ("lambd", cfg.train.lambd), ("weight_decay", cfg.train.weight_decay),
                        ("pretrain_epochs", cfg.train.pretrain_epochs)):
        if value < 0:
            raise DalbtError(f"{where}: {name} must be >= 0, got {value}")
    if cfg.train.lr <= 0:
        raise DalbtError(f"{where}: lr must be positive, got {cfg.train.lr}")
    try:
        cfg.train.check()
    except DalbtError as exc:
        raise DalbtError(f"{where}: {exc}") from None
    if cfg.val_size is not None and cfg.val_size < 0:
        raise DalbtError(f"{where}: val_size must be >= 0, got {cfg.val_size}")
    if cfg.ood_policy not in OOD_POLICIES:
        raise DalbtError(f"{where}: ood_policy must be 'return' or 'discard', got "
                         f"{cfg.ood_policy!r}")


def load_config(path: str | os.PathLike) -> BenchConfig:
    """Read and validate a bench config file (YAML).

    Raises:
        DalbtError: Missing or unreadable file, bad YAML, or an invalid config.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DalbtError(f"cannot read bench config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DalbtError(f"{path}: not valid YAML{at}: "
                         f"{getattr(exc, 'problem', None) or exc}") from None
    return parse_config(raw, str(path), name=path.stem)


def _presets_dir() -> Any:
    return resources.files("dalbt").joinpath("presets")


def preset_names() -> list[str]:
    """Names of the presets shipped with dalbt."""
    from dalbt.catalogue import preset_names

    return preset_names()


def load_preset(name: str) -> BenchConfig:
    """Read and validate a shipped preset.

    Raises:
        DalbtError: Unknown preset.
    """
    import yaml

    names = preset_names()
    if name not in names:
        raise DalbtError(f"unknown preset {name!r}; presets: {', '.join(names)} "
                         "(see 'dalbt bench --list-presets')")
    raw = yaml.safe_load(_presets_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    return parse_config(raw, f"preset {name}", name=name)


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every shipped preset (read without torch by the catalogue)."""
    from dalbt.catalogue import list_presets

    return list_presets()


# ---------------------------------------------------------------------------------------------
# Expansion


def _run_config(settings: dict[str, Any], spec: StrategySpec, seed: int) -> RunConfig:
    run = {k: v for k, v in settings.items() if k in RUN_SETTINGS}
    train = {k: v for k, v in settings.items() if k in TRAIN_SETTINGS}
    train.update(spec.train)
    if "projector_dims" in run:
        run["projector_dims"] = tuple(run["projector_dims"])
    return RunConfig(strategy=spec.name, strategy_options=dict(spec.options), seed=seed,
                     train=TrainConfig(**train), **run)


def _grid_points(bench: BenchConfig) -> list[dict[str, Any]]:
    keys = list(bench.grid)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(bench.grid[k] for k in keys))]


def _point_label(point: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in point.items())


def expand(bench: BenchConfig, full_data: bool = False
           ) -> tuple[list[PlannedRun], list[str]]:
    """The bench's runs: strategies x seeds x grid points (and full-data references).

    Combinations that cannot run (the SSL pool loss with ``gamma = 0``) are left out.

    Args:
        bench: The bench.
        full_data: Add one full-data reference run per grid point (on the first seed).

    Returns:
        (runs, notes): the planned runs, grouped by seed so that each seed's initial set is
        created once and reused; one line per left-out combination.
    """
    runs: list[PlannedRun] = []
    notes: list[str] = []
    points = _grid_points(bench)
    for seed in bench.seeds:
        for point in points:
            settings = {**bench.settings, **point}
            suffix = f" [{_point_label(point)}]" if point else ""
            for spec in bench.strategies:
                cfg = _run_config(settings, spec, seed)
                label = spec.label + suffix
                if cfg.train.ssl_unlabelled and cfg.train.gamma <= 0:
                    if seed == bench.seeds[0]:
                        notes.append(f"{label}: left out, the SSL pool loss needs gamma > 0")
                    continue
                runs.append(PlannedRun(label, cfg, config_key(cfg.key_dict())))
    if full_data:
        for point in points:
            settings = {**bench.settings, **point, "rounds": 0}
            cfg = _run_config(settings, StrategySpec(FULL_DATA), bench.seeds[0])
            cfg.train.ssl_unlabelled = False
            suffix = f" [{_point_label(point)}]" if point else ""
            runs.append(PlannedRun(FULL_DATA + suffix, cfg, "", full_data=True))
    return runs, notes


# ---------------------------------------------------------------------------------------------
# Full-data reference


def full_data_config(cfg: RunConfig, data: Any) -> tuple[RunConfig, np.ndarray, np.ndarray]:
    """The full-data run's config, its labelled indices and its validation split.

    The labelled set is every in-distribution training image outside the seed's validation
    split (the same split the AL runs of that seed use).
    """
    from dataclasses import replace

    from dalbt.data.pool import make_splits
    from dalbt.loop import ood_mask, resolve_val_size

    ood = ood_mask(data)
    in_dist = np.flatnonzero(~ood)
    val_size = resolve_val_size(cfg, len(in_dist))
    splits = make_splits(data.n_train, val_size, 1, cfg.seed,
                         candidates=in_dist if ood.any() else None)
    labelled = np.setdiff1d(in_dist, splits.validation)
    full = replace(cfg, strategy=FULL_DATA, strategy_options={}, rounds=0,
                   initial=len(labelled), budget=max(cfg.budget, 1))
    return full, labelled, splits.validation


def run_full_data(cfg: RunConfig, store: Any, data: Any = None,
                  log: Callable[[str], None] = print) -> Any:
    """Train the protocol's model and recipe on the whole training set (minus validation).

    Stored as a run with strategy ``full-data``, one round (round 0, no query); skipped when
    the store already holds it finished. With ``pretrain_epochs``, it starts from the seed's
    shared Barlow Twins encoder, as the AL runs do.

    Args:
        cfg: The protocol (its strategy and rounds are ignored).
        store: The experiment :class:`~dalbt.store.Store`.
        data: The loaded dataset (loaded from ``cfg`` when None).
        log: Where the one-line summary goes.

    Returns:
        The run's :class:`~dalbt.store.RunRecord`.
    """
    import torch

    from dalbt import rng as rngs
    from dalbt.al_round import RoundData, run_round
    from dalbt.data import load_dataset
    from dalbt.loop import apply_scenario, encoder_state
    from dalbt.models import build_model
    from dalbt.strategies import Strategy

    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_root)
    raw, data = data, apply_scenario(cfg, data)
    full, labelled, validation = full_data_config(cfg, data)
    key = config_key(full.key_dict())
    run = store.find_run(key)
    if run is not None and run.status == "finished":
        log(f"run {run.id} ({FULL_DATA}, seed {full.seed}) already finished")
        return run
    if run is None:
        run = store.create_run(full.to_dict(), labelled, key=key)
    device = torch.device(full.train.device)

    def new_model(seed: int) -> torch.nn.Module:
        return build_model(full.model, data.channels, data.image_size, data.num_classes,
                           latent_dim=full.latent_dim, projector_dims=full.projector_dims,
                           seed=seed, weights=full.weights,
                           input_size=full.input_size).to(device)

    round_data = RoundData(images=data.x_train, targets=data.y_train,
                           num_classes=data.num_classes, labelled=labelled,
                           validation=validation, unlabelled=np.empty(0, dtype=np.int64),
                           test=(data.x_test, data.y_test))
    model = new_model(rngs.int_seed(full.seed, rngs.INIT, 0))
    if full.train.pretrain_epochs > 0:  # the seed's shared encoder, as the AL runs start from
        model.load_state_dict(encoder_state(cfg, store.directory, raw, progress=False, log=log))
    res = run_round(Strategy(), round_data, full.train, seed=full.seed, round_=0, budget=0,
                    new_model=new_model, model=model)
    metrics = {"n_labelled": len(labelled), **res.metrics()}
    store.record_round(run.id, 0, metrics, np.empty(0, dtype=np.int64), finished=True)
    log(f"[{FULL_DATA} seed {full.seed}] labelled {len(labelled)}  val {metrics['val_acc']:.4f}  "
        f"test {res.test_acc:.4f}  train {res.t_train:.1f}s")
    return store.find_run(key) or run


# ---------------------------------------------------------------------------------------------
# Execution

_DATA_CACHE: dict[tuple[str, str | None], Any] = {}


def _dataset(name: str, root: str | None) -> Any:
    from dalbt.data import load_dataset

    if (name, root) not in _DATA_CACHE:
        _DATA_CACHE.clear()  # one dataset per bench: keep at most one in memory
        _DATA_CACHE[(name, root)] = load_dataset(name, root)
    return _DATA_CACHE[(name, root)]


#: Where a bench worker process sends its progress (set by :func:`_init_worker`).
_WORKER_EVENTS: Any = None

#: ``report(event)``: a run's progress, as tuples ``("start", index, pid)`` and
#: ``("round", index, rounds done, rounds of the run, seconds of the round)``.
Report = Callable[[tuple], object]


def _init_worker(threads: int, events: Any = None) -> None:
    import torch

    global _WORKER_EVENTS
    torch.set_num_threads(threads)
    _WORKER_EVENTS = events


def _execute_in_worker(task: dict[str, Any]) -> dict[str, Any]:
    """:func:`execute` in a worker process, reporting to the queue of :func:`_init_worker`."""
    return execute(task, None if _WORKER_EVENTS is None else _WORKER_EVENTS.put)


def execute(task: dict[str, Any], report: Report | None = None) -> dict[str, Any]:
    """Run (or resume, or skip) one planned run; the unit of work of a bench worker.

    Args:
        task: ``config`` (RunConfig dict), ``out`` (store directory), ``label``, ``full_data``
            and, for progress, ``index`` (its place in the bench's list).
        report: Called with the run's progress (see :data:`Report`); None for none.

    Returns:
        Summary: label, seed, n_labelled and test_acc of the last round, seconds.
    """
    from dalbt.loop import run_experiment
    from dalbt.store import Store

    cfg = RunConfig.from_dict(task["config"])
    data = _dataset(cfg.dataset, cfg.data_root)
    index = task.get("index", -1)
    on_round = None
    if report is not None:
        report(("start", index, os.getpid()))
        on_round = lambda done, total, seconds: report(  # noqa: E731
            ("round", index, done, total, seconds))
    t0 = time.perf_counter()
    with Store(task["out"]) as store:
        if task["full_data"]:
            run = run_full_data(cfg, store, data, log=lambda s: None)
            if on_round is not None:
                on_round(1, 1, time.perf_counter() - t0)
        else:
            run = run_experiment(cfg, store, resume=True, progress=False, data=data,
                                 log=lambda s: None, on_round=on_round)
        rounds = store.rounds(run.id)
    last = rounds[-1] if rounds else {}
    return {"label": task["label"], "seed": cfg.seed, "run_id": run.id,
            "n_labelled": last.get("n_labelled"), "test_acc": last.get("test_acc"),
            "seconds": time.perf_counter() - t0, "index": index}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _status(store: Any, run: PlannedRun, data_for_full: Callable[[], Any]) -> str:
    """'finished', 'resume at round k' or 'new'."""
    key = run.key
    if run.full_data:
        from dalbt.loop import apply_scenario

        full, _, _ = full_data_config(run.config, apply_scenario(run.config, data_for_full()))
        key = config_key(full.key_dict())
    rec = store.find_run(key)
    if rec is None:
        return "new"
    if rec.status == "finished":
        return "finished"
    return f"resume at round {len(store.rounds(rec.id))}"


def _rounds_done(status: str) -> int:
    """Rounds a run has from an earlier bench, from its :func:`_status`."""
    return int(status.rsplit(" ", 1)[1]) if status.startswith("resume at round ") else 0


def _write_manifest(out: Path, bench: BenchConfig, runs: list[PlannedRun]) -> None:
    """Record run key -> label in ``out/bench.json`` (merged with earlier benches)."""
    path = out / MANIFEST
    try:
        manifest = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        manifest = {}
    labels = manifest.setdefault("labels", {})
    for run in runs:
        if not run.full_data:
            labels[run.key] = run.label
    manifest.setdefault("benches", {})[bench.name] = {
        "settings": {k: list(v) if isinstance(v, tuple) else v
                     for k, v in bench.settings.items()},
        "grid": bench.grid, "seeds": bench.seeds,
        "strategies": [s.label for s in bench.strategies]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _plan_runs(bench: BenchConfig, full_data: bool, device: str | None,
               data_root: str | None, pretrain_cache: str | None = None
               ) -> tuple[list[PlannedRun], list[str]]:
    """The bench's runs with the device, data root and encoder cache overrides applied, and
    its notes."""
    runs, notes = expand(bench, full_data=full_data)
    for run in runs:
        if device is not None:
            run.config.train.device = device
        if data_root is not None:
            run.config.data_root = data_root
        if pretrain_cache is not None:
            run.config.pretrain_cache = pretrain_cache
    return runs, notes


def _validate_runs(bench: BenchConfig, runs: list[PlannedRun], data: Any) -> None:
    """Check the protocol against the data, once per scenario and pool size."""
    from dalbt.loop import apply_scenario, validate

    checked: set[tuple] = set()
    for run in runs:
        cfg = run.config
        sig = (tuple(cfg.unknown_classes), cfg.mix, cfg.val_size, cfg.initial, cfg.budget,
               cfg.rounds, run.full_data)
        if sig not in checked and not run.full_data:
            checked.add(sig)
            try:
                validate(cfg, apply_scenario(cfg, data))
            except DalbtError as exc:
                raise DalbtError(f"bench {bench.name} ({run.label}): {exc}") from None


def _run_statuses(out: Path, runs: list[PlannedRun], data: Any) -> list[str]:
    """The status of every run in the store at ``out`` (see :func:`_status`)."""
    from dalbt.store import Store

    store = Store(out)  # creates the database (WAL) before any worker opens it
    try:
        return [_status(store, run, lambda: data) for run in runs]
    finally:
        store.close()


def _needs_encoder(store: Any, run: PlannedRun, out: Path) -> bool:
    """Whether ``run`` will read a shared pre-trained encoder: it pre-trains, and it has no
    pre-training checkpoint of its own from before the shared cache."""
    from dalbt.encoders import legacy_path

    if run.full_data or run.config.train.pretrain_epochs <= 0:
        return False
    rec = store.find_run(run.key)
    return rec is None or not legacy_path(out, rec.id).exists()


def _pretrain_encoders(out: Path, todo: list[PlannedRun], data: Any, progress: bool,
                       log: Callable[[str], None]) -> None:
    """Pre-train each shared encoder that the runs to do need, once, in this process and
    before the workers start, so that they only read it (see :mod:`dalbt.encoders`)."""
    from dalbt.encoders import encoder_covers
    from dalbt.loop import prepare_encoder
    from dalbt.store import Store

    with Store(out) as store:
        needed = [run for run in todo if _needs_encoder(store, run, out)]
    seen: set[str] = set()
    t0, made = time.perf_counter(), 0
    for run in needed:
        cfg = run.config  # one encoder per data, model, seed and pre-training settings
        sig = json.dumps([encoder_covers(cfg, 0, 0), cfg.val_size, cfg.pretrain_cache])
        if sig in seen:
            continue
        seen.add(sig)
        made += prepare_encoder(cfg, out, data, progress=progress, log=log)[1]
    if made:
        log(f"pre-trained {made} shared encoder{'s' if made > 1 else ''} of {len(seen)} "
            f"needed in {_fmt_time(time.perf_counter() - t0)}")


def _plan_line(bench: BenchConfig, n_runs: int, n_todo: int, full_data: bool,
               out: Path) -> str:
    """One line: how many runs the bench has, where, how many are finished and to run."""
    n_seeds = len(bench.seeds)
    return (f"bench {bench.name}: {n_runs} runs ({len(bench.strategies)} strategies x "
            f"{n_seeds} seeds"
            f"{' x ' + str(len(_grid_points(bench))) + ' grid points' if bench.grid else ''}"
            f"{' + full-data' if full_data else ''}) in {out}: {n_runs - n_todo} finished, "
            f"{n_todo} to run")


class _BenchProgress:
    """The bench's progress from its runs' round events: a bar of rounds done (tqdm, on a
    terminal) with a bar per running run under it, or one log line per event; and the overall
    ETA from the measured round times.

    Args:
        tasks: The tasks, with ``rounds`` (rounds of the run) and ``done_before`` (rounds it
            has from an earlier bench).
        jobs: Runs that run at once.
        name: The bench's name.
        bars: Show tqdm bars on stderr.
        round_log: Write one line per run start and round (when there are no bars).
        log: Where lines go.
    """

    def __init__(self, tasks: list[dict[str, Any]], jobs: int, name: str, bars: bool,
                 round_log: bool, log: Callable[[str], None]) -> None:
        from tqdm.auto import tqdm

        self.tasks, self.jobs, self.name, self.log = tasks, jobs, name, log
        self.round_log = round_log and not bars
        self.bars = bars
        self.left = {i: t["rounds"] - t["done_before"] for i, t in enumerate(tasks)}
        self.done = {i: t["done_before"] for i, t in enumerate(tasks)}
        self.total_rounds = sum(self.left.values())
        self.rounds_done = 0
        self.round_seconds = 0.0
        self.finished: set[int] = set()
        self.running: dict[int, Any] = {}  # index -> its bar (None without bars)
        self.slots: list[int | None] = []  # the running run on each line under the bar
        self.pid: dict[int, int] = {}
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=self.total_rounds, desc=f"bench {name}", unit="round",
                        file=sys.stderr, disable=not bars, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "rounds [{elapsed}{postfix}]")
        self._postfix()

    def eta(self) -> float | None:
        """Seconds left for the whole bench: the rounds left at the mean measured round time,
        run ``jobs`` at a time (None before the first round)."""
        if not self.rounds_done:
            return None
        left = self.total_rounds - self.rounds_done
        parallel = max(1, min(self.jobs, len(self.tasks) - len(self.finished)))
        return left * self.round_seconds / self.rounds_done / parallel

    def eta_text(self) -> str:
        eta = self.eta()
        return "ETA ?" if eta is None else f"ETA {_fmt_time(eta)}"

    def _who(self, i: int) -> str:
        t = self.tasks[i]
        return f"{t['label']} seed {t['config']['seed']}"

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"runs {len(self.finished)}/{len(self.tasks)}, "
                                 f"{self.eta_text()}", refresh=True)

    def event(self, ev: tuple) -> None:
        """A worker's event (see :data:`Report`)."""
        from tqdm.auto import tqdm

        kind, i = ev[0], ev[1]
        if i not in self.left or i in self.finished:
            return
        if kind == "start":
            self.pid[i] = ev[2]
            t = self.tasks[i]
            slot = self.slots.index(None) if None in self.slots else len(self.slots)
            self.slots[slot:slot + 1] = [i]
            self.running[i] = tqdm(total=t["rounds"], initial=t["done_before"],
                                   desc=self._who(i), unit="round", file=sys.stderr,
                                   position=slot + 1, leave=False, dynamic_ncols=True,
                                   bar_format="  {desc}: round {n_fmt}/{total_fmt} "
                                              "[{elapsed}]") if self.bars else None
            if self.round_log:
                self.log(f"bench {self.name}: {self._who(i)} started at round "
                         f"{t['done_before']}/{t['rounds']}")
        elif kind == "round":
            done, total, seconds = ev[2], ev[3], ev[4]
            step = max(0, done - self.done[i])
            self.done[i] = done
            self.rounds_done += step
            self.round_seconds += seconds if step else 0.0
            self.bar.update(step)
            bar = self.running.get(i)
            if bar is not None:
                bar.update(done - bar.n)
            self._postfix()
            if self.round_log:
                self.log(f"bench {self.name}: {self._who(i)} round {done}/{total} "
                         f"({seconds:.1f}s); {self.rounds_done}/{self.total_rounds} rounds, "
                         f"{self.eta_text()}")

    def finish(self, i: int) -> None:
        """Task ``i`` ended (its rounds left count as done: a finished run may have been
        shorter than planned)."""
        bar = self.running.pop(i, None)
        if bar is not None:
            bar.close()
        self.slots = [None if k == i else k for k in self.slots]
        self.finished.add(i)
        step = max(0, self.tasks[i]["rounds"] - self.done[i])
        self.rounds_done += step
        self.bar.update(step)
        self._postfix()

    def dead_worker(self) -> str | None:
        """A running run whose worker process is gone (killed, out of memory): its name."""
        import multiprocessing as mp

        alive = {p.pid for p in mp.active_children()}
        for i in self.running:
            if i in self.pid and self.pid[i] not in alive:
                return self._who(i)
        return None

    def close(self) -> None:
        for bar in self.running.values():
            if bar is not None:
                bar.close()
        self.bar.close()


def _execute_tasks(tasks: list[dict[str, Any]], jobs: int, name: str, progress: bool,
                   log: Callable[[str], None], summary: dict[str, Any], threads: int | None,
                   round_log: bool = False) -> None:
    """Run the tasks (in ``jobs`` worker processes of ``threads`` torch threads when more than
    one), adding each result to ``summary`` and logging one line with the ETA as it finishes;
    the runs' rounds feed :class:`_BenchProgress`."""
    from tqdm.auto import tqdm

    jobs = min(jobs, len(tasks))
    prog = _BenchProgress(tasks, jobs, name, progress, round_log, log)

    def done(res: dict[str, Any]) -> None:
        summary["ran"] += 1
        summary["results"].append(res)
        prog.finish(res["index"])
        k = summary["ran"]
        acc = res["test_acc"]
        acc_text = f"{acc:.4f}" if acc is not None else "n/a"
        line = (f"[{k}/{len(tasks)}] {res['label']} seed {res['seed']}: test {acc_text} at "
                f"{res['n_labelled']} labels, {res['seconds']:.1f}s ({prog.eta_text()})")
        with tqdm.external_write_mode(file=sys.stderr):
            log(line)

    try:
        if jobs == 1:
            _execute_here(tasks, threads, prog, done)
        else:
            _execute_pool(tasks, jobs, threads or max(1, _cores() // jobs), prog, done)
    finally:
        prog.close()


def _execute_here(tasks: list[dict[str, Any]], threads: int | None, prog: _BenchProgress,
                  done: Callable[[dict[str, Any]], None]) -> None:
    """Run the tasks one after the other in this process (with ``threads`` torch threads)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for task in tasks:
            done(execute(task, prog.event))
    finally:
        torch.set_num_threads(before)


def _execute_pool(tasks: list[dict[str, Any]], jobs: int, threads: int, prog: _BenchProgress,
                  done: Callable[[dict[str, Any]], None]) -> None:
    """Run the tasks in ``jobs`` worker processes; their events come back through a managed
    queue (a worker that dies cannot jam it), read between results."""
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        events = manager.Queue()

        def drain() -> None:
            while True:
                try:
                    prog.event(events.get_nowait())
                except queue.Empty:
                    return

        with ctx.Pool(jobs, initializer=_init_worker, initargs=(threads, events)) as pool:
            results = pool.imap_unordered(_execute_in_worker, tasks)
            while True:
                try:
                    res = results.next(timeout=0.5)
                except mp.TimeoutError:
                    drain()
                    gone = prog.dead_worker()
                    if gone is not None:
                        raise DalbtError(
                            f"the worker running {gone} died (killed, or out of memory?); "
                            "run the bench again to resume, perhaps with fewer --jobs") from None
                    continue
                except StopIteration:
                    break
                drain()
                done(res)
            pool.close()  # let workers exit cleanly (terminate() on exit would kill them)
            pool.join()


def run_bench(
    bench: BenchConfig,
    out: str | os.PathLike,
    jobs: int = 1,
    full_data: bool = False,
    dry_run: bool = False,
    device: str | None = None,
    data_root: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pretrain_cache: str | None = None,
    threads: int | None = None,
    round_log: bool = False,
) -> dict[str, Any]:
    """Run every run of a bench that is not finished yet.

    Args:
        bench: The bench.
        out: Experiment directory (one store for all runs).
        jobs: Parallel worker processes (1: run in this process).
        full_data: Also train the full-data reference run(s).
        dry_run: Only print the plan (label, seed, status of every run).
        device: torch device of every run (None: the bench's setting).
        data_root: Dataset directory of every run (None: the bench's setting).
        progress: Show progress bars on stderr (pre-training with its loss; rounds done of the
            bench, with the runs done and the ETA from the measured round times; a bar per
            running run with its rounds).
        log: Where the plan and the one-line summary per finished run go.
        pretrain_cache: Directory of the shared pre-trained encoders of every run (None: the
            bench's setting, else ``out``); each one a run needs is pre-trained here before
            the workers start.
        threads: torch threads of each run (default: cores // jobs with several jobs; with
            one, this process's setting).
        round_log: Without bars: log one line when a run starts and at each round (with the
            bench's rounds done and ETA).

    Returns:
        ``{"total", "finished_before", "ran", "left_out", "results"}``.

    Raises:
        DalbtError: A run failed (bad protocol for the data, ...).
    """
    if jobs < 1:
        raise DalbtError(f"--jobs must be positive, got {jobs}")
    if threads is not None and threads < 1:
        raise DalbtError(f"--threads must be positive, got {threads}")
    runs, notes = _plan_runs(bench, full_data, device, data_root, pretrain_cache)
    out = Path(out)
    data = _dataset(bench.settings["dataset"], runs[0].config.data_root)
    _validate_runs(bench, runs, data)
    status = _run_statuses(out, runs, data)
    todo = [run for run, st in zip(runs, status, strict=True) if st != "finished"]
    for note in notes:
        log(note)
    log(_plan_line(bench, len(runs), len(todo), full_data, out))
    summary = {"total": len(runs), "finished_before": len(runs) - len(todo), "ran": 0,
               "left_out": notes, "results": []}
    if dry_run:
        for run, st in zip(runs, status, strict=True):
            log(f"  {run.label:<40s} seed {run.config.seed:<3d} {st}")
        return summary
    if not todo:
        return summary
    _write_manifest(out, bench, runs)
    tasks = [{"config": run.config.to_dict(), "out": str(out), "label": run.label,
              "full_data": run.full_data, "index": i,
              "rounds": 1 if run.full_data else run.config.rounds + 1,
              "done_before": _rounds_done(st)}
             for i, (run, st) in enumerate(
                 (r, st) for r, st in zip(runs, status, strict=True) if st != "finished")]
    _pretrain_encoders(out, todo, data, progress, log)
    _execute_tasks(tasks, jobs, bench.name, progress, log, summary, threads, round_log)
    return summary
