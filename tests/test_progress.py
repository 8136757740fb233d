"""Progress of a round (issue 15): the events of real rounds (epoch and step recipes, cold-start
pre-training), their throttling, the one-line phase log and the text people read."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dalbt import PhaseLog, ProgressEvent
from dalbt.al_round import RoundData, run_round
from dalbt.progress import PHASES, ProgressReporter, format_seconds
from dalbt.strategies import build_strategy
from dalbt.train import TrainConfig
from tests.conftest import small_lenet

LAB = np.arange(40)
VAL = np.arange(1400, 1430)
POOL = np.arange(100, 400)


def _round(d, recipe, labelled=LAB, strategy="margin", cold_start_epochs=0, **kw):
    events: list[ProgressEvent] = []
    data = RoundData(images=d.x_train, targets=d.y_train, num_classes=d.num_classes,
                     labelled=labelled, validation=VAL if len(labelled) else [],
                     unlabelled=POOL)
    res = run_round(build_strategy(strategy), data, recipe, seed=0, round_=2, budget=5,
                    new_model=lambda s: small_lenet(d, s), cold_start_epochs=cold_start_epochs,
                    on_progress=events.append, **kw)
    return res, events


def _check_phases(events, expected):
    """Phases come in order, each from its start to done == total, with sane numbers."""
    phases = [e.phase for e in events]
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order == expected
    assert all(PHASES.index(a) < PHASES.index(b) for a, b in zip(order, order[1:], strict=False))
    for phase in expected:
        evs = [e for e in events if e.phase == phase]
        assert evs[0].done == 0 and evs[0].eta_s is None
        assert evs[-1].done == evs[-1].total and evs[-1].eta_s == 0 and evs[-1].finished
        assert not any(e.finished for e in evs[:-1])
        dones = [e.done for e in evs]
        assert dones == sorted(dones)
        assert all(e.eta_s is None or e.eta_s >= 0 for e in evs)
        assert all(e.elapsed_s >= 0 and e.round == 2 for e in evs)
        elapsed = [e.elapsed_s for e in evs]
        assert elapsed == sorted(elapsed)
    return {p: [e for e in events if e.phase == p] for p in expected}


def test_epoch_recipe_reports_epochs_with_a_finite_loss(digits):
    res, events = _round(digits, TrainConfig(epochs=4, batch_size=16, gamma=0.0))
    by = _check_phases(events, ["training", "scoring", "selecting"])
    train = by["training"]
    assert {e.unit for e in train} == {"epoch"} and train[-1].total == 4
    assert all(math.isfinite(e.loss) for e in train[1:])
    score = by["scoring"]
    assert score[-1].unit == "image" and score[-1].total >= len(POOL)
    assert by["selecting"][-1].total == 5 and len(res.queried) == 5


def test_step_recipe_reports_steps(digits):
    _, events = _round(digits, TrainConfig(epochs=1, batch_size=16, gamma=0.0, steps=12,
                                           eval_every_steps=3))
    train = _check_phases(events, ["training", "scoring", "selecting"])["training"]
    assert {e.unit for e in train} == {"step"} and train[-1].total == 12
    # checkpoints every 3 steps; the callback may skip some (throttled), never the last
    assert {e.done for e in train} <= {0, 3, 6, 9, 12} and train[-1].done == 12
    assert "training: step 12 / 12" in train[-1].describe()


def test_cold_start_reports_pre_training(digits):
    _, events = _round(digits, TrainConfig(epochs=1, batch_size=64, pretrain_batch=64),
                       labelled=np.empty(0, np.int64), strategy="typiclust",
                       cold_start_epochs=2)
    pre = _check_phases(events, ["pre-training", "scoring", "selecting"])["pre-training"]
    assert {e.unit for e in pre} == {"epoch"} and pre[-1].total == 2
    assert all(math.isfinite(e.loss) for e in pre[1:])


def test_events_are_throttled_but_keep_each_phase_s_first_and_last(monkeypatch):
    clock = iter(np.arange(0.0, 100.0, 0.01))  # 10 ms per clock read
    monkeypatch.setattr("dalbt.progress.time.perf_counter", lambda: float(next(clock)))
    events: list[ProgressEvent] = []
    rep = ProgressReporter(events.append, round_=0, min_interval=0.25)
    with rep.phase("training", 200, "step") as phase:
        for k in range(1, 201):
            phase.update(k, loss=1.0 / k)
    assert events[0].done == 0 and events[-1].done == 200
    assert len(events) < 200 / 5  # far fewer events than updates
    gaps = np.diff([e.elapsed_s for e in events[1:-1]])
    assert (gaps >= 0.25 - 1e-9).all()
    assert events[-1].loss == pytest.approx(1 / 200) and events[-1].eta_s == 0


def test_failed_phase_reports_no_completion():
    events: list[ProgressEvent] = []
    rep = ProgressReporter(events.append)
    with pytest.raises(RuntimeError), rep.phase("training", 10, "epoch") as phase:
        phase.update(3)
        raise RuntimeError("diverged")
    assert max(e.done for e in events) < 10
    phase.update(9)  # after the phase: ignored
    assert max(e.done for e in events) < 10


def test_eta_follows_the_pace_since_the_first_unit(monkeypatch):
    t = iter([0.0, 0.0, 10.0, 12.0])  # the first unit is slow (warm-up), then 1 s a unit
    monkeypatch.setattr("dalbt.progress.time.perf_counter", lambda: next(t))
    events: list[ProgressEvent] = []
    phase = ProgressReporter(events.append, min_interval=0).phase("training", 100, "step")
    phase.__enter__()
    phase.update(1)
    assert events[-1].elapsed_s == 10 and events[-1].eta_s is None
    phase.update(3)
    assert events[-1].elapsed_s == 12 and events[-1].eta_s == pytest.approx(97)


def test_describe_and_dict():
    ev = ProgressEvent("training", 120, 600, "step", loss=0.4123, elapsed_s=3.5, eta_s=14.2,
                       round=3)
    assert ev.describe() == "training: step 120 / 600, loss 0.4123, about 14 s left"
    d = ev.to_dict()
    assert d["phase"] == "training" and d["eta_s"] == 14.2 and d["text"] == ev.describe()
    whole = ProgressEvent("training", 1, 2, "epoch", eta_s=5, query_eta_s=75)
    assert whole.describe().endswith("about 1 min 15 s left of the query")
    assert ProgressEvent("scoring", 0, 0, "image").describe() == "scoring..."
    assert format_seconds(3725) == "1 h 2 min" and format_seconds(-1) == "0 s"


def test_a_diverged_loss_is_null_in_the_page_state():
    from fastapi.responses import JSONResponse  # refuses NaN, as /api/state answers with it

    ev = ProgressEvent("training", 3, 10, "epoch", loss=float("nan"), elapsed_s=1.0,
                       eta_s=float("inf"))
    d = ev.to_dict()
    assert d["loss"] is None and d["eta_s"] is None and d["text"].startswith("training: ")
    assert b'"loss":null' in JSONResponse({"progress": d}).body


def test_phase_log_writes_one_line_per_phase():
    lines: list[str] = []
    log = PhaseLog(lines.append)
    rep = ProgressReporter(log, round_=0, min_interval=0)
    with rep.phase("training", 3, "epoch") as phase:
        for k in range(1, 4):
            phase.update(k, loss=0.5)
    with rep.phase("scoring", 0, "image") as phase:
        phase.grow(10)
        phase.advance(10)
    assert len(lines) == 2
    assert lines[0].startswith("training: 3 epochs in ") and lines[0].endswith("loss 0.5")
    assert lines[1].startswith("scoring: 10 images in ")


def test_phase_log_writes_the_state_of_a_long_phase():
    lines: list[str] = []
    rep = ProgressReporter(PhaseLog(lines.append, every=0), min_interval=0)
    with rep.phase("pre-training", 2, "epoch") as phase:
        phase.update(1, loss=250.0)
        phase.update(2, loss=240.0)
    assert lines[0] == "pre-training: epoch 1 / 2, loss 250"
    assert lines[-1].startswith("pre-training: 2 epochs in ") and len(lines) == 2
