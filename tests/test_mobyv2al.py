"""MoBYv2AL: joint training hook (train_model) and core-set selection."""

import numpy as np
import pytest
import torch

from dalbt.models import build_model
from dalbt.strategies import build_strategy
from dalbt.strategies.coreset import k_center_greedy
from dalbt.strategies.mobyv2al import MoBYLearner, MoBYv2ALStrategy
from dalbt.train import TrainConfig, TrainResult, train_round

N, K = 60, 3
LABELLED = np.arange(0, 20)
VALIDATION = np.arange(20, 30)
POOL = np.arange(30, 60)
SMALL = {"hidden_dim": 32, "proj_dim": 16, "queue_size": 64}


def _data():
    g = torch.Generator().manual_seed(1234)
    y = torch.arange(N) % K
    base = torch.rand(K, 1, 8, 8, generator=g) * 255
    x = (base[y] * 0.75 + torch.rand(N, 1, 8, 8, generator=g) * 60).clamp(0, 255).to(torch.uint8)
    return x, y


def _model(seed=0):
    return build_model("lenet", 1, 8, K, projector_dims=(16, 16), seed=seed)


def _gens(s=0, a=1):
    return torch.Generator().manual_seed(s), torch.Generator().manual_seed(a)


class Spy:
    """Indexable stand-in for a tensor that records every index it is read at."""

    def __init__(self, t):
        self.t = t
        self.read: set[int] = set()

    def __getitem__(self, key):
        self.read.update(np.asarray(key).reshape(-1).tolist())
        return self.t[key]


def _train(strategy, model=None, x=None, y=None, cfg=None, gens=(0, 1), pool=POOL):
    xd, yd = _data()
    model = model if model is not None else _model()
    cfg = cfg or TrainConfig(epochs=1, batch_size=8)
    sg, ag = _gens(*gens)
    res = strategy.train_model(model, xd if x is None else x, yd if y is None else y, LABELLED,
                               VALIDATION, cfg, sg, ag, unlabelled=pool)
    return model, res


def test_train_model_returns_result_and_changes_weights():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    epochs = []
    xd, yd = _data()
    sg, ag = _gens()
    res = MoBYv2ALStrategy(**SMALL).train_model(
        model, xd, yd, LABELLED, VALIDATION, TrainConfig(epochs=2, batch_size=8), sg, ag,
        on_epoch=lambda e, m: epochs.append((e, m)), unlabelled=POOL)
    assert isinstance(res, TrainResult)
    assert 0.0 <= res.val_acc <= 1.0 and res.best_epoch in (1, 2)
    assert np.isfinite(res.train_ce) and res.train_bt > 0
    assert [e for e, _ in epochs] == [1, 2] and "moby" in epochs[0][1]
    after = model.state_dict()
    for name in ("encoder.backbone.head.3.weight", "classifier.weight", "classifier.bias"):
        assert not torch.equal(before[name], after[name]), name
    # the model's Barlow Twins projector is not part of MoBYv2AL's objective
    assert torch.equal(before["projector.0.weight"], after["projector.0.weight"])


def test_unlabelled_labels_never_read_but_images_used():
    xd, yd = _data()
    y = yd.clone()
    y[POOL] = 10**6  # a sentinel: cross-entropy on it would raise
    xs, ys = Spy(xd), Spy(y)
    _, res = _train(MoBYv2ALStrategy(**SMALL), x=xs, y=ys,
                    cfg=TrainConfig(epochs=2, batch_size=8))
    assert np.isfinite(res.train_ce)
    assert ys.read == set(LABELLED) | set(VALIDATION)
    assert ys.read.isdisjoint(POOL)
    # pool images fed the contrastive loss: 2 epochs x 3 batches x up to 8 images each
    assert len(xs.read & set(POOL)) >= 20
    assert xs.read <= set(LABELLED) | set(VALIDATION) | set(POOL)
    # the sentinel is a real trap: CE over a pool batch would fail
    with pytest.raises((IndexError, RuntimeError)):
        torch.nn.functional.cross_entropy(torch.zeros(2, K), y[POOL[:2]])


def test_unlabelled_weight_zero_reads_no_pool_image():
    xs = Spy(_data()[0])
    _train(MoBYv2ALStrategy(unlabelled_weight=0.0, **SMALL), x=xs)
    assert xs.read.isdisjoint(POOL)


def test_zero_weights_equal_plain_cross_entropy_training():
    # With no contrastive term the objective is CE with one Adam step per batch and model
    # selection on validation: exactly the default training with gamma = 0.
    cfg = TrainConfig(epochs=3, batch_size=8, gamma=0.0)
    a, ra = _train(MoBYv2ALStrategy(labelled_weight=0.0, unlabelled_weight=0.0, **SMALL),
                   cfg=cfg)
    xd, yd = _data()
    b = _model()
    sg, ag = _gens()
    rb = train_round(b, xd, yd, LABELLED, VALIDATION, cfg, sg, ag, unlabelled=POOL)
    assert ra.val_acc == rb.val_acc and ra.best_epoch == rb.best_epoch
    assert ra.train_ce == pytest.approx(rb.train_ce, rel=1e-6)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6), ka


def test_contrastive_term_changes_training():
    cfg = TrainConfig(epochs=1, batch_size=8)
    a, _ = _train(MoBYv2ALStrategy(**SMALL), cfg=cfg)
    b, _ = _train(MoBYv2ALStrategy(labelled_weight=0.0, unlabelled_weight=0.0, **SMALL), cfg=cfg)
    wa, wb = a.state_dict()["encoder.backbone.head.3.weight"], b.state_dict()[
        "encoder.backbone.head.3.weight"]
    assert not torch.allclose(wa, wb)


def test_train_model_deterministic():
    s = MoBYv2ALStrategy(**SMALL)
    a, ra = _train(s, gens=(3, 4))
    b, rb = _train(s, gens=(3, 4))
    c, _ = _train(s, gens=(5, 4))
    assert ra == rb
    assert all(torch.equal(va, vb) for va, vb in zip(a.state_dict().values(),
                                                     b.state_dict().values(), strict=True))
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(),
                                                         c.state_dict().values(), strict=True))


def test_train_model_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    _train(MoBYv2ALStrategy(**SMALL))
    assert torch.equal(state, torch.get_rng_state())


def test_key_branch_follows_query_by_momentum():
    torch.manual_seed(0)
    model = _model()
    learner = MoBYLearner(model.encoder, model.latent_dim, proj_dim=8, hidden_dim=16,
                          queue_size=32)
    keys0 = [p.detach().clone() for p in learner.key_encoder.parameters()]
    kproj0 = [p.detach().clone() for p in learner.key_projector.parameters()]
    assert all(not p.requires_grad for p in learner.key_encoder.parameters())
    with torch.no_grad():  # the query branch moves away from its copy
        for p in [*model.encoder.parameters(), *learner.projector.parameters()]:
            p.add_(0.5)
    x = torch.rand(6, 1, 8, 8)
    loss = learner.loss(x, x.flip(-1), m=0.9)
    assert loss.shape == (6,)
    for k, k0, q in zip(learner.key_encoder.parameters(), keys0, model.encoder.parameters(),
                        strict=True):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q)
    for k, k0, q in zip(learner.key_projector.parameters(), kproj0,
                        learner.projector.parameters(), strict=True):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q)
    # keys were enqueued (normalised), one per image and view; no gradient into the key branch
    assert len(learner.queue1) == 6 and len(learner.queue2) == 6
    assert torch.allclose(learner.queue1.keys.norm(dim=1), torch.ones(6))
    loss.mean().backward()
    assert all(p.grad is None for p in learner.key_encoder.parameters())
    assert next(model.encoder.parameters()).grad is not None


class CapturingMoBY(MoBYv2ALStrategy):
    def make_learner(self, model):
        self.learner = super().make_learner(model)
        self.start = [p.detach().clone() for p in self.learner.key_encoder.parameters()]
        return self.learner


def test_train_model_key_encoder_is_a_lagging_copy():
    s = CapturingMoBY(**SMALL)
    model, _ = _train(s, cfg=TrainConfig(epochs=2, batch_size=8))
    keys = list(s.learner.key_encoder.parameters())
    online = list(model.encoder.parameters())
    # the key encoder moved from its initial copy but is not the online encoder itself
    assert any(not torch.equal(k, k0) for k, k0 in zip(keys, s.start, strict=True))
    assert any(not torch.equal(k, q) for k, q in zip(keys, online, strict=True))
    assert all(k.data_ptr() != q.data_ptr() for k, q in zip(keys, online, strict=True))
    # queues hold keys of labelled and pool images: 2 epochs x 3 steps x (8 + 8) at most
    assert 0 < len(s.learner.queue1) <= 64


def test_selection_is_k_center_greedy_on_pool_latents(context_factory):
    # 1-D latents: labelled at 0; pool at 1, 2, 10, 10.5 -> farthest first (10.5), then 2
    lat = np.array([[0.0], [0.1], [1.0], [2.0], [10.0], [10.5]])
    logits = np.zeros((6, 2))
    ctx = context_factory(logits, lat, [0, 1], [0, 1])
    assert build_strategy("mobyv2al").select(ctx, 2).tolist() == [5, 3]
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(80, 4))
    ctx = context_factory(rng.normal(size=(80, 3)), lat, np.arange(10), np.zeros(10))
    got = build_strategy("mobyv2al").select(ctx, 12)
    pos = k_center_greedy(torch.as_tensor(lat[10:], dtype=torch.float32),
                          torch.as_tensor(lat[:10], dtype=torch.float32), 12)
    assert got.tolist() == (10 + pos).tolist()


@pytest.mark.parametrize("bad", [
    {"temperature": 0.0}, {"temperature": -1.0}, {"queue_size": 0}, {"queue_size": 2.5},
    {"momentum": 1.5}, {"labelled_weight": -0.1}, {"unlabelled_weight": -1.0},
    {"proj_dim": 0}, {"hidden_dim": 0}, {"temperature": float("nan")},
])
def test_option_validation(bad):
    with pytest.raises(ValueError):
        MoBYv2ALStrategy(**bad)


def test_no_training_step_on_a_small_remainder_batch():
    # 20 labelled at batch 8: 8 + 8 + 4 (4 = the minimum, kept); at batch 9: 9 + 6 + 5 (not 2)
    from dalbt.train import min_batch, n_batches

    for bs, expect in ((8, [8, 8, 4]), (9, [9, 6, 5])):
        model = _model()
        sizes: list[int] = []
        model.classifier.register_forward_pre_hook(
            lambda m, args, sizes=sizes: sizes.append(args[0].shape[0]) if m.training else None)
        _train(MoBYv2ALStrategy(**SMALL), model=model,
               cfg=TrainConfig(epochs=1, batch_size=bs))
        assert sizes == expect and min(sizes) >= min_batch(bs)
    assert n_batches(20, 9) == 3  # the step count of MoBY's momentum schedule
