import numpy as np
import pytest
import torch

from dalbt.train import (
    TrainConfig,
    accuracy,
    batches,
    infer,
    min_batch,
    n_batches,
    pretrain_barlow,
    train_round,
)
from tests.conftest import small_lenet


def test_batches_recut_a_small_remainder_with_the_last_full_batch():
    assert min_batch(64) == 32 and min_batch(3) == 2 and min_batch(2) == 2
    assert [len(b) for b in batches(129, 64)] == [64, 33, 32]
    assert [len(b) for b in batches(130, 64)] == [64, 33, 33]
    assert [len(b) for b in batches(159, 64)] == [64, 48, 47]
    assert [len(b) for b in batches(160, 64)] == [64, 64, 32]  # 32 = the minimum: kept
    assert [len(b) for b in batches(90, 64)] == [45, 45]  # still two steps an epoch
    assert [len(b) for b in batches(128, 64)] == [64, 64]
    assert [len(b) for b in batches(20, 64)] == [20]  # fewer than a batch: one batch of all
    assert [len(b) for b in batches(5, 2)] == [2, 3]  # halves of 3 would leave a 1: merged
    assert [len(b) for b in batches(130, 64, min_size=1)] == [64, 64, 2]
    for n in range(1, 300):
        for size in (2, 3, 8, 64):
            cut = [len(b) for b in batches(n, size)]
            assert sum(cut) == n and len(cut) == n_batches(n, size)
            assert min(cut) >= min(n, min_batch(size)), (n, size, cut)
            if size > 2:  # an epoch keeps ceil(n / size) steps
                assert len(cut) == -(-n // size), (n, size, cut)
    g = torch.Generator().manual_seed(0)
    assert sorted(torch.cat(batches(10, 3, g)).tolist()) == list(range(10))
    # the same permutation whatever the cut
    a = torch.cat(batches(130, 64, torch.Generator().manual_seed(1)))
    b = torch.cat(batches(130, 64, torch.Generator().manual_seed(1), min_size=1))
    assert torch.equal(a, b)


def _record_train_batches(model) -> list[int]:
    """Sizes of the batches the encoder sees in training mode (every optimiser step's)."""
    sizes: list[int] = []
    model.encoder.register_forward_pre_hook(
        lambda m, args: sizes.append(args[0].shape[0]) if m.training else None)
    return sizes


@pytest.mark.parametrize("n_lab", [130, 131, 134, 65, 97])
def test_no_training_step_on_a_batch_smaller_than_the_minimum(digits, n_lab):
    model = small_lenet(digits)
    sizes = _record_train_batches(model)
    cfg = TrainConfig(epochs=2, batch_size=64, gamma=0.001)
    train_round(model, digits.x_train, digits.y_train, np.arange(n_lab), np.arange(1000, 1050),
                cfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert sizes and min(sizes) >= min_batch(64)
    # every labelled image is seen once per epoch: 3 passes (x, v1, v2) per step
    assert sum(sizes) == 3 * 2 * n_lab


def test_pretraining_never_steps_on_a_small_remainder(digits):
    model = small_lenet(digits)
    sizes = _record_train_batches(model)
    cfg = TrainConfig(pretrain_epochs=1, pretrain_batch=64)
    pretrain_barlow(model, digits.x_train, np.arange(130), cfg,
                    torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert sorted(sizes) == [33, 33, 33, 33, 64, 64]  # two views of 64, 33, 33 (not 2)


def test_joint_training_learns_and_selects_on_validation(digits):
    lab = np.arange(0, 600)
    val = np.arange(1000, 1200)
    model = small_lenet(digits)
    before = accuracy(model, digits.x_test, digits.y_test)
    cfg = TrainConfig(epochs=8, gamma=0.001)
    res = train_round(model, digits.x_train, digits.y_train, lab, val, cfg,
                      torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    after = accuracy(model, digits.x_test, digits.y_test)
    assert after > max(0.6, before + 0.3)
    assert res.train_bt > 0 and res.train_ce > 0
    # the kept model is the best validation epoch, and its accuracy is the one reported
    epochs, accs = zip(*res.history, strict=True)
    assert res.val_acc == max(accs) and res.best_epoch == epochs[int(np.argmax(accs))]
    x_val, y_val = digits.x_train[val], digits.y_train[val]
    assert accuracy(model, x_val, y_val) == pytest.approx(res.val_acc)


def test_training_is_deterministic_and_gamma_zero_skips_barlow(digits):
    lab, val = np.arange(0, 100), np.arange(1000, 1100)
    outs = []
    for _ in range(2):
        m = small_lenet(digits)
        train_round(m, digits.x_train, digits.y_train, lab, val, TrainConfig(epochs=2),
                    torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        outs.append(infer(m, digits.x_train, np.arange(50)).logits)
    assert torch.equal(outs[0], outs[1])
    res = train_round(small_lenet(digits), digits.x_train, digits.y_train, lab, val,
                      TrainConfig(epochs=1, gamma=0.0), torch.Generator().manual_seed(0),
                      torch.Generator().manual_seed(1))
    assert res.train_bt == 0.0


def test_infer_returns_outputs_in_dataset_index_order(digits):
    m = small_lenet(digits)
    idx = np.array([5, 900, 3, 41])
    out = infer(m, digits.x_train, idx, batch_size=3)
    assert out.indices.tolist() == idx.tolist()
    single = infer(m, digits.x_train, np.array([900]))
    assert torch.allclose(out.logits[1], single.logits[0], atol=1e-5)
    assert out.latents.shape == (4, 60) and out.logits.shape == (4, 10)
    assert infer(m, digits.x_train, np.array([], dtype=np.int64)).logits.shape == (0, 10)
