"""The Label Studio ML backend (``dalbt serve-ml``), through its HTTP API in-process."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest

from dalbt.errors import DalbtError
from dalbt.labelling.interchange import export_project, image_url, labelstudio_config
from dalbt.labelling.project import Project
from tests.test_serve import CLASSES, db_rows, make_project, pending_ids

pytest.importorskip("fastapi")
from fastapi import Request  # noqa: E402 - the fake Label Studio's routes resolve it here
from fastapi.testclient import TestClient  # noqa: E402

from dalbt.labelling.mlbackend import (  # noqa: E402
    QUEUED_SPAN,
    LabelStudioLink,
    choices_control,
    create_ml_app,
    model_version,
    priorities,
)


def ml_client(directory: Path, **kwargs) -> TestClient:
    return TestClient(create_ml_app(directory, **kwargs), base_url="http://127.0.0.1")


def tasks_of(directory: Path) -> list[dict]:
    """Every image as a Label Studio task with an id, as Label Studio would send it."""
    with Project(directory) as p:
        tasks = json.loads(export_project(p, "labelstudio", every=True))
    return [{"id": k + 1, "data": t["data"]} for k, t in enumerate(tasks)]


def image_of(directory: Path, task: dict) -> int:
    with Project(directory) as p:
        return p.image_ids()[task["data"]["dalbt_path"]]


def annotation(task: dict, choice: str, user: int = 7, cancelled: bool = False) -> dict:
    return {"action": "ANNOTATION_CREATED", "task": task,
            "annotation": {"id": 1, "completed_by": user, "was_cancelled": cancelled,
                           "result": [] if cancelled else [
                               {"from_name": "choice", "to_name": "image", "type": "choices",
                                "value": {"choices": [choice]}}]}}


def wait_query(app_client: TestClient, timeout: float = 120) -> None:
    job = app_client.app.state.query_job
    deadline = time.monotonic() + timeout
    while job.lock.locked():
        assert time.monotonic() < deadline, "the background query did not finish"
        time.sleep(0.05)
    assert job.error is None, job.error


CONFIG = ('<View><Image name="img" value="$image"/><Choices name="cls" toName="img">'
          + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")


def test_choices_control_finds_the_control_and_refuses_configs_without_the_classes():
    assert choices_control(CONFIG, CLASSES) == ("cls", "img")
    with pytest.raises(DalbtError, match="lack the project's classes 9"):
        choices_control(CONFIG.replace('<Choice value="9"/>', ""), CLASSES)
    with pytest.raises(DalbtError, match="no <Choices"):
        choices_control('<View><Image name="i" value="$image"/></View>', CLASSES)
    with pytest.raises(DalbtError, match="not XML"):
        choices_control("<View>", CLASSES)


def test_priorities_put_the_queue_first_in_query_order_then_the_least_confident():
    scores = priorities(pending=[5, 3, 9], image_ids=[9, 1, 3, 2, 5, 4],
                        confidence={1: 0.9, 2: 0.3, 3: 0.99, 4: 1.0})
    assert scores[0] == pytest.approx(QUEUED_SPAN * 2 / 3)  # 9: third queued
    assert scores[2] == pytest.approx(QUEUED_SPAN / 3)  # 3: second, whatever its confidence
    assert scores[4] == 0.0  # 5: first queued
    assert scores[1] == pytest.approx(0.5 + 0.5 * 0.9) and scores[3] == pytest.approx(0.65)
    order = [i for _, i in sorted(zip(scores, [9, 1, 3, 2, 5, 4], strict=True))]
    assert order == [5, 3, 9, 2, 1, 4]
    assert priorities([], [7], {}) == [1.0]  # no guess, not queued: last


@pytest.fixture
def proj(tmp_path):
    return make_project(tmp_path, n=30, budget=6)


def test_health_setup_and_the_cold_start_predictions(proj):
    c = ml_client(proj)
    assert c.get("/health").json() == {"status": "UP", "model_class": "dalbt",
                                       "model_version": "dalbt-round-0"}
    with Project(proj) as p:
        schema = labelstudio_config(p)
    assert c.post("/setup", json={"project": "1.1", "schema": schema}).json() == {
        "model_version": "dalbt-round-0"}
    bad = c.post("/setup", json={"schema": CONFIG.replace('<Choice value="3"/>', "")})
    assert bad.status_code == 400 and "classes 3" in bad.json()["error"]

    tasks = tasks_of(proj)
    stranger = {"id": 99, "data": {"image": "/data/upload/1/abcdef12-not-here.png"}}
    out = c.post("/predict", json={"tasks": [*tasks, stranger], "label_config": schema}).json()
    assert out["model_version"] == "dalbt-round-0"
    results = out["results"]
    assert len(results) == len(tasks) + 1
    assert all(r["result"] == [] for r in results)  # a cold start trains no classifier
    queued = pending_ids(proj)
    score = {image_of(proj, t): r["score"] for t, r in zip(tasks, results[:-1], strict=True)}
    assert [score[i] for i in queued] == sorted(score[i] for i in queued)
    assert max(score[i] for i in queued) < QUEUED_SPAN
    assert all(s == 1.0 for i, s in score.items() if i not in queued)
    assert results[-1]["score"] == 1.0


def test_annotations_are_labels_and_the_finished_batch_trains_the_next(proj):
    c = ml_client(proj, budget=4)
    tasks = {image_of(proj, t): t for t in tasks_of(proj)}
    queued = pending_ids(proj)
    with Project(proj) as p:
        truth = {i: p.image(i)[0].split("_")[1][0] for i in queued}  # dNNN_<digit>.png

    first = c.post("/webhook", json=annotation(tasks[queued[0]], truth[queued[0]])).json()
    assert first["status"] == "labelled" and first["added"] == 1 and "training" not in first
    again = c.post("/webhook", json={**annotation(tasks[queued[0]], truth[queued[0]]),
                                     "action": "ANNOTATION_UPDATED"}).json()
    assert again["added"] == 0  # the same label again is not a new row
    rows = db_rows(proj, "SELECT label, kind, who, source FROM labels WHERE image_id = ?",
                   (queued[0],))
    assert rows == [(truth[queued[0]], "class", "labelstudio:7", "label-studio")]

    wrong = c.post("/webhook", json=annotation(tasks[queued[1]], "not a class"))
    assert wrong.status_code == 400 and "no single class" in wrong.json()["error"]
    ood = c.post("/webhook", json=annotation(tasks[queued[1]], "none of these classes"))
    assert ood.json()["label"] == "none of these classes"
    assert db_rows(proj, "SELECT kind FROM labels WHERE image_id = ?", (queued[1],)) == [("ood",)]
    skipped = c.post("/webhook", json=annotation(tasks[queued[2]], "", cancelled=True)).json()
    assert skipped["status"] == "skipped"
    assert c.post("/webhook", json={"action": "PROJECT_UPDATED"}).json()["status"] == "ignored"

    for i in queued[3:-1]:
        assert "training" not in c.post("/webhook", json=annotation(tasks[i], truth[i])).json()
    last = c.post("/webhook", json=annotation(tasks[queued[-1]], truth[queued[-1]])).json()
    assert last["training"] is True  # the batch is done: the next one is trained and queued
    wait_query(c)
    assert len(pending_ids(proj)) == 4
    assert c.get("/health").json()["model_version"] == model_version(1)
    assert c.get("/versions").json() == {"versions": ["dalbt-round-0", "dalbt-round-1"]}


def test_predictions_of_a_trained_round_are_the_models_guess(proj):
    with Project(proj) as p:
        for q in p.pending():
            p.add_label(q.image_id, p.image(q.image_id)[0].split("_")[1][0])
        p.query(5, progress=False, log=lambda m: None)
        pred = p.predictions()
        schema = labelstudio_config(p)
    assert pred is not None and pred.round == 1
    assert pred.probs.shape == (30, 10)
    np.testing.assert_allclose(pred.probs.sum(1), 1.0, rtol=1e-5)
    tasks = tasks_of(proj)
    out = ml_client(proj).post("/predict", json={"tasks": tasks, "label_config": schema}).json()
    row = {int(i): k for k, i in enumerate(pred.image_ids)}
    queued = pending_ids(proj)
    for t, r in zip(tasks, out["results"], strict=True):
        probs = pred.probs[row[image_of(proj, t)]]
        (guess,) = r["result"]
        assert guess["from_name"] == "choice" and guess["to_name"] == "image"
        assert guess["value"]["choices"] == [CLASSES[int(probs.argmax())]]
        assert guess["score"] == pytest.approx(float(probs.max()), rel=1e-5)
        assert r["model_version"] == "dalbt-round-1"
        i = image_of(proj, t)
        if i in queued:
            assert r["score"] == pytest.approx(QUEUED_SPAN * queued.index(i) / len(queued))
        else:
            assert r["score"] == pytest.approx(0.5 + 0.5 * float(probs.max()), rel=1e-5)


def test_start_training_and_the_token(proj):
    c = ml_client(proj, token="s3cret")
    assert c.get("/health").status_code == 401
    basic = base64.b64encode(b"labelstudio:s3cret").decode()
    ok = {"Authorization": f"Basic {basic}"}
    assert c.get("/health", headers=ok).status_code == 200
    assert c.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    wrong = base64.b64encode(b"labelstudio:guess").decode()
    assert c.get("/health", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    with Project(proj) as p:
        for q in p.pending():
            p.add_label(q.image_id, p.image(q.image_id)[0].split("_")[1][0])
    with Project(proj) as p, p.acquire_query_lock():  # another process queries: not now
        assert c.post("/train", json={}, headers=ok).json() == {"training": False}
    started = c.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}},
                     headers=ok)
    try:
        assert started.status_code == 201 and started.json()["training"] is True
    finally:
        wait_query(c)
    assert db_rows(proj, "SELECT COUNT(*) FROM rounds") == [(2,)]


def test_tasks_of_another_image_or_a_changed_hash_are_not_labelled(proj):
    c = ml_client(proj)
    task = tasks_of(proj)[0]
    changed = {**task, "data": {**task["data"], "dalbt_sha256": "0" * 64}}
    out = c.post("/webhook", json=annotation(changed, "3")).json()
    assert out["status"] == "ignored"
    stranger = {"id": 5, "data": {"image": "/data/upload/1/abcdef12-elsewhere.png"}}
    assert c.post("/webhook", json=annotation(stranger, "3")).json()["status"] == "ignored"
    assert db_rows(proj, "SELECT COUNT(*) FROM labels") == [(0,)]
    assert c.post("/predict", json={"tasks": "no"}).status_code == 400


def test_export_all_gives_every_image_with_the_labels_so_far(proj):
    with Project(proj) as p:
        first = p.pending()[0]
        p.add_label(first.image_id, "4", who="ann")
        tasks = json.loads(export_project(p, "labelstudio", every=True))
        paths = sorted(p.image_ids())
        with pytest.raises(DalbtError, match="--format labelstudio"):
            export_project(p, "csv", every=True)
    assert [t["data"]["dalbt_path"] for t in tasks] == paths
    assert all(t["data"]["image"] == image_url(t["data"]["dalbt_path"]) for t in tasks)
    annotated = [t for t in tasks if t.get("annotations")]
    assert [t["data"]["dalbt_path"] for t in annotated] == [first.path]
    assert annotated[0]["annotations"][0]["result"][0]["value"] == {"choices": ["4"]}


def test_serve_ml_cli_refuses_a_missing_project(tmp_path, capsys):
    from dalbt.cli import main

    assert main(["serve-ml", str(tmp_path / "nothing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dalbt: error:") and "Traceback" not in err


def test_only_loopback_host_headers_reach_a_loopback_backend(proj):
    assert ml_client(proj).get("/health").status_code == 200
    rebound = TestClient(create_ml_app(proj), base_url="http://attacker.example")
    assert rebound.get("/health").status_code == 400
    assert rebound.post("/webhook", json={"action": "START_TRAINING"}).status_code == 400


@pytest.fixture
def fake_label_studio():
    """A stand-in for Label Studio's API that records what it is asked: ``(url, calls)``."""
    from fastapi import FastAPI

    from dalbt.labelling.server import background_server

    calls: list[tuple[str, str, str, dict]] = []
    app = FastAPI()

    @app.post("/api/token/refresh/")
    async def refresh(request: Request) -> dict:
        body = await request.json()
        calls.append(("POST", "/api/token/refresh/", "", body))
        return {"access": "access-of-" + body["refresh"]}

    @app.post("/api/dm/actions")
    async def actions(request: Request) -> dict:
        calls.append(("POST", f"/api/dm/actions?{request.url.query}",
                      request.headers.get("authorization", ""), await request.json()))
        time.sleep(0.2)  # long enough for a second schedule() to arrive meanwhile
        return {"processed_items": 3}

    @app.patch("/api/projects/{pid}")
    async def patch(pid: int, request: Request) -> dict:
        calls.append(("PATCH", f"/api/projects/{pid}", request.headers.get("authorization", ""),
                      await request.json()))
        return {}

    with background_server(app) as url:
        yield url, calls


def test_the_link_syncs_the_latest_version_with_the_users_address_and_token(fake_label_studio):
    url, calls = fake_label_studio
    with pytest.raises(DalbtError, match="--label-studio-url"):
        LabelStudioLink(None, "users-token")
    link = LabelStudioLink(url, "users-token", delay=0)
    # a /setup naming another host: the user's token still goes only to the user's address
    assert link.note_setup({"project": "3.1700000000", "hostname": "http://elsewhere.invalid",
                            "access_token": "label-studios-token"})
    assert not link.note_setup({"project": "3.1700000000"})
    link.schedule("dalbt-round-1")
    link.schedule("dalbt-round-2")  # while the first sync runs: coalesced, not lost
    link.wait()
    patches = [c for c in calls if c[0] == "PATCH"]
    assert patches[-1] == ("PATCH", "/api/projects/3", "Token users-token",
                           {"model_version": "dalbt-round-2"})
    assert link.synced[-1] == (3, "dalbt-round-2")
    assert all(c[2] == "Token users-token" for c in calls)
    retrieve = [c for c in calls if c[1].startswith("/api/dm/actions")][0]
    assert retrieve[1] == "/api/dm/actions?id=retrieve_tasks_predictions&project=3"
    assert retrieve[3] == {"selectedItems": {"all": True, "excluded": []}}
    link.schedule("dalbt-round-3")  # after a sync ended, the next one runs again
    link.wait()
    assert link.synced[-1] == (3, "dalbt-round-3")


def test_the_link_uses_label_studios_own_pair_and_personal_access_tokens(fake_label_studio):
    url, calls = fake_label_studio
    link = LabelStudioLink(delay=0)
    link.note_setup({"project": "4.1", "hostname": url, "access_token": "legacy"})
    link.schedule("dalbt-round-0")
    link.wait()
    assert {c[2] for c in calls} == {"Token legacy"}
    calls.clear()
    jwt = LabelStudioLink(url, "aaa.bbb.ccc", delay=0)  # a personal access token (a JWT)
    jwt.note_setup({"project": "4.1"})
    jwt.schedule("dalbt-round-1")
    jwt.wait()
    assert calls[0] == ("POST", "/api/token/refresh/", "", {"refresh": "aaa.bbb.ccc"})
    assert {c[2] for c in calls[1:]} == {"Bearer access-of-aaa.bbb.ccc"}
