"""Property test of the labelling HTTP API: arbitrary paths and JSON (or not JSON) bodies never
give a server error, and never a byte sequence of a secret file outside the image folder, even
when the database names that file (forged rows whose hash matches it)."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
import warnings
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dalbt.labelling.project import Project
from dalbt.labelling.server import create_app

with warnings.catch_warnings():  # starlette's note that it prefers httpx2 to httpx
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow  # hundreds of generated requests: skipped by make test-quick

SECRET = b"TOP-SECRET-" + secrets.token_hex(32).encode()
WINDOW = 12  # no run of this many secret bytes may appear in a response
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A project of 6 images, the secret file next to the image folder and 4 forged rows that
    lead to it (``..``, absolute, a symbolic link, a linked folder)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    images = tmp / "images"
    images.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(images / f"im{i}.png")
    with Project.init(tmp / "proj", images, ["a", "b"], log=lambda m: None,
                      cold_start_epochs=0) as p:
        p.query(3, progress=False, log=lambda m: None)
    secret = tmp / "secret.png"
    secret.write_bytes(SECRET)
    (images / "link.png").symlink_to(secret)
    (images / "up").symlink_to(tmp, target_is_directory=True)
    with sqlite3.connect(tmp / "proj" / "project.sqlite") as db:
        for rel in ("../secret.png", str(secret), "link.png", "up/secret.png"):
            db.execute("INSERT INTO images (path, sha256, added) VALUES (?, ?, 'now')",
                       (rel, hashlib.sha256(SECRET).hexdigest()))
    app = create_app(tmp / "proj")
    assert app.state.query_job.lock.acquire(blocking=False)  # no training: queries get 409
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        yield client  # one event loop for every request
    app.state.query_job.lock.release()


def check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    body = response.content
    leaks = [i for i in range(len(SECRET) - WINDOW + 1) if SECRET[i:i + WINDOW] in body]
    assert not leaks, f"secret bytes {leaks[:3]} in a {response.status_code} response"
    if (response.status_code >= 400 and response.request.method != "HEAD"
            and response.request.url.path.startswith("/api/")):
        assert isinstance(response.json()["detail"], str)


json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-10, 20)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
api_objects = st.fixed_dictionaries(
    {}, optional={"image_id": json_values | st.integers(-2, 15), "label": json_values
                  | st.sampled_from(["a", "b", None]), "who": json_values,
                  "budget": json_values})
bodies = (api_objects.map(lambda v: json.dumps(v, allow_nan=True).encode())
          | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())
          | st.binary(max_size=200)
          | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n))
segments = (st.text(max_size=30) | st.integers(-5, 20).map(str)
            | st.integers(1, 6000).map(lambda n: "9" * n) | st.sampled_from(
                ["..", "../secret.png", "%2e%2e%2fsecret.png", "..%2F..%2Fsecret.png",
                 "label.js", "secret.png", "", "%00", "\\..\\secret.png", "7", "8", "9", "10"]))
prefixes = st.sampled_from(["/api/image/", "/static/", "/", "/api/", "/api/label/", "/../"])


@FUZZ
@given(prefix=prefixes, segment=segments, raw=st.booleans(),
       method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]))
def test_no_path_gives_a_server_error_or_the_secret(served, prefix, segment, raw, method):
    url = prefix + quote(segment, safe="/%." if raw else "")
    check(served.request(method, url, headers={"content-type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(["/api/label", "/api/skip", "/api/undo", "/api/query",
                            "/api/state"]),
       body=bodies, ctype=st.sampled_from(["application/json", "application/json; charset=x",
                                           "text/plain"]))
def test_no_body_gives_a_server_error_or_the_secret(served, path, body, ctype):
    check(served.post(path, content=body, headers={"content-type": ctype}))


def test_every_image_id_answers_without_the_secret(served):
    """Every id in use (forged ones included) and around: images or a 4xx, never the secret."""
    started = time.monotonic()
    codes = {}
    for image_id in range(0, 14):
        r = served.get(f"/api/image/{image_id}")
        check(r)
        codes[image_id] = r.status_code
    assert [codes[i] for i in range(1, 7)] == [200] * 6
    assert [codes[i] for i in range(7, 11)] == [409] * 4  # the forged rows
    assert codes[0] == codes[11] == 404
    assert time.monotonic() - started < 5
