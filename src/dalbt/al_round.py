"""One active-learning round, written once.

A round trains a model on the labelled set (or, with no label yet, pre-trains it with Barlow
Twins only: the cold start), measures it, and asks a strategy for the next ``budget`` dataset
indices. The experiment loop, the labelling project, the full-data reference and
:class:`dalbt.ActiveLearner` all call :func:`run_round`; what differs between them (who labels,
where rounds are stored, how the model is initialised across rounds) stays with the caller.

Every random stream of round ``r`` derives from ``(seed, r)``: the model's initial weights
(:data:`dalbt.rng.INIT`, or :data:`~dalbt.rng.PRETRAIN` for a cold start), the batch order
(:data:`~dalbt.rng.SHUFFLE`), the augmentations (:data:`~dalbt.rng.AUGMENT`) and the query
(:data:`~dalbt.rng.QUERY`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dalbt import rng as rngs
from dalbt.distributed import SINGLE, Dist, Lead
from dalbt.models.net import DALBTNet
from dalbt.outputs import Outputs
from dalbt.probe import head_accuracy, head_outputs
from dalbt.progress import ProgressCallback, ProgressReporter
from dalbt.recipe import TrainConfig
from dalbt.strategies import QueryContext, Strategy
from dalbt.train import TrainResult, accuracy, infer, mc_dropout_probs, pretrain_barlow

#: ``new_model(seed) -> model``: a fresh model of the run's kind, initialised from ``seed``, on
#: the run's device.
ModelFactory = Callable[[int], DALBTNet]


@dataclass
class RoundData:
    """What one round sees of the data.

    Attributes:
        images: Every image a round may touch, (N, C, H, W) uint8; index it with dataset
            indices.
        targets: Labels, (N,) int64. Only those at ``labelled`` and ``validation`` are read;
            the round hides every other one before training.
        num_classes: Number of classes K.
        labelled: Dataset indices the model trains on, (L,) int64.
        validation: Dataset indices that select the epoch, (V,) int64 (may be empty).
        unlabelled: The pool the strategy queries from, (U,) int64.
        candidates: Every index that can ever be in the pool or labelled (default: all
            indices outside ``validation``); strategies that plan across rounds use it.
        known: The labelled indices the strategy sees (default: ``labelled``).
        test: ``(images (M, C, H, W) uint8, labels (M,) int64)`` to measure the model on.
    """

    images: Tensor
    targets: Tensor
    num_classes: int
    labelled: np.ndarray
    validation: np.ndarray
    unlabelled: np.ndarray
    candidates: np.ndarray | None = None
    known: np.ndarray | None = None
    test: tuple[Tensor, Tensor] | None = None

    def __post_init__(self) -> None:
        for name in ("labelled", "validation", "unlabelled"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        if self.candidates is None:
            self.candidates = np.setdiff1d(np.arange(len(self.images)), self.validation)
        if self.known is None:
            self.known = self.labelled

    def visible_targets(self) -> Tensor:
        """``targets`` with every label outside ``labelled`` and ``validation`` set to -1, (N,)."""
        visible = torch.full_like(self.targets, -1)
        seen = torch.as_tensor(np.concatenate([self.labelled, self.validation]))
        visible[seen] = self.targets[seen]
        return visible


@dataclass
class RoundResult:
    """What one round did.

    Attributes:
        model: The trained model.
        train: Training summary (None for a cold start, which trains no classifier).
        test_acc: Accuracy on ``RoundData.test`` (None without a test set).
        queried: Dataset indices the strategy chose, (Q,) int64, in query order.
        guesses: With ``guesses=True``: the model's outputs on ``queried`` (None for a cold
            start or no query).
        t_train: Seconds spent training.
        t_score: Seconds spent preparing the strategy and computing what it asked for.
        t_select: Seconds spent in the strategy's selection.
        scored: With ``keep_scores``: what the scorers computed (pool outputs, MC-dropout
            probabilities), as dicts of tensors.
    """

    model: DALBTNet
    train: TrainResult | None
    test_acc: float | None
    queried: np.ndarray
    guesses: Outputs | None
    t_train: float
    t_score: float = 0.0
    t_select: float = 0.0
    scored: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cold_start(self) -> bool:
        """True when the round had no label to train a classifier on."""
        return self.train is None

    def metrics(self) -> dict[str, Any]:
        """The round's figures as the experiment store records them."""
        res = self.train
        return {"test_acc": self.test_acc,
                "val_acc": res.val_acc if res else None,
                "best_epoch": res.best_epoch if res else None,
                "train_ce": res.train_ce if res else None,
                "train_bt": res.train_bt if res else None,
                "t_train": self.t_train, "t_score": self.t_score, "t_select": self.t_select}


def _train(model: DALBTNet, strategy: Strategy, data: RoundData, recipe: TrainConfig, seed: int,
           round_: int, cold_start_epochs: int, dist: Dist, report: ProgressReporter
           ) -> TrainResult | None:
    """Train ``model`` for the round: supervised (the strategy's hook), or a cold start."""
    if len(data.labelled) == 0:
        assert data.candidates is not None  # set in __post_init__
        # Barlow Twins correlates a batch's two views: one image teaches nothing
        if cold_start_epochs > 0 and len(data.candidates) >= 2:
            with report.phase("pre-training", cold_start_epochs, "epoch") as phase:
                pretrain_barlow(model, data.images, data.candidates,
                                replace(recipe, pretrain_epochs=cold_start_epochs),
                                rngs.torch_generator(seed, rngs.PRETRAIN, round_),
                                rngs.torch_generator(seed, rngs.AUGMENT, round_),
                                on_epoch=phase.on_epoch("bt"), dist=dist)
        return None
    steps = recipe.steps is not None  # on_epoch then reports the step of each checkpoint
    with report.phase("training", recipe.steps if recipe.steps is not None else recipe.epochs,
                      "step" if steps else "epoch") as phase:
        return strategy.train_model(
            model, data.images, data.visible_targets(), data.labelled, data.validation, recipe,
            rngs.torch_generator(seed, rngs.SHUFFLE, round_),
            rngs.torch_generator(seed, rngs.AUGMENT, round_),
            on_epoch=phase.on_epoch("ce"), unlabelled=data.unlabelled, dist=dist)


def _query(model: DALBTNet, strategy: Strategy, data: RoundData, recipe: TrainConfig,
           new_model: ModelFactory, seed: int, round_: int, budget: int, total_rounds: int,
           guess: bool, dist: Dist, report: ProgressReporter, keep_scores: bool,
           result: RoundResult) -> None:
    """Run the strategy (on rank 0; its scoring requests run sharded on every rank)."""
    scoring = report.phase("scoring", 0, "image")  # its total grows with each request
    scored = result.scored if keep_scores and dist.is_main else None

    def score(idx: np.ndarray) -> Outputs:
        scoring.grow(len(idx))
        if recipe.finetune == "head":  # the frozen encoder's latents are stored per run
            out = head_outputs(model, data.images, idx, dist=dist,
                               cache_dir=recipe.embedding_cache)
            scoring.advance(len(idx))
        else:
            out = infer(model, data.images, idx, progress=scoring.advance, dist=dist)
        if scored is not None:
            scored.append({"kind": "outputs", "indices": torch.as_tensor(out.indices),
                           "logits": out.logits, "latents": out.latents})
        return out

    def mc_score(idx: np.ndarray, t: int, g: torch.Generator) -> Tensor:
        probs = mc_dropout_probs(model, data.images, idx, t, g, dist=dist)
        if scored is not None:
            scored.append({"kind": "mc_probs", "indices": torch.as_tensor(idx), "probs": probs})
        return probs

    lead = Lead(dist, {"score": score, "mc_score": mc_score})

    def work() -> tuple[np.ndarray, Outputs | None, float, float]:
        known = np.asarray(data.known)
        ctx = QueryContext(unlabelled=data.unlabelled, labelled=known,
                           labelled_targets=data.targets[torch.as_tensor(known)].numpy(),
                           num_classes=data.num_classes,
                           rng=rngs.numpy_rng(seed, rngs.QUERY, round_),
                           scorer=lambda idx: lead.call("score", idx),
                           round=round_, total_rounds=total_rounds, images=data.images,
                           train_config=recipe, device=str(recipe.device),
                           model_factory=new_model, candidates=data.candidates,
                           mc_scorer=lambda idx, t, g: lead.call("mc_score", idx, t, g))
        t0 = time.perf_counter()
        with scoring:
            strategy.prepare(ctx)
            ctx.prefetch(strategy.requires)
        t_score = time.perf_counter() - t0
        t0 = time.perf_counter()
        with report.phase("selecting", min(budget, len(data.unlabelled)), "image"):
            queried = strategy.select(ctx, budget)
            t_select = time.perf_counter() - t0
            guesses = infer(model, data.images, queried) if guess else None
        return queried, guesses, t_score, t_select

    result.queried, result.guesses, result.t_score, result.t_select = lead.run(work)


def run_round(strategy: Strategy, data: RoundData, recipe: TrainConfig, *, seed: int,
              round_: int, budget: int, new_model: ModelFactory, model: DALBTNet | None = None,
              total_rounds: int | None = None, cold_start_epochs: int = 0,
              trained: TrainResult | None = None, dist: Dist = SINGLE, progress: bool = False,
              on_progress: ProgressCallback | None = None, keep_scores: bool = False,
              guesses: bool = False) -> RoundResult:
    """One AL round: train (or cold-start), measure, query.

    Args:
        strategy: The query strategy; its ``train_model`` hook trains the model.
        data: The round's view of the data.
        recipe: The training recipe.
        seed: The run's seed (every stream of the round derives from it and ``round_``).
        round_: The round number (0 = trained on the initial labelled set).
        budget: Indices to query (0: train and measure only).
        new_model: Fresh models for the round (and for strategies that train their own).
        model: The model to train (default: ``new_model`` from the round's seed; a caller that
            warm-starts or loads pre-trained weights passes its own).
        total_rounds: Query rounds the caller plans (strategies that plan ahead read it).
        cold_start_epochs: With no labelled image: Barlow Twins epochs on ``candidates``
            before the strategy picks on the encoder's features (0: untrained features).
        trained: ``model`` is already trained on this labelled set (this is its training
            summary): the round measures and queries without training again.
        dist: This process's place in a distributed run (every rank calls with the same
            arguments; the strategy runs on rank 0).
        progress: Show progress bars (on stderr), one per phase.
        on_progress: Called with a :class:`~dalbt.progress.ProgressEvent` as the round goes
            through its phases (pre-training or training, scoring, selecting; a few a second
            at most, the first and last of each phase always), on rank 0 only. The bars show
            the same events.
        keep_scores: Keep what the scorers computed in ``RoundResult.scored``.
        guesses: Also return the trained model's outputs on the queried images (what a
            labelling app shows as its guess).

    Returns:
        What the round did.

    Raises:
        TrainingDiverged: The training loss became non-finite.
    """
    cold = len(data.labelled) == 0
    if trained is not None and (model is None or cold):
        raise ValueError("trained= needs the trained model and a labelled set")
    if model is None:
        model = new_model(rngs.int_seed(seed, rngs.PRETRAIN if cold else rngs.INIT, round_))
    report = ProgressReporter(on_progress if dist.is_main else None,
                              bars=progress and dist.is_main, round_=round_)
    t0 = time.perf_counter()
    if trained is not None:
        res: TrainResult | None = trained
    else:
        res = _train(model, strategy, data, recipe, seed, round_, cold_start_epochs, dist,
                     report)
        dist.broadcast_module(model)  # identical weights on every rank, whatever trained them
    result = RoundResult(model=model, train=res, test_acc=None,
                         queried=np.empty(0, dtype=np.int64), guesses=None,
                         t_train=time.perf_counter() - t0)
    if data.test is not None and recipe.finetune == "head" and not cold:
        result.test_acc = head_accuracy(model, data.test[0], data.test[1], dist,
                                        recipe.embedding_cache)
    elif data.test is not None:
        result.test_acc = accuracy(model, data.test[0], data.test[1], dist=dist)
    if budget > 0 and len(data.unlabelled):
        _query(model, strategy, data, recipe, new_model, seed, round_, budget,
               total_rounds if total_rounds is not None else round_ + 1,
               guesses and not cold, dist, report, keep_scores, result)
    return result
