"""The active-learning loop with a simulated oracle.

Round r trains a model on the labelled set of round r, records its validation and test
accuracy, then (except after the last round) asks the strategy for ``budget`` dataset indices,
which the oracle labels for round r + 1. The loop knows nothing about any particular strategy.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dalbt import rng as rngs
from dalbt.data import ImageDataset, load_dataset
from dalbt.data.pool import HELD_OUT, Pool, Splits, make_splits
from dalbt.distributed import SINGLE, Dist, Lead
from dalbt.errors import DalbtError
from dalbt.models import build_model
from dalbt.recipe import MAX_SEED, MAX_WIDTH, OOD_POLICIES, RunConfig, check_int
from dalbt.store import RunRecord, Store, config_key
from dalbt.strategies import QueryContext, build_strategy
from dalbt.train import accuracy, infer, mc_dropout_probs, pretrain_barlow


def resolve_val_size(cfg: RunConfig, n_train: int) -> int:
    return min(5000, n_train // 10) if cfg.val_size is None else int(cfg.val_size)


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


def _digest_path(path: Path) -> Path:
    """The checkpoint's SHA-256 (damage inside the tensor data would load silently)."""
    return path.with_name(path.name + ".sha256")


def _save_checkpoint(path: Path, model: torch.nn.Module) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    _digest_path(path).unlink(missing_ok=True)  # killed before the new digest: torch checks
    os.replace(tmp, path)
    side_tmp = path.with_suffix(".sha256.tmp")
    side_tmp.write_text(digest + "\n")
    os.replace(side_tmp, _digest_path(path))


def _remove_checkpoint(path: Path) -> None:
    path.unlink(missing_ok=True)
    _digest_path(path).unlink(missing_ok=True)


def _pretrained_state(cfg: RunConfig, directory: Path | None, run_id: int, data: ImageDataset,
                      images: np.ndarray, new_model: Callable[[int], torch.nn.Module],
                      progress: bool, log: Callable[[str], None], dist: Dist = SINGLE) -> dict:
    """Barlow Twins pre-training on the whole pool (every training image outside the
    validation split), once per run; the weights are kept in the experiment directory (rank 0
    reads and writes them; the other ranks get them by broadcast)."""
    path = directory / "checkpoints" / f"run-{run_id}-pretrained.pt" if directory else None
    if dist.from_main(lambda: path is not None and path.exists()):
        what = f"pre-training checkpoint of run {run_id}"
        fix = "delete it to pre-train again (same seed, same weights), or restore it from a backup"
        state = dist.from_main(lambda: _read_checkpoint(
            path, cfg.train.device if not dist.active else "cpu", what, fix))
        _apply_state(new_model(0), state, path, what, fix)  # fails here, not in a round
        return state
    model = new_model(rngs.int_seed(cfg.seed, rngs.PRETRAIN, 0))
    bar = tqdm(total=cfg.train.pretrain_epochs, desc="pre-train", unit="ep", leave=False,
               disable=not progress)
    t0 = time.perf_counter()
    losses = pretrain_barlow(model, data.x_train, images, cfg.train,
                             rngs.torch_generator(cfg.seed, rngs.PRETRAIN, 1),
                             rngs.torch_generator(cfg.seed, rngs.PRETRAIN, 2),
                             on_epoch=lambda e, m: (bar.update(1), bar.set_postfix(m)),
                             dist=dist)
    bar.close()
    log(f"[{cfg.strategy} seed {cfg.seed}] Barlow Twins pre-training on {len(images)} images: "
        f"{cfg.train.pretrain_epochs} epochs, loss {losses[0]:.1f} -> {losses[-1]:.1f}, "
        f"{time.perf_counter() - t0:.1f}s")
    if path is not None:
        _save_checkpoint(path, model)
    return model.state_dict()


def _read_checkpoint(path: Path, map_location: Any, what: str, fix: str) -> dict:
    """``torch.load`` of a state dict, with a damaged file as a one-line DalbtError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DalbtError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    side = _digest_path(path)
    if side.exists() and side.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise DalbtError(f"the {what} {path} does not match its checksum {side.name}, the "
                         f"file is damaged: {fix}")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location)
    except Exception as exc:  # a truncated or garbled file fails in many ways
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DalbtError(f"cannot read the {what} {path} ({type(exc).__name__}: {first}); the "
                         f"file is truncated or damaged: {fix}") from None
    if not isinstance(state, dict):
        raise DalbtError(f"the {what} {path} holds a {type(state).__name__}, not model "
                         f"weights: {fix}")
    return state


def _apply_state(model: torch.nn.Module, state: dict, path: Path | None, what: str,
                 fix: str) -> None:
    """``model.load_state_dict`` with weights of another model as a one-line DalbtError."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DalbtError(f"the {what} {path} does not fit the run's model ({first}): {fix}"
                         ) from None


def _load_checkpoint(path: Path | None, device: torch.device, dist: Dist,
                     missing: str, what: str = "checkpoint", fix: str = "") -> dict:
    """A checkpoint that rank 0 reads (the others get it by broadcast); ``missing`` is the
    error when it does not exist."""
    def load() -> dict:
        if path is None or not path.exists():
            raise DalbtError(missing)
        return _read_checkpoint(path, device if not dist.active else "cpu", what, fix)

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
    _apply_state(model, state, prev, what, fix)


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

        def bad(why: str, r: int = r) -> DalbtError:
            return store.damaged(run.id, f"round {r}", why)

        if r != i:
            raise bad(f"round {i} is missing before it")
        if r > cfg.rounds or (r == cfg.rounds and len(q)):
            raise bad(f"the run has rounds 0 to {cfg.rounds}, and the last one queries nothing")
        if rec["n_labelled"] != len(trial.labelled):
            raise bad(f"rounds.n_labelled is {rec['n_labelled']}, but the initial set and "
                      f"the earlier rounds' queries label {len(trial.labelled)} images")
        out = q[(q < 0) | (q >= n)]
        if out.size:
            raise bad(f"rounds.queried holds index {out[0]}, outside the {n} training images")
        values, counts = np.unique(q, return_counts=True)
        if (counts > 1).any():
            raise bad(f"rounds.queried holds index {values[counts > 1][0]} more than once")
        if validation[q].any():
            raise bad(f"rounds.queried holds index {q[validation[q]][0]} of the validation "
                      "split")
        state = trial.state[q]
        if (state >= 0).any():
            k = int(np.flatnonzero(state >= 0)[0])
            raise bad(f"rounds.queried holds index {q[k]}, already labelled in round "
                      f"{state[k]}")
        if (state == HELD_OUT).any():
            raise bad(f"rounds.queried holds index {q[state == HELD_OUT][0]}, set aside in an "
                      "earlier round")
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
    strategy = build_strategy(cfg.strategy, **cfg.strategy_options)  # fails early on bad options
    ood = ood_mask(data)
    in_dist = np.flatnonzero(~ood)
    val_size = resolve_val_size(cfg, len(in_dist))
    splits = make_splits(data.n_train, val_size, cfg.initial, cfg.seed,
                         candidates=in_dist if ood.any() else None)
    key = config_key(cfg.key_dict())

    def open_run() -> tuple[RunRecord, list[dict[str, Any]]]:
        assert store is not None
        run = store.find_run(key)
        if run is not None and not resume:
            raise DalbtError(f"{store.directory} already holds this run (id {run.id}, "
                             f"{run.status}); pass --resume to continue it or choose another "
                             "--out")
        if run is None:
            run = store.create_run(cfg.to_dict(), splits.initial, key=key)
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
        _check_replay(store, run, rounds, cfg, splits, ood)
        return run, rounds

    # Rank 0 reads the store; every rank replays the recorded rounds from its answer.
    run, done = dist.from_main(open_run)
    if run.status == "finished":
        log(f"run {run.id} ({cfg.strategy}, seed {cfg.seed}) already finished")
        return run
    directory = store.directory if store is not None else None

    pool = Pool.from_splits(data.n_train, splits)

    def oracle(queried: np.ndarray, round_: int) -> int:
        return label_queries(pool, queried, round_, ood, cfg.ood_policy)

    for rec in done:
        oracle(rec["queried"], rec["round"] + 1)
    start = len(done)
    if start:
        log(f"resuming run {run.id} ({cfg.strategy}, seed {cfg.seed}) at round {start}")

    device = torch.device(cfg.train.device)

    def new_model(seed: int) -> torch.nn.Module:
        return build_model(cfg.model, data.channels, data.image_size, data.num_classes,
                           latent_dim=cfg.latent_dim, projector_dims=cfg.projector_dims,
                           dropout=strategy.train_dropout, seed=seed).to(device)

    outside_validation = np.setdiff1d(np.arange(data.n_train), splits.validation)
    pretrained = None
    if cfg.train.pretrain_epochs > 0:
        pretrained = _pretrained_state(cfg, directory, run.id, data, outside_validation,
                                       new_model, progress, log, dist)

    model = None
    for r in range(start, cfg.rounds + 1):
        if model is None or not cfg.train.warm_start:
            model = new_model(rngs.int_seed(cfg.seed, rngs.INIT, 0 if cfg.train.warm_start else r))
            if pretrained is not None:
                model.load_state_dict(pretrained)
            if cfg.train.warm_start and r > 0:
                _resume_warm_start(model, directory, run.id, r, device, dist)
        labelled = pool.labelled
        bar = tqdm(total=cfg.train.epochs, desc=f"round {r} train", unit="ep", leave=False,
                   disable=not progress)
        t0 = time.perf_counter()
        # Training sees the labels the oracle gave and the validation labels; nothing else.
        visible = torch.full_like(data.y_train, -1)
        seen = torch.as_tensor(np.concatenate([labelled, splits.validation]))
        visible[seen] = data.y_train[seen]
        res = strategy.train_model(
            model, data.x_train, visible, labelled, splits.validation, cfg.train,
            rngs.torch_generator(cfg.seed, rngs.SHUFFLE, r),
            rngs.torch_generator(cfg.seed, rngs.AUGMENT, r),
            on_epoch=lambda e, m, bar=bar: (bar.update(1), bar.set_postfix(m)),
            unlabelled=pool.unlabelled, dist=dist)
        dist.broadcast_module(model)  # identical weights on every rank, whatever trained them
        bar.close()
        t_train = time.perf_counter() - t0
        test_acc = accuracy(model, data.x_test, data.y_test, dist=dist)

        queried = np.empty(0, dtype=np.int64)
        t_score = t_select = 0.0
        if r < cfg.rounds:
            sbar = tqdm(desc=f"round {r} score", unit="img", leave=False,
                        disable=not progress or not strategy.requires)
            scored: list[dict[str, Any]] = []

            def score(idx: np.ndarray, sbar=sbar, model=model, scored=scored) -> Any:
                if dist.is_main:
                    sbar.total = (sbar.total or 0) + len(idx)
                out = infer(model, data.x_train, idx, progress=sbar.update, dist=dist)
                if save_scores and dist.is_main:
                    scored.append({"kind": "outputs", "indices": torch.as_tensor(out.indices),
                                   "logits": out.logits, "latents": out.latents})
                return out

            def mc_score(idx: np.ndarray, t: int, g: torch.Generator, model=model,
                         scored=scored) -> Any:
                probs = mc_dropout_probs(model, data.x_train, idx, t, g, dist=dist)
                if save_scores and dist.is_main:
                    scored.append({"kind": "mc_probs", "indices": torch.as_tensor(idx),
                                   "probs": probs})
                return probs

            # The strategy runs once, on rank 0; its scoring requests run sharded on all ranks.
            lead = Lead(dist, {"score": score, "mc_score": mc_score})

            def query(r=r, labelled=labelled, lead=lead) -> tuple[np.ndarray, float, float]:
                ctx = QueryContext(unlabelled=pool.unlabelled, labelled=labelled,
                                   labelled_targets=data.y_train[labelled].numpy(),
                                   num_classes=data.num_classes,
                                   rng=rngs.numpy_rng(cfg.seed, rngs.QUERY, r),
                                   scorer=lambda idx: lead.call("score", idx),
                                   round=r, total_rounds=cfg.rounds, images=data.x_train,
                                   train_config=cfg.train,
                                   device=str(device), model_factory=new_model,
                                   candidates=outside_validation,
                                   mc_scorer=lambda idx, t, g: lead.call("mc_score", idx, t, g))
                t0 = time.perf_counter()
                strategy.prepare(ctx)
                ctx.prefetch(strategy.requires)
                t_score = time.perf_counter() - t0
                t0 = time.perf_counter()
                queried = strategy.select(ctx, cfg.budget)
                return queried, t_score, time.perf_counter() - t0

            queried, t_score, t_select = lead.run(query)
            sbar.close()
            if save_scores and directory is not None:
                _save_scores(directory / "scores" / f"run-{run.id}-round-{r}.pt", r, scored,
                             queried)
        if cfg.train.warm_start and directory is not None:
            _save_checkpoint(_checkpoint_path(directory, run.id, r), model)
        metrics = {"n_labelled": len(labelled), "test_acc": test_acc, "val_acc": res.val_acc,
                   "best_epoch": res.best_epoch, "train_ce": res.train_ce,
                   "train_bt": res.train_bt, "t_train": t_train, "t_score": t_score,
                   "t_select": t_select}
        metrics["n_ood"] = int(ood[queried].sum()) if ood.any() else None
        if store is not None:
            store.record_round(run.id, r, metrics, queried, finished=r == cfg.rounds)
        if queried.size:
            oracle(queried, r + 1)
        if cfg.train.warm_start and r > 0 and directory is not None:
            _remove_checkpoint(_checkpoint_path(directory, run.id, r - 1))
        ood_note = f"  ood {metrics['n_ood']}/{len(queried)}" if ood.any() and len(queried) else ""
        log(f"[{cfg.strategy} seed {cfg.seed}] round {r:2d}  labelled {len(labelled):6d}  "
            f"val {res.val_acc:.4f}  test {test_acc:.4f}  train {t_train:.1f}s  "
            f"score {t_score:.1f}s  select {t_select:.2f}s{ood_note}")
    return dist.from_main(lambda: (store.find_run(key) if store is not None else None) or run)


def _save_scores(path: Path, round_: int, scored: list[dict[str, Any]], queried: np.ndarray
                 ) -> None:
    """What a round's scorers computed, and the selection (``--save-scores``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"round": round_, "scored": scored, "queried": torch.as_tensor(queried)}, tmp)
    os.replace(tmp, path)
