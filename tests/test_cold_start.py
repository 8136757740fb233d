"""``--initial-strategy``: the initial labelled set chosen without labels on the shared encoder's
features (issue 14, cold start)."""

from __future__ import annotations

import numpy as np
import pytest

from dalbt import rng as rngs
from dalbt.cli import main
from dalbt.data.pool import make_splits
from dalbt.errors import DalbtError
from dalbt.loop import RunConfig, encoder_state, run_experiment
from dalbt.models import build_model
from dalbt.store import Store, config_key
from dalbt.strategies import QueryContext, build_strategy
from dalbt.train import TrainConfig, infer


def _cfg(strategy="margin", initial_strategy="typiclust", seed=0, **kw) -> RunConfig:
    train = TrainConfig(steps=5, pretrain_epochs=1, pretrain_batch=256)
    return RunConfig(dataset="digits", strategy=strategy, seed=seed, initial=10, budget=5,
                     rounds=1, val_size=100, projector_dims=(16, 16), train=train,
                     initial_strategy=initial_strategy, **kw)


def _run(directory, cfg, digits, **kw):
    with Store(directory) as store:
        return run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None, **kw)


def test_the_default_keeps_the_old_keys_and_same_resolves_to_the_strategy():
    old = _cfg(initial_strategy="random").key_dict()
    assert "initial_strategy" not in old
    assert config_key(_cfg(strategy="typiclust", initial_strategy="same").key_dict()) == \
        config_key(_cfg(strategy="typiclust", initial_strategy="typiclust").key_dict())
    assert config_key(_cfg(initial_strategy="typiclust").key_dict()) != config_key(old)
    # random choosing its own initial set is the seed's split: the default run
    assert config_key(_cfg(strategy="random", initial_strategy="same").key_dict()) == \
        config_key(_cfg(strategy="random", initial_strategy="random").key_dict())


def test_initial_set_is_typiclusts_choice_on_the_shared_encoder(tmp_path, digits):
    cfg = _cfg()
    run = _run(tmp_path / "a", cfg, digits)
    # what TypiClust picks, computed here from the cached encoder's latents
    state = encoder_state(cfg, tmp_path / "a", digits, progress=False, log=lambda s: None)
    model = build_model("lenet", digits.channels, digits.image_size, digits.num_classes,
                        projector_dims=(16, 16), seed=0)
    model.load_state_dict(state)
    val = make_splits(digits.n_train, 100, 10, 0).validation
    pool = np.setdiff1d(np.arange(digits.n_train), val)
    empty = np.empty(0, dtype=np.int64)
    ctx = QueryContext(unlabelled=pool, labelled=empty, labelled_targets=empty, num_classes=10,
                       rng=rngs.numpy_rng(0, rngs.QUERY, rngs.COLD_START_ROUND),
                       scorer=lambda idx: infer(model, digits.x_train, idx))
    want = build_strategy("typiclust").select(ctx, 10)
    np.testing.assert_array_equal(run.initial, np.sort(want))
    assert not np.array_equal(run.initial, make_splits(digits.n_train, 100, 10, 0).initial)
    assert not np.isin(run.initial, val).any()


def test_same_seed_same_initial_set_and_resume_reads_the_recorded_one(tmp_path, digits,
                                                                      monkeypatch):
    a = _run(tmp_path / "a", _cfg(strategy="probcover", initial_strategy="same", seed=2), digits)
    b = _run(tmp_path / "b", _cfg(strategy="probcover", initial_strategy="same", seed=2), digits)
    np.testing.assert_array_equal(a.initial, b.initial)
    assert len(a.initial) == 10
    from dalbt import loop

    def fail(*args, **kw):
        raise AssertionError("the cold start ran again on resume")

    monkeypatch.setattr(loop._Experiment, "_cold_start", fail)
    again = _run(tmp_path / "a", _cfg(strategy="probcover", initial_strategy="same", seed=2),
                 digits, resume=True)
    np.testing.assert_array_equal(again.initial, a.initial)


@pytest.mark.parametrize(("kw", "match"), [
    ({"initial_strategy": "margin"}, "needs labels"),
    ({"strategy": "badge", "initial_strategy": "same"}, "needs labels"),
    ({"initial_strategy": "nope"}, "unknown strategy"),
])
def test_a_strategy_that_needs_labels_is_refused(tmp_path, digits, kw, match):
    with pytest.raises(DalbtError, match=match):
        _run(tmp_path, _cfg(**kw), digits)


def test_no_pretraining_is_refused_with_the_fix(tmp_path, digits):
    cfg = _cfg()
    cfg.train.pretrain_epochs = 0
    with pytest.raises(DalbtError, match="--pretrain-epochs"):
        _run(tmp_path, cfg, digits)


def test_cli_cold_start_run(tmp_path, capsys):
    rc = main(["run", "--dataset", "digits", "--strategy", "random", "--initial-strategy",
               "coreset", "--initial", "8", "--budget", "4", "--rounds", "1", "--steps", "3",
               "--pretrain-epochs", "1", "--val-size", "50", "--projector", "16-16",
               "--out", str(tmp_path / "x"), "--no-progress", "--threads", "1"])
    assert rc in (0, None)
    with Store(tmp_path / "x") as store:
        (run,) = store.runs()
    assert len(run.initial) == 8
    assert not np.array_equal(run.initial, make_splits(1500, 50, 8, 0).initial)
    rc = main(["run", "--dataset", "digits", "--initial-strategy", "entropy", "--pretrain-epochs",
               "1", "--out", str(tmp_path / "y")])
    assert rc == 2  # dalbt's exit status for a usage error, as argparse's
    assert "needs labels" in capsys.readouterr().err
