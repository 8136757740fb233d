"""PT4AL: numeric loss ordering, batches, cold start, least confidence within the batch, the
rotation pretext task, per-run state, options."""

import math

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.models import build_model
from dalbt.rng import isolated_torch_rng
from dalbt.strategies import QueryContext, build_strategy
from dalbt.strategies.pt4al import (
    PT4ALStrategy,
    RotationNet,
    pretext_batches,
    query_from_batch,
    rotate_all,
    rotation_losses,
    train_rotation,
    uniform_from_batch,
)
from dalbt.train import TrainConfig
from tests.conftest import ArrayScorer

N_CONST = 16


def _images(n=48, n_const=N_CONST):
    """``n_const`` constant images (rotation-invariant), then ``n - n_const`` noisy images with
    a bright L along the top and left edges (their orientation is easy to tell)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(n, 1, 8, 8, generator=g) * 40
    imgs[:, :, :2, :] += 180
    imgs[:, :, :, :2] += 180
    imgs[:n_const] = (torch.arange(n_const).float() * 15).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    return imgs.clamp(0, 255).to(torch.uint8)


def _factory(seed):
    return build_model("lenet", 1, 8, 3, projector_dims=(8,), seed=seed)


def _ctx(labelled, logits=None, round_=0, total_rounds=2, n=48, seed=0):
    images = _images(n)
    if logits is None:
        logits = np.zeros((n, 3))
    labelled = np.asarray(labelled, dtype=np.int64)
    return QueryContext(
        unlabelled=np.setdiff1d(np.arange(n), labelled), labelled=labelled,
        labelled_targets=np.zeros(len(labelled)), num_classes=3,
        rng=np.random.default_rng(seed), scorer=ArrayScorer(logits, np.zeros((n, 2))),
        round=round_, total_rounds=total_rounds, images=images,
        train_config=TrainConfig(lr=1e-2), model_factory=_factory)


def test_losses_are_sorted_as_numbers_descending():
    losses = np.array([1e-05, 0.5, 2e-3, 3.0, 1e-7])
    idx = np.array([10, 11, 12, 13, 14])
    (order,) = pretext_batches(losses, idx, 1)
    assert order.tolist() == [13, 11, 12, 10, 14]
    # what the reference code's string sort gives: 1e-05 and 1e-07 above 0.5
    as_strings = idx[np.argsort(np.array([str(v) for v in losses]))[::-1]]
    assert as_strings.tolist()[:2] != [13, 11]


def test_batches_are_equal_consecutive_chunks_with_index_ties_and_nan_last():
    losses = np.array([0.1, 0.9, 0.5, 0.5, np.nan, 0.7, 0.2, 0.3, 0.8, 0.4])
    idx = np.arange(100, 110)
    out = pretext_batches(losses, idx, 3)
    assert [len(b) for b in out] == [4, 3, 3]
    assert np.concatenate(out).tolist() == [101, 108, 105, 102, 103, 109, 107, 106, 100, 104]
    assert [len(b) for b in pretext_batches(np.zeros(12), np.arange(12), 4)] == [3, 3, 3, 3]
    assert pretext_batches(torch.tensor([1.0, 2.0]), np.array([5, 6]), 1)[0].tolist() == [6, 5]
    with pytest.raises(ValueError):
        pretext_batches(losses, idx, 0)
    with pytest.raises(ValueError):
        pretext_batches(losses[:3], idx, 2)


def test_cold_start_takes_every_kth_element():
    batch = np.arange(100, 150)
    assert uniform_from_batch(batch, 10).tolist() == list(range(100, 150, 5))
    assert uniform_from_batch(batch, 20).tolist() == list(range(100, 140, 2))  # k = 2
    assert uniform_from_batch(np.arange(5000), 1000).tolist() == list(range(0, 5000, 5))
    assert uniform_from_batch(batch[:3], 10).tolist() == [100, 101, 102]
    assert len(uniform_from_batch(batch, 0)) == 0


def test_round_i_queries_least_confident_within_its_batch_only():
    pool = np.arange(10)
    log_conf = np.log([0.05, 0.9, 0.6, 0.95, 0.8, 0.4, 0.7, 0.5, 0.99, 0.3])
    batch = np.array([2, 5, 7, 9, 3])
    got = query_from_batch(batch, pool, log_conf, 3, cold_start=False)
    # 0 is the least confident of the pool but lies outside the batch
    assert got.tolist() == [9, 5, 7]
    # inverted direction would give the most confident of the batch
    assert 3 not in got.tolist()


def test_cold_start_ignores_confidence_and_short_batches_are_filled():
    pool = np.arange(10)
    log_conf = np.log([0.05, 0.9, 0.6, 0.95, 0.8, 0.4, 0.7, 0.5, 0.99, 0.3])
    batch = np.array([8, 3, 1, 4, 6, 2])  # in loss order
    assert query_from_batch(batch, pool, log_conf, 3, cold_start=True).tolist() == [8, 1, 6]
    # only 2 of the batch are still unlabelled: they come first, then the least confident rest
    pool2 = np.array([0, 2, 5, 7, 9, 3])
    conf2 = log_conf[pool2]
    got = query_from_batch(np.array([1, 2, 3, 4]), pool2, conf2, 4, cold_start=False)
    assert got.tolist() == [2, 3, 0, 9]
    got = query_from_batch(np.array([1, 3]), pool2, conf2, 3, cold_start=True)
    assert got.tolist() == [3, 0, 9]


def test_rotate_all_gives_the_four_rotations_with_their_labels():
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    rot, y = rotate_all(x)
    assert rot.shape == (8, 1, 3, 3) and y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(rot[3], torch.rot90(x[1], 1, dims=(1, 2)))
    assert torch.equal(rot[5], x[1].flip(1).flip(2))  # 180 degrees


def test_rotation_loss_is_log4_on_symmetric_images_and_low_on_learnable_ones():
    images = _images()
    idx = np.arange(len(images))
    with isolated_torch_rng(0, "cpu"):
        net = RotationNet(_factory(0).encoder, 60)
    before = rotation_losses(net, images, idx, "cpu")
    # a constant image looks the same under every rotation: its mean CE is >= log 4 for any net
    assert (before[:N_CONST] >= math.log(4) - 1e-9).all()
    train_rotation(net, images, idx, 15, 16, 1e-2, 0.0, torch.Generator().manual_seed(0), "cpu")
    after = rotation_losses(net, images, idx, "cpu")
    assert (after[:N_CONST] >= math.log(4) - 1e-9).all()
    assert after[N_CONST:].mean() < 0.5 * math.log(4)
    assert after[N_CONST:].max() < after[:N_CONST].min()


def test_strategy_puts_hard_pretext_images_in_the_first_batch_and_queries_round_i_batch():
    s = build_strategy("pt4al", pretext_epochs=10, batch=16)
    ctx0 = _ctx(labelled=np.arange(20, 24))
    s.prepare(ctx0)
    first, second = s.batches
    assert len(first) == len(second) == 24
    assert set(range(N_CONST)) <= set(first.tolist())
    got0 = s.select(ctx0, 4)
    assert set(got0.tolist()) <= set(first.tolist())
    # cold start: evenly spaced along the loss order of batch 0's unlabelled samples
    remaining = first[~np.isin(first, ctx0.labelled)]
    assert got0.tolist() == remaining[:: len(remaining) // 4][:4].tolist()
    # round 1: least confident of batch 1, although batch 0 holds even less confident samples
    n = 48
    logits = np.zeros((n, 3))
    logits[:, 0] = 8.0  # confident everywhere ...
    logits[first, 0] = 0.0  # ... except batch 0: uniform, the least confident of all
    logits[second[[5, 9, 2]], 0] = [1.0, 2.0, 3.0]  # batch 1's least confident, in order
    ctx1 = _ctx(labelled=np.concatenate([np.arange(20, 24), got0]), logits=logits, round_=1)
    batches_before = s.batches
    got1 = s.select(ctx1, 3)
    assert s.batches is batches_before  # built once per run
    assert got1.tolist() == second[[5, 9, 2]].tolist()


def test_ranking_is_deterministic_and_rebuilt_identically_after_a_resume():
    a = build_strategy("pt4al", pretext_epochs=2, batch=16)
    a.prepare(_ctx(labelled=np.arange(20, 24), seed=1))
    # a fresh instance first seen at round 1 (other labelled set, other query rng): same union
    b = build_strategy("pt4al", pretext_epochs=2, batch=16)
    b.prepare(_ctx(labelled=np.arange(20, 30), round_=1, seed=7))
    assert all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True))
    assert a.pretext_history == b.pretext_history
    c = build_strategy("pt4al", pretext_epochs=2, batch=16, seed=3)
    c.prepare(_ctx(labelled=np.arange(20, 24)))
    assert c.pretext_history != a.pretext_history
    # a different number of rounds gives another split
    d = build_strategy("pt4al", pretext_epochs=2, batch=16)
    d.prepare(_ctx(labelled=np.arange(20, 24), total_rounds=3))
    assert [len(x) for x in d.batches] == [16, 16, 16]


def test_options_and_requirements():
    for bad in ({"pretext_epochs": -1}, {"batch": 0}, {"seed": -2}, {"batch": 2.5},
                {"pretext_epochs": True}):
        with pytest.raises(ValueError):
            PT4ALStrategy(**bad)
        with pytest.raises(DalbtError, match="bad options"):
            build_strategy("pt4al", **bad)
    ctx = _ctx(labelled=np.arange(4))
    ctx.images = torch.zeros(48, 1, 8, 9, dtype=torch.uint8)
    with pytest.raises(ValueError, match="square"):
        build_strategy("pt4al", pretext_epochs=0).prepare(ctx)
    ctx = _ctx(labelled=np.arange(4))
    ctx.model_factory = None
    with pytest.raises(RuntimeError, match="model_factory"):
        build_strategy("pt4al", pretext_epochs=0).prepare(ctx)
