"""Run keys: settings added later leave the keys of existing runs as they were."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dalbt.errors import DalbtError
from dalbt.recipe import RunConfig, TrainConfig
from dalbt.store import config_key

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# stores written before the step-recipe settings existed
STORES = [RESULTS / name / "dalbt.sqlite" for name in ("digits-rerun", "fashion-mnist-small")]


@pytest.mark.parametrize("db", STORES, ids=lambda p: p.parent.name)
def test_committed_runs_keep_their_keys(db):
    con = sqlite3.connect(f"file:{db}?immutable=1", uri=True)  # writes no -shm/-wal
    rows = con.execute("SELECT config, key FROM runs").fetchall()
    con.close()
    assert rows
    for config, key in rows:
        assert config_key(RunConfig.from_dict(json.loads(config)).key_dict()) == key


def test_new_settings_enter_the_key_only_away_from_their_defaults():
    base = RunConfig().key_dict()
    for name in ("steps", "schedule", "warmup_steps", "balanced", "ce_augment",
                 "eval_every_steps", "select", "finetune", "amp"):
        assert name not in base["train"]
    changed = {"steps": 500, "schedule": "cosine", "warmup_steps": 10, "balanced": True,
               "ce_augment": True, "select": "last", "finetune": "head", "amp": "bf16"}
    keys = {config_key(base)}
    for name, value in changed.items():
        d = RunConfig(train=TrainConfig(**{name: value})).key_dict()
        assert d["train"][name] == value
        keys.add(config_key(d))
    assert len(keys) == len(changed) + 1


@pytest.mark.parametrize(("settings", "says"), [
    ({"steps": 0}, "--steps must be an integer from 1"),
    ({"schedule": "linear"}, "--schedule must be constant or cosine"),
    ({"select": "worst"}, "--select must be best or last"),
    ({"finetune": "some"}, "--finetune must be all or head"),
    ({"eval_every_steps": 10}, "--eval-every-steps needs the step-based recipe"),
    ({"warmup_steps": -1}, "--warmup-steps must be an integer from 0"),
])
def test_bad_step_settings_are_named(settings, says):
    with pytest.raises(DalbtError, match=says):
        TrainConfig(**settings).check()
