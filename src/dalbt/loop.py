"""The active-learning loop with a simulated oracle.

Round r trains a model on the labelled set of round r, records its validation and test
accuracy, then (except after the last round) asks the strategy for ``budget`` dataset indices,
which the oracle labels for round r + 1. The loop knows nothing about any particular strategy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalbt import rng as rngs
from dalbt.al_round import RoundData, RoundResult, run_round
from dalbt.checkpoint import apply_state, read_checkpoint, remove_checkpoint, save_checkpoint
from dalbt.data import ImageDataset, load_dataset
from dalbt.data.pool import HELD_OUT, Pool, Splits, make_splits
from dalbt.distributed import SINGLE, Dist
from dalbt.encoders import SharedEncoder, legacy_path, read_shared
from dalbt.errors import DalbtError
from dalbt.models import build_model
from dalbt.models.net import DALBTNet
from dalbt.recipe import MAX_SEED, MAX_WIDTH, OOD_POLICIES, RunConfig, check_int
from dalbt.store import FULL_DATA, RunRecord, Store, config_key
from dalbt.strategies import build_strategy


def resolve_val_size(cfg: RunConfig, n_train: int) -> int:
    return min(5000, n_train // 10) if cfg.val_size is None else int(cfg.val_size)


def with_embedding_cache(cfg: RunConfig, directory: Path | None) -> RunConfig:
    """``cfg`` with its frozen encoder's embeddings cached on disk (``--finetune head``): in
    ``cfg.pretrain_cache`` (shared by experiments), else the experiment directory."""
    if cfg.train.finetune != "head" or cfg.train.embedding_cache is not None:
        return cfg
    root = cfg.pretrain_cache or directory
    if root is None:
        return cfg
    return replace(cfg, train=replace(cfg.train, embedding_cache=str(Path(root).expanduser())))


def validate(cfg: RunConfig, data: ImageDataset) -> None:
    """Check the protocol against the data; raise DalbtError naming the fix."""
    if cfg.initial <= 0:
        raise DalbtError(f"--initial must be positive, got {cfg.initial}")
    if cfg.budget <= 0:
        raise DalbtError(f"--budget must be positive, got {cfg.budget}")
    if cfg.rounds < 0:
        raise DalbtError(f"--rounds must be >= 0, got {cfg.rounds}")
    cfg.train.check()
    check_int("--seed", cfg.seed, 0, MAX_SEED)
    if cfg.latent_dim is not None:
        check_int("--latent-dim", cfg.latent_dim, 1, MAX_WIDTH)
    for width in cfg.projector_dims:
        check_int("--projector width", width, 1, MAX_WIDTH)
    if cfg.ood_policy not in OOD_POLICIES:
        raise DalbtError(f"--ood-policy must be 'return' or 'discard', got {cfg.ood_policy!r}")
    _validate_initial_strategy(cfg)
    if cfg.train.ssl_unlabelled and cfg.train.gamma <= 0:
        raise DalbtError("--ssl-pool adds the Barlow Twins loss on pool images: it needs "
                         "--gamma > 0")
    ood = data.ood.numpy() if data.ood is not None else np.zeros(data.n_train, dtype=bool)
    if (data.y_train.numpy()[~ood] < 0).any():
        raise DalbtError(f"dataset {data.name!r} has unlabelled training images; a simulated "
                         "oracle needs every label (use the labelling workflow instead)")
    val = resolve_val_size(cfg, int((~ood).sum()))
    pool = data.n_train - val
    need = cfg.initial + cfg.budget * cfg.rounds
    if need > pool:
        raise DalbtError(f"initial + budget * rounds = {need} exceeds the pool of {pool} images "
                         f"({data.n_train} train - {val} validation); lower --initial, --budget "
                         "or --rounds")


def _validate_initial_strategy(cfg: RunConfig) -> None:
    """A cold start needs a label-free strategy and the shared encoder's features."""
    from dalbt.catalogue import check_cold_start

    name = cfg.initial_choice()
    if name == "random":
        return
    what = f"--initial-strategy {cfg.initial_strategy}" + (
        f" (the run's strategy, {name})" if cfg.initial_strategy != name else "")
    try:
        check_cold_start(name)
    except DalbtError as exc:
        raise DalbtError(f"{what}: {exc}") from None
    if cfg.train.pretrain_epochs <= 0:
        raise DalbtError(f"{what} chooses the initial set on the shared pre-trained encoder's "
                         "features: add --pretrain-epochs (e.g. 10), or use --initial-strategy "
                         "random")


def apply_scenario(cfg: RunConfig, data: ImageDataset) -> ImageDataset:
    """The dataset as the run sees it: open-set classes and mixed-in datasets applied."""
    from dalbt.data.mixing import make_open_set, mix_in, parse_mix

    if cfg.unknown_classes:
        data = make_open_set(data, cfg.unknown_classes)
    if cfg.mix:
        for i, (name, count) in enumerate(parse_mix(cfg.mix)):
            other = load_dataset(name, cfg.data_root)
            data = mix_in(data, other, count, rngs.int_seed(cfg.seed, rngs.MIX, i))
    return data


def ood_mask(data: ImageDataset) -> np.ndarray:
    """(N,) bool: which training images are out of distribution."""
    return data.ood.numpy() if data.ood is not None else np.zeros(data.n_train, dtype=bool)


def _checkpoint_path(directory: Path, run_id: int, round_: int) -> Path:
    return directory / "checkpoints" / f"run-{run_id}-round-{round_}.pt"


def _load_checkpoint(path: Path | None, device: torch.device, dist: Dist,
                     missing: str, what: str = "checkpoint", fix: str = "") -> dict:
    """A checkpoint that rank 0 reads (the others get it by broadcast); ``missing`` is the
    error when it does not exist."""
    def load() -> dict:
        if path is None or not path.exists():
            raise DalbtError(missing)
        return read_checkpoint(path, device if not dist.active else "cpu", what, fix)

    return dist.from_main(load)


def _resume_warm_start(model: torch.nn.Module, directory: Path | None, run_id: int,
                       round_: int, device: torch.device, dist: Dist) -> None:
    """Load the model of round ``round_ - 1`` into ``model`` (``--warm-start``)."""
    prev = _checkpoint_path(directory, run_id, round_ - 1) if directory else None
    what = f"warm-start checkpoint of run {run_id} round {round_ - 1}"
    fix = (f"restore it from a backup, or delete run {run_id} with 'python -m dalbt.store "
           f"{directory} --delete-run {run_id}' and run it again, or rerun without --resume "
           "into another --out directory")
    state = _load_checkpoint(prev, device, dist, f"cannot resume warm-start run {run_id} at "
                             f"round {round_}: the {what} {prev} is missing; {fix}", what, fix)
    apply_state(model, state, prev, what, fix)


def _encoder_experiment(cfg: RunConfig, directory: str | os.PathLike,
                        data: ImageDataset | None, log: Callable[[str], None]
                        ) -> tuple[_Experiment, ImageDataset]:
    """The experiment parts the shared encoder of ``cfg``'s seed depends on (its strategy
    plays no part: ``cfg`` may be the full-data reference's)."""
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_root)
    data = apply_scenario(cfg, data)
    if cfg.strategy == FULL_DATA:  # not a strategy; the encoder does not depend on it
        cfg = replace(cfg, strategy="random", strategy_options={})
    validate(cfg, data)
    ex = _Experiment(cfg, None, data, SINGLE, log)
    ex.directory = Path(directory)
    return ex, data


def prepare_encoder(cfg: RunConfig, directory: str | os.PathLike,
                    data: ImageDataset | None = None, progress: bool = True,
                    log: Callable[[str], None] = print) -> tuple[str, bool]:
    """Pre-train the shared encoder of ``cfg`` into its cache unless the cache holds it
    (``dalbt bench`` does so before its workers start, so that they only read it).

    Args:
        cfg: A run's config with ``train.pretrain_epochs > 0``.
        directory: The run's experiment directory (the cache unless ``cfg.pretrain_cache``).
        data: The loaded dataset (loaded from ``cfg`` when None).
        progress: Show a progress bar with the loss.
        log: Where the one-line summary goes.

    Returns:
        (the encoder's key, whether it was pre-trained now).
    """
    ex, data = _encoder_experiment(cfg, directory, data, log)
    encoder = ex.encoder()
    return encoder.key, encoder.ensure(data.x_train, ex.candidates, ex.new_model, progress, log)


def encoder_state(cfg: RunConfig, directory: str | os.PathLike,
                  data: ImageDataset | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """The shared pre-trained encoder's weights of ``cfg``'s seed (read from the cache, or
    pre-trained and cached now): what every AL run of that seed starts from.

    Args: as :func:`prepare_encoder`.
    """
    ex, data = _encoder_experiment(cfg, directory, data, log)
    return ex.encoder().state(data.x_train, ex.candidates, ex.new_model, progress, log)


def label_queries(pool: Pool, queried: np.ndarray, round_: int, ood: np.ndarray,
                  policy: str) -> int:
    """The simulated oracle: label the in-distribution queries; out-of-distribution ones cost
    budget, get no label and go back to the pool (``return``) or are set aside (``discard``).

    Returns:
        How many of ``queried`` were out of distribution.
    """
    out = queried[ood[queried]]
    pool.label(queried[~ood[queried]], round_)
    if policy == "discard":
        pool.set_aside(out)
    return len(out)


def _round_problem(i: int, rec: dict[str, Any], cfg: RunConfig, n_labelled: int) -> str | None:
    """What is wrong with the number and labelled count of recorded round ``i`` (None: ok),
    given ``n_labelled`` labels after the earlier rounds."""
    r, q = rec["round"], rec["queried"]
    if r != i:
        return f"round {i} is missing before it"
    if r > cfg.rounds or (r == cfg.rounds and len(q)):
        return f"the run has rounds 0 to {cfg.rounds}, and the last one queries nothing"
    if rec["n_labelled"] != n_labelled:
        return (f"rounds.n_labelled is {rec['n_labelled']}, but the initial set and "
                f"the earlier rounds' queries label {n_labelled} images")
    return None


def _queried_problem(q: np.ndarray, trial: Pool, validation: np.ndarray) -> str | None:
    """What is wrong with a recorded round's queries ``q`` (None: distinct indices of the
    pool ``trial`` as it was then, not in the ``validation`` mask)."""
    n = len(validation)
    out = q[(q < 0) | (q >= n)]
    if out.size:
        return f"rounds.queried holds index {out[0]}, outside the {n} training images"
    values, counts = np.unique(q, return_counts=True)
    if (counts > 1).any():
        return f"rounds.queried holds index {values[counts > 1][0]} more than once"
    if validation[q].any():
        return f"rounds.queried holds index {q[validation[q]][0]} of the validation split"
    state = trial.state[q]
    if (state >= 0).any():
        k = int(np.flatnonzero(state >= 0)[0])
        return f"rounds.queried holds index {q[k]}, already labelled in round {state[k]}"
    if (state == HELD_OUT).any():
        return (f"rounds.queried holds index {q[state == HELD_OUT][0]}, set aside in an "
                "earlier round")
    return None


def _check_replay(store: Store, run: RunRecord, done: list[dict[str, Any]], cfg: RunConfig,
                  splits: Splits, ood: np.ndarray) -> None:
    """Check the recorded rounds before they are replayed: numbered 0, 1, ...; each one's
    labelled count what the earlier rounds give; each one's queries distinct indices of the
    pool as it was then (in range, not validation, not labelled or set aside before)."""
    n = len(ood)
    trial = Pool.from_splits(n, splits)
    validation = np.zeros(n, dtype=bool)
    validation[splits.validation] = True
    for i, rec in enumerate(done):
        r, q = rec["round"], rec["queried"]
        why = (_round_problem(i, rec, cfg, len(trial.labelled))
               or _queried_problem(q, trial, validation))
        if why is not None:
            raise store.damaged(run.id, f"round {r}", why)
        label_queries(trial, q, r + 1, ood, cfg.ood_policy)


def run_experiment(
    cfg: RunConfig,
    store: Store | None,
    resume: bool = False,
    progress: bool = True,
    data: ImageDataset | None = None,
    log: Callable[[str], None] = print,
    dist: Dist = SINGLE,
    save_scores: bool = False,
    on_round: Callable[[int, int, float], object] | None = None,
) -> RunRecord:
    """Run (or resume) one AL run and record every round in ``store``.

    Args:
        cfg: The run's config.
        store: Where rounds are written (one transaction per round); rank 0's only (None on
            the other ranks of a distributed run).
        resume: Continue an unfinished run with the same config instead of failing.
        progress: Show progress bars.
        data: The loaded dataset (loaded from ``cfg`` when None).
        log: Where one-line round summaries go.
        dist: This process's place in a distributed run (every rank calls this function with
            the same arguments; see :mod:`dalbt.distributed` for who does what).
        save_scores: Also save what the strategy's scorers computed each round (pool outputs,
            MC-dropout probabilities) to ``<store>/scores/run-<id>-round-<r>.pt``.
        on_round: Called on rank 0 after each round is recorded with (rounds done, rounds of
            the run (``cfg.rounds + 1``), seconds the round took).

    Returns:
        The run's record (on every rank).

    Raises:
        DalbtError: Bad protocol, or a run with this config already exists and ``resume`` is
            False.
    """
    if not dist.is_main:
        progress, log = False, lambda _: None
    elif store is None:
        raise ValueError("rank 0 needs the store")
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_root)
    data = apply_scenario(cfg, data)
    validate(cfg, data)
    cfg = with_embedding_cache(cfg, store.directory if store is not None else None)
    ex = _Experiment(cfg, store, data, dist, log)
    ex.on_round = on_round
    ex.choose_initial(progress)
    # Rank 0 reads the store; every rank replays the recorded rounds from its answer.
    run, done = dist.from_main(lambda: ex.open_run(resume))
    if run.status == "finished":
        log(f"run {run.id} ({cfg.strategy}, seed {cfg.seed}) already finished")
        return run
    for rec in done:
        ex.oracle(rec["queried"], rec["round"] + 1)
    if done:
        log(f"resuming run {run.id} ({cfg.strategy}, seed {cfg.seed}) at round {len(done)}")
    pretrained = None
    if cfg.train.pretrain_epochs > 0:
        pretrained = ex.pretrained_state(run.id, progress)
        ex.shared_encoder = {k: v for k, v in pretrained.items()
                             if not k.startswith("classifier.")}
    model = None
    for r in range(len(done), cfg.rounds + 1):
        t0 = time.perf_counter()
        if model is None or not cfg.train.warm_start:
            model = ex.initial_model(run.id, r, pretrained)
        ex.round_data.labelled = ex.round_data.known = ex.pool.labelled
        ex.round_data.unlabelled = ex.pool.unlabelled
        res = run_round(ex.strategy, ex.round_data, cfg.train, seed=cfg.seed, round_=r,
                        budget=cfg.budget if r < cfg.rounds else 0,
                        new_model=ex.strategy_model, model=model, total_rounds=cfg.rounds,
                        dist=dist, progress=progress, keep_scores=save_scores)
        ex.finish_round(run.id, r, res, save_scores, time.perf_counter() - t0)
    return dist.from_main(lambda: (store.find_run(ex.key) if store is not None else None) or run)


class _Experiment:
    """One run's fixed parts (splits, pool, strategy, store) and what happens around each
    :func:`~dalbt.al_round.run_round` of :func:`run_experiment`."""

    def __init__(self, cfg: RunConfig, store: Store | None, data: ImageDataset, dist: Dist,
                 log: Callable[[str], None]) -> None:
        self.cfg, self.store, self.data, self.dist, self.log = cfg, store, data, dist, log
        self.strategy = build_strategy(cfg.strategy, **cfg.strategy_options)  # fails early
        self.ood = ood_mask(data)
        in_dist = np.flatnonzero(~self.ood)
        self.splits = make_splits(data.n_train, resolve_val_size(cfg, len(in_dist)),
                                  cfg.initial, cfg.seed,
                                  candidates=in_dist if self.ood.any() else None)
        self.key = config_key(cfg.key_dict())
        self.directory = store.directory if store is not None else None
        self.pool = Pool.from_splits(data.n_train, self.splits)
        self.device = torch.device(cfg.train.device)
        self.on_round: Callable[[int, int, float], object] | None = None
        self.shared_encoder: dict | None = None  # pre-trained weights, classifier left out
        self.candidates = np.setdiff1d(np.arange(data.n_train), self.splits.validation)
        self.round_data = RoundData(
            images=data.x_train, targets=data.y_train, num_classes=data.num_classes,
            labelled=self.pool.labelled, validation=self.splits.validation,
            unlabelled=self.pool.unlabelled, candidates=self.candidates,
            test=(data.x_test, data.y_test))

    def new_model(self, seed: int) -> DALBTNet:
        cfg, data = self.cfg, self.data
        return build_model(cfg.model, data.channels, data.image_size, data.num_classes,
                           latent_dim=cfg.latent_dim, projector_dims=cfg.projector_dims,
                           dropout=self.strategy.train_dropout, seed=seed,
                           weights=cfg.weights, input_size=cfg.input_size).to(self.device)

    def encoder(self) -> SharedEncoder:
        """The run's shared pre-trained encoder (cached by rank 0 only)."""
        cfg, directory = self.cfg, self.directory
        root = Path(cfg.pretrain_cache).expanduser() if cfg.pretrain_cache else directory
        return SharedEncoder(cfg, root if self.dist.is_main else None, self.data.n_train,
                             len(self.splits.validation))

    def pretrained_state(self, run_id: int, progress: bool) -> dict:
        """Barlow Twins weights on the whole pool (every training image outside the
        validation split): the run's own checkpoint when it pre-trained before the shared
        cache, else the shared encoder (read from the cache, or pre-trained and cached now)."""
        directory, dist = self.directory, self.dist
        legacy = legacy_path(directory, run_id) if directory is not None else None
        if dist.from_main(lambda: legacy is not None and legacy.exists()):
            return read_shared(legacy, f"pre-training checkpoint of run {run_id}",
                               "delete it to use the shared encoder (same seed, same weights), "
                               "or restore it from a backup", self.cfg.train.device,
                               self.new_model, dist)
        return self.encoder().state(self.data.x_train, self.candidates, self.new_model,
                                    progress, self.log, dist)

    def choose_initial(self, progress: bool) -> None:
        """Cold start: let the label-free ``cfg.initial_choice()`` choose the initial set on
        the shared pre-trained encoder's latents, from every image outside validation (the
        set the store recorded, when it already holds the run). Chosen out-of-distribution
        images get no label: they cost initial budget and stay in the pool. Nothing to do for
        ``random``: the seed's split is the initial set."""
        if self.cfg.initial_choice() == "random":
            return
        store, key = self.store, self.key
        recorded = self.dist.from_main(
            lambda: getattr(store.find_run(key) if store is not None else None, "initial", None))
        initial = recorded if recorded is not None else self._cold_start(progress)
        self.splits = Splits(validation=self.splits.validation,
                             initial=np.sort(np.asarray(initial, dtype=np.int64)))
        self.pool = Pool.from_splits(self.data.n_train, self.splits)

    def _cold_start(self, progress: bool) -> np.ndarray:
        cfg, data = self.cfg, self.data
        name = cfg.initial_choice()
        state = self.encoder().state(data.x_train, self.candidates, self.new_model, progress,
                                     self.log, self.dist)
        model = self.new_model(rngs.int_seed(cfg.seed, rngs.INIT, 0))
        model.load_state_dict(state)
        strategy = build_strategy(name, **(cfg.strategy_options if name == cfg.strategy else {}))
        empty = np.empty(0, dtype=np.int64)
        view = RoundData(images=data.x_train, targets=data.y_train, num_classes=data.num_classes,
                         labelled=empty, validation=self.splits.validation,
                         unlabelled=self.candidates, candidates=self.candidates)
        picks = run_round(strategy, view, cfg.train, seed=cfg.seed, round_=rngs.COLD_START_ROUND,
                          budget=cfg.initial, new_model=self.strategy_model, model=model,
                          total_rounds=cfg.rounds, dist=self.dist, progress=progress).queried
        labelled = picks[~self.ood[picks]]
        if not len(labelled):
            raise DalbtError(f"--initial-strategy {name} chose {len(picks)} images, all out of "
                             "distribution: nothing to train on; raise --initial or use "
                             "--initial-strategy random")
        self.log(f"[{cfg.strategy} seed {cfg.seed}] initial set of {len(picks)} chosen by {name}"
                 + (f" ({len(picks) - len(labelled)} out of distribution, unlabelled)"
                    if len(labelled) < len(picks) else ""))
        return labelled

    def strategy_model(self, seed: int) -> DALBTNet:
        """A model for a strategy that trains its own (ensemble members, DAL-OSR, PT4AL): fresh
        from ``seed``, with the run's shared pre-trained encoder and projector loaded when the
        run pre-trains (the classifier keeps its ``seed`` initialisation, so members differ)."""
        model = self.new_model(seed)
        if self.shared_encoder is not None:
            model.load_state_dict(self.shared_encoder, strict=False)
        return model

    def oracle(self, queried: np.ndarray, round_: int) -> int:
        return label_queries(self.pool, queried, round_, self.ood, self.cfg.ood_policy)

    def open_run(self, resume: bool) -> tuple[RunRecord, list[dict[str, Any]]]:
        """The run's record and its recorded rounds (checked), created when new (rank 0)."""
        store, cfg, splits = self.store, self.cfg, self.splits
        assert store is not None
        run = store.find_run(self.key)
        if run is not None and not resume:
            raise DalbtError(f"{store.directory} already holds this run (id {run.id}, "
                             f"{run.status}); pass --resume to continue it or choose another "
                             "--out")
        if run is None:
            run = store.create_run(cfg.to_dict(), splits.initial, key=self.key)
            stale = sorted((store.directory / "checkpoints").glob(f"run-{run.id}-*.pt"))
            if stale:  # they belong to a run of this id that the database no longer holds
                store.delete_run(run.id)
                raise DalbtError(
                    f"{stale[0]} belongs to a run {run.id} that {store.path} no longer holds "
                    f"(did the database lose it?): restore {store.path.name} from a backup, or "
                    f"delete {store.directory / 'checkpoints'}/run-{run.id}-*.pt to start this "
                    "run afresh, or use another --out directory")
        elif not np.array_equal(run.initial, splits.initial):
            raise DalbtError(f"run {run.id} in {store.directory} was started from another "
                             "initial set than this dataset gives now; the data files changed")
        rounds = store.rounds(run.id)
        _check_replay(store, run, rounds, cfg, splits, self.ood)
        return run, rounds

    def initial_model(self, run_id: int, r: int, pretrained: dict | None) -> DALBTNet:
        """Round ``r``'s starting model: fresh (or, warm-starting, round 0's init and then the
        previous round's checkpoint when resuming), with the pre-trained weights loaded."""
        warm = self.cfg.train.warm_start
        model = self.new_model(rngs.int_seed(self.cfg.seed, rngs.INIT, 0 if warm else r))
        if pretrained is not None:
            model.load_state_dict(pretrained)
        if warm and r > 0:
            _resume_warm_start(model, self.directory, run_id, r, self.device, self.dist)
        return model

    def finish_round(self, run_id: int, r: int, res: RoundResult, save_scores: bool,
                     seconds: float = 0.0) -> None:
        """Save, record and log round ``r`` (which took ``seconds`` so far), then label its
        queries."""
        cfg, directory, queried = self.cfg, self.directory, res.queried
        if save_scores and directory is not None and r < cfg.rounds:
            _save_scores(directory / "scores" / f"run-{run_id}-round-{r}.pt", r, res.scored,
                         queried)
        if cfg.train.warm_start and directory is not None:
            save_checkpoint(_checkpoint_path(directory, run_id, r), res.model)
        metrics = {"n_labelled": len(self.round_data.labelled), **res.metrics()}
        ood = self.ood
        metrics["n_ood"] = int(ood[queried].sum()) if ood.any() else None
        if self.store is not None:
            self.store.record_round(run_id, r, metrics, queried, finished=r == cfg.rounds)
            if self.on_round is not None:
                self.on_round(r + 1, cfg.rounds + 1, seconds)
        if queried.size:
            self.oracle(queried, r + 1)
        if cfg.train.warm_start and r > 0 and directory is not None:
            remove_checkpoint(_checkpoint_path(directory, run_id, r - 1))
        ood_note = f"  ood {metrics['n_ood']}/{len(queried)}" if ood.any() and len(queried) else ""
        self.log(f"[{cfg.strategy} seed {cfg.seed}] round {r:2d}  labelled "
                 f"{metrics['n_labelled']:6d}  val {metrics['val_acc']:.4f}  test "
                 f"{res.test_acc:.4f}  train {res.t_train:.1f}s  score {res.t_score:.1f}s  "
                 f"select {res.t_select:.2f}s{ood_note}")


def _save_scores(path: Path, round_: int, scored: list[dict[str, Any]], queried: np.ndarray
                 ) -> None:
    """What a round's scorers computed, and the selection (``--save-scores``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"round": round_, "scored": scored, "queried": torch.as_tensor(queried)}, tmp)
    os.replace(tmp, path)
