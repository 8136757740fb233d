import csv

import numpy as np
import pytest
from scipy.stats import t

from dalbt.report import (
    Curve,
    aubc,
    ci95_halfwidth,
    labels_to_reach,
    load_ceilings,
    load_curves,
    paired_wins,
    pairwise_matrices,
    summary_records,
    write_report,
)
from dalbt.store import Store


def _fill(store, strategy, seed, accs, times=(2.0, 0.5, 0.1), dataset="d"):
    cfg = {"dataset": dataset, "strategy": strategy, "seed": seed, "strategy_options": {},
           "initial": 100, "budget": 50}
    run = store.create_run(cfg, np.arange(3))
    for r, a in enumerate(accs):
        metrics = {"n_labelled": 100 + 50 * r, "test_acc": a,
                   **dict(zip(("t_train", "t_score", "t_select"), times, strict=True))}
        store.record_round(run.id, r, metrics, np.array([r]), finished=r == len(accs) - 1)


# --- pure functions ------------------------------------------------------------------------

def test_aubc_known_inputs():
    assert aubc([0, 10, 20], [0.7, 0.7, 0.7]) == pytest.approx(0.7)  # flat = its accuracy
    assert aubc([0, 1], [0.0, 1.0]) == pytest.approx(0.5)  # linear ramp 0..1
    assert aubc(np.linspace(100, 1000, 10), np.linspace(0, 1, 10)) == pytest.approx(0.5)
    # non-uniform x: (0.5+0.5)/2*1 + (0.5+1)/2*3 = 0.5 + 2.25 over range 4
    assert aubc([0, 1, 4], [0.5, 0.5, 1.0]) == pytest.approx(2.75 / 4)
    assert aubc([100], [0.42]) == pytest.approx(0.42)


def test_aubc_rejects_bad_input():
    with pytest.raises(ValueError):
        aubc([0, 1], [0.5])
    with pytest.raises(ValueError):
        aubc([1, 0], [0.5, 0.5])
    with pytest.raises(ValueError):
        aubc([0, 1], [0.5, np.nan])


def test_ci95_is_student_t():
    acc = np.array([[0.5, 0.6], [0.7, 0.8], [0.6, np.nan]])
    h = ci95_halfwidth(acc)
    assert h[0] == pytest.approx(t.ppf(0.975, 2) * np.std([0.5, 0.7, 0.6], ddof=1) / np.sqrt(3))
    assert h[1] == pytest.approx(t.ppf(0.975, 1) * np.std([0.6, 0.8], ddof=1) / np.sqrt(2))
    assert np.isnan(ci95_halfwidth(np.array([[0.5, 0.6]]))).all()  # one seed: no interval


def test_labels_to_reach():
    x, mean = [100, 150, 200, 250], [0.5, 0.8, np.nan, 0.9]
    assert labels_to_reach(x, mean, ceiling=1.0, percent=80) == 150
    assert labels_to_reach(x, mean, ceiling=1.0, percent=90) == 250  # >= counts
    assert labels_to_reach(x, mean, ceiling=1.0, percent=95) is None
    assert labels_to_reach(x, mean, ceiling=0.5, percent=100) == 100


def test_paired_wins_better_identical_and_worse():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.7, size=(5, 6))
    better = base + 0.1 + rng.normal(0, 0.005, size=base.shape)
    assert paired_wins(better, base) == (6, 6)
    assert paired_wins(base, better) == (0, 6)  # significantly worse is no win
    assert paired_wins(base, base.copy()) == (0, 6)
    noisy = base + rng.normal(0, 0.05, size=base.shape)
    wins, _ = paired_wins(noisy, base)
    assert wins <= 1
    # rounds with fewer than two paired seeds are not compared
    a = better.copy()
    a[1:, -1] = np.nan
    assert paired_wins(a, base) == (5, 5)


# --- from a store ----------------------------------------------------------------------------

def _bench(store):
    good, bad = [0.6, 0.82, 0.9], [0.5, 0.6, 0.7]
    for seed, eps in enumerate((0.0, 0.01, -0.01)):
        _fill(store, "weibull", seed, [a + eps for a in good], times=(3.0, 1.0, 0.2 + seed))
        _fill(store, "random", seed, [a + eps * 1.5 for a in bad])
    _fill(store, "entropy", 0, [0.55, 0.65, 0.8])  # one seed: no interval, not in matrix
    cfg = {"dataset": "d", "strategy": "full-data", "seed": 0, "strategy_options": {}}
    run = store.create_run(cfg, np.arange(3))
    store.record_round(run.id, 0, {"n_labelled": 1000, "test_acc": 0.9}, np.array([]),
                       finished=True)


def test_full_data_run_is_a_ceiling_not_a_curve(tmp_path):
    with Store(tmp_path) as store:
        _bench(store)
        curves = load_curves(store)
        ceilings = load_ceilings(store)
    assert sorted(c.label for c in curves) == ["entropy", "random", "weibull"]
    assert ceilings == {"d": pytest.approx(0.9)}
    recs = {r["strategy"]: r for r in summary_records(curves, ceilings)}
    w = recs["weibull"]
    assert w["labels_to_90pct"] == 150 and w["labels_to_95pct"] == 200  # .81 <= .82 < .855
    assert recs["random"]["labels_to_90pct"] is None
    assert w["aubc_mean"] == pytest.approx(0.785)
    assert w["aubc_std"] == pytest.approx(0.01)  # a constant shift moves AUBC by the shift
    assert w["final_bought"] == 200 and w["final_acc_mean"] == pytest.approx(0.9)
    assert w["final_acc_ci95"] == pytest.approx(t.ppf(0.975, 2) * 0.01 / np.sqrt(3))
    assert w["t_train"] == pytest.approx(3.0) and w["t_select"] == pytest.approx(1.2)
    assert np.isnan(recs["entropy"]["final_acc_ci95"])
    assert np.isnan(recs["entropy"]["aubc_std"])


def test_summary_uses_rounds_every_seed_reached(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, "random", 0, [0.5, 0.6, 0.7])
        _fill(store, "random", 1, [0.5, 0.6])  # unfinished
        (curve,) = load_curves(store)
    (rec,) = summary_records([curve], {})
    assert rec["rounds"] == 2 and rec["final_bought"] == 150
    assert rec["aubc_mean"] == pytest.approx(0.55)
    assert rec["labels_to_90pct"] is None  # no full-data run


def test_pairwise_matrix_from_store(tmp_path):
    with Store(tmp_path) as store:
        _bench(store)
        curves = load_curves(store)
    (m,) = pairwise_matrices(curves)
    idx = {label: i for i, label in enumerate(m.labels)}
    w, r, e = idx["weibull"], idx["random"], idx["entropy"]
    assert m.wins[w][r] == (3, 3)
    assert m.wins[r][w] == (0, 3)
    assert m.wins[w][w] is None and m.wins[e][w] is None and m.wins[w][e] is None


def test_pairwise_needs_the_same_budget_axis():
    acc = np.tile([0.5, 0.6], (3, 1))
    a = Curve("d", "a", [0, 1, 2], np.array([100, 150]), acc)
    b = Curve("d", "b", [0, 1, 2], np.array([10, 20]), acc)
    assert pairwise_matrices([a, b]) == []


def test_write_report_summary_files(tmp_path):
    with Store(tmp_path) as store:
        _bench(store)
    rep = write_report(tmp_path, tmp_path / "rep")
    assert rep["svg"].read_text().lstrip().startswith("<?xml")
    assert rep["png"].stat().st_size > 1000
    md = rep["summary"].read_text()
    assert "Full-data accuracy: 90.00 %" in md
    assert "| d | weibull | 3 | 0.785 ± 0.010 | 90.00 ± 2.48 @ 200 | 150 | 200 |" in md
    assert "| d | random | 3 |" in md and "not reached" in md
    assert "### Pairwise comparison (d)" in md
    assert "| A \\ B | entropy | random | weibull |" in md
    assert "| weibull |  | 3/3 |  |" in md and "| random |  |  | 0/3 |" in md
    rows = list(csv.DictReader(rep["summary_csv"].open()))
    by = {r["strategy"]: r for r in rows}
    assert set(by) == {"entropy", "random", "weibull"}
    assert float(by["weibull"]["aubc_mean"]) == pytest.approx(0.785)
    assert by["random"]["labels_to_90pct"] == "" and by["weibull"]["labels_to_95pct"] == "200"
    assert by["entropy"]["final_acc_ci95"] == ""
    table = rep["table"]
    assert "bought" in table.splitlines()[0]
    assert "AUBC" in table and "labels to 90% full" in table
