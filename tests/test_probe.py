"""``--finetune head``: a linear head on the frozen encoder (dalbt.probe)."""

import copy
import logging
import socket

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch import nn

from dalbt import distributed, probe
from dalbt.distributed import SINGLE
from dalbt.loop import RunConfig, run_experiment
from dalbt.models import build_model
from dalbt.models.net import DALBTNet, make_projector
from dalbt.store import Store
from dalbt.train import TrainConfig, accuracy, infer, train_round
from tests.conftest import small_lenet

HEAD = TrainConfig(finetune="head", pretrain_epochs=1)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(probe, "_warned", set())


def _frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")}


def _gens(shuffle=1, augment=2):
    return torch.Generator().manual_seed(shuffle), torch.Generator().manual_seed(augment)


def _separable(n=120, classes=4, seed=0):
    """8x8 images whose class is the one bright pixel among the first ``classes``, on noise,
    and a network whose encoder just flattens them: the latents are linearly separable."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g)
    x.view(n, -1)[torch.arange(n), y] = 255
    net = DALBTNet(nn.Flatten(), make_projector(64, (8,)), latent_dim=64, num_classes=classes)
    return x.to(torch.uint8), y, net


def test_head_leaves_encoder_and_projector_unchanged_and_trains_the_classifier(digits):
    model = small_lenet(digits)
    frozen, head = _frozen_state(model), copy.deepcopy(model.classifier.state_dict())
    lab, val = np.arange(200), np.arange(1000, 1200)
    res = train_round(model, digits.x_train, digits.y_train, lab, val, HEAD, *_gens(),
                      unlabelled=np.arange(200, 1000))
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    assert not torch.equal(model.classifier.weight, head["weight"])
    assert res.train_bt == 0.0 and res.best_epoch > 0 and np.isfinite(res.train_ce)
    # the reported validation accuracy is that of the model now held
    assert res.val_acc == pytest.approx(
        accuracy(model, digits.x_train[val], digits.y_train[val]), abs=1 / len(val))
    assert 1 <= len(res.history) <= len(probe.l2_candidates(HEAD, True))
    assert res.val_acc == max(a for _, a in res.history)


def test_head_reaches_full_training_accuracy_on_separable_latents():
    x, y, net = _separable()
    lab = np.arange(80)
    cfg = TrainConfig(finetune="head", pretrain_epochs=1, select="last")
    before = accuracy(net, x[lab], y[lab])
    res = train_round(net, x, y, lab, np.arange(80, 120), cfg, *_gens())
    assert accuracy(net, x[lab], y[lab]) == 1.0 > before
    assert accuracy(net, x[80:], y[80:]) == 1.0  # unseen images of the same rule
    assert res.history == [] and res.train_ce < 0.05 and res.val_acc == 1.0
    # no labels: nothing to fit, the classifier is left as it was
    head = copy.deepcopy(net.classifier.state_dict())
    res = train_round(net, x, y, np.empty(0, dtype=np.int64), np.arange(80, 120), cfg, *_gens())
    assert np.isnan(res.train_ce) and torch.equal(net.classifier.weight, head["weight"])


def test_head_is_deterministic_and_independent_of_the_initial_classifier(digits):
    lab, val = np.arange(150), np.arange(1000, 1100)
    heads = []
    for init, shuffle in ((0, 1), (0, 1), (5, 9)):
        model = small_lenet(digits)
        torch.manual_seed(init)
        model.classifier.reset_parameters()  # another initial head, same encoder
        train_round(model, digits.x_train, digits.y_train, lab, val, HEAD, *_gens(shuffle))
        heads.append(model.classifier.state_dict())
    for other in heads[1:]:
        for k in heads[0]:
            assert torch.equal(heads[0][k], other[k]), k


def test_selection_on_validation_chooses_among_l2_strengths():
    x, y, net = _separable(seed=1)
    cfg = TrainConfig(finetune="head", pretrain_epochs=1, weight_decay=3e-4)
    assert probe.l2_candidates(cfg, False) == [3e-4]
    grid = probe.l2_candidates(cfg, True)
    assert grid == sorted(grid, reverse=True) and 3e-4 in grid and len(grid) == 6
    res = train_round(net, x, y, np.arange(60), np.arange(60, 120), cfg, *_gens())
    assert [a for _, a in res.history] and res.val_acc == max(a for _, a in res.history)
    # without a validation split: one fit, NaN validation accuracy
    res = train_round(net, x, y, np.arange(60), np.empty(0, dtype=np.int64), cfg, *_gens())
    assert res.history == [] and np.isnan(res.val_acc) and res.best_epoch > 0


class _Fit:
    def __init__(self, acc, iterations):
        self.acc, self.iterations = acc, iterations

    def accuracy(self, z, y):
        return self.acc


@pytest.mark.parametrize("accs,best,drawn", [
    ([0.5, 0.7, 0.6, 0.6, 0.9], 1, 4),  # two in a row no better than 0.7: stop
    ([0.5, 0.7, 0.7, 0.8, 0.1, 0.8, 0.9], 3, 6),  # ties keep the earlier; patience restarts
    ([0.9, 0.9, 0.9], 0, 3),
    ([0.1, 0.2, 0.3], 2, 3),
])
def test_selection_stops_after_patience_and_prefers_the_stronger_penalty(accs, best, drawn):
    assert probe.PATIENCE == 2
    fits = [_Fit(a, i + 1) for i, a in enumerate(accs)]
    chosen, acc, history = probe.select_on_validation(iter(fits), None, None)
    assert chosen is fits[best] and acc == accs[best]
    assert history == [(i + 1, a) for i, a in enumerate(accs[:drawn])]


def test_fit_head_minimises_the_penalised_cross_entropy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (200,), generator=g)
    w, b, ce, iterations = probe.fit_head(x, y, 3, 0.1)
    assert 0 < iterations <= probe.MAX_ITER
    w, b = w.requires_grad_(), b.requires_grad_()
    loss = nn.functional.cross_entropy(x @ w.T + b, y) + 0.05 * (w * w).sum()
    loss.backward()
    # stopped at a (near) stationary point: the gradient or the loss change under tolerance
    assert max(float(w.grad.abs().max()), float(b.grad.abs().max())) < 10 * probe.TOL_GRAD
    with torch.no_grad():
        assert ce == pytest.approx(float(nn.functional.cross_entropy(x @ w.T + b, y)))


def test_standardisation_is_folded_back_into_raw_weights():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10, 0.1, 1])
    z[:, 3] = 7.0  # a constant dimension keeps scale 1
    std = probe.Standardised(z)
    assert float(std.scale[3]) == 1.0
    w, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    raw_w, raw_b = std.unfold(w, b)
    torch.testing.assert_close(z @ raw_w.T + raw_b, std(z) @ w.T + b)


def test_random_encoder_is_warned_about_once(digits, caplog):
    model = small_lenet(digits)
    cfg = TrainConfig(finetune="head")  # pretrain_epochs = 0
    with caplog.at_level(logging.WARNING, logger="dalbt.probe"):
        for _ in range(2):
            train_round(model, digits.x_train, digits.y_train, np.arange(50), np.arange(50, 90),
                        cfg, *_gens())
    warned = [r for r in caplog.records if r.name == "dalbt.probe"]
    assert len(warned) == 1 and "--pretrain-epochs" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dalbt.probe"):
        train_round(small_lenet(digits), digits.x_train, digits.y_train, np.arange(50),
                    np.arange(50, 90), HEAD, *_gens())
    assert not [r for r in caplog.records if r.name == "dalbt.probe"]


@pytest.mark.parametrize("strategy", ["margin", "weibull"])
def test_run_with_a_linear_head_keeps_the_pretrained_encoder(tmp_path, digits, monkeypatch,
                                                             strategy):
    encoders = []
    real = probe.train_head

    def recording(model, *args, **kw):
        res = real(model, *args, **kw)
        encoders.append(_frozen_state(model))
        return res

    monkeypatch.setattr(probe, "train_head", recording)
    cfg = RunConfig(dataset="digits", strategy=strategy, initial=30, budget=20, rounds=2,
                    val_size=100, projector_dims=(32, 32),
                    train=TrainConfig(epochs=1, finetune="head", pretrain_epochs=1))
    with Store(tmp_path) as store:
        run = run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None)
        rounds = store.rounds(run.id)
    assert run.status == "finished" and [r["n_labelled"] for r in rounds] == [30, 50, 70]
    assert all(r["train_bt"] == 0.0 and r["best_epoch"] > 0 for r in rounds)
    assert all(len(r["queried"]) == 20 for r in rounds[:2])
    (cached,) = sorted((tmp_path / "encoders").glob("*.pt"))  # the seed's shared encoder
    pretrained = torch.load(cached)
    assert len(encoders) == 3
    for state in encoders:
        assert state.keys() == {k for k in pretrained if not k.startswith("classifier")}
        for k, v in state.items():
            assert torch.equal(v, pretrained[k]), k


def test_head_outputs_equal_a_full_pass_and_encode_the_images_once(digits):
    model = small_lenet(digits)
    cache = probe.FrozenLatents()
    idx = np.array([5, 0, 17, 3])
    z = cache(model, digits.x_train, idx)
    assert cache.encodings == 1
    ref = infer(model, digits.x_train, idx)
    torch.testing.assert_close(z, ref.latents, rtol=1e-5, atol=1e-6)
    assert torch.equal(cache(model, digits.x_train, idx[::-1]), z.flip(0))
    assert cache.encodings == 1  # indexed, not encoded again
    out = probe.head_outputs(model, digits.x_train, idx)
    np.testing.assert_array_equal(out.indices, idx)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    empty = probe.head_outputs(model, digits.x_train, np.empty(0, dtype=np.int64))
    assert empty.logits.shape == (0, digits.num_classes) and empty.latents.shape == (0, 60)


def test_frozen_latents_follow_the_encoder_weights_and_the_images(digits):
    model = small_lenet(digits)
    cache = probe.FrozenLatents()
    idx = np.arange(4)
    before = cache(model, digits.x_train, idx)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # not the encoder: nothing to recompute
    cache(model, digits.x_train, idx)
    assert cache.encodings == 1
    with torch.no_grad():
        next(model.encoder.parameters()).mul_(2.0)
    after = cache(model, digits.x_train, idx)
    assert cache.encodings == 2 and not torch.equal(before, after)
    cache(model, digits.x_train.clone(), idx)  # other images, even with equal values
    assert cache.encodings == 3


def test_a_head_run_encodes_the_pool_once(tmp_path, digits, monkeypatch):
    cache = probe.FrozenLatents()
    monkeypatch.setattr(probe, "frozen_latents", cache)
    cfg = RunConfig(dataset="digits", strategy="badge", initial=30, budget=20, rounds=2,
                    val_size=100, projector_dims=(32, 32),
                    train=TrainConfig(epochs=1, finetune="head", pretrain_epochs=1))
    with Store(tmp_path) as store:
        run = run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None)
    assert run.status == "finished"
    # three rounds of training and two queries share one pass over the training images, and
    # the three test accuracies one over the test images
    assert cache.encodings == 2


# --- distributed: every rank fits the same head ------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world)
    dist = distributed.from_process_group("cpu")
    x, y, _ = _separable(n=90, classes=3, seed=2)
    x = (x.float() * 0.6 + 40).to(torch.uint8)  # some overlap: a non-trivial fit
    heads = []
    for d in (SINGLE, dist):
        net = build_model("lenet", 1, 8, 3, projector_dims=(16,), seed=0)
        train_round(net, x, y, np.arange(45), np.arange(45, 70), HEAD, *_gens(), dist=d)
        heads.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(heads[1], heads[0], rtol=0, atol=1e-6)
    everyone = [torch.empty_like(heads[1]) for _ in range(world)]
    tdist.all_gather(everyone, heads[1])
    assert all(torch.equal(everyone[0], e) for e in everyone)
    distributed.shutdown(dist)


@pytest.mark.slow
@pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is unavailable")
def test_two_gloo_processes_fit_the_one_process_head():
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(2, _free_port()), nprocs=2, join=True)
