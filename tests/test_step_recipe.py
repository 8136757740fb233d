"""The step-based recipe (issue 13): exact step counts, class-balanced batches, the learning-rate
schedule, the augmented cross-entropy, validation every K steps, ``select="last"`` and resume.
The epoch recipe's rounds are checked against the stored golden ones in test_golden_rounds."""

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dalbt.errors import TrainingDiverged
from dalbt.train import (
    BalancedSampler,
    RoundPlan,
    TrainConfig,
    accuracy,
    check_finite,
    lr_factor,
    min_batch,
    to_float,
    train_round,
    with_min_steps,
)
from tests.conftest import small_lenet

VAL = np.arange(1400, 1450)


def _train(d, lab, cfg, val=VAL, model=None, **kw):
    model = model if model is not None else small_lenet(d)
    res = train_round(model, d.x_train, d.y_train, np.asarray(lab), val, cfg,
                      torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), **kw)
    return model, res


@contextmanager
def optimiser_steps():
    """Learning rates of every optimiser step taken inside (one entry per ``step()`` call)."""
    lrs: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        yield lrs
    finally:
        handle.remove()


def _ce_inputs(model) -> list[torch.Tensor]:
    """Inputs of the classifier's forward passes in training (what the cross-entropy sees)."""
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    return seen


@pytest.mark.parametrize("n_lab", [1, 7, 1000])
def test_step_recipe_takes_exactly_steps_optimiser_steps(digits, n_lab):
    lab = np.arange(n_lab)
    model = small_lenet(digits)
    seen = _ce_inputs(model)
    with optimiser_steps() as lrs:
        _, res = _train(digits, lab, TrainConfig(steps=23, batch_size=64), model=model)
    assert len(lrs) == 23 and len(seen) == 23
    sizes = [len(x) for x in seen]
    assert min(sizes) >= min(n_lab, min_batch(64))
    if n_lab < 64:  # every step sees the whole labelled set
        clean = to_float(digits.x_train[torch.as_tensor(lab)], "cpu")
        assert all(sorted(map(tuple, x.flatten(1).tolist()))
                   == sorted(map(tuple, clean.flatten(1).tolist())) for x in seen)
    else:  # 1000 at 64: passes of 15 x 64 + 40; the 23 steps cross into a second pass
        assert sizes == [64] * 15 + [40] + [64] * 7
    assert res.best_epoch in {m for m, _ in res.history} and res.history[-1][0] == 23


def test_epoch_count_does_not_change_the_step_recipe(digits):
    lab = np.arange(100)
    with optimiser_steps() as lrs:
        _train(digits, lab, TrainConfig(steps=9, epochs=1), val=VAL[:0])
        _train(digits, lab, TrainConfig(steps=9, epochs=50), val=VAL[:0])
    assert len(lrs) == 18


def test_balanced_sampler_draws_classes_and_their_images_equally():
    labels = torch.tensor([0] * 90 + [1] * 10 + [7] * 3)
    sampler = BalancedSampler(labels, torch.Generator().manual_seed(0))
    draws = torch.cat([sampler.take(k) for k in (5, 64, 1, 50, 60)])  # 180 = 60 rounds of 3
    counts = torch.bincount(labels[draws], minlength=8)
    assert counts[[0, 1, 7]].tolist() == [60, 60, 60] and counts.sum() == 180
    # within a class, passes of a permutation: the 10 images of class 1 drawn 6 times each,
    # the 3 of class 7 20 times each
    per_image = torch.bincount(draws, minlength=103)
    assert per_image[90:100].tolist() == [6] * 10 and per_image[100:].tolist() == [20] * 3
    again = BalancedSampler(labels, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([again.take(k) for k in (5, 64, 1, 50, 60)]), draws)


class Spy:
    """x_train stand-in that records the dataset indices of every read."""

    def __init__(self, t):
        self.t, self.reads = t, []

    def __getitem__(self, key):
        self.reads.append(torch.as_tensor(key).flatten())
        return self.t[key]


@pytest.mark.parametrize("balanced", [True, False])
def test_balanced_training_sees_both_classes_equally_on_a_90_10_set(digits, balanced):
    y = digits.y_train.numpy()
    lab = np.concatenate([np.flatnonzero(y == 0)[:90], np.flatnonzero(y == 1)[:10]])
    spy = Spy(digits.x_train)
    cfg = TrainConfig(steps=40, batch_size=20, balanced=balanced, gamma=0.0)
    train_round(small_lenet(digits), spy, digits.y_train, lab, np.arange(0), cfg,
                torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    drawn = torch.cat([r for r in spy.reads if set(r.tolist()) <= set(lab.tolist())])
    assert len(drawn) == 40 * 20
    share = float((digits.y_train[drawn] == 1).float().mean())
    assert abs(share - (0.5 if balanced else 0.1)) < 0.05, share


def test_learning_rate_follows_warmup_then_cosine(digits):
    lr, n, w = 1e-3, 20, 5

    def expected(s):  # s: 0-based optimiser step
        if s < w:
            return lr * (s + 1) / w  # linear warm-up from lr / w to lr
        return lr * 0.5 * (1 + math.cos(math.pi * (s - w) / (n - w)))  # cosine towards 0

    with optimiser_steps() as lrs:
        _train(digits, np.arange(100), TrainConfig(steps=n, lr=lr, warmup_steps=w,
                                                   schedule="cosine"))
    assert lrs == pytest.approx([expected(s) for s in range(n)], rel=1e-9)
    assert lrs[0] == pytest.approx(lr / w) and lrs[w - 1] == lrs[w] == pytest.approx(lr)
    assert 0 < lrs[-1] < 0.02 * lr
    assert [lr_factor(s, n, w, "constant") for s in (0, 2, 4, 5, 19)] == [0.2, 0.6, 1, 1, 1]


def test_epoch_recipe_schedule_covers_its_total_steps(digits):
    # 130 labels at batch 64: 3 steps an epoch, 9 in 3 epochs; cosine without warm-up
    with optimiser_steps() as lrs:
        _train(digits, np.arange(130), TrainConfig(epochs=3, schedule="cosine"))
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 9))
                                 for s in range(9)], rel=1e-9)
    with optimiser_steps() as lrs:  # the paper's recipe: no scheduler, the rate untouched
        _train(digits, np.arange(130), TrainConfig(epochs=1))
    assert lrs == [1e-3] * 3


def _encoder_inputs(model) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.encoder.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    return seen


def test_ce_augment_changes_what_the_cross_entropy_sees_and_leaves_the_barlow_term(digits):
    lab = np.arange(40)
    runs = {}
    for ce_augment in (False, True):
        model = small_lenet(digits)
        seen, metrics = _encoder_inputs(model), []
        _train(digits, lab, TrainConfig(steps=1, ce_augment=ce_augment), model=model,
               on_epoch=lambda s, m, metrics=metrics: metrics.append(m))
        runs[ce_augment] = (seen, metrics[0])
    (x, v1, v2), plain = runs[False]
    (x_ce, w1, w2), augmented = runs[True]
    # the clean batch is the labelled set (in the batch order); the CE now sees another image
    clean = to_float(digits.x_train[torch.as_tensor(lab)], "cpu")
    assert sorted(map(tuple, x.flatten(1).tolist())) == sorted(map(tuple,
                                                                   clean.flatten(1).tolist()))
    assert x_ce.shape == x.shape and (x_ce - x).abs().mean() > 0.01
    assert all(not torch.equal(row, c) for row in x_ce for c in clean)
    # the Barlow Twins views, and so the Barlow Twins loss of the step, are unchanged
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert augmented["bt"] == plain["bt"] and augmented["ce"] != plain["ce"]


def test_ce_augment_without_barlow_twins_augments_the_cross_entropy_only(digits):
    lab = np.arange(40)
    seen = {}
    for ce_augment in (False, True):
        model = small_lenet(digits)
        seen[ce_augment] = _encoder_inputs(model)
        _train(digits, lab, TrainConfig(steps=2, gamma=0.0, ce_augment=ce_augment),
               model=model)
    assert len(seen[True]) == len(seen[False]) == 2  # one pass a step: no Barlow Twins views
    assert all((a - b).abs().mean() > 0.01 for a, b in zip(seen[True], seen[False],
                                                          strict=True))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("recipe", [{"steps": 12, "eval_every_steps": 5}, {"epochs": 4}])
def test_select_last_keeps_the_final_weights(digits, recipe):
    lab = np.arange(100)
    final, _ = _train(digits, lab, TrainConfig(**recipe), val=VAL[:0])  # nothing to select on
    model, res = _train(digits, lab, TrainConfig(select="last", **recipe))
    assert all(torch.equal(v, _weights(final)[k]) for k, v in _weights(model).items())
    last = recipe.get("steps", recipe.get("epochs"))
    assert res.best_epoch == last and len(res.history) == 1 and res.history[0][0] == last
    x_val, y_val = digits.x_train[VAL], digits.y_train[VAL]
    assert res.val_acc == accuracy(model, x_val, y_val)
    _, best = _train(digits, lab, TrainConfig(**recipe))  # select="best" validates more often
    assert len(best.history) > 1


@pytest.mark.parametrize(("steps", "every", "marks"), [
    (10, 3, [3, 6, 9, 10]), (9, 3, [3, 6, 9]), (5, 7, [5]), (7, None, [3, 6, 7]),
])
def test_eval_every_steps_validates_ceil_steps_over_k_times(digits, steps, every, marks):
    calls: list[tuple[int, dict]] = []
    # 130 labels at batch 64: a pass is 3 steps (the interval without eval_every_steps)
    model, res = _train(digits, np.arange(130),
                        TrainConfig(steps=steps, eval_every_steps=every),
                        on_epoch=lambda s, m: calls.append((s, m)))
    if every is not None:
        assert len(marks) == math.ceil(steps / every)
    assert [m for m, _ in res.history] == marks == [s for s, _ in calls]
    assert all("val_acc" in m and "ce" in m for _, m in calls)
    accs = [a for _, a in res.history]
    assert res.val_acc == max(accs) and res.best_epoch == marks[int(np.argmax(accs))]
    assert accuracy(model, digits.x_train[VAL], digits.y_train[VAL]) == res.val_acc


def test_round_plan_of_both_recipes():
    paper = RoundPlan.of(TrainConfig(epochs=20, eval_every=2), 130)
    assert (paper.total, paper.every, paper.last, paper.by_step) == (60, 2, 20, False)
    steps = RoundPlan.of(TrainConfig(steps=100), 130)
    assert (steps.total, steps.every, steps.last, steps.by_step) == (100, 3, 100, True)
    periods = list(steps.periods(torch.Generator().manual_seed(0)))
    assert [m for m, _ in periods][:3] == [3, 6, 9] and periods[-1][0] == 100
    empty = RoundPlan.of(TrainConfig(steps=5), 0)  # no labelled image: no step, no hang
    assert [len(list(p)) for _, p in empty.periods(torch.Generator())] == [0]


def test_divergence_names_the_step_and_min_steps_raise_the_steps():
    with pytest.raises(TrainingDiverged, match="in step 40 "):
        check_finite("training", 40, {"ce": float("nan")}, 1e-3, unit="step")
    assert with_min_steps(TrainConfig(steps=10), 5, 50).steps == 50
    assert with_min_steps(TrainConfig(steps=80), 5, 50).steps == 80
    assert with_min_steps(TrainConfig(epochs=2), 100, 50).epochs == 25  # 2 steps an epoch


def test_mobyv2al_honours_the_step_recipe(digits):
    from dalbt.strategies.mobyv2al import MoBYv2ALStrategy

    strategy = MoBYv2ALStrategy(hidden_dim=32, proj_dim=16, queue_size=64)
    calls: list[int] = []
    with optimiser_steps() as lrs:
        res = strategy.train_model(
            small_lenet(digits), digits.x_train, digits.y_train, np.arange(7), VAL,
            TrainConfig(steps=11, eval_every_steps=4, schedule="cosine", balanced=True,
                        ce_augment=True),
            torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
            on_epoch=lambda s, m: calls.append(s), unlabelled=np.arange(200, 300))
    assert len(lrs) == 11 and lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[0]
    assert calls == [4, 8, 11] and [m for m, _ in res.history] == calls


def test_resumed_step_recipe_run_gives_the_same_queries(tmp_path, digits, monkeypatch):
    from dalbt.errors import DalbtError
    from dalbt.loop import RunConfig, run_experiment
    from dalbt.store import Store
    from tests.conftest import kill_at_round

    train = TrainConfig(steps=6, schedule="cosine", warmup_steps=2, balanced=True,
                        ce_augment=True, eval_every_steps=4, batch_size=16)
    cfg = RunConfig(dataset="digits", strategy="margin", initial=20, budget=10, rounds=3,
                    seed=0, val_size=100, projector_dims=(32, 32), train=train)

    def run(name, **kw):
        with Store(tmp_path / name) as store:
            r = run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None,
                               **kw)
            return r, store.rounds(r.id)

    _, full = run("full")
    kill_at_round(monkeypatch, 2, lambda: run("cut"))
    with pytest.raises(DalbtError, match="--resume"):
        run("cut")
    resumed_run, resumed = run("cut", resume=True)
    assert resumed_run.status == "finished" and [r["round"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(full, resumed, strict=True):
        assert np.array_equal(a["queried"], b["queried"])
        assert a["test_acc"] == pytest.approx(b["test_acc"])
        assert a["best_epoch"] == b["best_epoch"] and a["best_epoch"] in (4, 6)
    assert sum(len(r["queried"]) for r in full) == 30


@pytest.mark.parametrize(("name", "opts", "steps"), [
    ("dal-osr", {}, 9),  # the run's step recipe
    ("dal-osr", {"epochs": 2}, 2 * 1),  # its own epochs: 14 labelled at batch 16, 1 step each
    ("ensemble-varratio", {"members": 2}, 2 * 9),
    ("ensemble-varratio", {"members": 2, "epochs": 3}, 2 * 3 * 1),
])
def test_strategies_that_train_their_own_models_follow_the_recipe(name, opts, steps):
    import dataclasses

    from dalbt.strategies import build_strategy
    from tests.conftest import make_real_context

    ctx = make_real_context(np.arange(0, 40, 3))
    ctx = dataclasses.replace(ctx, train_config=TrainConfig(batch_size=16, steps=9,
                                                            schedule="cosine"))
    with optimiser_steps() as lrs:
        assert len(build_strategy(name, **opts).select(ctx, 5)) == 5
    assert len(lrs) == steps
    if "epochs" not in opts:  # the schedule of the step recipe, restarted by each model
        assert lrs[:9] == pytest.approx([1e-3 * lr_factor(s, 9, 0, "cosine") for s in range(9)])
