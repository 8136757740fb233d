import numpy as np
import pytest
import torch

from dalbt.data import load_dataset
from dalbt.models import build_model
from dalbt.train import TrainConfig, accuracy, batches, infer, train_round


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model(d, seed=0):
    return build_model("lenet", d.channels, d.image_size, d.num_classes, seed=seed,
                       projector_dims=(32, 32))


def test_batches_drop_only_a_singleton():
    assert [len(b) for b in batches(129, 64, drop_singleton=True)] == [64, 64]
    assert [len(b) for b in batches(129, 64)] == [64, 64, 1]
    assert [len(b) for b in batches(130, 64, drop_singleton=True)] == [64, 64, 2]
    g = torch.Generator().manual_seed(0)
    assert sorted(torch.cat(batches(10, 3, g)).tolist()) == list(range(10))


def test_joint_training_learns_and_selects_on_validation(digits):
    lab = np.arange(0, 600)
    val = np.arange(1000, 1200)
    model = _model(digits)
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
        m = _model(digits)
        train_round(m, digits.x_train, digits.y_train, lab, val, TrainConfig(epochs=2),
                    torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
        outs.append(infer(m, digits.x_train, np.arange(50)).logits)
    assert torch.equal(outs[0], outs[1])
    res = train_round(_model(digits), digits.x_train, digits.y_train, lab, val,
                      TrainConfig(epochs=1, gamma=0.0), torch.Generator().manual_seed(0),
                      torch.Generator().manual_seed(1))
    assert res.train_bt == 0.0


def test_infer_returns_outputs_in_dataset_index_order(digits):
    m = _model(digits)
    idx = np.array([5, 900, 3, 41])
    out = infer(m, digits.x_train, idx, batch_size=3)
    assert out.indices.tolist() == idx.tolist()
    single = infer(m, digits.x_train, np.array([900]))
    assert torch.allclose(out.logits[1], single.logits[0], atol=1e-5)
    assert out.latents.shape == (4, 60) and out.logits.shape == (4, 10)
    assert infer(m, digits.x_train, np.array([], dtype=np.int64)).logits.shape == (0, 10)
