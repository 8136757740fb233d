"""Self-supervised training options and the out-of-distribution pool scenarios."""

import numpy as np
import pytest
import torch

from dalbt.data import load_dataset
from dalbt.errors import DalbtError
from dalbt.loop import RunConfig, apply_scenario, run_experiment
from dalbt.models import build_model
from dalbt.store import Store
from dalbt.train import TrainConfig, pretrain_barlow, train_round


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


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
    ood_queried = np.concatenate([q[ood[q]] for q in queried])
    if policy == "discard":
        assert len(np.unique(ood_queried)) == len(ood_queried)  # never asked twice
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
    losses = pretrain_barlow(model, digits.x_train, np.arange(1500),
                             TrainConfig(pretrain_epochs=4, pretrain_batch=128),
                             torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert losses[-1] < losses[0]
    assert torch.equal(before, model.classifier.weight)  # labels play no part
    cfg = _cfg(rounds=1, pretrain_epochs=1, pretrain_batch=128)
    _, plain = _run(tmp_path, "plain", _cfg(rounds=1), digits)
    run, pre = _run(tmp_path, "pre", cfg, digits)
    assert (tmp_path / "pre" / "checkpoints" / f"run-{run.id}-pretrained.pt").exists()
    assert pre[0]["test_acc"] != plain[0]["test_acc"] or pre[0]["train_ce"] != plain[0]["train_ce"]

    import dalbt.loop

    def fail(*a, **k):
        raise AssertionError("pre-training must not run again")

    monkeypatch.setattr(dalbt.loop, "pretrain_barlow", fail)
    with Store(tmp_path / "pre") as store:  # a resumed run reuses the stored weights
        store.conn.execute("DELETE FROM rounds WHERE round = 1")
        store.conn.execute("UPDATE runs SET status = 'running'")
        store.conn.commit()
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
