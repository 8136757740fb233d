"""Self-supervised training options and the out-of-distribution pool scenarios."""

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.loop import RunConfig, apply_scenario, run_experiment
from dalbt.models import build_model
from dalbt.store import Store
from dalbt.train import TrainConfig, pretrain_barlow, train_round
from tests.conftest import kill_at_round


def _cfg(strategy="random", rounds=3, **kw):
    train = {k: kw.pop(k) for k in list(kw) if k in TrainConfig.__dataclass_fields__}
    return RunConfig(dataset="digits", strategy=strategy, initial=20, budget=20, rounds=rounds,
                     seed=0, val_size=100, projector_dims=(32, 32),
                     train=TrainConfig(epochs=1, **train), **kw)


def _run(tmp_path, name, cfg, digits, **kw):
    with Store(tmp_path / name) as store:
        run = run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None, **kw)
        return run, store.rounds(run.id)


@pytest.mark.parametrize("policy", ["return", "discard"])
def test_open_set_queries_cost_budget_without_labels(tmp_path, digits, policy):
    cfg = _cfg(rounds=4, unknown_classes=["8", "9"], ood_policy=policy)
    data = apply_scenario(cfg, digits)
    ood = data.ood.numpy()
    assert data.num_classes == 8 and ood.sum() == int((digits.y_train >= 8).sum())
    run, rounds = _run(tmp_path, policy, cfg, digits)
    assert not ood[run.initial].any()
    queried = [r["queried"] for r in rounds[:-1]]
    for r, q in zip(rounds, queried, strict=False):
        assert len(q) == 20 and r["n_ood"] == int(ood[q].sum())
    assert sum(r["n_ood"] for r in rounds[:-1]) > 0  # about 20 % of the pool is OOD
    # labelled counts grow by the in-distribution queries only
    for prev, nxt in zip(rounds, rounds[1:], strict=False):
        assert nxt["n_labelled"] == prev["n_labelled"] + len(prev["queried"]) - prev["n_ood"]
    # the test split holds known classes only
    assert int(data.y_test.max()) == 7 and len(data.y_test) < len(digits.y_test)


def test_ood_policy_and_flags_are_validated(tmp_path, digits):
    with pytest.raises(DalbtError, match="ood-policy"):
        _run(tmp_path, "bad", _cfg(ood_policy="keep"), digits)
    with pytest.raises(DalbtError, match="gamma"):
        _run(tmp_path, "bad2", _cfg(ssl_unlabelled=True, gamma=0.0), digits)


def test_ssl_on_pool_never_reads_pool_labels(digits):
    y = digits.y_train.clone()
    lab, pool, val = np.arange(0, 64), np.arange(64, 1000), np.arange(1000, 1100)
    y[torch.as_tensor(pool)] = 999  # would raise inside cross-entropy if a pool label were read
    outs = []
    for ssl in (False, True):
        model = build_model("lenet", 1, 8, 10, projector_dims=(32, 32), seed=0)
        res = train_round(model, digits.x_train, y, lab, val,
                          TrainConfig(epochs=2, ssl_unlabelled=ssl),
                          torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
                          unlabelled=pool)
        assert res.train_bt > 0
        outs.append(torch.cat([p.detach().flatten() for p in model.encoder.parameters()]))
    assert not torch.equal(outs[0], outs[1])  # the pool's views changed the encoder's updates


def test_pretraining_lowers_barlow_loss_and_is_reused_on_resume(tmp_path, digits, monkeypatch):
    model = build_model("lenet", 1, 8, 10, projector_dims=(32, 32), seed=0)
    before = model.classifier.weight.detach().clone()
    losses = pretrain_barlow(model, digits.x_train, np.arange(600),
                             TrainConfig(pretrain_epochs=4, pretrain_batch=128),
                             torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert losses[-1] < losses[0]
    assert torch.equal(before, model.classifier.weight)  # labels play no part
    cfg = _cfg(rounds=1, pretrain_epochs=1, pretrain_batch=128)
    _, plain = _run(tmp_path, "plain", _cfg(rounds=1), digits)
    run, pre = _run(tmp_path, "pre", cfg, digits)
    assert len(list((tmp_path / "pre" / "encoders").glob("*.pt"))) == 1  # the shared encoder
    assert pre[0]["test_acc"] != plain[0]["test_acc"] or pre[0]["train_ce"] != plain[0]["train_ce"]

    import dalbt.encoders

    def fail(*a, **k):
        raise AssertionError("pre-training must not run again")

    monkeypatch.setattr(dalbt.encoders, "pretrain_barlow", fail)
    with Store(tmp_path / "pre") as store:  # a resumed run reuses the stored weights
        store.delete_rounds(run.id, 1)
    _, again = _run(tmp_path, "pre", cfg, digits, resume=True)
    assert again[1]["test_acc"] == pre[1]["test_acc"]


def test_cross_dataset_pool_from_real_format_files(tmp_path, digits):
    from tests.test_data_formats import make_idx_set

    make_idx_set(tmp_path / "data" / "KMNIST" / "raw", gz=True, n_train=40, n_test=3)
    cfg = _cfg(rounds=2, mix="kmnist:30")
    cfg.data_root = str(tmp_path / "data")
    data = apply_scenario(cfg, digits)
    assert data.n_train == digits.n_train + 30 and int(data.ood.sum()) == 30
    assert data.x_train.shape[1:] == digits.x_train.shape[1:]  # resized to 8x8, one channel
    run, rounds = _run(tmp_path, "mix", cfg, digits)
    ood = data.ood.numpy()
    assert all(r["n_ood"] == int(ood[r["queried"]].sum()) for r in rounds[:-1])
    assert not ood[run.initial].any()


class _OodFirst:
    """A strategy that always asks for one fixed image first (then the lowest indices)."""

    name = "ood-first"
    description = "test strategy"

    def __init__(self, target: int = 0):
        from dalbt.strategies.random import RandomStrategy

        self.target = target
        self.base = RandomStrategy()

    def __getattr__(self, item):
        return getattr(self.base, item)

    def select(self, ctx, budget):
        rest = [i for i in ctx.unlabelled[:budget + 1] if i != self.target]
        head = [self.target] if self.target in set(ctx.unlabelled) else []
        return np.array(head + rest, dtype=np.int64)[:budget]


@pytest.mark.parametrize("policy", ["return", "discard"])
def test_returned_ood_images_can_be_asked_again_discarded_ones_cannot(tmp_path, digits,
                                                                      monkeypatch, policy):
    import dalbt.loop
    import dalbt.strategies

    cfg = _cfg("random", rounds=3, unknown_classes=["9"], ood_policy=policy)
    target = int(np.flatnonzero(apply_scenario(cfg, digits).ood.numpy())[0])
    cfg.strategy_options = {"target": target}
    monkeypatch.setitem(dalbt.strategies.STRATEGIES, "random", _OodFirst)
    monkeypatch.setattr(dalbt.loop, "build_strategy",
                        lambda name, **o: _OodFirst(**o))
    _, rounds = _run(tmp_path, policy, cfg, digits)
    asked = [int(target in r["queried"]) for r in rounds[:-1]]
    assert asked == ([1, 1, 1] if policy == "return" else [1, 0, 0])
    assert all(r["n_ood"] >= a for r, a in zip(rounds, asked, strict=False))


def test_training_never_sees_pool_labels(tmp_path, digits, monkeypatch):
    from dalbt.strategies.base import Strategy

    seen = []
    original = Strategy.train_model

    def spy(self, model, x, y, labelled, validation, *a, unlabelled=None, **k):
        seen.append((y.clone(), labelled.copy(), validation.copy(), unlabelled.copy()))
        return original(self, model, x, y, labelled, validation, *a, unlabelled=unlabelled, **k)

    monkeypatch.setattr(Strategy, "train_model", spy)
    _run(tmp_path, "spy", _cfg("entropy", rounds=2), digits)
    assert len(seen) == 3
    for y, labelled, validation, unlabelled in seen:
        assert (y[torch.as_tensor(unlabelled)] == -1).all()
        assert torch.equal(y[torch.as_tensor(labelled)], digits.y_train[torch.as_tensor(labelled)])
        assert (y[torch.as_tensor(validation)] >= 0).all()


@pytest.mark.parametrize("policy", ["return", "discard"])
def test_ood_run_resumes_to_the_same_queries(tmp_path, digits, monkeypatch, policy):
    cfg = _cfg("entropy", rounds=3, unknown_classes=["8", "9"], ood_policy=policy)
    _, full = _run(tmp_path, "full", cfg, digits)
    kill_at_round(monkeypatch, 2, lambda: _run(tmp_path, "cut", cfg, digits))
    _, resumed = _run(tmp_path, "cut", cfg, digits, resume=True)
    for a, b in zip(full, resumed, strict=True):
        assert np.array_equal(a["queried"], b["queried"]) and a["n_ood"] == b["n_ood"]
        assert a["n_labelled"] == b["n_labelled"]
