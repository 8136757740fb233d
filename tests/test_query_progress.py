"""Progress of a labelling query (issue 15): ``Project.query(on_progress=)``, the page's
``/api/state`` ``query.progress`` during a real query, and ``dalbt query``'s phase lines."""

from __future__ import annotations

import time

from dalbt.labelling.project import Project
from dalbt.progress import ProgressEvent
from tests.test_serve import client, make_project


def label_pending(directory) -> None:
    """Give every queued image its true digit (from the file name)."""
    with Project(directory) as p:
        for q in p.pending():
            p.add_label(q.image_id, q.path.split("_")[1][0], who="t", source="api")


def test_project_query_reports_its_phases(tmp_path):
    proj = make_project(tmp_path, n=40, budget=None, cold_start_epochs=2)
    events: list[ProgressEvent] = []
    with Project(proj) as p:
        p.query(8, progress=False, log=lambda m: None, on_progress=events.append)
        cold = [e.phase for e in events]
        assert cold[0] == "pre-training" and cold[-1] == "selecting" and "training" not in cold
        assert [e.done for e in events if e.phase == "pre-training"][-1] == 2
        assert all(e.query_eta_s is None for e in events)  # nothing to go by yet
        for _ in range(2):
            label_pending(proj)
            events.clear()
            p.query(4, progress=False, log=lambda m: None, on_progress=events.append)
            phases = [e.phase for e in events]
            assert phases[0] == "training" and phases[-1] == "selecting"
            train = [e for e in events if e.phase == "training"]
            assert train[-1].done == train[-1].total >= 10  # min_steps with one step an epoch
            assert {e.round for e in events} == {p.rounds()[-1]["round"]}
        # after a trained round, the ETA of the query adds what that round spent afterwards
        timed = [e for e in events if e.query_eta_s is not None]
        assert timed and all(e.query_eta_s >= (e.eta_s or 0) for e in timed)
        assert events[-1].query_eta_s == 0


def test_state_shows_the_progress_of_a_running_query(tmp_path):
    proj = make_project(tmp_path, n=30, budget=10, min_steps=150)
    label_pending(proj)
    c = client(proj)
    assert c.get("/api/state").json()["query"]["progress"] is None
    assert c.post("/api/query", json={"budget": 5}).status_code == 202
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        q = c.get("/api/state").json()["query"]
        if not q["running"]:
            break
        if q["progress"] is not None:
            seen.append(q["progress"])
        time.sleep(0.02)
    assert not q["running"] and q["error"] is None and q["last"]["queued"] == 5
    assert q["progress"] is None  # cleared when the query ends
    train = [s for s in seen if s["phase"] == "training"]
    assert train, seen
    mid = [s for s in train if 0 < s["done"] < s["total"]]
    assert mid, train
    s = mid[-1]
    assert s["unit"] == "epoch" and s["total"] >= 150 and s["elapsed_s"] > 0
    assert s["loss"] is not None and s["loss"] > 0
    assert s["text"].startswith(f"training: epoch {s['done']} / {s['total']}, loss ")
    assert set(s) >= {"phase", "done", "total", "unit", "loss", "eta_s", "elapsed_s"}
    assert [t["done"] for t in train] == sorted(t["done"] for t in train)


def test_cli_query_logs_one_line_per_phase_when_not_on_a_terminal(tmp_path, capsys):
    from dalbt.cli import main

    proj = str(make_project(tmp_path, n=30, budget=None, cold_start_epochs=2))
    assert main(["query", proj, "--budget", "5", "--threads", "1"]) == 0
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["pre-training", "scoring", "selecting"]
    assert lines[0].startswith("pre-training: 2 epochs in ") and ", loss " in lines[0]
    assert lines[2].startswith("selecting: 5 images in ")
    assert "queued 5 images in round 0" in out.out
    label_pending(proj)
    assert main(["query", proj, "--budget", "5", "--threads", "1"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[0] for ln in lines if not ln.startswith("note")] == [
        "training", "scoring", "selecting"]
    assert main(["query", proj, "--budget", "5", "--threads", "1", "--no-progress"]) == 0
    assert not [ln for ln in capsys.readouterr().err.splitlines() if "training" in ln]
