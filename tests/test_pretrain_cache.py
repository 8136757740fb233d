"""One self-supervised encoder per seed, shared by every strategy (issue 13, part 2): pre-trained
once per content key, cached on disk, read by every later run, a bench and other experiment
directories."""

from __future__ import annotations

import fcntl
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from dalbt import bench, encoders, loop
from dalbt import rng as rngs
from dalbt.cli import build_parser
from dalbt.data.pool import make_splits
from dalbt.encoders import SharedEncoder, encoder_covers, encoder_key
from dalbt.errors import DalbtError
from dalbt.loop import RunConfig, prepare_encoder, run_experiment
from dalbt.models import build_model
from dalbt.store import Store, config_key
from dalbt.train import TrainConfig, pretrain_barlow

TINY = {"dataset": "digits", "model": "lenet", "initial": 20, "budget": 10, "rounds": 1,
        "epochs": 1, "val_size": 100, "projector_dims": [16, 16], "pretrain_epochs": 1}


@pytest.fixture
def pretrained(monkeypatch):
    """Every call of the Barlow Twins pre-training (the seed of its augmentation stream)."""
    calls: list[int] = []

    def counting(model, x_train, indices, cfg, shuffle_gen, augment_gen, **kw):
        calls.append(int(augment_gen.initial_seed()))
        return pretrain_barlow(model, x_train, indices, cfg, shuffle_gen, augment_gen, **kw)

    monkeypatch.setattr(encoders, "pretrain_barlow", counting)
    return calls


@pytest.fixture
def used(monkeypatch):
    """The pre-trained weights each run starts its rounds from."""
    states: list[dict] = []
    real = loop._Experiment.pretrained_state

    def spy(self, run_id, progress):
        states.append(real(self, run_id, progress))
        return states[-1]

    monkeypatch.setattr(loop._Experiment, "pretrained_state", spy)
    return states


def _cfg(strategy="random", seed=0, **kw) -> RunConfig:
    train = {k: kw.pop(k) for k in list(kw) if k in TrainConfig.__dataclass_fields__}
    train = {"epochs": 1, "pretrain_epochs": 1, "pretrain_batch": 256, **train}
    run = {"initial": 20, "budget": 10, "rounds": 1, "val_size": 100, "projector_dims": (16, 16),
           **kw}
    return RunConfig(dataset="digits", strategy=strategy, seed=seed, train=TrainConfig(**train),
                     **run)


def _run(directory, cfg, digits, log=None, **kw):
    with Store(directory) as store:
        return run_experiment(cfg, store, progress=False, data=digits,
                              log=log if log is not None else (lambda s: None), **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_two_strategies_of_a_seed_share_one_pretraining(tmp_path, digits, pretrained, used):
    lines: list[str] = []
    _run(tmp_path / "exp", _cfg("random"), digits, log=lines.append)
    _run(tmp_path / "exp", _cfg("bald"), digits, log=lines.append)  # dropout 0.5: no weights
    assert len(pretrained) == 1 and len(used) == 2
    assert _same(used[0], used[1])
    [path] = (tmp_path / "exp" / "encoders").glob("*.pt")
    assert _same(torch.load(path), used[0])
    assert any("read from" in line and path.name in line for line in lines)
    note = json.loads(path.with_suffix(".json").read_text())
    assert note["key"] == path.stem == encoder_key(note["covers"])
    assert note["covers"]["seed"] == 0 and note["covers"]["pretrain"]["epochs"] == 1
    assert path.with_name(path.name + ".sha256").exists()
    # the weights a run pre-trained for itself before the cache: same seed streams
    cfg = _cfg()
    val = make_splits(digits.n_train, 100, 20, 0).validation
    model = build_model("lenet", 1, 8, 10, projector_dims=(16, 16),
                        seed=rngs.int_seed(0, rngs.PRETRAIN, 0))
    pretrain_barlow(model, digits.x_train, np.setdiff1d(np.arange(digits.n_train), val),
                    cfg.train, rngs.torch_generator(0, rngs.PRETRAIN, 1),
                    rngs.torch_generator(0, rngs.PRETRAIN, 2))
    assert _same(model.state_dict(), used[0])


def test_dropout_of_the_strategy_leaves_the_encoder_unchanged(digits, pretrained):
    cfg = _cfg()
    images = np.arange(300)
    states = []
    for dropout in (0.0, 0.5):
        def new_model(seed, dropout=dropout):
            return build_model("lenet", 1, 8, 10, projector_dims=(16, 16), dropout=dropout,
                               seed=seed)

        enc = SharedEncoder(cfg, None, digits.n_train, 100)  # no cache: pre-trains each time
        states.append(enc.state(digits.x_train, images, new_model, False, lambda s: None))
    assert len(pretrained) == 2
    assert _same(states[0], states[1])


def test_key_covers_data_model_seed_and_pretraining_not_strategy_or_rounds():
    def key(**kw):
        return encoder_key(encoder_covers(_cfg(**kw), 1797, 100))

    base = key()
    same = [key(strategy="bald"), key(epochs=7), key(gamma=0.0), key(steps=50),
            key(warm_start=True), key(batch_size=16), key(device="cuda"),
            key(pretrain_cache="/elsewhere"), key(strategy_options={"samples": 3})]
    assert all(k == base for k in same)
    other = [key(seed=1), key(pretrain_epochs=2), key(pretrain_batch=128), key(lr=1e-4),
             key(weight_decay=0.0), key(lambd=0.01), key(amp="bf16"), key(latent_dim=32),
             key(model="vgg16"), key(projector_dims=(16, 8)), key(unknown_classes=["9"]),
             key(mix="kmnist:30")]
    assert len({base, *other}) == len(other) + 1
    assert encoder_key(encoder_covers(_cfg(), 1797, 200)) != base  # another validation split
    assert encoder_key(encoder_covers(_cfg(), 1700, 100)) != base  # other data


def test_another_seed_pretrains_another_encoder(tmp_path, digits, pretrained):
    _run(tmp_path / "exp", _cfg(seed=0), digits)
    _run(tmp_path / "exp", _cfg(seed=1), digits)
    _run(tmp_path / "exp", _cfg(seed=1, pretrain_batch=128), digits)
    assert len(pretrained) == 3
    assert len(list((tmp_path / "exp" / "encoders").glob("*.pt"))) == 3


@pytest.mark.parametrize(("how", "says"), [("garbled", "does not match its checksum"),
                                           ("truncated", "truncated or damaged")])
def test_damaged_cached_encoder_is_one_line_naming_the_fix(tmp_path, digits, how, says):
    _run(tmp_path / "exp", _cfg("random"), digits)
    [path] = (tmp_path / "exp" / "encoders").glob("*.pt")
    data = path.read_bytes()
    if how == "garbled":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(255 - b for b in data[mid:mid + 64])
                         + data[mid + 64:])
    else:
        path.write_bytes(data[:len(data) // 2])
        path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(DalbtError) as err:
        _run(tmp_path / "exp", _cfg("margin"), digits)
    text = str(err.value)
    assert "\n" not in text and says in text and str(path) in text
    assert "delete it and its .sha256 to pre-train again" in text


def test_cache_directory_shared_by_two_experiment_directories(tmp_path, digits, pretrained,
                                                              used):
    cache = str(tmp_path / "cache")
    first = _run(tmp_path / "a", _cfg("random", pretrain_cache=cache), digits)
    _run(tmp_path / "b", _cfg("entropy", pretrain_cache=cache), digits)
    assert len(pretrained) == 1 and _same(used[0], used[1])
    assert len(list((tmp_path / "cache" / "encoders").glob("*.pt"))) == 1
    assert not (tmp_path / "a" / "encoders").exists() and not (tmp_path / "b" / "encoders"
                                                               ).exists()
    assert first.key == config_key(_cfg("random").key_dict())  # not part of the run key


def test_old_per_run_checkpoint_is_still_read(tmp_path, digits, pretrained, used):
    run = _run(tmp_path / "exp", _cfg(rounds=2), digits)
    [path] = (tmp_path / "exp" / "encoders").glob("*.pt")
    legacy = tmp_path / "exp" / "checkpoints" / f"run-{run.id}-pretrained.pt"
    legacy.parent.mkdir(exist_ok=True)
    shutil.move(path, legacy)  # as a run pre-trained before the shared cache left it
    shutil.move(f"{path}.sha256", f"{legacy}.sha256")
    with Store(tmp_path / "exp") as store:
        store.delete_rounds(run.id, 1)
    _run(tmp_path / "exp", _cfg(rounds=2), digits, resume=True)
    assert len(pretrained) == 1 and _same(used[0], used[1])
    assert not path.exists()  # read from the run's own file, not pre-trained into the cache


def test_a_second_process_waits_for_the_first_and_reads_its_encoder(tmp_path, digits,
                                                                    pretrained):
    """While one process pre-trains (holding ``<key>.lock``), another that needs the same
    encoder waits, then finds it and does not pre-train it again."""
    cfg = _cfg()
    first = SharedEncoder(cfg, tmp_path, digits.n_train, 100)
    assert first.path is not None
    lines: list[str] = []
    result: list[bool] = []

    def new_model(seed):
        return build_model("lenet", 1, 8, 10, projector_dims=(16, 16), seed=seed)

    def second():
        enc = SharedEncoder(cfg, tmp_path, digits.n_train, 100)
        result.append(enc.ensure(digits.x_train, np.arange(300), new_model, False,
                                 lines.append))

    first.path.parent.mkdir(parents=True)
    with open(first.path.with_suffix(".lock"), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 30
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lines and lines[0].startswith("waiting for another process")
        assert not first.path.exists() and not result
        first._pretrain(digits.x_train, np.arange(300), new_model, False, lambda s: None,
                        encoders.SINGLE)
        fcntl.flock(held, fcntl.LOCK_UN)
    thread.join(timeout=60)
    assert result == [False] and len(pretrained) == 1
    assert not list(first.path.parent.glob("*.tmp"))  # written atomically


def test_bench_pretrains_each_encoder_once_before_its_runs(tmp_path, digits, monkeypatch,
                                                           pretrained):
    monkeypatch.setattr(bench, "_DATA_CACHE", {("digits", None): digits})
    events: list[str] = []
    execute = bench.execute

    def running(task, *report):
        events.append(f"run {len(pretrained)}")
        return execute(task, *report)

    monkeypatch.setattr(bench, "execute", running)
    cfg = bench.parse_config({**TINY, "strategies": ["random", "margin"], "seeds": [0, 1]},
                             "test")
    lines: list[str] = []
    res = bench.run_bench(cfg, tmp_path / "b", jobs=1, progress=False, log=lines.append,
                          pretrain_cache=str(tmp_path / "cache"))
    assert res["ran"] == 4 and len(pretrained) == 2  # one per seed
    assert events == ["run 2"] * 4  # both seeds' encoders exist before the first run
    assert any(line.startswith("pre-trained 2 shared encoders of 2 needed in ")
               for line in lines)
    assert len(list((tmp_path / "cache" / "encoders").glob("*.pt"))) == 2
    again = bench.run_bench(cfg, tmp_path / "c", jobs=1, progress=False, log=lines.append,
                            pretrain_cache=str(tmp_path / "cache"))
    assert again["ran"] == 4 and len(pretrained) == 2  # another directory, same cache


def test_prepare_encoder_reports_whether_it_pretrained(tmp_path, digits, pretrained):
    key, made = prepare_encoder(_cfg(), tmp_path, digits, progress=False, log=lambda s: None)
    assert made and (tmp_path / "encoders" / f"{key}.pt").exists()
    assert prepare_encoder(_cfg("bald"), tmp_path, digits, progress=False,
                           log=lambda s: None) == (key, False)
    assert len(pretrained) == 1


def test_pretrain_cache_options():
    parser = build_parser()
    assert parser.parse_args(["run"]).pretrain_cache is None
    assert parser.parse_args(["run", "--pretrain-cache", "enc"]).pretrain_cache == "enc"
    assert parser.parse_args(["bench", "--pretrain-cache", "enc"]).pretrain_cache == "enc"
    cfg = bench.parse_config({**TINY, "strategies": ["random"], "pretrain_cache": "enc"}, "t")
    [run], _ = bench.expand(cfg)
    assert run.config.pretrain_cache == "enc"
    assert run.key == config_key(RunConfig.from_dict({**run.config.to_dict(),
                                                      "pretrain_cache": None}).key_dict())


def test_full_data_reference_starts_from_the_seeds_shared_encoder(tmp_path, monkeypatch, digits):
    from dalbt import encoders
    from dalbt.bench import run_full_data
    from dalbt.recipe import RunConfig, TrainConfig
    from dalbt.store import Store

    calls = []
    real = encoders.pretrain_barlow
    monkeypatch.setattr(encoders, "pretrain_barlow",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = RunConfig(dataset="digits", initial=20, budget=10, rounds=1, seed=2, val_size=100,
                    train=TrainConfig(epochs=1, pretrain_epochs=1, pretrain_batch=512,
                                      finetune="head"), pretrain_cache=str(tmp_path / "cache"))
    store = Store(tmp_path)
    run = run_full_data(cfg, store, data=digits, log=lambda _: None)
    # as the bench runs it: given the full-data config itself (strategy 'full-data'), it
    # reads the same shared encoder
    from dalbt.bench import full_data_config

    full = full_data_config(cfg, digits)[0]
    with Store(tmp_path / "again") as again:
        rerun = run_full_data(full, again, data=digits, log=lambda _: None)
        assert calls == [1]  # not pre-trained again: the encoder is the same
        assert again.rounds(rerun.id)[0]["test_acc"] == store.rounds(run.id)[0]["test_acc"]
    assert run.status == "finished" and calls == [1]
    assert len(list((tmp_path / "cache" / "encoders").glob("*.pt"))) == 1
    # a linear head on the pre-trained encoder: the paper's random encoder would give ~10 %
    assert store.rounds(run.id)[0]["test_acc"] > 0.5
    store.close()


def test_models_strategies_train_start_from_the_shared_encoder(tmp_path, monkeypatch, digits):
    """Ensemble members (and DAL-OSR's, PT4AL's models) get the seed's pre-trained encoder and
    projector; their classifiers keep their own seeds, so that members still differ."""
    import torch

    from dalbt.loop import run_experiment
    from dalbt.recipe import RunConfig, TrainConfig
    from dalbt.store import Store
    from dalbt.strategies.base import QueryContext

    made = []
    real_post_init = QueryContext.__post_init__

    def spy(self):
        real_post_init(self)
        if self.model_factory is not None:
            made.append(self.model_factory(7))
            made.append(self.model_factory(8))

    monkeypatch.setattr(QueryContext, "__post_init__", spy)
    cfg = RunConfig(dataset="digits", strategy="random", initial=20, budget=10, rounds=1,
                    seed=3, val_size=100,
                    train=TrainConfig(epochs=1, pretrain_epochs=1, pretrain_batch=512))
    with Store(tmp_path) as store:
        run_experiment(cfg, store, progress=False, data=digits, log=lambda _: None)
    (cached,) = sorted((tmp_path / "encoders").glob("*.pt"))
    shared = torch.load(cached)
    assert made
    a, b = made[0].state_dict(), made[1].state_dict()
    for name, value in shared.items():
        if name.startswith("classifier."):
            assert not torch.equal(a[name], b[name])  # each member its own head
        else:
            assert torch.equal(a[name], value) and torch.equal(b[name], value), name
