"""Query strategies on arrays: pick samples from a model's outputs, without a dalbt model.

:func:`select` runs a registered strategy on what a user's own model produced for the pool
(class probabilities or logits, embeddings, MC-dropout samples) and, where the strategy uses it,
for the labelled set (embeddings, probabilities, labels). It serves these arrays through a
:class:`~dalbt.strategies.QueryContext`, so the strategy code is the same one the experiment
loop runs. What a strategy needs is what it asks the context for: asking for an array that was
not passed raises a :class:`~dalbt.errors.DalbtError` naming the argument. Strategies that
train models of their own on the images (VAAL, ensembles, PT4AL, DAL-OSR) or train the task
model their own way (MoBYv2AL) cannot run on arrays; they raise an error pointing to the
model-level API.

What each strategy reads (checked by ``tests/test_selection.py``)::

    strategy            pool                  labelled set
    random              (nothing)             -
    entropy, least-confidence, margin
                        probs                 -
    badge               probs, embeddings     -
    coreset, typiclust, probcover
                        embeddings            labelled_embeddings (optional: cold start)
    weibull, weibull-balanced
                        probs, embeddings     labelled_embeddings, labelled_probs,
                                              labelled_targets
    dalbt               probs, embeddings     labelled_embeddings, labelled_probs,
                                              labelled_targets (optional: cold start)
    waal                probs, embeddings     labelled_embeddings (at least one row)
    mc-dropout, bald, var-ratio, batchbald
                        mc_probs              -

``probs`` stands for ``probs`` or ``logits`` (and ``labelled_probs`` for ``labelled_probs`` or
``labelled_logits``).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from dalbt import rng as streams
from dalbt.errors import DalbtError
from dalbt.strategies import (
    LABELLED_OUTPUTS,
    STRATEGIES,
    Outputs,
    QueryContext,
    Strategy,
    build_strategy,
)

__all__ = ["MODEL_LEVEL_API", "ArrayInput", "select"]

# Where strategies that need images or their own training are pointed to.
MODEL_LEVEL_API = "dalbt.ActiveLearner"

ArrayInput = npt.ArrayLike | Tensor

# Row sums of probabilities may be off by this much (float16 or float32 softmax outputs).
PROB_SUM_TOLERANCE = 1e-2
# Probabilities are clamped to this before the log, so that logits stay finite in float32.
_TINY = float(torch.finfo(torch.float32).tiny)

_NEEDS = {
    "logits": "probs or logits: the model's class probabilities (or logits) on the pool, "
              "shape (N, K)",
    "latents": "embeddings: the model's feature vectors of the pool (e.g. its penultimate "
               "layer), shape (N, D)",
    "labelled_logits": "labelled_probs or labelled_logits: the model's class probabilities "
                       "(or logits) on the labelled set, shape (L, K)",
    "labelled_latents": "labelled_embeddings: the model's feature vectors of the labelled set, "
                        "shape (L, D)",
    "labelled_targets": "labelled_targets: the class labels of the labelled set, shape (L,)",
    "mc_probs": "mc_probs: MC-dropout class probabilities of the pool, shape (N, T, K)",
}
_KEYWORDS = ("probs", "logits", "embeddings", "mc_probs", "labelled_embeddings",
             "labelled_probs", "labelled_logits", "labelled_targets", "indices", "num_classes",
             "seed")


def select(strategy: str | Strategy, budget: int, *,
           probs: ArrayInput | None = None,
           logits: ArrayInput | None = None,
           embeddings: ArrayInput | None = None,
           mc_probs: ArrayInput | None = None,
           labelled_embeddings: ArrayInput | None = None,
           labelled_probs: ArrayInput | None = None,
           labelled_logits: ArrayInput | None = None,
           labelled_targets: ArrayInput | None = None,
           indices: ArrayInput | None = None,
           num_classes: int | None = None,
           seed: int = 0,
           **options: Any) -> np.ndarray:
    """Choose ``budget`` pool samples with a query strategy, from arrays of model outputs.

    Arrays may be numpy arrays, torch tensors (any device; they are copied to the CPU as
    float32) or nested sequences. Pass only what the strategy reads (see the module docstring);
    a missing one raises an error that names it.

    Args:
        strategy: A registered strategy name (``dalbt strategies`` lists them) or a
            :class:`~dalbt.strategies.Strategy` instance.
        budget: Number of samples wanted (> 0); all N when the pool is smaller.
        probs: Class probabilities of the pool, (N, K), rows summing to 1. Turned into logits
            ``log(max(p, tiny))``, whose softmax gives them back.
        logits: Classifier logits of the pool, (N, K) (instead of ``probs``).
        embeddings: Feature vectors of the pool, (N, D) (e.g. the penultimate layer).
        mc_probs: MC-dropout class probabilities of the pool, (N, T, K), T >= 2 dropout samples
            (the MC strategies' ``samples`` option defaults to T).
        labelled_embeddings: Feature vectors of the labelled set, (L, D).
        labelled_probs: Class probabilities of the labelled set, (L, K).
        labelled_logits: Logits of the labelled set, (L, K) (instead of ``labelled_probs``).
        labelled_targets: Class labels of the labelled set, (L,) integers in [0, K).
        indices: The pool's own dataset indices, (N,) unique integers; the result is then
            given in them instead of in row positions.
        num_classes: Number of classes K; inferred from the arrays when omitted.
        seed: Seed of the strategy's randomness (ties, sampling): the same arrays and seed give
            the same indices.
        **options: The strategy's options (``dalbt strategies NAME`` lists them); only with a
            strategy name.

    Returns:
        (min(budget, N),) int64 indices: row positions in the pool arrays (or entries of
        ``indices``), unique, in query order (most wanted first).

    Raises:
        DalbtError: Unknown strategy or option, a missing, misshapen or non-finite input, or a
            strategy that needs images or training of its own (use :data:`MODEL_LEVEL_API`).
    """
    _check_strategy(strategy, options)
    _check_budget(budget)
    pool = _Pool.build(probs=probs, logits=logits, embeddings=embeddings, mc_probs=mc_probs,
                       indices=indices)
    labelled = _Labelled.build(embeddings=labelled_embeddings, probs=labelled_probs,
                               logits=labelled_logits, targets=labelled_targets)
    k = _num_classes(pool, labelled, num_classes)
    strat = _strategy(strategy, options, pool.mc_probs)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DalbtError(f"seed must be a non-negative integer, got {seed!r}")
    if pool.size == 0:
        return np.empty(0, dtype=np.int64)
    ctx = _ArrayContext(strat.name, pool, labelled, k, streams.numpy_rng(int(seed), streams.QUERY))
    try:
        strat.prepare(ctx)
        chosen = strat.select(ctx, int(budget))
    except RuntimeError as exc:  # a strategy's own complaint about the data it was given
        hint = ""
        if LABELLED_OUTPUTS in strat.requires and labelled.size == 0:
            hint = (" (it uses the labelled set: pass labelled_embeddings and, where it needs "
                    "them, labelled_probs and labelled_targets)")
        raise DalbtError(f"strategy {strat.name!r} cannot select from these arrays: "
                         f"{exc}{hint}") from exc
    return pool.indices[chosen] if pool.indices is not None else chosen


def _check_strategy(strategy: str | Strategy, options: dict[str, Any]) -> None:
    """Fail before reading any array for an unknown strategy, option or misspelt argument, and
    for a strategy that trains the task model its own way (it overrides
    ``Strategy.train_model``): outputs of the user's model do not fit it."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            build_strategy(strategy)  # raises the unknown-strategy error listing the names
        cls: type[Strategy] = STRATEGIES[strategy]
        specs = _option_names(cls)
        for key in options:
            close = difflib.get_close_matches(key, _KEYWORDS, n=1)
            if key not in specs and close:
                raise DalbtError(f"select() got an unknown argument {key!r}; did you mean "
                                 f"{close[0]!r}?")
    elif isinstance(strategy, Strategy):
        if options:
            raise DalbtError(f"options ({', '.join(sorted(options))}) only go with a strategy "
                             "name; set them when building the Strategy instance")
        cls = type(strategy)
    else:
        raise DalbtError(f"strategy must be a strategy name or a dalbt Strategy, got "
                         f"{type(strategy).__name__}")
    if cls.train_model is not Strategy.train_model:
        raise DalbtError(f"strategy {cls.name!r} trains the task model its own way, so it "
                         "cannot select from the outputs of a model trained otherwise; use the "
                         f"model-level API {MODEL_LEVEL_API} with your model and dataset")


def _strategy(strategy: str | Strategy, options: dict[str, Any],
              mc_probs: Tensor | None) -> Strategy:
    """The strategy to run (checked by :func:`_check_strategy`); the MC strategies' ``samples``
    option defaults to the T of ``mc_probs``."""
    if isinstance(strategy, Strategy):
        return strategy
    if mc_probs is not None and "samples" in _option_names(STRATEGIES[strategy]) \
            and "samples" not in options:
        t = mc_probs.shape[1]
        if t < 2:
            raise DalbtError(f"mc_probs has T={t} MC-dropout sample; strategy {strategy!r} "
                             "needs T >= 2, shape (N, T, K)")
        options = {**options, "samples": t}
    return build_strategy(strategy, **options)


def _option_names(cls: type[Strategy]) -> set[str]:
    """Names of a strategy's options (its constructor's keyword arguments)."""
    return set(inspect.signature(cls).parameters)


def _check_budget(budget: Any) -> None:
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget <= 0:
        raise DalbtError(f"budget must be a positive integer, got {budget!r}")


def _tensor(name: str, value: ArrayInput, shape: str) -> Tensor:
    """``value`` as a CPU tensor of a real dtype with as many dimensions as ``shape`` names,
    checked for NaN and infinities."""
    if isinstance(value, Tensor):
        t = value.detach().cpu()
    else:
        try:
            a = np.asarray(value)
        except (TypeError, ValueError) as exc:
            raise DalbtError(f"{name} must be an array of shape {shape}: {exc}") from None
        if a.dtype.kind not in "biuf":
            raise DalbtError(f"{name} must be a numeric array of shape {shape}, got dtype "
                             f"{a.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if t.is_complex() or t.dtype == torch.bool:
        raise DalbtError(f"{name} must be a real-valued array of shape {shape}, got {t.dtype}")
    ndim = len([axis for axis in shape.strip("()").split(",") if axis.strip()])
    if t.ndim != ndim:
        raise DalbtError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.is_floating_point() and t.numel():
        bad = ~torch.isfinite(t.reshape(len(t), -1)).all(dim=1)
        if bad.any():
            row = int(torch.nonzero(bad)[0, 0])
            raise DalbtError(f"{name} has NaN or infinite values (first in row {row}); pass "
                             "finite values")
    return t


def _logits(name: str, probs: ArrayInput | None, logits_name: str,
            logits: ArrayInput | None, shape: str) -> Tensor | None:
    """(rows, K) float32 logits from either probabilities or logits (not both)."""
    if probs is not None and logits is not None:
        raise DalbtError(f"pass either {name} or {logits_name}, not both")
    if logits is not None:
        return _tensor(logits_name, logits, shape).float()
    if probs is None:
        return None
    return torch.log(_probabilities(name, probs, shape).clamp_min(_TINY))


def _probabilities(name: str, value: ArrayInput, shape: str) -> Tensor:
    """Probabilities along the last dimension, checked: in [0, 1], summing to 1; float32."""
    p = _tensor(name, value, shape)
    if p.numel():
        low, high = float(p.min()), float(p.max())
        if low < 0 or high > 1 + PROB_SUM_TOLERANCE:
            raise DalbtError(f"{name} must hold probabilities in [0, 1], got values in "
                             f"[{low:.4g}, {high:.4g}]; pass logits instead if they are scores")
        sums = p.sum(dim=-1, dtype=torch.float64)
        off = (sums - 1).abs().reshape(-1)
        if float(off.max()) > PROB_SUM_TOLERANCE:
            first = int(torch.nonzero(off > PROB_SUM_TOLERANCE)[0, 0])
            raise DalbtError(f"{name} must sum to 1 over the classes (the last axis); entry "
                             f"{first} sums to {float(sums.reshape(-1)[first]):.4g}")
    return p.float()


@dataclass
class _Pool:
    """The pool's arrays, checked: row i of each is pool sample i."""

    size: int
    logits: Tensor | None
    embeddings: Tensor | None
    mc_probs: Tensor | None
    indices: np.ndarray | None

    @classmethod
    def build(cls, *, probs: ArrayInput | None, logits: ArrayInput | None,
              embeddings: ArrayInput | None, mc_probs: ArrayInput | None,
              indices: ArrayInput | None) -> _Pool:
        lg = _logits("probs", probs, "logits", logits, "(N, K)")
        emb = None if embeddings is None else _tensor("embeddings", embeddings, "(N, D)").float()
        mc = None if mc_probs is None else _probabilities("mc_probs", mc_probs, "(N, T, K)")
        idx = None if indices is None else _indices(indices)
        given = {name: len(t) for name, t in (("probs" if probs is not None else "logits", lg),
                                              ("embeddings", emb), ("mc_probs", mc),
                                              ("indices", idx)) if t is not None}
        if not given:
            raise DalbtError("select needs the pool: pass probs (or logits), embeddings or "
                             "mc_probs, whichever the strategy uses (or indices for 'random')")
        _same("rows (N)", given)
        if lg is not None and mc is not None:
            _same("classes (K)", {"probs/logits": lg.shape[1], "mc_probs": mc.shape[2]})
        return cls(next(iter(given.values())), lg, emb, mc, idx)


@dataclass
class _Labelled:
    """The labelled set's arrays, checked (size 0 and all None when none was passed)."""

    size: int
    logits: Tensor | None
    embeddings: Tensor | None
    targets: np.ndarray | None

    @classmethod
    def build(cls, *, embeddings: ArrayInput | None, probs: ArrayInput | None,
              logits: ArrayInput | None, targets: ArrayInput | None) -> _Labelled:
        lg = _logits("labelled_probs", probs, "labelled_logits", logits, "(L, K)")
        emb = None if embeddings is None else _tensor("labelled_embeddings", embeddings,
                                                      "(L, D)").float()
        y = None if targets is None else _targets(targets)
        given = {name: len(t) for name, t in (
            ("labelled_probs" if probs is not None else "labelled_logits", lg),
            ("labelled_embeddings", emb), ("labelled_targets", y)) if t is not None}
        if given:
            _same("rows (L)", given)
        return cls(next(iter(given.values()), 0), lg, emb, y)


def _indices(value: ArrayInput) -> np.ndarray:
    t = _tensor("indices", value, "(N,)")
    if t.is_floating_point() and t.numel() and not bool((t == t.round()).all()):
        raise DalbtError("indices must be integers, shape (N,)")
    idx = t.numpy().astype(np.int64)
    if len(np.unique(idx)) != len(idx):
        raise DalbtError("indices must be unique: each pool sample has its own dataset index")
    return idx


def _targets(value: ArrayInput) -> np.ndarray:
    t = _tensor("labelled_targets", value, "(L,)")
    if t.numel() and (bool((t < 0).any()) or (t.is_floating_point()
                                               and not bool((t == t.round()).all()))):
        raise DalbtError("labelled_targets must be class labels: integers >= 0, shape (L,)")
    return t.numpy().astype(np.int64)


def _same(what: str, sizes: dict[str, int]) -> None:
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {n}" for name, n in sizes.items())
        raise DalbtError(f"the arrays disagree on the number of {what}: {listed}")


def _num_classes(pool: _Pool, labelled: _Labelled, num_classes: int | None) -> int:
    """K from the arrays, checked against ``num_classes`` and the labels (0 when unknown)."""
    sizes = {name: int(t.shape[-1]) for name, t in (
        ("probs/logits", pool.logits), ("mc_probs", pool.mc_probs),
        ("labelled_probs/logits", labelled.logits)) if t is not None}
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) \
                or num_classes < 1:
            raise DalbtError(f"num_classes must be a positive integer, got {num_classes!r}")
        sizes["num_classes"] = int(num_classes)
    _same("classes (K)", sizes)
    if pool.embeddings is not None and labelled.embeddings is not None:
        _same("embedding dimensions (D)", {"embeddings": pool.embeddings.shape[1],
                                           "labelled_embeddings": labelled.embeddings.shape[1]})
    y = labelled.targets
    top = int(y.max()) + 1 if y is not None and len(y) else 0
    k = next(iter(sizes.values()), top)
    if top > k:
        raise DalbtError(f"labelled_targets has label {top - 1} but there are {k} classes; "
                         "labels must be in [0, K)")
    return k


class _ArrayOutputs(Outputs):
    """:class:`Outputs` over given arrays; a field that was not given raises a DalbtError
    naming the argument to pass."""

    _values: dict[str, Tensor | None]
    _needs: dict[str, str]

    def __init__(self, indices: np.ndarray, logits: Tensor | None, latents: Tensor | None,
                 needs: dict[str, str]) -> None:
        # Outputs is frozen: set the state without its generated __init__.
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "_values", {"logits": logits, "latents": latents})
        object.__setattr__(self, "_needs", needs)

    def _value(self, name: str) -> Tensor:
        value = self._values[name]
        if value is None:
            raise DalbtError(self._needs[name])
        return value

    @property
    def logits(self) -> Tensor:
        return self._value("logits")

    @property
    def latents(self) -> Tensor:
        return self._value("latents")

    def __repr__(self) -> str:
        return f"_ArrayOutputs(n={len(self.indices)})"


class _ArrayContext(QueryContext):
    """A query context that serves given arrays; the pool's dataset indices are the row
    positions 0..N-1 and the labelled set's N..N+L-1."""

    def __init__(self, name: str, pool: _Pool, labelled: _Labelled, num_classes: int,
                 rng: np.random.Generator) -> None:
        self._name = name
        self._pool = pool
        self._lab = labelled
        n, size = pool.size, labelled.size
        targets = labelled.targets if labelled.targets is not None else np.zeros(size, np.int64)
        super().__init__(unlabelled=np.arange(n), labelled=np.arange(n, n + size),
                         labelled_targets=targets, num_classes=num_classes, rng=rng)
        self._targets_given = labelled.targets is not None

    def _needs(self, key: str) -> str:
        return f"strategy {self._name!r} needs {_NEEDS[key]}"

    @property
    def labelled_targets(self) -> np.ndarray:
        if not getattr(self, "_targets_given", True):
            raise DalbtError(self._needs("labelled_targets"))
        return self._targets

    @labelled_targets.setter
    def labelled_targets(self, value: np.ndarray) -> None:
        self._targets = value

    def pool_outputs(self) -> Outputs:
        return _ArrayOutputs(self.unlabelled, self._pool.logits, self._pool.embeddings,
                             {"logits": self._needs("logits"),
                              "latents": self._needs("latents")})

    def labelled_outputs(self) -> Outputs:
        return _ArrayOutputs(self.labelled, self._lab.logits, self._lab.embeddings,
                             {"logits": self._needs("labelled_logits"),
                              "latents": self._needs("labelled_latents")})

    def mc_probs(self, samples: int) -> Tensor:
        mc = self._pool.mc_probs
        if mc is None:
            raise DalbtError(self._needs("mc_probs"))
        if mc.shape[1] != samples:
            raise DalbtError(f"strategy {self._name!r} is set to samples={samples} but mc_probs "
                             f"has T={mc.shape[1]} MC-dropout samples; pass mc_probs of shape "
                             f"(N, {samples}, K) or the option samples={mc.shape[1]}")
        return mc

    def require(self, what: str) -> Any:
        raise DalbtError(f"strategy {self._name!r} trains models of its own (it needs the "
                         f"run's {what}), so it cannot select from arrays of model outputs; use "
                         f"the model-level API {MODEL_LEVEL_API} with your model and dataset")
