"""VAAL: constructed cases with known answers, the ranking direction, options."""

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.strategies import QueryContext, build_strategy
from dalbt.strategies.vaal import ConvVAE, cycle_batches, rank_lowest_first


def _dark_bright_context(seed=0, channels=1, size=8):
    """20 labelled dark images; a pool of 30 dark and 30 bright ones (bright: 50..79)."""
    g = torch.Generator().manual_seed(seed)
    n = 80
    images = torch.rand(n, channels, size, size, generator=g) * 40
    images[50:] += 200
    labelled = np.arange(20)
    return QueryContext(unlabelled=np.arange(20, n), labelled=labelled,
                        labelled_targets=np.zeros(20), num_classes=2,
                        rng=np.random.default_rng(seed), images=images.to(torch.uint8))


@pytest.mark.parametrize("seed", [0, 1])
def test_discriminator_separates_an_obviously_different_pool(seed):
    ctx = _dark_bright_context(seed)
    s = build_strategy("vaal", steps=40, batch=32, width=8, disc_hidden=64)
    s.prepare(ctx)
    got = s.select(ctx, 30)
    # the bright images look nothing like the (all dark) labelled set: queried first
    assert sorted(got.tolist()) == list(range(50, 80))


def test_prepare_then_select_uses_the_prepared_models():
    ctx = _dark_bright_context(3)
    s = build_strategy("vaal", steps=5, batch=16, width=4, disc_hidden=16)
    s.prepare(ctx)
    vae = s.vae
    s.select(ctx, 3)
    assert s.vae is vae  # not retrained by select
    s.select(_dark_bright_context(3), 3)  # a new round's context: trains again
    assert s.vae is not vae


def test_ranking_is_lowest_labelled_probability_first():
    probs = torch.tensor([0.9, 0.1, 0.5, 0.01, 0.1])
    idx = np.array([10, 20, 30, 40, 50])
    assert rank_lowest_first(probs, idx, 3).tolist() == [40, 20, 50]
    assert rank_lowest_first(torch.logit(probs), idx, 5).tolist() == [40, 20, 50, 30, 10]


def test_cycle_batches_are_shuffled_epochs():
    it = cycle_batches(5, 3, torch.Generator().manual_seed(0))
    flat = torch.cat([next(it) for _ in range(5)]).tolist()  # 15 positions = 3 epochs
    for e in range(3):
        assert sorted(flat[5 * e:5 * e + 5]) == [0, 1, 2, 3, 4]
    assert next(cycle_batches(1, 4, torch.Generator())).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (2, 9, 13), (1, 3, 3)])
def test_vae_reconstructs_at_the_input_size(shape):
    vae = ConvVAE(*shape, latent=4, width=4)
    x = torch.rand(2, *shape)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (2, 4)
    recon = vae.decode(mu)
    assert recon.shape == x.shape
    assert recon.min() >= 0 and recon.max() <= 1


def test_leaves_global_random_state_alone():
    ctx = _dark_bright_context(4)
    before = torch.random.get_rng_state()
    build_strategy("vaal", steps=3, batch=8, width=4, disc_hidden=8).select(ctx, 2)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("options", [
    {"latent": 0}, {"steps": -1}, {"batch": 0}, {"vae_steps": 0}, {"adv_steps": 0},
    {"beta": -1.0}, {"adversary_param": -0.5}, {"lr": 0.0}, {"width": 0}, {"disc_hidden": 0},
    {"disc_layers": 0}, {"latent": 2.5}, {"nope": 1},
])
def test_option_validation(options):
    with pytest.raises(DalbtError, match="bad options"):
        build_strategy("vaal", **options)


def test_needs_images_and_a_labelled_set():
    ctx = _dark_bright_context()
    ctx.images = None
    with pytest.raises(RuntimeError, match="images"):
        build_strategy("vaal", steps=1).select(ctx, 2)
    ctx = _dark_bright_context()
    ctx.labelled = np.empty(0, dtype=np.int64)
    with pytest.raises(RuntimeError, match="labelled"):
        build_strategy("vaal", steps=1).select(ctx, 2)


def test_rank_lowest_first_orders_ties_from_the_query_stream():
    scores, idx = torch.zeros(20), np.arange(100, 120)
    assert rank_lowest_first(scores, idx, 5).tolist() == [100, 101, 102, 103, 104]  # rng=None
    a = rank_lowest_first(scores, idx, 5, rng=np.random.default_rng(0)).tolist()
    assert a == rank_lowest_first(scores, idx, 5, rng=np.random.default_rng(0)).tolist()
    assert a != rank_lowest_first(scores, idx, 5, rng=np.random.default_rng(1)).tolist()
    assert a != [100, 101, 102, 103, 104]
