import functools

import numpy as np
import pytest
import torch

from dalbt.strategies import Outputs, QueryContext


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits as dalbt loads them (1500 train / 297 test, 1x8x8): read once; no
    test may modify it."""
    from dalbt.data import load_dataset

    return load_dataset("digits")


def small_lenet(d, seed=0):
    """A LeNet for ``d`` with a small projector (fast training in tests)."""
    from dalbt.models import build_model

    return build_model("lenet", d.channels, d.image_size, d.num_classes, seed=seed,
                       projector_dims=(32, 32))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny batches gain nothing from more, and spinning threads slow the
    suite badly when the machine's cores are busy with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def sklearn_digits():
    """scikit-learn's digits, read once per session (images (1797, 8, 8) in 0..16, target
    (1797,)); callers only read it."""
    from sklearn.datasets import load_digits

    return load_digits()


class ArrayScorer:
    """Scores dataset indices from fixed per-index logits and latents (no model)."""

    def __init__(self, logits, latents):
        self.logits = torch.as_tensor(logits, dtype=torch.float32)
        self.latents = torch.as_tensor(latents, dtype=torch.float32)
        self.calls = 0

    def __call__(self, idx):
        self.calls += 1
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return Outputs(indices=np.asarray(idx, dtype=np.int64), logits=self.logits[t],
                       latents=self.latents[t])


def make_context(logits, latents, labelled, targets, unlabelled=None, seed=0, num_classes=None):
    logits = np.asarray(logits, dtype=np.float32)
    n = len(logits)
    labelled = np.asarray(labelled, dtype=np.int64)
    if unlabelled is None:
        unlabelled = np.setdiff1d(np.arange(n), labelled)
    return QueryContext(unlabelled=np.asarray(unlabelled), labelled=labelled,
                        labelled_targets=np.asarray(targets),
                        num_classes=num_classes or logits.shape[1],
                        rng=np.random.default_rng(seed), scorer=ArrayScorer(logits, latents))


@pytest.fixture
def context_factory():
    return make_context


def make_real_context(labelled, unlabelled=None, seed=0, n=60, num_classes=3, dropout=0.5):
    """A context over a small synthetic image set with a real (untrained) LeNet, so that every
    capability a strategy may ask for (outputs, MC dropout, images, own training) exists."""
    from dalbt.models import build_model
    from dalbt.train import TrainConfig, infer, mc_dropout_probs

    g = torch.Generator().manual_seed(1234)
    targets = torch.arange(n) % num_classes
    base = torch.rand(num_classes, 1, 8, 8, generator=g) * 255
    noise = torch.rand(n, 1, 8, 8, generator=g) * 60
    images = (base[targets] * 0.75 + noise).clamp(0, 255).to(torch.uint8)

    def factory(s):
        return build_model("lenet", 1, 8, num_classes, projector_dims=(16, 16),
                           dropout=dropout, seed=s)

    model = factory(0)
    labelled = np.asarray(labelled, dtype=np.int64)
    if unlabelled is None:
        unlabelled = np.setdiff1d(np.arange(n), labelled)
    return QueryContext(
        unlabelled=np.asarray(unlabelled), labelled=labelled,
        labelled_targets=targets[labelled].numpy(), num_classes=num_classes,
        rng=np.random.default_rng(seed), scorer=lambda idx: infer(model, images, idx),
        mc_scorer=lambda idx, t, gen: mc_dropout_probs(model, images, idx, t, gen),
        images=images, train_config=TrainConfig(epochs=1, batch_size=16), device="cpu",
        model_factory=factory)


@pytest.fixture
def real_context_factory():
    return make_real_context


class Killed(Exception):
    """Stands for a process killed while a round is in progress."""


def kill_at_round(monkeypatch, round_, run):
    """Call ``run()`` with the store failing to record ``round_`` (as if killed then), and
    restore the store afterwards."""
    from dalbt.store import Store

    original = Store.record_round

    def dying(self, run_id, r, *a, **k):
        if r == round_:
            raise Killed
        return original(self, run_id, r, *a, **k)

    monkeypatch.setattr(Store, "record_round", dying)
    try:
        with pytest.raises(Killed):
            run()
    finally:
        monkeypatch.setattr(Store, "record_round", original)
