"""The labelling project: state, labels, queries, safety of paths, crashes and concurrency."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalbt.errors import DalbtError
from dalbt.labelling.images import scan_images
from dalbt.labelling.project import SCHEMA_VERSION, Project, is_loopback, parse_classes
from tests.conftest import sklearn_digits

CLASSES = [str(c) for c in range(10)]
# few steps per query: the tests check which images are queried and recorded, not accuracy
TINY = {"train": {"epochs": 2}, "cold_start_epochs": 1, "min_steps": 10}


def write_digits(folder: Path, n: int, sub: dict[int, str] | None = None) -> dict[str, int]:
    """Write ``n`` digits as PNGs; returns relative path -> true class."""
    d = sklearn_digits()
    truth = {}
    for i in range(n):
        rel = f"{sub[i]}/d{i:03d}.png" if sub and i in sub else f"d{i:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).save(folder / rel)
        truth[rel] = int(d.target[i])
    return truth


@pytest.fixture
def project(tmp_path):
    images = tmp_path / "images"
    truth = write_digits(images, 60)
    with Project.init(tmp_path / "proj", images, CLASSES, log=lambda m: None, **TINY) as p:
        yield p, truth


def _label_pending(p, truth, who="tester"):
    path = {i: rel for rel, i in p.image_ids().items()}
    for item in p.pending():
        p.add_label(item.image_id, str(truth[path[item.image_id]]), who=who, source="web")


def test_init_records_images_hashes_and_initial_labels(tmp_path):
    images = tmp_path / "images"
    truth = write_digits(images, 12, sub={0: "3", 1: "3", 2: "notaclass"})
    (images / "labels.csv").write_text(f"path,label\nd005.png,{truth['d005.png']}\n")
    (images / ".hidden.png").write_bytes(b"x")
    (images / "notes.txt").write_text("not an image")
    p = Project.init(tmp_path / "proj", images, CLASSES, labels_csv=images / "labels.csv",
                     log=lambda m: None)
    assert p.image_count() == 12
    ids = p.image_ids()
    assert "3/d000.png" in ids and "notaclass/d002.png" in ids and ".hidden.png" not in ids
    labels = {rel: p.current_labels().get(i) for rel, i in ids.items()}
    # class sub-folders label their images; other folders do not; the CSV adds more
    assert labels["3/d000.png"] == "3" and labels["3/d001.png"] == "3"
    assert labels["notaclass/d002.png"] is None and ids["notaclass/d002.png"] not in \
        p.current_labels()
    assert labels["d005.png"] == str(truth["d005.png"])
    rel, digest, status = p.image(ids["d005.png"])
    import hashlib
    assert digest == hashlib.sha256((images / "d005.png").read_bytes()).hexdigest()
    assert status == "ok" and p.config.image_size == 8 and p.config.channels == 1
    hist = p.label_history()
    assert {h["source"] for h in hist} == {"init"} and len(hist) == 3
    # opening it again reads the same config; a second init is refused
    assert Project(tmp_path / "proj").classes == CLASSES
    with pytest.raises(DalbtError, match="already holds"):
        Project.init(tmp_path / "proj", images, CLASSES, log=lambda m: None)


@pytest.mark.parametrize("csv_text, match", [
    ("path,label\nmissing.png,3\n", "no image 'missing.png'"),
    ("path,label\nd000.png,cat\n", "unknown class 'cat'"),
    ("d000.png\n", "expected 'path,label'"),
])
def test_init_rejects_bad_label_files(tmp_path, csv_text, match):
    images = tmp_path / "images"
    write_digits(images, 3)
    (tmp_path / "l.csv").write_text(csv_text)
    with pytest.raises(DalbtError, match=match):
        Project.init(tmp_path / "proj", images, CLASSES, labels_csv=tmp_path / "l.csv",
                     log=lambda m: None)
    assert not (tmp_path / "proj" / "project.sqlite").exists()


def test_bad_init_arguments(tmp_path):
    with pytest.raises(DalbtError, match="does not exist"):
        Project.init(tmp_path / "p", tmp_path / "nowhere", CLASSES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DalbtError, match="no images found"):
        Project.init(tmp_path / "p", tmp_path / "empty", CLASSES)
    write_digits(tmp_path / "imgs", 2)
    with pytest.raises(DalbtError, match="at least 2 classes"):
        Project.init(tmp_path / "p", tmp_path / "imgs", ["only"])
    with pytest.raises(DalbtError, match="name the classes"):
        Project.init(tmp_path / "p", tmp_path / "imgs", [])
    with pytest.raises(DalbtError, match="unique"):
        parse_classes("a,b,a", None)
    assert parse_classes(" a, b ,c ", None) == ["a", "b", "c"]
    with pytest.raises(DalbtError, match="not a dalbt labelling project"):
        Project(tmp_path / "nothing")


def test_symlinks_leaving_the_root_are_not_scanned_nor_served(tmp_path):
    images = tmp_path / "images"
    write_digits(images, 3)
    secret = tmp_path / "secret.png"
    Image.new("L", (8, 8)).save(secret)
    (images / "escape.png").symlink_to(secret)
    (images / "inside.png").symlink_to(images / "d000.png")
    paths, warnings = scan_images(images)
    assert "escape.png" not in paths and "inside.png" in paths
    assert any("escape.png" in w for w in warnings)
    p = Project.init(tmp_path / "proj", images, CLASSES, log=lambda m: None)
    for rel in ("../secret.png", "/etc/passwd", "escape.png", "a/../../secret.png", ""):
        with pytest.raises(DalbtError):
            p.safe_path(rel)
    assert p.safe_path("d000.png") == images / "d000.png"
    # a row pointing outside (e.g. a tampered database) is refused and marked, never read
    with p.transaction() as db:
        cur = db.execute("INSERT INTO images (path, sha256, added) VALUES ('../secret.png', "
                         "'x', 'now')")
    bad = cur.lastrowid
    with pytest.raises(DalbtError, match="outside the image folder"):
        p.read_image(bad)
    assert p.image(bad)[2] == "unreadable"
    # the symlink is replaced after init by one that escapes: refused at read time too
    os.unlink(images / "inside.png")
    (images / "inside.png").symlink_to(secret)
    with pytest.raises(DalbtError, match="outside the image folder"):
        p.read_image(p.image_ids()["inside.png"])


def test_labels_are_append_only_and_close_the_queue(project):
    p, truth = project
    res = p.query(5, progress=False, log=lambda m: None)
    assert res.method == "cold-start" and len(res.queued) == 5 == len(set(res.queued))
    first = res.queued[0]
    p.add_label(first, "3", who="ann", source="web")
    p.add_label(first, "4", who="bob", source="web")
    assert p.current_labels()[first] == "4"
    assert [(h["label"], h["who"]) for h in p.label_history()] == [("3", "ann"), ("4", "bob")]
    p.add_label(res.queued[1], None, who="ann")  # none of these classes
    p.skip(res.queued[2])
    status = {q.image_id: q.status for q in p.queue(0)}
    assert status[first] == "done" and status[res.queued[1]] == "done"
    assert status[res.queued[2]] == "skipped"
    assert [q.image_id for q in p.pending()] == res.queued[3:]
    assert p.progress()["ood"] == 1 and p.progress()["labelled"] == 1
    with pytest.raises(DalbtError, match="unknown class 'cat'"):
        p.add_label(first, "cat")
    with pytest.raises(DalbtError, match="no image with id"):
        p.add_label(10_000, "3")


def test_queries_exclude_labelled_ood_and_pending_and_are_deterministic(tmp_path):
    images = tmp_path / "images"
    truth = write_digits(images, 60)
    runs = []
    for name in ("a", "b"):
        p = Project.init(tmp_path / name, images, CLASSES, log=lambda m: None, **TINY)
        r0 = p.query(8, progress=False, log=lambda m: None)
        _label_pending(p, truth)
        ood = p.query(8, progress=False, log=lambda m: None).queued
        p.add_label(ood[0], None)
        r2 = p.query(8, progress=False, log=lambda m: None)
        runs.append((r0.queued, ood, r2.queued))
        labelled = set(p.current_labels())
        pending_before = set(ood[1:])
        assert not set(r2.queued) & (labelled | pending_before)
        assert r2.method == "dalbt" and r2.round == 2 and r2.n_labelled == 8
        rounds = p.rounds()
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert rounds[1]["batch_labelled"] == 1 and (p.directory / "checkpoints").is_dir()
    assert runs[0] == runs[1]  # same seed, same labels: same queues


def test_validation_split_is_stable_and_gives_accuracy(tmp_path):
    images = tmp_path / "images"
    truth = write_digits(images, 80)
    p = Project.init(tmp_path / "proj", images, CLASSES, log=lambda m: None, val_fraction=0.3,
                     min_val=5, **TINY)
    ids = p.image_ids()
    for rel, i in list(ids.items())[:50]:
        p.add_label(i, str(truth[rel]))
    r = p.query(5, progress=False, log=lambda m: None)
    rounds = p.rounds()
    assert rounds[0]["n_val"] >= 5 and r.val_acc is not None and 0 <= r.val_acc <= 1
    # the role, written out: held out when sha256("seed:content hash") falls in the first 30 %
    import hashlib

    def held_out(i):
        h = hashlib.sha256(f"0:{p.image(i)[1]}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < 0.3

    labelled = [i for _, i in list(ids.items())[:50]]
    assert rounds[0]["n_val"] == sum(held_out(i) for i in labelled)
    assert rounds[0]["n_labelled"] == 50
    # labelling more keeps every earlier image's role: n_val grows by the new held-out ones only
    more = [i for _, i in list(ids.items())[50:70] if i not in r.queued]
    for i in more:
        rel = next(k for k, v in ids.items() if v == i)
        p.add_label(i, str(truth[rel]))
    for i in r.queued:
        p.add_label(i, None)  # none of these classes: never a validation image
    p.query(5, progress=False, log=lambda m: None)
    assert p.rounds()[1]["n_val"] == sum(held_out(i) for i in labelled + more)


def test_changed_and_unreadable_images_are_reported_and_skipped(project):
    p, truth = project
    ids = p.image_ids()
    root = p.root
    Image.new("L", (8, 8), 255).save(root / "d001.png")  # changed after init
    (root / "d002.png").write_bytes(b"garbage")  # changed too (hash differs)
    os.unlink(root / "d003.png")
    msgs = []
    res = p.query(10, progress=False, log=msgs.append)
    bad = {ids["d001.png"], ids["d002.png"], ids["d003.png"]}
    assert not bad & set(res.queued)
    assert {rel for rel, _ in res.skipped_images} == {"d001.png", "d002.png", "d003.png"}
    assert sum("skipped" in m for m in msgs) == 3
    assert {(rel, st) for rel, st, _ in p.problems()} == {
        ("d001.png", "changed"), ("d002.png", "changed"), ("d003.png", "missing")}
    with pytest.raises(DalbtError, match="changed on disk"):
        p.read_image(ids["d001.png"])


def test_query_errors(project):
    p, truth = project
    with pytest.raises(DalbtError, match="positive"):
        p.query(0)
    p.query(60, progress=False, log=lambda m: None)
    with pytest.raises(DalbtError, match="nothing left"):
        p.query(5, progress=False, log=lambda m: None)


def test_second_query_is_refused_while_one_runs(project):
    import fcntl

    p, _ = project
    with open(p.directory / "query.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert p.query_running()
        with pytest.raises(DalbtError, match="another query"):
            p.query(3, progress=False, log=lambda m: None)
    assert not p.query_running()


def test_concurrent_labellers_lose_nothing(project):
    p, truth = project
    ids = list(p.image_ids().values())
    errors = []

    def worker(who):
        try:
            with Project(p.directory) as mine:  # one connection per labeller, as two tabs
                for k in range(40):
                    mine.add_label(ids[k % len(ids)], str(k % 10), who=who, source="web")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"u{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    hist = p.label_history()
    assert len(hist) == 120
    for n in range(3):
        assert sum(h["who"] == f"u{n}" for h in hist) == 40


def _subprocess(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_killed_labeller_loses_no_acknowledged_label(project):
    p, _ = project
    proc = _subprocess(f"""
        from dalbt.labelling.project import Project
        p = Project({str(p.directory)!r})
        ids = sorted(p.image_ids().values())
        k = 0
        while True:
            p.add_label(ids[k % len(ids)], str(k % 10), who="killed", source="web")
            print(k, flush=True)
            k += 1
    """)
    acked = -1
    deadline = time.time() + 60
    while acked < 30 and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert acked >= 30, proc.stderr.read()
    # every label the process printed (after its commit returned) is in the database
    with sqlite3.connect(p.directory / "project.sqlite") as db:
        n = db.execute("SELECT COUNT(*) FROM labels WHERE who = 'killed'").fetchone()[0]
    assert n >= acked + 1


@pytest.mark.slow
def test_killed_query_leaves_no_half_batch_and_can_rerun(tmp_path):
    images = tmp_path / "images"
    write_digits(images, 60)
    p = Project.init(tmp_path / "proj", images, CLASSES, log=lambda m: None,
                     train={"epochs": 2}, cold_start_epochs=2000)
    proc = _subprocess(f"""
        import torch
        torch.set_num_threads(1)
        from dalbt.labelling.project import Project
        p = Project({str(p.directory)!r})
        print("start", flush=True)
        p.query(10, progress=False)
    """)
    assert proc.stdout.readline().strip() == "start"
    deadline = time.time() + 30
    while not p.query_running() and time.time() < deadline:
        time.sleep(0.05)
    assert p.query_running()
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not p.query_running()  # the lock dies with the process
    assert p.rounds() == [] and p.pending() == []
    with p.transaction() as db:  # a shorter cold start for the rerun
        import json
        cfg = json.loads(db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
        cfg["cold_start_epochs"] = 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(cfg),))
    res = Project(p.directory).query(10, progress=False, log=lambda m: None)
    assert res.round == 0 and len(p.pending()) == 10


def test_cli_init_query_and_errors(tmp_path, capsys):
    from dalbt.cli import main

    images = tmp_path / "images"
    write_digits(images, 30)
    proj = str(tmp_path / "proj")
    assert main(["init", proj, "--images", str(images), "--classes", ",".join(CLASSES),
                 "--epochs", "2", "--cold-start-epochs", "1"]) == 0
    assert main(["query", proj, "--budget", "5", "--threads", "1"]) == 0
    assert "queued 5 images in round 0" in capsys.readouterr().out
    assert main(["query", str(tmp_path / "nope"), "--budget", "5"]) == 2
    assert "not a dalbt labelling project" in capsys.readouterr().err
    assert main(["init", proj + "2", "--images", str(images), "--classes", "a,b",
                 "--classes-file", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    code, err = _cli(["init", proj + "3", "--images", str(images), "--classes", "a,b",
                      "--val-fraction", "1.5"])
    assert code == 2
    assert "--val-fraction: expected a finite number >= 0 and < 1, got '1.5'" in err[0]


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert not is_loopback("example.com") and not is_loopback("")


def test_add_labels_is_all_or_nothing_and_can_skip_unchanged(project):
    p, _ = project
    ids = sorted(p.image_ids().values())[:3]
    with pytest.raises(DalbtError, match="unknown class 'cat'"):
        p.add_labels([(ids[0], "1", "a"), (ids[1], "cat", "a")], "test")
    assert p.label_history() == []
    assert p.add_labels([(ids[0], "1", "a"), (ids[1], None, "a")], "test") == (2, 0)
    assert p.add_labels([(ids[0], "1", "b"), (ids[1], "2", "b"), (ids[2], None, None)], "test",
                        skip_unchanged=True) == (2, 1)
    assert p.current_labels() == {ids[0]: "1", ids[1]: "2", ids[2]: None}
    assert len({h["at"] for h in p.label_history() if h["who"] == "b"}) == 1


def test_label_history_current_only(project):
    p, _ = project
    ids = sorted(p.image_ids().items())[:2]
    p.add_label(ids[1][1], "1", who="a")
    p.add_label(ids[0][1], "2", who="a")
    p.add_label(ids[1][1], None, who="b")
    cur = p.label_history(current_only=True)
    assert [(h["path"], h["label"], h["who"]) for h in cur] == [
        (ids[0][0], "2", "a"), (ids[1][0], None, "b")]
    assert len(p.label_history()) == 3


def _cli(args):
    """``(exit code, stderr lines)`` of ``dalbt ARGS`` run in this process."""
    import contextlib
    import io

    from dalbt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse rejects before main's handler
            code = exc.code
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("args, says", [
    (["--model", "nosuch"], ["unknown model 'nosuch'", "lenet", "resnet18", "vgg16"]),
    (["--strategy", "nosuch"], ["unknown strategy 'nosuch'", "dalbt"]),
    (["-O", "nosuch=1"], ["bad options for strategy 'dalbt'", "nosuch"]),
    (["--gamma", "nan"], ["--gamma", "'nan'", ">= 0"]),
    (["--gamma", "inf"], ["--gamma", "'inf'"]),
    (["--gamma", "-0.5"], ["--gamma", "'-0.5'"]),
    (["--val-fraction", "nan"], ["--val-fraction", "'nan'", ">= 0 and < 1"]),
    (["--val-fraction", "1"], ["--val-fraction", ">= 0 and < 1"]),
    (["--image-size", "100000"], ["--image-size", "100000", "512"]),
    (["--image-size", "4"], ["--image-size", "from 8", "'lenet'", "got 4"]),
    (["--epochs", "0"], ["--epochs", "positive"]),
    (["--seed", "-1"], ["--seed", ">= 0"]),
    (["--channels", "2"], ["--channels", "invalid choice"]),
])
def test_cli_init_rejects_bad_settings_and_writes_nothing(tmp_path, args, says):
    write_digits(tmp_path / "images", 4)
    proj = tmp_path / "new" / "proj"
    code, err = _cli(["init", str(proj), "--images", str(tmp_path / "images"),
                      "--classes", "a,b", *args])
    assert code == 2 and len(err) == 1 and "error:" in err[0], err
    assert all(s in err[0] for s in says), err[0]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command, args, says", [
    ("query", ["--budget", "0"], ["--budget", "from 1"]),
    ("query", ["--budget", "5", "--threads", "100000000000"], ["--threads", "100000000000"]),
    ("query", ["--budget", "nan"], ["--budget", "'nan'"]),
    ("serve", ["--port", "70000"], ["--port", "0 to 65535", "70000"]),
    ("serve", ["--port", "-1"], ["--port", "-1"]),
    ("serve", ["--port", "http"], ["--port", "'http'"]),
    ("serve", ["--budget", "0"], ["--budget"]),
])
def test_cli_query_and_serve_reject_out_of_range_numbers(tmp_path, command, args, says):
    code, err = _cli([command, str(tmp_path), *args])
    assert code == 2 and len(err) == 1 and "error:" in err[0], err
    assert all(s in err[0] for s in says), err[0]


@pytest.mark.parametrize("settings, match", [
    ({"model": "nosuch"}, "unknown model 'nosuch'; known models: lenet"),
    ({"strategy": "nosuch"}, "unknown strategy 'nosuch'"),
    ({"strategy_options": {"nosuch": 1}}, "bad options"),
    ({"train": {"gamma": float("nan")}}, "--gamma must be a finite number >= 0, got nan"),
    ({"train": {"lr": float("inf")}}, "--lr must be a finite number > 0"),
    ({"train": {"lr": 0.0}}, "--lr"),
    ({"train": {"batch_size": 0}}, "--batch-size must be an integer from 2"),
    ({"val_fraction": float("nan")}, "--val-fraction"),
    ({"image_size": 10_000}, "--image-size for model 'lenet' must be an integer from 8 to 512"),
    ({"image_size": 2.5}, "--image-size"),
    ({"cold_start_epochs": -1}, "--cold-start-epochs"),
    ({"train": {"amp": "fp8"}}, "--amp"),
])
def test_init_validates_settings_before_writing(tmp_path, settings, match):
    write_digits(tmp_path / "images", 4)
    with pytest.raises(DalbtError, match=match.replace("(", r"\(").replace(")", r"\)")):
        Project.init(tmp_path / "new" / "proj", tmp_path / "images", CLASSES,
                     log=lambda m: None, **settings)
    assert not (tmp_path / "new").exists()


def test_failed_init_leaves_no_database_nor_folder(tmp_path, monkeypatch):
    import dalbt.labelling.project as project_mod

    write_digits(tmp_path / "images", 4)
    calls = []

    def unreadable(data):
        calls.append(1)
        if len(calls) == 3:
            raise PermissionError(13, "Permission denied")
        return "0" * 64

    monkeypatch.setattr(project_mod, "sha256_bytes", unreadable)
    with pytest.raises(DalbtError, match="cannot read image d002.png .*Permission denied"):
        Project.init(tmp_path / "new" / "proj", tmp_path / "images", CLASSES,
                     log=lambda m: None)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays, empty of project files
    calls.clear()
    with pytest.raises(DalbtError):
        Project.init(tmp_path / "kept", tmp_path / "images", CLASSES, log=lambda m: None)
    assert list((tmp_path / "kept").iterdir()) == []


def test_query_refuses_a_stored_setting_it_cannot_train_with(project):
    import json

    p, _ = project
    with p.transaction() as db:
        cfg = json.loads(db.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
        cfg["model"] = "nosuch"
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(cfg),))
    with pytest.raises(DalbtError, match="holds a setting .*unknown model 'nosuch'.*dalbt init"):
        Project(p.directory).query(5, progress=False, log=lambda m: None)
    assert p.rounds() == []


def test_marked_images_are_rechecked_at_each_query(project, monkeypatch):
    p, truth = project
    ids = p.image_ids()
    root = p.root
    original = {rel: (root / rel).read_bytes() for rel in ("d001.png", "d002.png", "d003.png")}
    Image.new("L", (8, 8), 255).save(root / "d001.png")  # changed
    (root / "d002.png").write_bytes(b"garbage")  # changed
    os.unlink(root / "d003.png")  # missing
    msgs = []
    first = p.query(5, progress=False, log=msgs.append)
    assert {rel for rel, _ in first.skipped_images} == {"d001.png", "d002.png", "d003.png"}
    assert {(rel, st) for rel, st, _ in p.problems()} == {
        ("d001.png", "changed"), ("d002.png", "changed"), ("d003.png", "missing")}

    # d001 restored byte for byte; d002 untouched since it was marked: not even read again
    (root / "d001.png").write_bytes(original["d001.png"])
    checked = []
    real = Project._check_content
    monkeypatch.setattr(Project, "_check_content", staticmethod(
        lambda full, rel, *a: checked.append(rel) or real(full, rel, *a)))
    msgs.clear()
    second = p.query(5, progress=False, log=msgs.append)
    assert checked == ["d001.png"]
    assert second.restored_images == ["d001.png"] and second.skipped_images == []
    assert any(m.startswith("restored: d001.png (marked changed)") for m in msgs), msgs
    assert any(m.startswith("still changed: 1 image") and "d002.png" in m for m in msgs), msgs
    assert any(m.startswith("still missing: 1 image") and "d003.png" in m for m in msgs), msgs
    assert {rel for rel, _, _ in p.problems()} == {"d002.png", "d003.png"}
    assert p.image(ids["d001.png"])[2] == "ok"

    # back in the pool: everything not queued yet is queued now, d001 included
    queued_before = {q.image_id for q in p.pending()}
    third = p.query(100, progress=False, log=lambda m: None)
    assert queued_before | set(third.queued) == set(ids.values()) - {ids["d002.png"],
                                                                       ids["d003.png"]}
    assert ids["d001.png"] in set(second.queued) | set(third.queued)

    # d002 and d003 come back too once restored; a changed file that is deleted is 'missing'
    (root / "d002.png").write_bytes(original["d002.png"])
    (root / "d003.png").write_bytes(original["d003.png"])
    assert sorted(p.recheck_images()) == [("d002.png", "changed", "ok"),
                                          ("d003.png", "missing", "ok")]
    assert p.problems() == []


def test_recheck_of_a_changed_file_that_vanished_or_changed_again(project):
    p, _ = project
    root = p.root
    ids = p.image_ids()
    (root / "d004.png").write_bytes(b"garbage")
    (root / "d005.png").write_bytes(b"other garbage")
    for rel in ("d004.png", "d005.png"):
        with pytest.raises(DalbtError, match="changed on disk"):
            p.read_image(ids[rel])
    os.unlink(root / "d004.png")
    (root / "d005.png").write_bytes(b"garbage, again")
    assert p.recheck_images() == [("d004.png", "changed", "missing"),
                                  ("d005.png", "changed", "changed")]
    msgs = []
    p.query(3, progress=False, log=msgs.append)
    assert "still changed: 1 image left out (d005.png)" in " ".join(msgs)


def test_project_made_before_file_stat_gets_the_column(project):
    p, _ = project
    with p.transaction() as db:
        db.execute("ALTER TABLE images DROP COLUMN file_stat")
    old = Project(p.directory)
    os.unlink(old.root / "d006.png")
    with pytest.raises(DalbtError, match="cannot be read"):
        old.read_image(old.image_ids()["d006.png"])
    assert old.problems() == [("d006.png", "missing",
                               "cannot read: No such file or directory")]
    assert Project(p.directory)._meta("schema_version") == str(SCHEMA_VERSION)


def test_image_warnings_name_the_image_path(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    write_digits(tmp_path / "images", 12)
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png at all")
    msgs = []
    p = Project.init(tmp_path / "proj", tmp_path / "images", CLASSES, log=msgs.append, **TINY)
    p.query(3, progress=False, log=msgs.append)
    text = "\n".join(msgs)
    assert "warning: skipped bad.png: image bad.png cannot be decoded: not an image file " \
           "Pillow can read" in text
    assert "BytesIO" not in text and "0x" not in text
    # PIL's own warnings (here: a possible decompression bomb) name the file too
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 40)  # an 8x8 digit has 64 pixels
    for f in (p.directory / "cache").iterdir():
        f.unlink()
    msgs.clear()
    p.query(3, progress=False, log=msgs.append)
    bomb = [m for m in msgs if "decompression bomb" in m]
    assert len(bomb) == 12 and all(m.startswith("warning: d0") and ".png: Image size" in m
                                   for m in bomb), msgs
    assert "still unreadable: 1 image left out (bad.png)" in "\n".join(msgs)


def test_load_images_warnings_name_the_file(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from dalbt.data.formats import load_images

    write_digits(tmp_path, 2)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 40)
    with pytest.warns(PILImage.DecompressionBombWarning) as caught:
        load_images([tmp_path / "d000.png", tmp_path / "d001.png"])
    assert {str(w.message).split(": Image size")[0] for w in caught} == {
        str(tmp_path / "d000.png"), str(tmp_path / "d001.png")}
