import math

import pytest
import torch
import torch.nn.functional as F

from dalbt.losses import (
    BarlowTwinsLoss,
    JointLoss,
    barlow_twins_loss,
    cross_correlation,
    joint_loss,
)


def plain_barlow(z1, z2, lambd):
    """Paper formula written out with loops: C_ij = sum_b a_bi b_bj / sqrt(sum a^2 sum b^2)
    over batch-centred, batch-standardised outputs."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(float(a[k, i] * b[k, j]) for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def test_barlow_matches_plain_formula():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    for lambd in (0.0051, 0.5):
        assert barlow_twins_loss(z1, z2, lambd).item() == pytest.approx(
            plain_barlow(z1, z2, lambd), rel=1e-5)


def test_cross_correlation_is_correlation():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 4, generator=g)
    c = cross_correlation(z, z)
    assert torch.allclose(torch.diagonal(c), torch.ones(4), atol=1e-4)
    assert c.abs().max() <= 1 + 1e-4


def test_barlow_invariant_to_per_dimension_affine_maps():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    scale = torch.rand(6, generator=g) * 10 + 0.1
    shift = torch.randn(6, generator=g) * 100
    base = barlow_twins_loss(z1, z2)
    assert barlow_twins_loss(z1 * scale + shift, z2).item() == pytest.approx(base.item(), rel=1e-3)
    # swapping the views transposes C: the loss is symmetric
    assert barlow_twins_loss(z2, z1).item() == pytest.approx(base.item(), rel=1e-5)


def test_identical_decorrelated_views_give_zero_loss():
    # centred, orthogonal columns: C = identity (up to the batch-norm eps)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))
    z = q * 8.0  # unit variance per column over 64 rows
    assert cross_correlation(z, z).sub(torch.eye(8, dtype=torch.float64)).abs().max() < 1e-4
    assert barlow_twins_loss(z, z).item() < 1e-6
    assert barlow_twins_loss(z, -z).item() == pytest.approx(4 * 8, rel=1e-3)


def test_barlow_rejects_batch_of_one_and_mismatched_shapes():
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError):
        barlow_twins_loss(torch.randn(4, 4), torch.randn(4, 3))


def test_joint_loss_is_ce_plus_gamma_bt():
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    p1, p2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    total, ce, bt = joint_loss(logits, y, p1, p2, gamma=0.25, lambd=0.1)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, y).item())
    assert bt.item() == pytest.approx(plain_barlow(p1, p2, 0.1), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + 0.25 * bt.item(), rel=1e-6)
    total0, _, bt0 = joint_loss(logits, y, None, None)
    assert bt0.item() == 0 and total0.item() == pytest.approx(ce.item())
    m = JointLoss(gamma=0.25, lambd=0.1)(logits, y, p1, p2)[0]
    assert m.item() == pytest.approx(total.item())
    assert BarlowTwinsLoss(0.1)(p1, p2).item() == pytest.approx(bt.item())
    assert not math.isnan(total.item())


def test_barlow_gradient_flows_to_both_views():
    z1 = torch.randn(16, 4, requires_grad=True)
    z2 = torch.randn(16, 4, requires_grad=True)
    barlow_twins_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
