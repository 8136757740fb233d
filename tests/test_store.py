"""Damaged stores and checkpoints: one-line errors naming the file and the way out, never a
traceback or a silent restart; the database file alone is a complete backup."""

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch

from dalbt import store as store_module
from dalbt.cli import main
from dalbt.data import load_dataset
from dalbt.data.pool import make_splits
from dalbt.loop import RunConfig, run_experiment
from dalbt.store import DB_NAME, MANIFEST_NAME, Store
from dalbt.train import TrainConfig
from tests.conftest import Killed

RUN = ["run", "--dataset", "digits", "--strategy", "random", "--initial", "20", "--budget", "10",
       "--rounds", "3", "--epochs", "1", "--val-size", "100", "--threads", "1",
       "--projector", "32-32", "--warm-start", "--pretrain-epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A warm-start, pre-trained run killed after recording round 1, twice over:

    ``live``: the directory afterwards (rounds 0 and 1 in the database, the shared pre-trained
    encoder, the checkpoint of round 1);
    ``image``: the files as a kill -9 at that moment leaves them, with round 1's checkpoint into
    the database file skipped (as if killed between the round's commit and its checkpoint):
    round 0 is in ``dalbt.sqlite``, round 1 only in ``dalbt.sqlite-wal``.
    """
    base = tmp_path_factory.mktemp("killed")
    live, image = base / "live", base / "image"
    record, checkpoint = Store.record_round, Store.checkpoint

    def dying(self, run_id, r, *a, **k):
        if r == 1:  # round 1 stays in the WAL; killed before round 2 starts
            mp.setattr(Store, "checkpoint", lambda self: False)
            record(self, run_id, r, *a, **k)
            shutil.copytree(live, image)
            raise Killed
        return record(self, run_id, r, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "record_round", dying)
        with pytest.raises(Killed):
            main([*RUN, "--out", str(live)])
    assert Store.checkpoint is checkpoint
    return {"live": live, "image": image}


@pytest.fixture
def live(killed, tmp_path):
    return shutil.copytree(killed["live"], tmp_path / "live")


@pytest.fixture
def image(killed, tmp_path):
    return shutil.copytree(killed["image"], tmp_path / "image")


def _fails(capsys, argv, *needles):
    """``dalbt argv`` exits 2 with one 'dalbt: error:' line holding every needle."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("dalbt: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], err
    return lines[0]


def _resume(d):
    return [*RUN, "--out", d, "--resume"]


def _sql(d, *statements):
    con = sqlite3.connect(d / DB_NAME)
    with con:
        for s in statements:
            con.execute(s)
    con.close()


def _rounds_in(path, wal=True):
    """Rounds a database file holds, read from a copy (without its WAL when ``wal`` is
    False)."""
    copy = path.parent / "copy" / path.name
    copy.parent.mkdir(exist_ok=True)
    shutil.copy(path, copy)
    if wal and path.with_name(path.name + "-wal").exists():
        shutil.copy(path.with_name(path.name + "-wal"), copy.with_name(copy.name + "-wal"))
    con = sqlite3.connect(copy)
    try:
        return [r[0] for r in con.execute("SELECT round FROM rounds ORDER BY run_id, round")]
    finally:
        con.close()
        shutil.rmtree(copy.parent)


# -- damaged values in the database ----------------------------------------------------------

@pytest.mark.parametrize("command", ["report", "resume"])
@pytest.mark.parametrize(("sql", "names"), [
    ("UPDATE runs SET config = '{\"dataset\": '", "runs.config"),
    ("UPDATE runs SET config = '[1, 2]'", "runs.config"),
    ("UPDATE runs SET env = 'nan nan'", "runs.env"),
    ("UPDATE runs SET initial = '[1, \"x\"]'", "runs.initial"),
    ("UPDATE rounds SET queried = '[3, 4' WHERE round = 1", "rounds.queried"),
    ("UPDATE rounds SET queried = '[1.5]' WHERE round = 1", "rounds.queried"),
    ("UPDATE rounds SET queried = '{}' WHERE round = 1", "rounds.queried"),
    ("UPDATE rounds SET test_acc = 'high' WHERE round = 1", "rounds.test_acc"),
])
def test_damaged_json_is_one_line_naming_the_run(live, capsys, command, sql, names):
    _sql(live, sql)
    argv = ["report", live] if command == "report" else _resume(live)
    line = _fails(capsys, argv, live / DB_NAME, "run 1", names, "--delete-run 1", "backup")
    if names.startswith("rounds"):
        assert "round 1" in line


@pytest.fixture(scope="module")
def splits():
    n = load_dataset("digits").n_train
    return n, make_splits(n, 100, 20, 0)


@pytest.mark.parametrize(("change", "needle"), [
    ("beyond", "outside the"),
    ("negative", "outside the"),
    ("twice", "more than once"),
    ("validation", "validation split"),
    ("initial", "already labelled in round 0"),
    ("earlier", "already labelled in round 1"),
])
def test_bad_queried_index_is_caught_before_replay(live, capsys, splits, change, needle):
    n, sp = splits
    con = sqlite3.connect(live / DB_NAME)
    q0, q1 = (json.loads(r[0]) for r in con.execute("SELECT queried FROM rounds ORDER BY round"))
    con.close()
    q1[0] = {"beyond": n, "negative": -1, "twice": q1[1], "validation": int(sp.validation[0]),
             "initial": int(sp.initial[0]), "earlier": q0[0]}[change]
    _sql(live, f"UPDATE rounds SET queried = '{json.dumps(q1)}' WHERE round = 1")
    _fails(capsys, _resume(live), live / DB_NAME, "run 1", "round 1", needle, "backup")


def test_replay_checks_labelled_counts_and_round_numbers(live, capsys):
    _sql(live, "UPDATE rounds SET queried = '[5]' WHERE round = 0")
    _fails(capsys, _resume(live), "round 1", "rounds.n_labelled is 30")
    _sql(live, "DELETE FROM rounds WHERE round = 0")
    (live / MANIFEST_NAME).unlink()  # deleted on purpose: not a lost round
    _fails(capsys, _resume(live), live / DB_NAME, "round 0 is missing")


# -- damaged checkpoints ---------------------------------------------------------------------

def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "garbled":  # inside the tensor data: torch.load alone reads it without a word
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(255 - b for b in data[mid:mid + 64])
                         + data[mid + 64:])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "other model":
        torch.save({"weight": torch.zeros(3)}, path)
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(("kind", "how", "checksum", "needles"), [
    ("round", "truncated", True, ["does not match its checksum"]),
    ("round", "truncated", False, ["truncated or damaged", "PytorchStreamReader"]),
    ("round", "garbled", True, ["does not match its checksum"]),
    ("round", "empty", False, ["truncated or damaged"]),
    ("round", "other model", False, ["does not fit the run's model"]),
    ("round", "missing", True, ["is missing"]),
    ("pretrained", "truncated", False, ["truncated or damaged", "pre-train again"]),
    ("pretrained", "garbled", True, ["does not match its checksum", "pre-train again"]),
    ("legacy", "truncated", False, ["truncated or damaged", "use the shared encoder"]),
    ("legacy", "garbled", True, ["does not match its checksum", "use the shared encoder"]),
])
def test_damaged_checkpoint_is_one_line(live, capsys, kind, how, checksum, needles):
    [shared] = (live / "encoders").glob("*.pt")  # the seed's shared pre-trained encoder
    path = {"round": live / "checkpoints" / "run-1-round-1.pt", "pretrained": shared,
            "legacy": live / "checkpoints" / "run-1-pretrained.pt"}[kind]
    if kind == "legacy":  # as a run pre-trained before the shared cache left it
        shutil.move(shared, path)
        shutil.move(f"{shared}.sha256", f"{path}.sha256")
    if not checksum:  # as a checkpoint written before checksums
        path.with_name(f"{path.name}.sha256").unlink()
    _damage(path, how)
    what = {"round": "warm-start checkpoint of run 1 round 1", "pretrained":
            "pre-trained encoder", "legacy": "pre-training checkpoint of run 1"}[kind]
    line = _fails(capsys, _resume(live), path, what, *needles)
    if kind == "round":
        assert "--delete-run 1" in line and "another --out" in line


def test_checkpoints_of_a_lost_run_are_not_reused(live, capsys):
    """A new run that gets the id of a run the database no longer holds must not load that
    run's pre-trained weights."""
    _sql(live, "DELETE FROM rounds", "DELETE FROM runs")
    (live / MANIFEST_NAME).unlink()
    _fails(capsys, [*RUN, "--out", live], "run-1-", "no longer holds", "backup")
    with Store(live) as store:
        assert store.runs() == []  # the refused run is not left behind


def test_delete_run_tool_removes_run_rounds_and_checkpoints(live, capsys):
    _sql(live, "UPDATE runs SET config = 'broken'")
    assert store_module.main([str(live), "--delete-run", "1"]) == 0
    assert not list((live / "checkpoints").iterdir())
    with Store(live) as store:  # the manifest knows: no lost-rounds error
        assert store.runs() == []
    assert json.loads((live / MANIFEST_NAME).read_text())["runs"] == {}
    assert store_module.main([str(live), "--delete-run", "1"]) == 2
    assert "has no run 1" in capsys.readouterr().err


# -- damaged, emptied or locked database files ------------------------------------------------

@pytest.mark.parametrize("command", ["report", "resume"])
def test_empty_database_file(live, capsys, command):
    (live / DB_NAME).write_bytes(b"")
    argv = ["report", live] if command == "report" else _resume(live)
    _fails(capsys, argv, live / DB_NAME, "0 bytes", "backup")


@pytest.mark.parametrize(("where", "needle"), [(0, "file is not a database"),
                                               (2, "integrity check")])
def test_garbled_database_file(live, capsys, where, needle):
    path = live / DB_NAME
    data = bytearray(path.read_bytes())
    data[where * 4096:where * 4096 + 4096] = bytes(range(256)) * 16
    path.write_bytes(bytes(data))
    line = _fails(capsys, ["report", live], path, "not a readable dalbt database", needle)
    assert "another dalbt process" not in line
    _fails(capsys, _resume(live), path, "not a readable dalbt database")


def test_locked_database_names_the_other_process(live, capsys, monkeypatch):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT", 0.1)
    holder = sqlite3.connect(live / DB_NAME)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        _fails(capsys, _resume(live), live / DB_NAME, "is locked", "another dalbt process")
    finally:
        holder.rollback()
        holder.close()


def test_missing_database_with_a_manifest(live, capsys):
    (live / DB_NAME).unlink()
    _fails(capsys, _resume(live), live / DB_NAME, "is missing", "2 finished rounds", "backup")
    _fails(capsys, ["report", live], "is missing")


def test_damaged_manifest(live, capsys):
    (live / MANIFEST_NAME).write_text("{\"runs\": [")
    _fails(capsys, _resume(live), live / MANIFEST_NAME, "is damaged", "delete it")


def test_creating_a_store_is_atomic(tmp_path):
    with Store(tmp_path / "new") as store:
        assert store.path.stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [DB_NAME, MANIFEST_NAME]


# -- lost rounds: the write-ahead log deleted or damaged --------------------------------------

def test_kill_image_holds_round_1_only_in_the_wal(image):
    """The premise of the tests below."""
    assert _rounds_in(image / DB_NAME) == [0, 1]
    assert _rounds_in(image / DB_NAME, wal=False) == [0]


@pytest.mark.parametrize("damage", ["deleted", "garbled header", "garbled frame"])
def test_lost_wal_is_an_error_not_a_restart(image, capsys, damage):
    wal = image / f"{DB_NAME}-wal"
    data = bytearray(wal.read_bytes())
    if damage == "deleted":
        wal.unlink()
    elif damage == "garbled header":
        data[:32] = bytes(32)
        wal.write_bytes(bytes(data))
    else:  # the first frame's page: its checksum fails, so the log is cut there
        data[32 + 24:32 + 24 + 512] = bytes(range(256)) * 2
        wal.write_bytes(bytes(data))
    _fails(capsys, _resume(image), image / DB_NAME, "lost finished rounds", "1 of 2 rounds",
           MANIFEST_NAME, "backup")
    rc = main(["report", str(image), "--out", str(image / "report")])  # reading: a warning
    err = capsys.readouterr().err
    assert rc == 0 and "dalbt: warning:" in err and "1 of 2 rounds" in err
    assert "Traceback" not in err
    (image / MANIFEST_NAME).unlink()  # the user accepts the loss: the run may go on
    with Store(image) as store:
        assert [r["round"] for r in store.rounds(1)] == [0]


def test_database_file_alone_holds_every_round(tmp_path):
    """After each round and at the end of a run, while the store is still open, the database
    file without its WAL is a complete backup."""
    cfg = RunConfig(dataset="digits", strategy="random", initial=20, budget=10, rounds=1,
                    seed=0, val_size=100, projector_dims=(32, 32), train=TrainConfig(epochs=1))
    seen = []
    record = Store.record_round

    def recording(self, run_id, r, *a, **k):
        record(self, run_id, r, *a, **k)
        seen.append(_rounds_in(self.path, wal=False))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Store, "record_round", recording)
        with Store(tmp_path / "s") as store:
            run_experiment(cfg, store, progress=False, log=lambda s: None)
            assert seen == [[0], [0, 1]]
            con = sqlite3.connect(tmp_path / "s" / DB_NAME)  # the file, not the connection
            assert con.execute("SELECT status FROM runs").fetchall() == [("finished",)]
            con.close()
    assert not (tmp_path / "s" / f"{DB_NAME}-wal").exists() or \
        (tmp_path / "s" / f"{DB_NAME}-wal").stat().st_size == 0
    manifest = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    assert [v["rounds"] for v in manifest["runs"].values()] == [2]


def test_existing_store_without_manifest_still_reads(tmp_path):
    """Stores written before the manifest: read as before; the first writer records one."""
    with Store(tmp_path) as store:
        run = store.create_run({"dataset": "digits", "strategy": "random", "seed": 0},
                               np.arange(3))
        store.record_round(run.id, 0, {"n_labelled": 3, "test_acc": 0.5}, np.array([7]))
    (tmp_path / MANIFEST_NAME).unlink()
    with Store(tmp_path, create=False) as store:
        assert [r["queried"].tolist() for r in store.rounds(run.id)] == [[7]]
    assert not (tmp_path / MANIFEST_NAME).exists()  # reading writes nothing
    Store(tmp_path).close()
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["runs"][run.key]["rounds"] == 1
