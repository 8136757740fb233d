"""A round whose training diverges stops with one line and leaves nothing of itself stored."""

import sqlite3

import numpy as np
import pytest
import torch

from dalbt.cli import main
from dalbt.errors import TrainingDiverged
from dalbt.train import EXPLODED_CE, TrainConfig, check_finite, pretrain_barlow, train_round
from tests.conftest import small_lenet


def test_check_finite_names_the_loss_and_the_learning_rate():
    check_finite("training", 1, {"ce": 2.3, "bt": 150.0}, 1e-3)  # healthy: no error
    for losses in ({"ce": float("nan")}, {"bt": float("inf")}, {"ce": EXPLODED_CE * 10}):
        with pytest.raises(TrainingDiverged, match=r"epoch 3 .*learning rate 0\.5 .*--gamma"):
            check_finite("training", 3, losses, 0.5)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="weights"):
        check_finite("training", 1, {"ce": 1.0}, 1e-3, model)


@pytest.mark.parametrize("gamma", [0.0, 0.001])
def test_train_round_stops_when_the_loss_explodes(digits, gamma):
    cfg = TrainConfig(epochs=5, batch_size=32, lr=1e6, gamma=gamma)
    with pytest.raises(TrainingDiverged, match="diverged in epoch"):
        train_round(small_lenet(digits), digits.x_train, digits.y_train, np.arange(64),
                    np.arange(1000, 1100), cfg, torch.Generator().manual_seed(0),
                    torch.Generator().manual_seed(1))


def test_pretraining_stops_when_the_loss_turns_nan(digits):
    cfg = TrainConfig(pretrain_epochs=5, pretrain_batch=64, lr=1e8)
    with pytest.raises(TrainingDiverged, match="pre-training diverged"):
        pretrain_barlow(small_lenet(digits), digits.x_train, np.arange(256), cfg,
                        torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("strategy", ["entropy", "weibull"])
def test_cli_run_that_diverges_exits_2_and_keeps_the_store_consistent(tmp_path, capsys,
                                                                      strategy):
    out = tmp_path / "exp"
    argv = ["run", "--dataset", "digits", "--strategy", strategy, "--initial", "40", "--budget",
            "10", "--rounds", "2", "--epochs", "4", "--val-size", "100", "--threads", "1",
            "--lr", "1e6", "--gamma", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dalbt: error: training diverged")
    assert "Traceback" not in err[0]
    with sqlite3.connect(out / "dalbt.sqlite") as conn:
        status = conn.execute("SELECT status FROM runs").fetchall()
        rounds = conn.execute("SELECT round FROM rounds ORDER BY round").fetchall()
    assert status == [("running",)]  # unfinished: --resume would retry it, nothing is faked
    assert [r for (r,) in rounds] == list(range(len(rounds)))  # no gap, nothing half-written
    assert len(rounds) < 3
    # resuming the same diverging run fails the same way, without duplicating rounds
    assert main([*argv, "--resume"]) == 2
    with sqlite3.connect(out / "dalbt.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == len(rounds)


def test_cli_prints_library_warnings_as_one_dalbt_warning_line(capsys):
    import logging

    from dalbt.cli import _warnings_to_stderr

    _warnings_to_stderr()
    _warnings_to_stderr()  # idempotent: one handler
    logging.getLogger("dalbt.strategies.weibull").warning("weibull: degenerate Weibull fit: x")
    assert capsys.readouterr().err == "dalbt: warning: weibull: degenerate Weibull fit: x\n"


@pytest.mark.parametrize("setting, says", [
    ("lr: .nan", "--lr must be a finite number > 0"),
    ("lr: 1.0e+300", "--lr must be a finite number > 0 and at most 1e+06"),
    ("gamma: .inf", "--gamma must be a finite number >= 0"),
    ("batch_size: 99999999999", "--batch-size must be an integer from 2 to"),
])
def test_bench_config_with_an_unusable_number_is_one_line(tmp_path, capsys, setting, says):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: bad\ndataset: digits\ninitial: 20\nbudget: 10\nrounds: 1\n"
                   f"val_size: 100\nepochs: 1\n{setting}\nstrategies: [random]\nseeds: [0]\n")
    assert main(["bench", str(cfg), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dalbt: error:") and says in err[0], err
