"""The labelling web API (``dalbt serve``): path safety, token, content types, Host check,
concurrent labellers, changed images, background queries and the accuracy plot."""

from __future__ import annotations

import fcntl
import hashlib
import io
import sqlite3
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dalbt.labelling.project import Project
from dalbt.labelling.server import background_server, cookie_name, create_app, history_png

with warnings.catch_warnings():  # starlette's note that it prefers httpx2 to httpx
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

CLASSES = [str(c) for c in range(10)]
SECRET = b"TOP-SECRET-BYTES-" + b"x" * 64


def write_digits(folder: Path, n: int) -> dict[str, int]:
    """``n`` digits images as PNGs named ``dNNN_<digit>.png``; returns name -> digit."""
    from tests.conftest import sklearn_digits

    d = sklearn_digits()
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(n):
        name = f"d{i:03d}_{d.target[i]}.png"
        img = np.clip(d.images[i] * 16, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / name)
        truth[name] = int(d.target[i])
    return truth


def make_project(tmp_path: Path, n: int = 30, budget: int | None = 10, **settings) -> Path:
    """A digits project in ``tmp_path/proj`` with a first (cold-start) batch queued."""
    write_digits(tmp_path / "images", n)
    directory = tmp_path / "proj"
    settings = {"train": {"epochs": 2}, "cold_start_epochs": 0, "min_steps": 10, **settings}
    with Project.init(directory, tmp_path / "images", CLASSES, log=lambda m: None,
                      **settings) as p:
        if budget:
            p.query(budget, progress=False, log=lambda m: None)
    return directory


def client(directory: Path, **kwargs) -> TestClient:
    return TestClient(create_app(directory, **kwargs), base_url="http://127.0.0.1")


def db_rows(directory: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows read through a fresh connection: only what was committed."""
    with sqlite3.connect(directory / "project.sqlite") as db:
        return db.execute(sql, args).fetchall()


def pending_ids(directory: Path) -> list[int]:
    with Project(directory) as p:
        return [q.image_id for q in p.pending()]


@pytest.fixture
def proj(tmp_path):
    return make_project(tmp_path)


def test_page_static_files_and_state(proj):
    c = client(proj, user="alice", budget=7)
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="image"', 'id="skip"', 'id="ood"', 'id="train"', 'id="budget"',
                    'id="progress"', 'id="status"', 'src="/static/label.js"'):
        assert element in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    js = c.get("/static/label.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "image-rendering: pixelated" in c.get("/static/label.css").text
    assert c.get("/static/label.html").status_code == 404  # only the listed names
    assert c.get("/static/..%2Fserve.py").status_code == 404
    s = c.get("/api/state").json()
    assert s["classes"] == CLASSES
    assert [q["image_id"] for q in s["pending"]] == pending_ids(proj)
    assert all(q["round"] == 0 for q in s["pending"])
    assert [q["position"] for q in s["pending"]] == list(range(10))
    assert s["batches"] == {"0": {"size": 10, "pending": 10}}
    assert s["user"] == "alice" and s["budget"] == 7
    assert s["query"] == {"running": False, "error": None, "last": None, "started": None,
                          "finished": None, "progress": None}
    assert s["progress"]["images"] == 30 and s["progress"]["pending"] == 10


def test_image_bytes_and_content_types(tmp_path):
    write_digits(tmp_path / "images", 4)
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    img.save(tmp_path / "images" / "a.jpg")
    img.save(tmp_path / "images" / "b.pgm")
    Image.fromarray(np.asarray(img, np.uint16) * 256).save(tmp_path / "images" / "c16.tif")
    Project.init(tmp_path / "proj", tmp_path / "images", CLASSES, log=lambda m: None).close()
    c = client(tmp_path / "proj")
    with Project(tmp_path / "proj") as p:
        ids = p.image_ids()
    r = c.get(f"/api/image/{ids['d000_0.png']}")
    assert r.headers["content-type"] == "image/png"
    assert r.content == (tmp_path / "images" / "d000_0.png").read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"
    r = c.get(f"/api/image/{ids['a.jpg']}")
    assert r.headers["content-type"] == "image/jpeg"
    assert r.content == (tmp_path / "images" / "a.jpg").read_bytes()
    r = c.get(f"/api/image/{ids['b.pgm']}")  # browsers cannot show PGM: converted to PNG
    assert r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(img))
    r = c.get(f"/api/image/{ids['c16.tif']}")  # 16-bit TIFF: its top 8 bits as PNG
    assert r.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(img))


def test_unknown_ids_and_encoded_paths_are_404(proj):
    (proj.parent / "secret.png").write_bytes(SECRET)
    c = client(proj)
    for url in ("/api/image/99999", "/api/image/abc", "/api/image/-1", "/api/image/1.0",
                "/api/image/..%2Fsecret.png", "/api/image/..%2F..%2Fsecret.png",
                "/api/image/%2e%2e%2fsecret.png", "/api/image/..%5Csecret.png",
                "/api/image/", "/api/image", "/secret.png", "/../secret.png",
                "/api/image/%C2%B2", "/api/image/%D9%A1", "/api/image/" + "9" * 30,
                "/static/..%2F..%2F..%2Fsecret.png"):
        r = c.get(url)
        assert r.status_code == 404, url
        assert SECRET not in r.content and b"TOP-SECRET" not in r.content, url


def insert_image(directory: Path, rel: str, data: bytes) -> int:
    """An images row added behind the project's back (as a damaged or forged database)."""
    with sqlite3.connect(directory / "project.sqlite") as db:
        cur = db.execute("INSERT INTO images (path, sha256, added) VALUES (?, ?, 'now')",
                         (rel, hashlib.sha256(data).hexdigest()))
        return cur.lastrowid


def test_paths_outside_the_image_root_are_never_served(proj, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(SECRET)
    dotdot = insert_image(proj, "../secret.png", SECRET)  # hash matches: only the path stops it
    absolute = insert_image(proj, str(secret), SECRET)
    (tmp_path / "images" / "link.png").symlink_to(secret)
    link = insert_image(proj, "link.png", SECRET)
    (tmp_path / "images" / "sub").symlink_to(tmp_path, target_is_directory=True)
    via_dir = insert_image(proj, "sub/secret.png", SECRET)
    c = client(proj)
    for image_id in (dotdot, absolute, link, via_dir):
        r = c.get(f"/api/image/{image_id}")
        assert r.status_code == 409, image_id
        assert b"TOP-SECRET" not in r.content
        assert "image folder" in r.json()["detail"]  # "outside" / "not ... inside"
    status = dict(db_rows(proj, "SELECT id, status FROM images"))
    assert {status[i] for i in (dotdot, absolute, link, via_dir)} == {"unreadable"}
    assert c.get(f"/api/image/{pending_ids(proj)[0]}").status_code == 200  # others still fine


def test_token_header_cookie_and_query(proj):
    token = "s3cret-token"
    c = client(proj, token=token)
    for url in ("/", "/api/state", f"/api/image/{pending_ids(proj)[0]}", "/api/history.png",
                "/static/label.js"):
        r = c.get(url)
        assert r.status_code == 401, url
        assert b"PNG" not in r.content[:8]
    assert "token" in c.get("/api/state").json()["detail"]
    assert c.get("/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/?token=wrong").status_code == 401
    assert c.get("/api/state", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    # no label is written without the token
    first = pending_ids(proj)[0]
    r = c.post("/api/label", json={"image_id": first, "label": "1", "who": "x"})
    assert r.status_code == 401
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 0
    # the first page load with ?token= sets an HttpOnly SameSite=Strict cookie ...
    r = c.get(f"/?token={token}")
    assert r.status_code == 200 and 'id="image"' in r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{cookie_name(token)}={token}")
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    # ... which then authorises the API (the client keeps cookies)
    assert c.get("/api/state").status_code == 200
    assert c.post("/api/label", json={"image_id": first, "label": "1"}).status_code == 200
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 1
    # a cookie with another value is refused
    other = client(proj, token=token)
    other.cookies.set(cookie_name(token), "wrong")
    assert other.get("/api/state").status_code == 401


def test_posts_need_a_json_body(proj):
    c = client(proj)
    first = pending_ids(proj)[0]
    for ctype, body in (("application/x-www-form-urlencoded", f"image_id={first}&label=1"),
                        ("text/plain", f'{{"image_id": {first}, "label": "1"}}'),
                        ("multipart/form-data; boundary=x", "--x--"), (None, "")):
        headers = {"content-type": ctype} if ctype else {}
        for path in ("/api/label", "/api/skip", "/api/query"):
            r = c.post(path, content=body, headers=headers)
            assert r.status_code == 415, (ctype, path)
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 0
    assert db_rows(proj, "SELECT COUNT(*) FROM queue WHERE status != 'pending'")[0][0] == 0
    r = c.post("/api/label", content=f'{{"image_id": {first}, "label": "1"}}',
               headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_host_header_is_checked_on_loopback(proj):
    app = create_app(proj)  # bound to 127.0.0.1 by default
    for host, code in (("127.0.0.1:8765", 200), ("localhost:8765", 200), ("[::1]:8765", 200),
                       ("localhost", 200), ("evil.example:8765", 400),
                       ("127.0.0.1.evil.example", 400), ("attacker.com", 400)):
        r = TestClient(app, base_url="http://127.0.0.1").get("/api/state",
                                                             headers={"host": host})
        assert r.status_code == code, host
    # on a public address the token protects the server instead, whatever the Host
    app = create_app(proj, token="t", host="0.0.0.0")
    r = TestClient(app, base_url="http://labelbox.lan").get(
        "/api/state", headers={"Authorization": "Bearer t"})
    assert r.status_code == 200


def test_label_ood_skip_and_errors(proj):
    c = client(proj, user="server-user")
    a, b, d, e = pending_ids(proj)[:4]
    assert c.post("/api/label", json={"image_id": a, "label": "7", "who": "alice"}).json()["ok"]
    assert c.post("/api/label", json={"image_id": b, "label": None, "who": " "}).status_code \
        == 200
    assert c.post("/api/skip", json={"image_id": d}).status_code == 200
    r = c.post("/api/label", json={"image_id": e, "label": "cat", "who": "alice"})
    assert r.status_code == 400 and "unknown class 'cat'" in r.json()["detail"]
    assert c.post("/api/label", json={"image_id": 99999, "label": "1"}).status_code == 404
    assert c.post("/api/skip", json={"image_id": 99999}).status_code == 404
    assert c.post("/api/label", json={"image_id": e}).status_code == 422  # label is required
    assert c.post("/api/label", json={"image_id": 10**30, "label": "1"}).status_code == 422
    assert c.post("/api/skip", json={"image_id": -1}).status_code == 422
    rows = db_rows(proj, "SELECT image_id, label, kind, who, source FROM labels ORDER BY id")
    assert rows == [(a, "7", "class", "alice", "web"), (b, None, "ood", "server-user", "web")]
    status = dict(db_rows(proj, "SELECT image_id, status FROM queue"))
    assert (status[a], status[b], status[d], status[e]) == ("done", "done", "skipped", "pending")
    s = c.get("/api/state").json()
    assert [q["image_id"] for q in s["pending"]][:1] == [e]
    assert s["batches"]["0"] == {"size": 10, "pending": 7}
    assert s["progress"]["labelled"] == 1 and s["progress"]["ood"] == 1
    assert s["progress"]["per_class"]["7"] == 1


def test_concurrent_labellers_lose_nothing(proj):
    ids = pending_ids(proj)
    errors: list[str] = []
    with background_server(create_app(proj)) as url:

        def labeller(who: str, label: str, images: list[int]) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for image_id in images:
                    r = http.post("/api/label",
                                  json={"image_id": image_id, "label": label, "who": who})
                    if r.status_code != 200:
                        errors.append(f"{who}: {r.status_code} {r.text}")

        # 2 x 50 labels: both labellers on the same 5 images, and each on 5 of its own
        same, own_a, own_b = ids[:5], ids[5:8] + ids[:2], ids[8:10] + ids[2:5]
        jobs = [threading.Thread(target=labeller, args=("a", "1", (same + own_a) * 5)),
                threading.Thread(target=labeller, args=("b", "2", (own_b + same) * 5))]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join()
    assert errors == []
    rows = db_rows(proj, "SELECT image_id, label, who, source FROM labels")
    assert len(rows) == 100
    assert sorted((w, i) for i, _, w, _ in rows) == sorted(
        [("a", i) for i in (same + own_a) * 5] + [("b", i) for i in (own_b + same) * 5])
    assert {(w, lab, s) for _, lab, w, s in rows} == {("a", "1", "web"), ("b", "2", "web")}
    assert db_rows(proj, "SELECT DISTINCT status FROM queue") == [("done",)]


def test_image_changed_on_disk_is_409_marked_and_skipped(proj, tmp_path):
    c = client(proj)
    first, second = pending_ids(proj)[:2]
    with Project(proj) as p:
        rel = p.image(first)[0]
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "images" / rel)
    r = c.get(f"/api/image/{first}")
    assert r.status_code == 409
    assert "changed on disk" in r.json()["detail"] and rel in r.json()["detail"]
    s = c.get("/api/state").json()
    assert first not in [q["image_id"] for q in s["pending"]]
    assert s["progress"]["problems"] == 1
    assert db_rows(proj, "SELECT status FROM images WHERE id = ?", (first,)) == [("changed",)]
    assert db_rows(proj, "SELECT status FROM queue WHERE image_id = ?", (first,)) == \
        [("unreadable",)]
    # the server goes on: the next image is served and labelled
    assert c.get(f"/api/image/{second}").status_code == 200
    assert c.post("/api/label", json={"image_id": second, "label": "3"}).status_code == 200
    (tmp_path / "images" / rel).unlink()  # a vanished file is the same kind of problem
    assert c.get(f"/api/image/{first}").status_code == 409


def wait_idle(c: TestClient, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = c.get("/api/state").json()
        if not s["query"]["running"]:
            return s
        time.sleep(0.05)
    raise AssertionError("the query did not finish")


def test_query_runs_in_the_background_one_at_a_time(proj, monkeypatch):
    c = client(proj)
    with Project(proj) as p:  # label the first batch by its file names
        for q in p.pending():
            p.add_label(q.image_id, q.path.split("_")[1][0], who="t", source="api")
    release = threading.Event()
    original = Project.query

    def slow_query(self, *args, **kwargs):
        assert release.wait(30)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Project, "query", slow_query)
    r = c.post("/api/query", json={"budget": 5})
    assert r.status_code == 202 and r.json()["budget"] == 5
    s = c.get("/api/state").json()
    assert s["query"]["running"] and s["query"]["started"] is not None
    second = c.post("/api/query", json={"budget": 5})
    assert second.status_code == 409 and "already running" in second.json()["detail"]
    # labelling goes on while the query runs
    with Project(proj) as p:
        free = next(i for i in p.image_ids().values() if i not in p.current_labels())
    assert c.post("/api/label", json={"image_id": free, "label": "4"}).status_code == 200
    release.set()
    s = wait_idle(c)
    assert s["query"]["error"] is None
    assert s["query"]["last"]["round"] == 1 and s["query"]["last"]["queued"] == 5
    assert [r["round"] for r in s["rounds"]] == [0, 1]
    assert len(s["pending"]) == 5 and {q["round"] for q in s["pending"]} == {1}
    assert s["batches"]["1"] == {"size": 5, "pending": 5}
    assert s["budget"] == 5  # the default follows the last batch
    assert db_rows(proj, "SELECT method, n_labelled FROM rounds WHERE round = 1") == \
        [("dalbt", 11)]


def test_query_lock_of_another_process_gives_409(proj):
    c = client(proj)
    with open(proj / "query.lock", "w") as f:  # as 'dalbt query' in another process
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert c.get("/api/state").json()["query"]["running"] is True
        r = c.post("/api/query", json={"budget": 3})
        assert r.status_code == 409 and "another process" in r.json()["detail"]
        fcntl.flock(f, fcntl.LOCK_UN)
    assert c.get("/api/state").json()["query"]["running"] is False
    assert c.post("/api/query", json={"budget": 0}).status_code == 422
    assert db_rows(proj, "SELECT COUNT(*) FROM rounds")[0][0] == 1


def test_query_errors_are_reported_in_the_state(tmp_path):
    proj = make_project(tmp_path, n=8, budget=8)  # every image is queued already
    c = client(proj)
    assert c.post("/api/query", json={}).status_code == 202
    s = wait_idle(c)
    assert "nothing left to query" in s["query"]["error"]
    assert s["query"]["last"] is None and s["query"]["finished"] is not None
    assert c.post("/api/query", json={"budget": 2}).status_code == 202  # not stuck
    assert "nothing left" in wait_idle(c)["query"]["error"]


def test_history_png(tmp_path):
    proj = make_project(tmp_path, budget=None)
    c = client(proj)
    empty = c.get("/api/history.png")
    assert empty.status_code == 200 and empty.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(empty.content)).format == "PNG"
    rounds = [{"round": r, "n_labelled": n, "val_acc": v, "batch_acc": b}
              for r, n, v, b in ((0, 0, None, None), (1, 20, 0.5, 0.4), (2, 40, 0.8, 0.7))]
    plot = Image.open(io.BytesIO(history_png(rounds)))
    assert plot.format == "PNG" and plot.size == Image.open(io.BytesIO(empty.content)).size
    pixels = np.asarray(plot.convert("RGB")).reshape(-1, 3)
    # the curves are drawn in their colours; the placeholder has none of them
    assert (np.abs(pixels.astype(int) - (31, 119, 180)).sum(1) < 30).any()
    assert (np.abs(pixels.astype(int) - (255, 127, 14)).sum(1) < 30).any()
    blank = np.asarray(Image.open(io.BytesIO(empty.content)).convert("RGB")).reshape(-1, 3)
    assert not (np.abs(blank.astype(int) - (31, 119, 180)).sum(1) < 30).any()


def test_serve_never_runs_a_public_address_without_a_token(proj, monkeypatch, capsys):
    import uvicorn

    from dalbt.labelling import server as serve_mod

    seen = {}

    def fake_run(self, sockets=None):
        seen["app"], seen["port"] = self.config.app, sockets[0].getsockname()[1]
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    serve_mod.serve(proj, host="0.0.0.0", port=0)
    out = capsys.readouterr().out
    assert "?token=" in out and "not a loopback address" in out
    token = out.split("?token=")[1].split()[0]
    assert len(token) >= 24 and f":{seen['port']}/" in out
    app = TestClient(seen["app"], base_url="http://labelbox.lan")
    assert app.get("/api/state").status_code == 401
    assert app.get("/api/state", headers={"Authorization": f"Bearer {token}"}).status_code \
        == 200
    serve_mod.serve(proj, host="127.0.0.1", port=0)  # loopback: no token
    out = capsys.readouterr().out
    assert "token" not in out and f"http://127.0.0.1:{seen['port']}/" in out
    assert TestClient(seen["app"], base_url="http://127.0.0.1").get("/api/state") \
        .status_code == 200


def test_serve_reports_a_busy_port_and_a_missing_project(proj, tmp_path):
    from dalbt.errors import DalbtError
    from dalbt.labelling.server import serve

    with background_server(create_app(proj)) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(DalbtError, match="choose another --port"):
            serve(proj, host="127.0.0.1", port=port)
    with pytest.raises(DalbtError, match="not a dalbt labelling project"):
        create_app(tmp_path / "nothing")


@pytest.mark.parametrize("method, url, body, code, says", [
    ("GET", "/api/image/" + "9" * 5000, None, 404, "no image with id '99999"),
    ("GET", "/api/image/" + "0" * 5000 + "1", None, 404, "no image with id"),
    ("POST", "/api/label", '{"image_id": NaN, "label": "1"}', 422, "image_id: Input should "
     "be a valid integer"),
    ("POST", "/api/label", '{"image_id": Infinity, "label": "1"}', 422, "image_id"),
    ("POST", "/api/label", '{"image_id": 1e400, "label": "1"}', 422, "image_id"),
    ("POST", "/api/label", '{"image_id": true, "label": "1"}', 422, "image_id"),
    ("POST", "/api/label", '{"image_id": "1", "label": "1"}', 422, "image_id"),
    ("POST", "/api/label", '{"image_id": 1.0, "label": "1"}', 422, "image_id"),
    ("POST", "/api/label", '{"image_id": 1' + "0" * 5000 + ', "label": "1"}', 400, "parsing"),
    ("POST", "/api/label", '{"image_id": 1, "label": NaN}', 422, "label: Input should be a "
     "valid string"),
    ("POST", "/api/label", '{"image_id": 1, "label": "1", "who": NaN}', 422, "who"),
    ("POST", "/api/label", '{"label": "1"}', 422, "image_id: Field required"),
    ("POST", "/api/label", "[1, 2]", 422, "valid dictionary"),
    ("POST", "/api/label", "null", 422, "valid dictionary"),
    ("POST", "/api/label", '"text"', 422, "valid dictionary"),
    ("POST", "/api/label", "[" * 100_000 + "]" * 100_000, 413, "too large"),
    ("POST", "/api/label", "[" * 30_000 + "]" * 30_000, 400, "error parsing the body"),
    ("POST", "/api/label", "{", 422, "not valid JSON"),
    ("POST", "/api/skip", '{"image_id": NaN}', 422, "image_id"),
    ("POST", "/api/skip", '{"image_id": false}', 422, "image_id"),
    ("POST", "/api/query", '{"budget": NaN}', 422, "budget"),
    ("POST", "/api/query", '{"budget": true}', 422, "budget"),
    ("POST", "/api/query", "[]", 422, "valid dictionary"),
])
def test_hostile_ids_and_bodies_are_4xx_with_a_json_message(proj, method, url, body, code,
                                                           says):
    c = TestClient(create_app(proj), base_url="http://127.0.0.1",
                   raise_server_exceptions=False)
    r = c.request(method, url, content=body, headers={"content-type": "application/json"})
    assert r.status_code == code, r.text[:200]
    detail = r.json()["detail"]
    assert isinstance(detail, str) and says in detail and len(detail) < 300, detail
    assert r.headers["x-content-type-options"] == "nosniff"
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 0
    assert db_rows(proj, "SELECT COUNT(*) FROM queue WHERE status != 'pending'")[0][0] == 0


def test_a_chunked_body_cannot_escape_the_size_limit(proj):
    c = TestClient(create_app(proj), base_url="http://127.0.0.1",
                   raise_server_exceptions=False)

    def chunks():  # no Content-Length: sent with Transfer-Encoding: chunked
        for _ in range(400):
            yield b" " * 50_000

    r = c.post("/api/label", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 411 and "Content-Length" in r.json()["detail"]
    assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 0
