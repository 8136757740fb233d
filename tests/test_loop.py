"""AL loop and store: determinism, shared initial sets, transactional rounds, resume."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from dalbt.errors import DalbtError
from dalbt.loop import RunConfig, run_experiment
from dalbt.store import Store
from dalbt.train import TrainConfig
from tests.conftest import kill_at_round


def _cfg(strategy="weibull", seed=0, rounds=2, **kw):
    return RunConfig(dataset="digits", strategy=strategy, initial=20, budget=10, rounds=rounds,
                     seed=seed, val_size=100, projector_dims=(32, 32),
                     train=TrainConfig(epochs=2, **kw))


def _run(tmp_path, name, cfg, digits, **kw):
    with Store(tmp_path / name) as store:
        run = run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None, **kw)
        return run, store.rounds(run.id)


def test_rounds_recorded_and_same_seed_same_queries(tmp_path, digits):
    run, rounds = _run(tmp_path, "a", _cfg(), digits)
    _, again = _run(tmp_path, "b", _cfg(), digits)
    assert run.status == "finished"
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["n_labelled"] for r in rounds] == [20, 30, 40]
    assert [len(r["queried"]) for r in rounds] == [10, 10, 0]
    for r, s in zip(rounds, again, strict=True):
        assert np.array_equal(r["queried"], s["queried"])
        assert r["test_acc"] == s["test_acc"]
    queried = np.concatenate([r["queried"] for r in rounds])
    assert len(np.unique(queried)) == 20 and not set(queried) & set(run.initial)
    assert all(0 <= r["test_acc"] <= 1 and r["t_train"] > 0 for r in rounds)
    _, other = _run(tmp_path, "c", _cfg(seed=1), digits)
    assert not np.array_equal(other[0]["queried"], rounds[0]["queried"])


def test_strategies_of_a_seed_share_initial_set_and_first_model(tmp_path, digits):
    runs = [_run(tmp_path, s, _cfg(s, rounds=1), digits) for s in ("weibull", "random")]
    assert np.array_equal(runs[0][0].initial, runs[1][0].initial)
    assert runs[0][1][0]["test_acc"] == runs[1][1][0]["test_acc"]
    assert not np.array_equal(runs[0][1][0]["queried"], runs[1][1][0]["queried"])


def test_validation_split_never_queried(tmp_path, digits):
    from dalbt.data.pool import make_splits

    run, rounds = _run(tmp_path, "v", _cfg("random", rounds=3), digits)
    val = make_splits(digits.n_train, 100, 20, 0).validation
    queried = np.concatenate([r["queried"] for r in rounds])
    assert not set(queried) & set(val) and not set(run.initial) & set(val)


@pytest.mark.parametrize("warm", [False, True])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, digits, monkeypatch, warm):
    _, full = _run(tmp_path, "full", _cfg(rounds=3, warm_start=warm), digits)
    kill_at_round(monkeypatch, 2,
                  lambda: _run(tmp_path, "cut", _cfg(rounds=3, warm_start=warm), digits))
    with Store(tmp_path / "cut") as store:
        assert [r["round"] for r in store.rounds(store.runs()[0].id)] == [0, 1]
    with pytest.raises(DalbtError, match="--resume"):
        _run(tmp_path, "cut", _cfg(rounds=3, warm_start=warm), digits)
    run, resumed = _run(tmp_path, "cut", _cfg(rounds=3, warm_start=warm), digits, resume=True)
    assert run.status == "finished"
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]
    for a, b in zip(full, resumed, strict=True):
        assert np.array_equal(a["queried"], b["queried"])
        assert a["test_acc"] == pytest.approx(b["test_acc"])
    # resuming a finished run does nothing
    _, again = _run(tmp_path, "cut", _cfg(rounds=3, warm_start=warm), digits, resume=True)
    assert len(again) == 4


@pytest.mark.slow
def test_killed_process_loses_at_most_the_current_round(tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dalbt", "run", "--dataset", "digits", "--strategy", "random",
           "--initial", "20", "--budget", "10", "--rounds", "12", "--epochs", "3",
           "--val-size", "100", "--projector", "32-32", "--out", str(out), "--no-progress",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(180, proc.kill)  # a silent, hung child must not hang the test
    watchdog.start()
    seen = 0
    for line in proc.stdout:
        seen += "round" in line
        if seen >= 2:
            break
    os.kill(proc.pid, signal.SIGKILL)
    watchdog.cancel()
    proc.wait()
    alone = tmp_path / "alone"  # the database file copied without its WAL: a backup
    alone.mkdir()
    shutil.copy(out / "dalbt.sqlite", alone)
    con = sqlite3.connect(alone / "dalbt.sqlite")
    in_file = [r[0] for r in con.execute("SELECT round FROM rounds ORDER BY round")]
    con.close()
    con = sqlite3.connect(out / "dalbt.sqlite")
    done = [r[0] for r in con.execute("SELECT round FROM rounds ORDER BY round")]
    con.close()
    assert done[:2] == [0, 1] and done == list(range(len(done))) and len(done) < 13
    # each round is checkpointed into the file once committed (a kill may fall in between)
    assert in_file in (done, done[:-1]) and in_file[:2] == [0, 1]
    res = subprocess.run(cmd[:cmd.index("--rounds") + 1] + ["4"] + cmd[cmd.index("--rounds") + 2:]
                         + ["--resume"], capture_output=True, text=True, timeout=300)
    # a different --rounds is a different run: it must not mix with the killed one
    assert res.returncode == 0, res.stderr
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    con = sqlite3.connect(out / "dalbt.sqlite")
    per_run = con.execute("SELECT run_id, COUNT(*), COUNT(DISTINCT round) FROM rounds "
                          "GROUP BY run_id ORDER BY run_id").fetchall()
    status = [r[0] for r in con.execute("SELECT status FROM runs ORDER BY id")]
    con.close()
    assert per_run[0][1:] == (13, 13) and per_run[1][1:] == (5, 5)
    assert status == ["finished", "finished"]


@pytest.mark.parametrize("name", sorted(__import__("dalbt.strategies").strategies.STRATEGIES))
def test_every_strategy_runs_a_round_through_the_loop(tmp_path, digits, name):
    from tests.test_strategies import FAST

    # BatchBALD's defaults (20 MC samples, 1000 joint samples over the whole pool) take seconds
    fast = {**FAST, "batchbald": {"samples": 5, "num_samples": 100}}
    cfg = RunConfig(dataset="digits", strategy=name, strategy_options=fast.get(name, {}),
                    initial=20, budget=10, rounds=1, seed=0, val_size=100,
                    projector_dims=(32, 32), train=TrainConfig(epochs=1))
    run, rounds = _run(tmp_path, name, cfg, digits)
    assert run.status == "finished" and len(rounds) == 2
    assert len(rounds[0]["queried"]) == 10
    assert not set(rounds[0]["queried"]) & set(run.initial)


def test_dropout_trained_strategy_is_reproducible_and_leaves_global_rng(tmp_path, digits):
    import torch

    state = torch.get_rng_state()
    _, a = _run(tmp_path, "mc1", _cfg("bald", rounds=1), digits)
    torch.manual_seed(123)  # a different global state must not change the run
    _, b = _run(tmp_path, "mc2", _cfg("bald", rounds=1), digits)
    assert np.array_equal(a[0]["queried"], b[0]["queried"])
    assert a[1]["test_acc"] == b[1]["test_acc"]
    torch.manual_seed(7)
    before = torch.get_rng_state()
    _run(tmp_path, "mc3", _cfg("bald", rounds=1), digits)
    assert torch.equal(before, torch.get_rng_state())
    torch.set_rng_state(state)
