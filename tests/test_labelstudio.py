"""End to end against a real Label Studio: ``dalbt serve-ml`` as its ML backend.

Label Studio runs from its own virtual environment (``make labelstudio`` creates
``.venv-labelstudio``; ``DALBT_LABEL_STUDIO`` may name another ``label-studio`` executable),
started on a loopback port with its SQLite default in a temporary folder. Every proxy points at
a closed port, so any call it made to the internet would fail: it has to start and work
offline. Skipped when Label Studio is not installed, unless ``DALBT_REQUIRE_LABEL_STUDIO=1``
(set by ``make test``), where that fails instead.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalbt.labelling.interchange import export_project, labelstudio_config
from dalbt.labelling.project import Project

pytestmark = pytest.mark.slow  # starts Label Studio (a minute or two of migrations)

httpx = pytest.importorskip("httpx")
ROOT = Path(__file__).resolve().parents[1]
TOKEN = secrets.token_hex(20)  # the Label Studio user's legacy API token
START_TIMEOUT = 600.0  # seconds for Label Studio's first start (database migrations)


def label_studio_or_skip() -> str:
    """The ``label-studio`` executable, or skip (fail when it is required)."""
    exe = os.environ.get("DALBT_LABEL_STUDIO") or str(ROOT / ".venv-labelstudio" / "bin"
                                                      / "label-studio")
    if Path(exe).is_file() and os.access(exe, os.X_OK):
        return exe
    msg = f"Label Studio is not installed at {exe} (make labelstudio)"
    if os.environ.get("DALBT_REQUIRE_LABEL_STUDIO") == "1":
        pytest.fail(f"DALBT_REQUIRE_LABEL_STUDIO=1 but {msg}")
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(data: Path) -> dict[str, str]:
    """Label Studio's environment: its own data and home folders, no telemetry, no version
    check, no error reporting, every proxy a closed port (loopback excepted), and local ML
    backend and webhook URLs allowed."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("LABEL_STUDIO", "HTTP_PROXY", "HTTPS_PROXY"))}
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    env.update({
        "HOME": str(data / "home"), "LABEL_STUDIO_BASE_DATA_DIR": str(data / "base"),
        "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead,
        "ALL_PROXY": dead, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false", "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "", "FEATURE_FLAGS_OFFLINE": "true",
        "SSRF_PROTECTION_ENABLED": "false", "ML_BLOCK_LOCAL_IP": "false",
        "SECRET_KEY": secrets.token_hex(32), "PYTHONUNBUFFERED": "1",
    })
    return env


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A running Label Studio: ``(base URL, httpx client with the API token)``."""
    exe = label_studio_or_skip()
    data = tmp_path_factory.mktemp("label-studio")
    (data / "home").mkdir()
    port = free_port()
    log = (data / "label-studio.log").open("w")
    proc = subprocess.Popen(
        [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data / "data"), "--username", "dalbt@example.com",
         "--password", secrets.token_hex(8), "--user-token", TOKEN,
         "--enable-legacy-api-token", "--log-level", "WARNING"],
        env=offline_env(data), stdout=log, stderr=subprocess.STDOUT, cwd=data)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Token {TOKEN}"},
                          timeout=300, trust_env=False)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Label Studio exited ({proc.returncode}):\n"
                            f"{(data / 'label-studio.log').read_text()[-3000:]}")
            try:
                if client.get("/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Label Studio did not start in time"
            time.sleep(1)
        yield url, client
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def write_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """60 digits images, the first 20 in class folders (labelled), a first batch of 5 queued
    by a trained model; returns the project and each path's true class."""
    from tests.conftest import sklearn_digits

    d = sklearn_digits()
    root, truth = tmp_path / "images", {}
    for i in range(60):
        rel = f"{d.target[i]}/d{i:03d}.png" if i < 20 else f"pool/d{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(d.images[i] * 16, 0, 255).astype(np.uint8)).save(root / rel)
        truth[rel] = str(d.target[i])
    directory = tmp_path / "proj"
    with Project.init(directory, root, [str(c) for c in range(10)], train={"epochs": 2},
                      cold_start_epochs=0, min_steps=10, log=lambda m: None) as p:
        p.query(5, progress=False, log=lambda m: None)
    return directory, truth


def wait_for(what: str, check, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_label_studio_ranks_guesses_and_trains_through_dalbt(tmp_path, label_studio):
    from dalbt.labelling.mlbackend import LabelStudioLink, create_ml_app
    from dalbt.labelling.server import background_server

    url, ls = label_studio
    directory, truth = write_project(tmp_path)
    with Project(directory) as p:
        config = labelstudio_config(p)
        tasks = json.loads(export_project(p, "labelstudio", every=True))
        queued = [p.image(q.image_id)[0] for q in p.pending()]
        first = p.predictions()
    assert first is not None and first.round == 0
    link = LabelStudioLink(url, TOKEN)
    app = create_ml_app(directory, link=link)
    with background_server(app) as backend:
        made = ls.post("/api/projects", json={"title": "dalbt end to end",
                                              "label_config": config,
                                              "sampling": "Uncertainty sampling"})
        assert made.status_code == 201, made.text
        pid = made.json()["id"]
        imported = ls.post(f"/api/projects/{pid}/import", json=tasks).json()
        assert imported["task_count"] == 60 and imported["annotation_count"] == 20

        connected = ls.post("/api/ml", json={"url": backend, "project": pid, "title": "dalbt"})
        assert connected.status_code == 201, connected.text
        assert connected.json()["state"] == "CO"  # Label Studio called /health and /setup
        hooks = ls.get("/api/webhooks", params={"project": pid}).json()
        assert [h["url"] for h in hooks] == [f"{backend}/webhook"]

        # On connecting, the backend has Label Studio retrieve its predictions and rank by them.
        wait_for("the model version of round 0", lambda: ls.get(f"/api/projects/{pid}").json()
                 .get("model_version") == "dalbt-round-0")
        preds = ls.get("/api/predictions", params={"project": pid}).json()
        assert len(preds) == 60 and {p["model_version"] for p in preds} == {"dalbt-round-0"}
        path_of = {t["id"]: t["data"]["dalbt_path"]
                   for t in ls.get("/api/tasks", params={"project": pid, "page_size": 100})
                   .json()["tasks"]}
        row = {int(i): k for k, i in enumerate(first.image_ids)}
        with Project(directory) as p:
            ids = p.image_ids()
        for pred in preds:
            probs = first.probs[row[ids[path_of[pred["task"]]]]]
            (guess,) = pred["result"]
            assert guess["value"]["choices"] == [str(int(probs.argmax()))]
            assert guess["score"] == pytest.approx(float(probs.max()), rel=1e-4)
        # the queued images have the lowest prediction scores, in query order
        score_of = {path_of[pred["task"]]: pred["score"] for pred in preds}
        assert [score_of[q] for q in queued] == sorted(score_of[q] for q in queued)
        assert max(score_of[q] for q in queued) < min(
            s for path, s in score_of.items() if path not in queued)

        # Label Studio's labelling stream follows dalbt's queue; annotations become labels.
        for k, path in enumerate(queued):
            task = ls.get(f"/api/projects/{pid}/next").json()
            assert task["data"]["dalbt_path"] == path, f"task {k} of the stream"
            result = [{"from_name": "choice", "to_name": "image", "type": "choices",
                       "value": {"choices": [truth[path]]}}]
            made = ls.post(f"/api/tasks/{task['id']}/annotations", json={"result": result})
            assert made.status_code == 201, made.text
        with Project(directory) as p:
            got = {h["path"]: (h["label"], h["source"]) for h in p.label_history()
                   if h["source"] == "label-studio"}
        assert got == {path: (truth[path], "label-studio") for path in queued}

        # The finished batch trained round 1; Label Studio now ranks by it.
        wait_for("the model version of round 1", lambda: ls.get(f"/api/projects/{pid}").json()
                 .get("model_version") == "dalbt-round-1")
        job = app.state.query_job
        assert job.error is None and job.last["round"] == 1
        with Project(directory) as p:
            queued = [p.image(q.image_id)[0] for q in p.pending()]
        assert len(queued) == 5 and not set(queued) & set(got)
        preds = ls.get("/api/predictions", params={"project": pid}).json()
        newer = [p for p in preds if p["model_version"] == "dalbt-round-1"]
        assert {path_of[p["task"]] for p in newer} >= set(queued)
        assert ls.get(f"/api/projects/{pid}/next").json()["data"]["dalbt_path"] == queued[0]
        link.wait()
