"""MoBY's contrastive loss, momentum update/schedule and key queue."""

import math

import numpy as np
import pytest
import torch

from dalbt.losses import (
    KeyQueue,
    MoBYLoss,
    moby_contrastive,
    moby_loss,
    momentum_schedule,
    momentum_update,
)


def _plain(q, k, queue, t):
    """Per-sample InfoNCE written out with explicit sums of exponentials (float64)."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    queue = np.asarray(queue, dtype=np.float64)
    out = []
    for b in range(len(q)):
        qb = q[b] / np.sqrt(sum(v * v for v in q[b]))
        kb = k[b] / np.sqrt(sum(v * v for v in k[b]))
        pos = math.exp(sum(qb[i] * kb[i] for i in range(len(qb))) / t)
        neg = 0.0
        for n in queue:
            nn_ = n / np.sqrt(sum(v * v for v in n))
            neg += math.exp(sum(qb[i] * nn_[i] for i in range(len(qb))) / t)
        out.append(-math.log(pos / (pos + neg)))
    return np.array(out)


def _data(b=4, d=5, qn=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randn(b, d, generator=g, dtype=torch.float64),
            torch.randn(qn, d, generator=g, dtype=torch.float64))


def test_contrastive_equals_plain_formula():
    q, k, queue = _data()
    for t in (0.2, 1.0):
        want = _plain(q, k, queue, t)
        got = moby_contrastive(q, k, queue, t, reduction="none")
        assert np.allclose(got.numpy(), want, rtol=1e-10)
        assert float(moby_contrastive(q, k, queue, t)) == pytest.approx(want.mean(), rel=1e-10)


def test_contrastive_empty_queue_is_zero_and_grad_only_to_q():
    q, k, queue = _data()
    assert float(moby_contrastive(q, k, queue[:0])) == pytest.approx(0.0, abs=1e-12)
    q.requires_grad_(True)
    k.requires_grad_(True)
    queue.requires_grad_(True)
    moby_contrastive(q, k, queue).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_contrastive_invariances():
    q, k, queue = _data()
    base = moby_contrastive(q, k, queue, reduction="none")
    assert torch.allclose(moby_contrastive(3.7 * q, k, queue, reduction="none"), base)
    assert torch.allclose(moby_contrastive(q, 0.01 * k, queue, reduction="none"), base)
    perm = torch.randperm(len(queue), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(moby_contrastive(q, k, queue[perm], reduction="none"), base)
    # but not invariant to which key is the positive (a wrong pairing would change it)
    assert not torch.allclose(moby_contrastive(q, k.flip(0), queue, reduction="none"), base)


def test_contrastive_prefers_aligned_positive():
    q = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    good = moby_contrastive(q, torch.tensor([[1.0, 0.0]]), queue)
    bad = moby_contrastive(q, torch.tensor([[0.0, -1.0]]), queue)
    assert float(good) < float(bad)


def test_moby_loss_is_symmetric_pairing():
    q1, k1, queue1 = _data(seed=1)
    q2, k2, queue2 = _data(seed=2)
    got = moby_loss(q1, q2, k1, k2, queue1, queue2, 0.2)
    want = _plain(q1, k2, queue2, 0.2).mean() + _plain(q2, k1, queue1, 0.2).mean()
    assert float(got) == pytest.approx(want, rel=1e-10)
    wrong = _plain(q1, k1, queue1, 0.2).mean() + _plain(q2, k2, queue2, 0.2).mean()
    assert abs(float(got) - wrong) > 1e-3
    assert float(MoBYLoss(0.2)(q1, q2, k1, k2, queue1, queue2)) == pytest.approx(want, rel=1e-10)


def test_contrastive_validation():
    q, k, queue = _data()
    with pytest.raises(ValueError):
        moby_contrastive(q, k, queue, temperature=0.0)
    with pytest.raises(ValueError):
        moby_contrastive(q, k[:2], queue)
    with pytest.raises(ValueError):
        moby_contrastive(q, k, queue[:, :3])
    with pytest.raises(ValueError):
        moby_contrastive(q, k, queue, reduction="sum")
    with pytest.raises(ValueError):
        MoBYLoss(-1.0)


def test_momentum_update_formula():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    momentum_update(online, target, 0.9)
    for o, t, b in zip(online.parameters(), target.parameters(), before, strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
        assert not t.requires_grad or t.grad is None
    momentum_update(online, target, 0.0)
    for o, t in zip(online.parameters(), target.parameters(), strict=True):
        assert torch.equal(t, o)
    snapshot = [p.detach().clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    momentum_update(online, target, 1.0)
    assert all(torch.equal(t, s) for t, s in zip(target.parameters(), snapshot, strict=True))
    with pytest.raises(ValueError):
        momentum_update(online, target, 1.5)
    with pytest.raises(ValueError):
        momentum_update(online, torch.nn.Linear(3, 3), 0.5)


def test_momentum_schedule_endpoints():
    assert momentum_schedule(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_schedule(100, 100, 0.99) == pytest.approx(1.0)
    assert momentum_schedule(50, 100, 0.99) == pytest.approx(0.995)
    vals = [momentum_schedule(s, 10, 0.9) for s in range(11)]
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False))
    with pytest.raises(ValueError):
        momentum_schedule(0, 0)
    with pytest.raises(ValueError):
        momentum_schedule(0, 10, 1.5)


def _keys(start, n):
    return torch.arange(start, start + n, dtype=torch.float32).view(-1, 1).repeat(1, 2)


def test_queue_fifo_wraparound():
    q = KeyQueue(2, size=5)
    assert len(q) == 0 and q.keys.shape == (0, 2)
    q.enqueue(_keys(0, 3))
    assert q.ordered()[:, 0].tolist() == [0, 1, 2]
    q.enqueue(_keys(3, 4))  # 0..6: 0 and 1 are dropped
    assert len(q) == 5
    assert q.ordered()[:, 0].tolist() == [2, 3, 4, 5, 6]
    # ring storage: 5 and 6 overwrote slots 0 and 1
    assert q.keys[:, 0].tolist() == [5, 6, 2, 3, 4]
    q.enqueue(_keys(7, 12))  # more than the capacity: only the newest 5 remain
    assert q.ordered()[:, 0].tolist() == [14, 15, 16, 17, 18]
    q.enqueue(_keys(19, 1))
    assert q.ordered()[:, 0].tolist() == [15, 16, 17, 18, 19]


def test_queue_detaches_and_validates():
    q = KeyQueue(3, size=4)
    k = torch.randn(2, 3, requires_grad=True)
    q.enqueue(k)
    assert not q.keys.requires_grad
    with pytest.raises(ValueError):
        q.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError):
        KeyQueue(3, size=0)
