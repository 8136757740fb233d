"""The page's API for undo and the model's guess, and the accuracy-history chart's axis."""

from __future__ import annotations

import pytest

from dalbt.labelling.project import Project
from dalbt.labelling.server import history_figure
from tests.test_serve import client, db_rows, make_project, pending_ids


@pytest.fixture
def proj(tmp_path):
    return make_project(tmp_path, n=20, budget=6)


def test_state_sends_path_guess_and_confidence(proj):
    with Project(proj) as p:
        first = p.pending()[0]
        with p.transaction() as db:  # as a trained round would have stored them
            db.execute("UPDATE queue SET predicted = '7', confidence = 0.875 "
                       "WHERE image_id = ?", (first.image_id,))
    items = client(proj).get("/api/state").json()["pending"]
    assert items[0] == {"image_id": first.image_id, "round": 0, "position": 0,
                        "path": first.path, "predicted": "7", "confidence": 0.875}
    assert all(it["predicted"] is None and it["confidence"] is None for it in items[1:])
    assert all(it["path"].endswith(".png") for it in items)


def test_label_undo_and_refusal_after_another_tab(proj):
    c = client(proj, user="srv")
    a, b = pending_ids(proj)[:2]
    r = c.post("/api/label", json={"image_id": a, "label": "3", "who": "tab-a"}).json()
    assert r["label_id"] == db_rows(proj, "SELECT MAX(id) FROM labels")[0][0]
    mine = r["label_id"]
    # tab B labels another image: undoing tab A's label leaves B's alone
    theirs = c.post("/api/label", json={"image_id": b, "label": "4"}).json()["label_id"]
    u = c.post("/api/undo", json={"label_id": mine, "who": "tab-a"})
    assert u.status_code == 200
    assert u.json() == {"ok": True, "image_id": a, "round": 0, "label_id": theirs + 1,
                        "restored": None, "kind": "none"}
    assert a in pending_ids(proj) and b not in pending_ids(proj)
    assert db_rows(proj, "SELECT image_id, label, kind, who, source FROM labels ORDER BY id") == [
        (a, "3", "class", "tab-a", "web"), (b, "4", "class", "srv", "web"),
        (a, None, "none", "tab-a", "web-undo")]
    state = c.get("/api/state").json()
    assert state["progress"]["labelled"] == 1 and state["progress"]["per_class"]["4"] == 1
    # B then labels A's image: A's old label can no longer be undone
    again = c.post("/api/label", json={"image_id": a, "label": "8"}).json()["label_id"]
    c.post("/api/label", json={"image_id": a, "label": "9"})
    refused = c.post("/api/undo", json={"label_id": again})
    assert refused.status_code == 409
    assert "labelled again since" in refused.json()["detail"]
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 5  # nothing written
    assert c.post("/api/undo", json={"label_id": 10**6}).status_code == 404


def test_skip_undo(proj):
    c = client(proj)
    a = pending_ids(proj)[0]
    assert c.post("/api/skip", json={"image_id": a}).json() == {"ok": True, "image_id": a,
                                                                "round": 0}
    assert a not in pending_ids(proj)
    assert c.post("/api/undo", json={"image_id": a, "round": 0}).status_code == 200
    assert pending_ids(proj)[0] == a
    again = c.post("/api/undo", json={"image_id": a, "round": 0})
    assert again.status_code == 409 and "no longer skipped" in again.json()["detail"]
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 0


@pytest.mark.parametrize("body", [{}, {"label_id": 1, "image_id": 2, "round": 0},
                                  {"image_id": 2}, {"label_id": "1"}, {"label_id": -1}])
def test_undo_rejects_bad_bodies(proj, body):
    r = client(proj).post("/api/undo", json=body)
    assert r.status_code == 422 and r.json()["detail"]


def _round(n_labelled, val_acc, batch_acc=None):
    return {"round": 0, "method": "dalbt", "n_labelled": n_labelled, "val_acc": val_acc,
            "batch_acc": batch_acc, "batch_size": 10, "batch_labelled": 10}


def _x_ticks(fig):
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi], (lo, hi)


@pytest.mark.parametrize("xs", [[19], [19, 20], [8, 18, 28, 38]])
def test_history_chart_has_whole_number_label_ticks(xs):
    fig = history_figure([_round(x, 0.5 + 0.01 * k, 0.4) for k, x in enumerate(xs)])
    ticks, (lo, hi) = _x_ticks(fig)
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    assert lo < min(xs) and max(xs) < hi  # every point inside, none on the frame
    if len(xs) == 1:
        assert (lo, hi) == (18, 20)


def test_history_chart_without_accuracy_has_no_axes():
    fig = history_figure([_round(0, None)])
    assert not fig.axes[0].axison
