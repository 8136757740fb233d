"""A real ``dalbt serve`` process killed mid-labelling loses no acknowledged label and resumes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_serve import db_rows, make_project, pending_ids

pytestmark = pytest.mark.slow  # server subprocesses: skipped by make test-quick


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(directory: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dalbt", "serve", str(directory), "--port", str(port),
         "--threads", "1", "--user", "killed-server"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/state", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
    proc.kill()
    raise AssertionError("the server did not start")


def test_killed_server_loses_no_acknowledged_label_and_resumes(tmp_path):
    directory = make_project(tmp_path, n=30, budget=10)
    queued = pending_ids(directory)
    port = _free_port()
    proc = _start(directory, port)
    acked = []
    try:
        for k, image_id in enumerate(queued[:6]):
            r = httpx.post(f"http://127.0.0.1:{port}/api/label",
                           json={"image_id": image_id, "label": str(k), "who": "ann"})
            assert r.status_code == 200, r.text
            acked.append((image_id, str(k)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # every label answered with 200 is in the database, read through a fresh connection
    rows = db_rows(directory, "SELECT image_id, label FROM labels WHERE who = 'ann' ORDER BY id")
    assert rows == acked
    # a new server on the same project serves the rest of the batch, in order
    proc = _start(directory, port)
    try:
        state = httpx.get(f"http://127.0.0.1:{port}/api/state").json()
        assert [p["image_id"] for p in state["pending"]] == queued[6:]
        r = httpx.post(f"http://127.0.0.1:{port}/api/label",
                       json={"image_id": queued[6], "label": None, "who": "ann"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert pending_ids(directory) == queued[7:]
