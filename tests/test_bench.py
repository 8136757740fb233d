"""Bench runner: config validation, grid expansion, resume/skip, shared initial sets, presets,
full-data reference runs, parallel workers and the CLI."""

import json
import os
import re

import numpy as np
import pytest

from dalbt import bench
from dalbt.cli import main
from dalbt.data import DATASETS
from dalbt.errors import DalbtError
from dalbt.store import Store
from dalbt.strategies import STRATEGIES

TINY = {"dataset": "digits", "model": "lenet", "initial": 20, "budget": 10, "rounds": 1,
        "epochs": 1, "val_size": 100, "projector_dims": [16, 16]}


@pytest.fixture(autouse=True)
def _cached_digits(digits, monkeypatch):
    monkeypatch.setattr(bench, "_DATA_CACHE", {("digits", None): digits})


def _cfg(**kw):
    raw = {**TINY, "strategies": ["random"], "seeds": [0]}
    raw.update(kw)
    return bench.parse_config(raw, "test")


def _run(cfg, out, **kw):
    lines = []
    res = bench.run_bench(cfg, out, progress=False, log=lines.append, **kw)
    return res, lines


# -- parsing and validation ----------------------------------------------------------------


def test_parse_config_fields_and_strategy_forms():
    cfg = _cfg(strategies=["random", {"name": "random", "train": {"ssl_unlabelled": True}},
                           {"name": "weibull", "options": {"distance": "cosine"}},
                           {"name": "entropy", "label": "ent"}],
               lr="1e-3", seeds=[0, 3])
    assert [s.label for s in cfg.strategies] == ["random", "random+ssl",
                                                 "weibull(distance=cosine)", "ent"]
    assert cfg.settings["lr"] == 0.001 and cfg.settings["projector_dims"] == (16, 16)
    assert cfg.seeds == [0, 3]
    runs, _ = bench.expand(cfg)
    ssl = [r for r in runs if r.label == "random+ssl"][0].config
    assert ssl.train.ssl_unlabelled and ssl.train.epochs == 1 and ssl.projector_dims == (16, 16)
    assert runs[0].config.strategy_options == {} and runs[2].config.strategy_options == {
        "distance": "cosine"}


@pytest.mark.parametrize("change, message", [
    ({"epoch": 3}, "unknown key 'epoch'"),
    ({"strategies": ["nope"]}, "unknown strategy 'nope'"),
    ({"strategies": [{"name": "random", "colour": 1}]}, "unknown key 'colour'"),
    ({"strategies": [{"name": "random", "train": {"gama": 1}}]}, "unknown key 'gama'"),
    ({"strategies": [{"name": "weibull", "options": {"bogus": 1}}]}, "bad options"),
    ({"strategies": []}, "non-empty list"),
    ({"strategies": ["random", "random"]}, "labelled 'random'"),
    ({"epochs": "many"}, "epochs must be an integer"),
    ({"ssl_unlabelled": "yes"}, "ssl_unlabelled must be true/false"),
    ({"gamma": [1]}, "gamma must be a number"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"model": "alexnet"}, "unknown model 'alexnet'"),
    ({"seeds": [0, "a"]}, "'seeds' must be"),
    ({"seeds": [1, 1]}, "seed twice"),
    ({"grid": {"colour": [1]}}, "unknown setting 'colour'"),
    ({"grid": {"gamma": 0.1}}, "non-empty list"),
    ({"grid": {"dataset": ["mnist"]}}, "cannot vary"),
    ({"budget": 0}, "budget must be positive"),
    ({"gamma": -1.0}, "gamma must be >= 0"),
])
def test_bad_configs_name_the_problem(change, message):
    with pytest.raises(DalbtError, match=message):
        _cfg(**change)


def test_grid_conflicting_with_strategy_override():
    with pytest.raises(DalbtError, match="grid varies"):
        _cfg(strategies=[{"name": "random", "train": {"gamma": 0.1}}],
             grid={"gamma": [0.1, 0.0]})


def test_grid_expansion_strategies_x_seeds_x_settings():
    cfg = _cfg(strategies=["random", "weibull",
                           {"name": "random", "train": {"ssl_unlabelled": True}}],
               seeds=[0, 1], grid={"gamma": [0.001, 0], "budget": [10, 20]})
    runs, notes = bench.expand(cfg)
    # ssl with gamma 0 is left out: 3 strategies x 2 seeds x 4 points - 2 points x 2 seeds
    assert len(runs) == 3 * 2 * 4 - 4
    assert len(notes) == 2 and all("gamma > 0" in n for n in notes)
    labels = {r.label for r in runs}
    assert "random [gamma=0.001 budget=20]" in labels and "weibull [gamma=0 budget=10]" in labels
    assert len({(r.label, r.config.seed) for r in runs}) == len(runs)
    assert len({r.key for r in runs}) == len(runs)
    r = next(r for r in runs if r.label == "weibull [gamma=0 budget=20]" and r.config.seed == 1)
    assert r.config.train.gamma == 0 and r.config.budget == 20 and r.config.strategy == "weibull"


def test_load_config_file_and_yaml_errors(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("dataset: digits\nstrategies: [random]\nseeds: [0, 1]\nepochs: 2\n")
    cfg = bench.load_config(path)
    assert cfg.name == "b" and cfg.seeds == [0, 1] and cfg.settings["epochs"] == 2
    path.write_text("dataset: digits\nstrategies: [random\n")
    with pytest.raises(DalbtError, match="not valid YAML"):
        bench.load_config(path)
    with pytest.raises(DalbtError, match="cannot read"):
        bench.load_config(tmp_path / "missing.yaml")
    path.write_text("- random\n")
    with pytest.raises(DalbtError, match="expected a mapping"):
        bench.load_config(path)


# -- presets --------------------------------------------------------------------------------


def test_presets_load_and_are_fair():
    names = bench.preset_names()
    assert {"mnist-100", "mnist-1000", "fashion-mnist-100", "fashion-mnist-1000", "cifar10-2500",
            "cifar10-1000", "cifar10-mixed", "digits", "fashion-mnist-small"} <= set(names)
    for name in names:
        cfg = bench.load_preset(name)
        assert cfg.name == name and cfg.description
        assert cfg.settings["dataset"] in DATASETS
        assert all(s.name in STRATEGIES for s in cfg.strategies)
        # fair comparison: random is run with every training-option set any strategy uses
        variants = {json.dumps(s.train, sort_keys=True) for s in cfg.strategies}
        randoms = {json.dumps(s.train, sort_keys=True) for s in cfg.strategies
                   if s.name == "random"}
        assert variants == randoms, name
    assert {s.name for s in bench.load_preset("digits").strategies} == set(STRATEGIES)
    assert bench.load_preset("digits").seeds == [0, 1]
    fm = bench.load_preset("fashion-mnist-100")
    assert fm.settings["epochs"] == 150 and fm.settings["val_size"] == 5000
    mixed = bench.load_preset("cifar10-mixed")
    assert mixed.settings["mix"] == "svhn:3334,kmnist:3333,fashion-mnist:3333"
    small = bench.load_preset("fashion-mnist-small")
    assert [s.label for s in small.strategies] == ["random", "random+ssl", "weibull",
                                                   "weibull+ssl", "entropy", "coreset", "badge"]
    assert small.seeds == [0, 1, 2, 3, 4] and small.settings["val_size"] == 1000
    with pytest.raises(DalbtError, match="unknown preset"):
        bench.load_preset("nope")


# -- running --------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_skips_finished_runs_and_seed_shares_initial_set(tmp_path, monkeypatch):
    cfg = _cfg(strategies=["random", "entropy"], seeds=[0, 1])
    calls = []
    real = bench.execute
    monkeypatch.setattr(bench, "execute", lambda task, *a: calls.append(task) or real(task, *a))
    res, lines = _run(cfg, tmp_path / "b")
    assert res["ran"] == 4 and len(calls) == 4
    assert sum(ln.startswith("[") and "ETA" in ln for ln in lines) == 4
    with Store(tmp_path / "b") as store:
        runs = store.runs()
        rows = {r.id: store.rounds(r.id) for r in runs}
    assert len(runs) == 4 and all(r.status == "finished" for r in runs)
    for seed in (0, 1):
        initial = [r.initial for r in runs if r.seed == seed]
        assert np.array_equal(initial[0], initial[1])
    assert not np.array_equal(*[r.initial for r in runs if r.strategy == "random"])
    manifest = json.loads((tmp_path / "b" / bench.MANIFEST).read_text())
    assert sorted(set(manifest["labels"].values())) == ["entropy", "random"]

    calls.clear()
    res, lines = _run(cfg, tmp_path / "b")
    assert res["ran"] == 0 and res["finished_before"] == 4 and not calls
    assert "4 finished, 0 to run" in lines[-1]
    with Store(tmp_path / "b") as store:
        assert [r.id for r in store.runs()] == [r.id for r in runs]
        assert {r.id: store.rounds(r.id) for r in store.runs()}.keys() == rows.keys()

    # one more seed: only its runs are new
    res, _ = _run(_cfg(strategies=["random", "entropy"], seeds=[0, 1, 2]), tmp_path / "b")
    assert res["ran"] == 2 and res["finished_before"] == 4


def test_dry_run_lists_status_and_runs_nothing(tmp_path):
    cfg = _cfg(seeds=[0, 1])
    res, lines = _run(cfg, tmp_path / "d", dry_run=True)
    assert res["ran"] == 0 and sum(ln.strip().endswith("new") for ln in lines) == 2
    with Store(tmp_path / "d") as store:
        assert store.runs() == []


def test_protocol_checked_against_data_before_running(tmp_path):
    with pytest.raises(DalbtError, match="exceeds the pool"):
        _run(_cfg(rounds=200), tmp_path / "p")


def test_full_data_reference_run_written_once(tmp_path, digits):
    cfg = _cfg()
    res, _ = _run(cfg, tmp_path / "f", full_data=True)
    assert res["ran"] == 2
    with Store(tmp_path / "f") as store:
        full = [r for r in store.runs() if r.strategy == bench.FULL_DATA]
        assert len(full) == 1 and full[0].status == "finished"
        rounds = store.rounds(full[0].id)
    assert len(rounds) == 1 and rounds[0]["n_labelled"] == digits.n_train - 100
    assert 0 <= rounds[0]["test_acc"] <= 1 and len(rounds[0]["queried"]) == 0
    assert len(full[0].initial) == digits.n_train - 100
    res, _ = _run(cfg, tmp_path / "f", full_data=True)
    assert res["ran"] == 0 and res["finished_before"] == 2
    with Store(tmp_path / "f") as store:
        assert sum(r.strategy == bench.FULL_DATA for r in store.runs()) == 1


@pytest.mark.slow
def test_parallel_jobs_share_one_store(tmp_path):
    cfg = _cfg(strategies=["random", "margin"])
    res, lines = _run(cfg, tmp_path / "j", jobs=2, threads=1, round_log=True)
    assert res["ran"] == 2
    # the workers' rounds came back through the queue: 2 runs x 2 rounds
    rounds = [ln for ln in lines if re.match(r"bench bench: \w+ seed 0 round [12]/2 ", ln)]
    assert len(rounds) == 4 and rounds[-1].endswith("4/4 rounds, ETA 0:00")
    with Store(tmp_path / "j") as store:
        runs = store.runs()
        assert len(runs) == 2 and all(r.status == "finished" for r in runs)
        assert np.array_equal(runs[0].initial, runs[1].initial)
        assert all(len(store.rounds(r.id)) == 2 for r in runs)


# -- CLI ------------------------------------------------------------------------------------


def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: digits\nstrategies: [nope]\n")
    assert main(["bench", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown strategy 'nope'" in err
    assert main(["bench", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["bench"]) == 2
    assert "--preset" in capsys.readouterr().err
    assert main(["bench", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_cli_list_presets_and_dry_run(tmp_path, capsys):
    assert main(["bench", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "cifar10-mixed" in out and "fashion-mnist-small" in out
    assert main(["bench", "--preset", "digits", "--dry-run", "--device", "cpu",
                 "--out", str(tmp_path / "dr")]) == 0
    out = capsys.readouterr().out
    assert f"{len(STRATEGIES) * 2} runs" in out and "mobyv2al" in out


# -- threads and progress -------------------------------------------------------------------


def test_threads_per_run_and_one_line_per_round(tmp_path, monkeypatch):
    import torch

    seen = []
    real = bench.execute
    monkeypatch.setattr(bench, "execute", lambda task, *a: seen.append(
        torch.get_num_threads()) or real(task, *a))
    cfg = _cfg(seeds=[0, 1])
    res, lines = _run(cfg, tmp_path / "t", threads=2, round_log=True)
    assert res["ran"] == 2 and seen == [2, 2] and torch.get_num_threads() == 1  # restored
    starts = [ln for ln in lines if "started" in ln]
    assert starts == ["bench bench: random seed 0 started at round 0/2",
                      "bench bench: random seed 1 started at round 0/2"]
    rounds = [ln for ln in lines if re.match(r"bench bench: random seed \d round \d/2 ", ln)]
    assert [ln.split(";")[1].split(",")[0] for ln in rounds] == [
        " 1/4 rounds", " 2/4 rounds", " 3/4 rounds", " 4/4 rounds"]
    assert "ETA" in rounds[0] and rounds[-1].endswith("ETA 0:00")
    # the run's summary line gives the bench's ETA from the round times
    finished = [ln for ln in lines if ln.startswith("[")]
    assert len(finished) == 2 and finished[-1].endswith("(ETA 0:00)")
    assert re.search(r"\(ETA \d+:\d\d\)$", finished[0])

    # without round_log: no round lines (as before)
    _, quiet = _run(_cfg(seeds=[2]), tmp_path / "t")
    assert not [ln for ln in quiet if "round 1/2" in ln]


def test_eta_from_measured_round_times():
    tasks = [{"label": "a", "config": {"seed": s}, "rounds": 4, "done_before": d}
             for s, d in ((0, 0), (1, 2), (2, 0))]
    lines = []
    prog = bench._BenchProgress(tasks, jobs=2, name="b", bars=False, round_log=True,
                                log=lines.append)
    assert prog.total_rounds == 10 and prog.eta() is None
    prog.event(("start", 0, os.getpid()))
    prog.event(("round", 0, 1, 4, 6.0))
    prog.event(("round", 0, 2, 4, 2.0))  # 4 s a round so far, 8 rounds left, 2 at a time
    assert prog.eta() == pytest.approx(8 * 4.0 / 2)
    assert lines[-1] == "bench b: a seed 0 round 2/4 (2.0s); 2/10 rounds, ETA 0:16"
    prog.finish(0)  # its last two rounds count as done
    assert prog.rounds_done == 4 and prog.eta() == pytest.approx(6 * 2.0 / 2)


def test_a_dead_worker_is_named():
    import multiprocessing as mp

    tasks = [{"label": "margin", "config": {"seed": 3}, "rounds": 2, "done_before": 0}]
    prog = bench._BenchProgress(tasks, jobs=1, name="b", bars=False, round_log=False,
                                log=lambda s: None)
    child = mp.get_context("fork").Process(target=__import__("time").sleep, args=(30,))
    child.start()
    try:
        prog.event(("start", 0, child.pid))
        assert prog.dead_worker() is None
    finally:
        child.kill()
        child.join()
    assert prog.dead_worker() == "margin seed 3"


def test_cli_threads_is_validated(tmp_path, capsys):
    path = tmp_path / "b.yaml"
    path.write_text("dataset: digits\nstrategies: [random]\n")
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", str(path), "--threads", bad])
        assert exc.value.code == 2
        assert "--threads" in capsys.readouterr().err
    with pytest.raises(DalbtError, match="--threads must be positive"):
        _run(_cfg(), tmp_path / "v", threads=0)
