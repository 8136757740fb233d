"""dalbt.ActiveLearner on models and data dalbt has never seen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dalbt.errors import DalbtError
from dalbt.learner import ActiveLearner as _ActiveLearner
from dalbt.recipe import TrainConfig

TINY = TrainConfig(epochs=2, batch_size=16)


def ActiveLearner(*args, **kwargs):  # noqa: N802 - the learner with few steps per round
    kwargs.setdefault("min_steps", 20)
    return _ActiveLearner(*args, **kwargs)


class TwoLayerMLP(nn.Module):
    """A model of the user's own: an MLP on the flattened 8x8 digits."""

    def __init__(self, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def _loop(data, strategy: str, seed: int, rounds: int = 3, budget: int = 12) -> list[np.ndarray]:
    learner = ActiveLearner(TwoLayerMLP(), data, strategy=strategy, recipe=TINY, seed=seed,
                            cold_start_epochs=1, min_val=3)
    truth = data.y_train.numpy()
    picks = []
    for _ in range(rounds):
        pool_before = set(learner.unlabelled.tolist())
        q = learner.query(budget)
        assert len(q) == budget and len(set(q.tolist())) == budget
        assert set(q.tolist()) <= pool_before
        learner.teach(q, truth[q])
        picks.append(q)
    assert len(learner.labelled) == rounds * budget
    assert learner.history[0]["cold_start"]
    assert rounds == 1 or not learner.history[-1]["cold_start"]
    return picks


@pytest.mark.parametrize("strategy", ["margin", "badge", "weibull"])
def test_unseen_model_through_the_full_loop_is_valid_and_reproducible(digits, strategy):
    first = _loop(digits, strategy, seed=3)
    again = _loop(digits, strategy, seed=3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = _loop(digits, strategy, seed=4, rounds=1)
    assert not np.array_equal(first[0], other[0])  # the seed matters (cold start differs)


def test_fit_then_query_trains_once_and_copies_weights_back(digits, monkeypatch):
    mlp = TwoLayerMLP()
    before = mlp.classifier.weight.detach().clone()
    learner = ActiveLearner(mlp, digits, strategy="margin", recipe=TINY, seed=0, min_val=3)
    truth = digits.y_train.numpy()
    learner.teach(np.arange(40), truth[:40])
    calls = []
    original = learner.strategy.train_model
    monkeypatch.setattr(learner.strategy, "train_model",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    report = learner.fit()
    assert report["n_labelled"] == 40 and 0.0 <= report["val_acc"] <= 1.0
    q = learner.query(5)
    assert len(calls) == 1  # query() reused the model fit() trained on the same labels
    assert not np.isin(q, np.arange(40)).any()
    assert not torch.equal(mlp.classifier.weight, before)  # the user's module is trained
    probs = learner.predict_proba()
    assert probs.shape == (digits.n_train, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(digits.n_train))
    learner.teach(q, truth[q])
    learner.query(5)
    assert len(calls) == 2  # new labels: trained again


def test_model_factory_and_test_accuracy(digits):
    learner = ActiveLearner(lambda: TwoLayerMLP(hidden=16), digits, strategy="entropy",
                            recipe=TINY, seed=1, test=digits_test(digits), min_val=3)
    truth = digits.y_train.numpy()
    learner.teach(np.arange(30), truth[:30])
    assert 0.0 <= learner.fit()["test_acc"] <= 1.0


def digits_test(data):
    from dalbt.data import ImageDataset

    return ImageDataset("digits-test", data.x_test, data.y_test, data.x_test[:0],
                        data.y_test[:0], data.classes)


@pytest.mark.parametrize(("call", "says"), [
    (lambda lr: lr.teach([0, 1], [3]), "2 indices and 1 labels"),
    (lambda lr: lr.teach([0], [10]), "label 10 is outside 0..9"),
    (lambda lr: lr.teach([99999], [1]), "outside the pool"),
    (lambda lr: lr.teach([2, 2], [1, 1]), "given twice"),
    (lambda lr: lr.query(0), "positive number"),
    (lambda lr: lr.fit(), "fit\\(\\) needs labels"),
    (lambda lr: lr.predict(), "no trained model"),
])
def test_bad_calls_say_what_to_do(digits, call, says):
    learner = ActiveLearner(TwoLayerMLP(), digits, recipe=TINY)
    with pytest.raises(DalbtError, match=says):
        call(learner)


def test_a_model_without_encoder_and_classifier_is_refused(digits):
    with pytest.raises(DalbtError, match="'encoder'.*'classifier'"):
        ActiveLearner(nn.Linear(64, 10), digits)
    with pytest.raises(DalbtError, match="cold_start_strategy 'margin' needs labels"):
        ActiveLearner(TwoLayerMLP(), digits, cold_start_strategy="margin")


def test_mc_dropout_strategy_trains_with_dropout(digits):
    learner = ActiveLearner(TwoLayerMLP(), digits, strategy="bald", recipe=TINY, seed=2,
                            min_val=3)
    truth = digits.y_train.numpy()
    learner.teach(np.arange(30), truth[:30])
    q = learner.query(6)
    assert len(set(q.tolist())) == 6 and learner.model is not None
    assert learner.model.dropout.p > 0


def test_public_names_load_and_a_registered_strategy_runs(digits):
    import dalbt
    from dalbt.strategies import STRATEGIES, Strategy

    for name in dalbt.__all__:
        assert getattr(dalbt, name) is not None, name

    class FirstInPool(Strategy):
        name = "test-first-in-pool"
        description = "the smallest pool indices (test strategy)"

        def _select(self, ctx, n):
            return np.sort(ctx.unlabelled)[:n]

    try:
        dalbt.register_strategy(FirstInPool)
        with pytest.raises(DalbtError, match="already registered"):
            dalbt.register_strategy(type("Other", (Strategy,), {"name": "test-first-in-pool"}))
        learner = ActiveLearner(TwoLayerMLP(), digits, strategy="test-first-in-pool",
                                recipe=TINY, min_val=3)
        learner.teach(np.arange(20), digits.y_train[:20])
        np.testing.assert_array_equal(learner.query(4), [20, 21, 22, 23])
    finally:
        STRATEGIES.pop("test-first-in-pool", None)
    with pytest.raises(DalbtError, match="Strategy subclass"):
        dalbt.register_strategy(int)


def test_all_lists_every_lazy_name():
    import dalbt

    assert set(dalbt.__all__) == {"DalbtError", "__version__", *dalbt._LAZY}


def test_every_data_form_loads_through_the_same_path(digits, tmp_path):
    from PIL import Image

    x = digits.x_train[:60]
    y = digits.y_train[:60]
    for k in range(60):
        folder = tmp_path / digits.classes[int(y[k])]
        folder.mkdir(exist_ok=True)
        Image.fromarray(x[k, 0].numpy()).save(folder / f"{k:02d}.png")
    pil_items = [(Image.fromarray(x[k, 0].numpy()), int(y[k])) for k in range(60)]
    forms = {
        "arrays": (x.numpy(), None),
        "float tensor": x.float() / 255.0,
        "torch dataset": pil_items,
        "folder": tmp_path,
    }
    for form, data in forms.items():
        learner = ActiveLearner(TwoLayerMLP(), data, recipe=TINY, cold_start_epochs=0,
                                data_options={"image_size": 8} if form == "folder" else None)
        assert learner.data.x_train.shape == (60, 1, 8, 8), form
        assert (learner.labels == -1).all(), form  # labels in the data are not taught
        assert len(learner.query(5)) == 5, form
    folder = ActiveLearner(TwoLayerMLP(), tmp_path, data_options={"image_size": 8}).data
    # the same images, grouped by class folder
    assert sorted(map(tuple, folder.x_train.flatten(1).tolist())) == \
        sorted(map(tuple, x.flatten(1).tolist()))


def test_odd_sizes_tiny_pools_and_budgets_larger_than_the_pool():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                         nn.Flatten())
            self.classifier = nn.Linear(8, 3)

    x = np.random.default_rng(0).integers(0, 255, (7, 13, 13, 3), dtype=np.uint8)  # (N, H, W, C)
    learner = ActiveLearner(Net(), x, strategy="weibull", recipe=TINY, cold_start_epochs=1,
                            min_val=1)
    first = learner.query(100)
    assert sorted(first.tolist()) == list(range(7))  # the whole pool, each once
    learner.teach(first[:3], [0, 1, 2])
    assert sorted(learner.query(100).tolist()) == sorted(first[3:].tolist())
    one = ActiveLearner(Net(), x[:1], recipe=TINY, cold_start_epochs=1)
    np.testing.assert_array_equal(one.query(5), [0])
