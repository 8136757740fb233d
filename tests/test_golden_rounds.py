"""The refactored AL round reproduces the rounds stored before it.

``tests/data/golden_rounds.json`` was written by the code before "one round, written once"
(``python -m tests.test_golden_rounds --write``); each scenario here is run again and must give
the same queried indices and the same accuracies and losses. Timings are not compared.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).parent / "data" / "golden_rounds.json"
LOOP_STRATEGIES = ("random", "margin", "weibull", "coreset", "badge", "bald", "ensemble-varratio")
_METRICS = ("n_labelled", "test_acc", "val_acc", "best_epoch", "train_ce", "train_bt", "n_ood")


def _loop_rounds(tmp: Path, strategy: str, **train: object) -> list[dict]:
    from dalbt.data import load_dataset
    from dalbt.loop import RunConfig, run_experiment
    from dalbt.store import Store
    from dalbt.train import TrainConfig

    cfg = RunConfig(dataset="digits", strategy=strategy, initial=20, budget=10, rounds=2,
                    seed=5, val_size=100, train=TrainConfig(epochs=2, **train))
    store = Store(tmp / f"{strategy}-{len(train)}")
    run = run_experiment(cfg, store, progress=False, data=load_dataset("digits"),
                         log=lambda _: None)
    rounds = [{**{k: rec[k] for k in _METRICS if k in rec}, "round": rec["round"],
               "queried": [int(i) for i in rec["queried"]]} for rec in store.rounds(run.id)]
    store.close()
    return rounds


def _full_data(tmp: Path) -> list[dict]:
    from dalbt.bench import run_full_data
    from dalbt.loop import RunConfig
    from dalbt.store import Store
    from dalbt.train import TrainConfig

    cfg = RunConfig(dataset="digits", initial=20, budget=10, rounds=2, seed=5, val_size=100,
                    train=TrainConfig(epochs=1))
    store = Store(tmp / "full")
    run = run_full_data(cfg, store, log=lambda _: None)
    rounds = [{k: rec[k] for k in _METRICS if k in rec} for rec in store.rounds(run.id)]
    store.close()
    return rounds


def _project(tmp: Path) -> list[dict]:
    from dalbt.labelling.project import Project
    from tests.test_project import CLASSES, write_digits

    images = tmp / "images"
    truth = write_digits(images, 90)
    out = []
    with Project.init(tmp / "proj", images, CLASSES, log=lambda m: None, strategy="margin",
                      cold_start_strategy="coreset", min_val=2, min_steps=20, train={"epochs": 2},
                      cold_start_epochs=1) as p:
        path = {i: rel for rel, i in p.image_ids().items()}
        for _ in range(3):
            res = p.query(15, progress=False, log=lambda m: None)
            out.append({"round": res.round, "method": res.method, "queued": res.queued,
                        "n_labelled": res.n_labelled, "val_acc": res.val_acc,
                        "predicted": [r[0] for r in p.db.execute(
                            "SELECT predicted FROM queue WHERE round = ? ORDER BY position",
                            (res.round,))]})
            for item in p.pending():
                p.add_label(item.image_id, str(truth[path[item.image_id]]), who="t",
                            source="web")
    return out


def collect(tmp: Path) -> dict:
    torch.set_num_threads(1)
    loop = {s: _loop_rounds(tmp, s) for s in LOOP_STRATEGIES}
    loop["random+pretrain+warm"] = _loop_rounds(tmp, "random", pretrain_epochs=1,
                                                warm_start=True)
    return {"loop": loop, "full_data": _full_data(tmp), "project": _project(tmp)}


def _same(a: object, b: object, where: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{where}: {a} != {b}"
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_rounds_identical_to_the_stored_golden_rounds(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = collect(tmp_path)
    _same(now, golden, "rounds")
    # the scenarios do query: a golden of empty queries would compare nothing
    assert all(len(r[0]["queried"]) == 10 for r in golden["loop"].values())
    assert np.sum([len(q["queued"]) for q in golden["project"]]) == 45


if __name__ == "__main__":
    import tempfile

    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.test_golden_rounds --write")
    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps(collect(Path(d)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
