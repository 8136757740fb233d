"""Undo of labels and skips (appended corrections), the queued guess's confidence, and the
migration of projects made before them."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from dalbt.errors import DalbtError
from dalbt.labelling.interchange import export_project
from dalbt.labelling.project import SCHEMA_VERSION, Project, UndoRefused
from tests.test_project import CLASSES, write_digits


@pytest.fixture
def queued(tmp_path):
    """A digits project with a cold-start batch of 6 queued (no training: cold_start_epochs
    0), and its pending image ids."""
    write_digits(tmp_path / "images", 20)
    with Project.init(tmp_path / "proj", tmp_path / "images", CLASSES, cold_start_epochs=0,
                      train={"epochs": 1}, min_steps=2, log=lambda m: None) as p:
        p.query(6, progress=False, log=lambda m: None)
        yield p, [q.image_id for q in p.pending()]


def rows(p: Project) -> list[tuple]:
    return [(h["id"], h["label"], h["kind"], h["who"], h["source"]) for h in p.label_history()]


def status(p: Project, image_id: int) -> list[str]:
    return [q.status for q in p.queue() if q.image_id == image_id]


def test_undo_appends_a_correction_and_requeues(queued):
    p, ids = queued
    a, b = ids[:2]
    first = p.add_label(a, "3", who="ann", source="web")
    p.add_label(b, None, who="ann", source="web")
    assert status(p, a) == ["done"] and p.progress()["labelled"] == 1
    done = p.undo_label(first, who="ann")
    assert (done.image_id, done.label, done.kind, done.round) == (a, None, "none", 0)
    # nothing deleted: the label and its correction are both in the history
    assert rows(p)[0] == (first, "3", "class", "ann", "web")
    assert rows(p)[2] == (done.label_id, None, "none", "ann", "web-undo")
    assert len(p.label_history()) == 3
    # undone means unlabelled everywhere: current labels, progress, exports, the queue
    assert p.current_labels() == {b: None}
    assert status(p, a) == ["pending"] and a in [q.image_id for q in p.pending()]
    prog = p.progress()
    assert (prog["labelled"], prog["ood"], prog["pending"]) == (0, 1, 5)
    assert [h["kind"] for h in p.label_history(current_only=True)] == ["ood"]
    assert export_project(p, "csv").count("\n") == 2  # header and b's ood label
    # the image can be labelled again, and that label undone back to "no label"
    again = p.add_label(a, "5", who="bob", source="web")
    assert p.current_labels()[a] == "5"
    assert p.undo_label(again).kind == "none"
    assert a not in p.current_labels()


def test_undo_restores_the_previous_label(queued):
    p, ids = queued
    a = ids[0]
    p.add_label(a, "2", source="import:x.csv")
    second = p.add_label(a, "7", source="web")
    done = p.undo_label(second, who="carol")
    assert (done.label, done.kind) == ("2", "class")
    assert p.current_labels()[a] == "2"
    assert [r[1:3] for r in rows(p)] == [("2", "class"), ("7", "class"), ("2", "class")]
    # labelled again, the image is not queued again
    assert done.round is None and status(p, a) == ["done"]
    assert a not in [q.image_id for q in p.pending()] and p.progress()["pending"] == 5


def test_undo_is_refused_when_the_image_was_labelled_again(queued):
    p, ids = queued
    a, b = ids[:2]
    mine = p.add_label(a, "1", who="tab-a", source="web")
    theirs_other = p.add_label(b, "4", who="tab-b", source="web")  # another image: no matter
    later = p.add_label(a, "8", who="tab-b", source="web")  # the same image: refuse
    before = rows(p)
    with pytest.raises(UndoRefused, match="labelled again since"):
        p.undo_label(mine)
    assert rows(p) == before and p.current_labels() == {a: "8", b: "4"}
    assert p.undo_label(later).label == "1"  # the latest one can still be undone
    assert p.current_labels() == {a: "1", b: "4"}
    assert theirs_other in [r[0] for r in rows(p)]
    with pytest.raises(DalbtError, match="no label with id 999"):
        p.undo_label(999)


def test_undo_of_a_skip(queued):
    p, ids = queued
    a, b = ids[:2]
    assert p.skip(a) == 0
    assert p.skip(a) is None  # no longer pending: nothing skipped
    assert status(p, a) == ["skipped"]
    p.unskip(a, 0)
    assert status(p, a) == ["pending"]
    with pytest.raises(UndoRefused, match="no longer skipped"):
        p.unskip(a, 0)
    p.skip(b)
    p.add_label(b, "6", source="web")  # labelled since: the skip cannot be undone
    with pytest.raises(UndoRefused):
        p.unskip(b, 0)
    assert status(p, b) == ["done"]
    with pytest.raises(DalbtError, match="not queued in round 3"):
        p.unskip(b, 3)
    assert p.label_history()[-1]["source"] == "web"  # skips write no label rows


def test_undone_images_go_back_to_the_pool_of_the_next_query(queued):
    p, ids = queued
    label = p.add_label(ids[0], "3", source="web")
    p.undo_label(label)
    for i in ids:
        p.skip(i)
    y, lab, val, pool = p._round_split(np.array(sorted(p.image_ids().values())), print)
    assert len(lab) + len(val) == 0 and (y == -1).all()
    assert len(pool) == 20  # the undone image is unlabelled and unqueued again


def test_confidence_is_the_softmax_maximum(queued, monkeypatch):
    """The stored guess and confidence are argmax and max of softmax(logits); none in the
    cold-start batch."""
    import dalbt.al_round as al_round
    from dalbt.outputs import Outputs

    p, ids = queued
    assert {(q.predicted, q.confidence) for q in p.pending()} == {(None, None)}
    for i in ids:
        p.add_label(i, "1" if i % 2 else "2", source="web")
    real = al_round.run_round

    def with_known_logits(*args, **kwargs):
        res = real(*args, **kwargs)
        n = len(res.queried)
        logits = torch.zeros(n, len(CLASSES))
        logits[:, 4] = torch.log(torch.tensor(9.0 * 3))  # p(4) = 27 / (27 + 9) = 0.75
        res.guesses = Outputs(indices=res.queried, logits=logits,
                              latents=torch.zeros(n, 2))
        return res

    monkeypatch.setattr(al_round, "run_round", with_known_logits)
    p.query(2, progress=False, log=lambda m: None)
    new = [q for q in p.pending() if q.round == 1]
    assert [(q.predicted, round(q.confidence, 6)) for q in new] == [("4", 0.75)] * 2


def test_project_made_before_confidence_and_undo_migrates(queued):
    p, ids = queued
    label = p.add_label(ids[0], "3", source="web")
    with p.transaction() as db:  # as a schema-2 project was
        db.execute("ALTER TABLE queue DROP COLUMN confidence")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    old = Project(p.directory)
    assert {q.confidence for q in old.pending()} == {None}  # read without writing
    assert old._meta("schema_version") == "2"
    old.undo_label(label)  # no column needed
    assert ids[0] not in old.current_labels()
    old._ensure_schema()  # what a query does before it writes its queue
    with sqlite3.connect(p.directory / "project.sqlite") as db:
        cols = {r[1] for r in db.execute("PRAGMA table_info(queue)")}
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert "confidence" in cols and version == (str(SCHEMA_VERSION),)
    assert {q.confidence for q in Project(p.directory).pending()} == {None}
