import numpy as np
import pytest

from dalbt.errors import DalbtError
from dalbt.report import load_curves, table_rows, write_report
from dalbt.store import Store


def _fill(store, strategy, seed, accs, options=None, gamma=0.001):
    cfg = {"dataset": "digits", "strategy": strategy, "seed": seed,
           "strategy_options": options or {}, "train": {"gamma": gamma, "device": "cpu"}}
    run = store.create_run(cfg, np.arange(3))
    for r, a in enumerate(accs):
        store.record_round(run.id, r, {"n_labelled": 10 + 5 * r, "test_acc": a},
                           np.array([100 + r]), finished=r == len(accs) - 1)


def test_curves_and_table_from_known_values(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, "weibull", 0, [0.5, 0.6, 0.7])
        _fill(store, "weibull", 1, [0.7, 0.8, 0.9])
        _fill(store, "random", 0, [0.4, 0.5])  # unfinished: one round fewer
        _fill(store, "weibull", 0, [0.1], options={"distance": "cosine"})
        curves = {c.label: c for c in load_curves(store)}
    w = curves["weibull"]
    assert w.seeds == [0, 1] and w.n_labelled.tolist() == [10, 15, 20]
    assert np.allclose(w.mean, [0.6, 0.7, 0.8])
    assert np.allclose(w.std, [np.std([0.5, 0.7], ddof=1)] * 3)
    assert "weibull(distance=cosine)" in curves
    header, rows = table_rows(list(curves.values()))
    col = header.index("weibull")
    assert rows[0][col] == "60.00 ± 14.14"
    assert rows[2][header.index("random")] == ""


def test_runs_with_other_settings_are_not_averaged_as_seeds(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, "random", 0, [0.4, 0.5])
        _fill(store, "random", 1, [0.6, 0.7])
        _fill(store, "random", 0, [0.1, 0.2], gamma=0.0)
        _fill(store, "weibull", 0, [0.3, 0.3])
        curves = {c.label: c for c in load_curves(store)}
    assert set(curves) == {"random [gamma=0.001]", "random [gamma=0.0]", "weibull"}
    assert curves["random [gamma=0.001]"].seeds == [0, 1]
    assert np.allclose(curves["random [gamma=0.0]"].mean, [0.1, 0.2])


def test_write_report_files(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, "random", 0, [0.4, 0.5])
    rep = write_report(tmp_path)
    assert rep["png"].stat().st_size > 1000
    assert rep["md"].read_text().startswith("| dataset | bought | random |")
    assert "50.00" in rep["table"]
    rows = rep["rounds"].read_text().splitlines()
    assert rows[0].startswith("run,dataset,strategy,seed,round,n_labelled,test_acc")
    assert len(rows) == 3 and rows[1].split(",")[4] == "0" and rows[2].endswith(",1")


def test_report_only_keeps_matching_strategies(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, "random", 0, [0.4, 0.5])
        _fill(store, "weibull", 0, [0.3, 0.6])
        _fill(store, "weibull", 0, [0.2, 0.9], options={"balance": True})
    rep = write_report(tmp_path, tmp_path / "w", only=["weibull*"])
    header = rep["md"].read_text().splitlines()[0]
    assert "weibull(balance=True)" in header and "| weibull |" in header
    assert "random" not in header
    rep = write_report(tmp_path, tmp_path / "r", only=["random", "weibull"])
    assert "balance" not in rep["md"].read_text().splitlines()[0]
    with pytest.raises(DalbtError, match="matches no strategy.*random, weibull"):
        write_report(tmp_path, tmp_path / "x", only=["entropy"])


def test_empty_store_is_an_error(tmp_path):
    Store(tmp_path).close()
    with pytest.raises(DalbtError, match="no finished rounds"):
        write_report(tmp_path)


def test_ood_fraction_per_round_and_budget_axis(tmp_path):
    with Store(tmp_path) as store:
        for seed, oods in ((0, [10, 30]), (1, [20, 50])):
            cfg = {"dataset": "d", "strategy": "weibull", "seed": seed, "strategy_options": {},
                   "initial": 100, "budget": 100}
            run = store.create_run(cfg, np.arange(3))
            for r, n_ood in enumerate(oods):
                store.record_round(run.id, r, {"n_labelled": 100 + 50 * r, "test_acc": 0.5,
                                               "n_ood": n_ood}, np.arange(100))
        (curve,) = load_curves(store)
    assert curve.n_labelled.tolist() == [100, 200]  # labels bought, not labelled
    assert np.allclose(np.nanmean(curve.ood, axis=0), [0.15, 0.40])
    rep = write_report(tmp_path)
    rows = (tmp_path / "ood.csv").read_text().splitlines()
    assert rows[1:] == ["d,weibull,0,0.1500,2", "d,weibull,1,0.4000,2"]
    assert rep["png"].exists()


def test_bench_labels_name_the_curves(tmp_path):
    import json

    with Store(tmp_path) as store:
        _fill(store, "random", 0, [0.4, 0.5])
        _fill(store, "random", 0, [0.1, 0.2], gamma=0.0)
        _fill(store, "weibull", 0, [0.3, 0.3])
        keys = {(r.strategy, r.config["train"]["gamma"]): r.key for r in store.runs()}
    names = {keys[("random", 0.0)]: "random-ce-only", keys[("weibull", 0.001)]: "dalbt",
             keys[("random", 0.001)]: "dalbt"}  # a clash: those two keep computed labels
    (tmp_path / "bench.json").write_text(json.dumps({"labels": names}))
    rep = write_report(tmp_path, tmp_path / "out")
    header = rep["md"].read_text().splitlines()[0]
    assert "random-ce-only" in header and "random [gamma=0.001]" in header
    assert "| weibull |" in header and "dalbt" not in header


def test_report_seeds_keeps_only_those_runs(tmp_path):
    with Store(tmp_path) as store:
        for seed, accs in enumerate([[0.4, 0.5], [0.6, 0.7], [0.9, 0.9]]):
            _fill(store, "random", seed, accs)
        _fill(store, "weibull", 2, [0.1, 0.1])
    rep = write_report(tmp_path, tmp_path / "o", seeds=[0, 1])
    md = rep["md"].read_text()
    assert "| 10 | 50.00 ± 14.14 |" in md and "| 15 | 60.00 ± 14.14 |" in md
    assert "weibull" not in md.splitlines()[0]
    with pytest.raises(DalbtError, match="no run has any of the seeds"):
        write_report(tmp_path, tmp_path / "x", seeds=[7])


def test_runs_stored_before_a_setting_existed_share_the_curve_of_its_default(tmp_path):
    with Store(tmp_path) as store:
        _fill(store, "random", 0, [0.4, 0.5])  # stored before initial_strategy and steps
        cfg = {"dataset": "digits", "strategy": "random", "seed": 1, "strategy_options": {},
               "initial_strategy": "random",
               "train": {"gamma": 0.001, "device": "cpu", "steps": None, "finetune": "all"}}
        for c, accs in ((cfg, [0.6, 0.7]),
                        ({**cfg, "seed": 2, "initial_strategy": "typiclust"}, [0.1, 0.2])):
            run = store.create_run(c, np.arange(3))
            for r, a in enumerate(accs):
                store.record_round(run.id, r, {"n_labelled": 10 + 5 * r, "test_acc": a},
                                   np.array([100 + r]), finished=r == 1)
        curves = {c.label: c for c in load_curves(store)}
    assert curves["random"].seeds == [0, 1]
    assert [c.seeds for k, c in curves.items() if "typiclust" in k] == [[2]]
