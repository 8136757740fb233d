"""End-to-end test of the labelling page in a real headless Chromium (Playwright).

Skipped when Playwright or Chromium is missing, unless ``DALBT_REQUIRE_BROWSER=1`` (set by
``make test``), where a missing browser fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalbt.labelling.project import Project
from dalbt.labelling.server import background_server, create_app
from tests.test_serve import CLASSES, db_rows, make_project, pending_ids, write_digits

pytestmark = pytest.mark.slow  # a real browser and server: skipped by make test-quick


def find_chromium() -> str | None:
    """The Chromium binary (Debian's package installs ``/usr/bin/chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_or_skip():
    """Playwright's sync API and the Chromium path, or skip (fail when they are required)."""
    required = os.environ.get("DALBT_REQUIRE_BROWSER") == "1"
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    exe = find_chromium()
    if missing is None and exe is None:
        missing = "chromium is not installed (apt-get install chromium)"
    if missing:
        if required:
            pytest.fail(f"DALBT_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return sync_playwright, exe


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's tests."""
    sync_playwright, exe = browser_or_skip()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def wait_next(page, previous: str | None, timeout: float = 15_000) -> str | None:
    """Wait until the page shows another image than ``previous`` (or none); its image id."""
    page.wait_for_function(
        """prev => { const i = document.getElementById('image');
                     return i.hidden || (i.dataset.imageId && i.dataset.imageId !== prev); }""",
        arg=previous, timeout=timeout)
    return page.evaluate("() => { const i = document.getElementById('image');"
                         " return i.hidden ? null : i.dataset.imageId; }")


def test_label_a_batch_and_train_in_the_browser(tmp_path, browser):
    truth = write_digits(tmp_path / "images", 60)
    proj = tmp_path / "proj"
    with Project.init(proj, tmp_path / "images", CLASSES, train={"epochs": 2},
                      cold_start_epochs=1, log=lambda m: None) as p:
        p.query(10, progress=False, log=lambda m: None)
        path_of = {i: rel for rel, i in p.image_ids().items()}
    digit = {i: str(truth[rel]) for i, rel in path_of.items()}
    app = create_app(proj, user="server-default", budget=4)
    with background_server(app) as url:
        context = browser.new_context()  # the tabs share the labeller name
        try:
            page = context.new_page()
            page.set_default_timeout(15_000)
            page.goto(url + "/")
            page.wait_for_selector("#image[data-image-id]:not([hidden])")
            assert page.input_value("#who") == "server-default"
            assert page.input_value("#budget") == "4"
            assert page.locator("#classes button").count() == 10
            # classes named by digits: each digit key labels its own digit
            assert page.get_attribute('button[data-class="3"]', "title") == "key 3"
            assert page.text_content('button[data-class="0"] kbd') == "0"
            page.fill("#who", "tester")
            page.press("#who", "Enter")  # leaves the field: the keys label again

            # round 0: one skip, one "none of these classes", the rest by the true digit key
            labelled, shown = {}, page.get_attribute("#image", "data-image-id")
            for k in range(10):
                assert page.text_content("#progress") == f"{k + 1} / 10 in round 0"
                image_id = int(shown)
                if k == 0:
                    page.keyboard.press("s")
                elif k == 1:
                    page.keyboard.press("n")
                else:
                    page.keyboard.press(digit[image_id])
                labelled[image_id] = k
                shown = wait_next(page, shown)
                if k == 0:
                    assert "skipped" in page.text_content("#status")
            assert shown is None and page.is_visible("#empty")
            assert page.text_content("#progress") == "queue empty"
            page.wait_for_function("() => document.getElementById('totals').textContent"
                                   ".startsWith('8 of 60 images labelled, 1 as none')")
            counts = {c: int(page.text_content(f'td[data-count="{c}"]')) for c in CLASSES}
            with Project(proj) as p:
                expected = {c: 0 for c in CLASSES}
                for lab in p.current_labels().values():
                    if lab is not None:
                        expected[lab] += 1
            assert counts == expected and sum(counts.values()) == 8

            # a network error keeps the image and asks to retry; nothing is lost
            page.fill("#budget", "10")
            page.click("#train")
            page.wait_for_function("() => document.getElementById('progress').textContent"
                                   " === '1 / 10 in round 1'", timeout=60_000)
            assert page.text_content("#query-status").startswith("round 1: queued 10 images")
            page.wait_for_selector("#image[data-image-id]")
            first = page.get_attribute("#image", "data-image-id")
            page.route("**/api/label", lambda route: route.abort())
            page.keyboard.press("5")
            page.wait_for_function("() => document.getElementById('status').textContent"
                                   ".startsWith('not saved')")
            assert "press the key again" in page.text_content("#status")
            assert page.get_attribute("#image", "data-image-id") == first
            page.unroute("**/api/label")

            # a second tab labels the image the first one shows: the first moves on
            other = context.new_page()
            other.goto(url + "/")
            other.wait_for_selector(f'#image[data-image-id="{first}"]')
            assert other.input_value("#who") == "tester"  # remembered
            other.keyboard.press(digit[int(first)])
            second = wait_next(other, first)
            assert other.text_content("#progress") == "2 / 10 in round 1"
            shown = wait_next(page, first, timeout=10_000)
            assert shown == second
            assert "elsewhere" in page.text_content("#status")
            assert page.text_content("#progress") == "2 / 10 in round 1"

            # an image changed on disk is skipped with its reason, not fatal
            with Project(proj) as p:
                third = p.pending()[1]
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / third.path)
            page.keyboard.press(digit[int(second)])
            shown = wait_next(page, second)
            assert shown is not None and int(shown) != third.image_id
            assert re.match(r"skipped: image .* changed on disk", page.text_content("#status"))
            assert page.text_content("#progress") == "4 / 10 in round 1"
            history = page.evaluate(
                "async () => (await fetch(document.getElementById('history').src)).status")
            assert history == 200
        finally:
            context.close()

    with sqlite3.connect(proj / "project.sqlite") as db:
        labels = db.execute("SELECT image_id, label, kind, who, source FROM labels "
                            "ORDER BY id").fetchall()
        queue = dict(db.execute("SELECT image_id, status FROM queue WHERE round = 0"))
        rounds = db.execute("SELECT round, method, n_labelled FROM rounds").fetchall()
        changed = db.execute("SELECT status FROM images WHERE id = ?",
                             (third.image_id,)).fetchone()
    order = sorted(labelled, key=labelled.get)
    # the skipped image went back to the pool: skipped, unless round 1 queued it and it got a
    # label there (a label closes its earlier queue entries too)
    later = {int(first), int(second)}
    assert queue[order[0]] == ("done" if order[0] in later else "skipped")
    assert all(queue[i] == "done" for i in order[1:])
    round0 = labels[:9]
    assert round0[0] == (order[1], None, "ood", "tester", "web")
    assert round0[1:] == [(i, digit[i], "class", "tester", "web") for i in order[2:]]
    assert labels[9:] == [(int(first), digit[int(first)], "class", "tester", "web"),
                          (int(second), digit[int(second)], "class", "tester", "web")]
    assert rounds == [(0, "cold-start", 0), (1, "dalbt", 8)]
    assert changed == ("changed",)
    assert Path(proj / "checkpoints" / "round_001.pt").is_file()


def test_named_classes_keys_and_token_cookie(tmp_path, browser):
    write_digits(tmp_path / "images", 6)
    proj = tmp_path / "proj"
    with Project.init(proj, tmp_path / "images", ["cat", "dog", "bird"], cold_start_epochs=0,
                      log=lambda m: None) as p:
        p.query(3, progress=False, log=lambda m: None)
        queued = [q.image_id for q in p.pending()]
    with background_server(create_app(proj, user="u", token="tok-123")) as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            assert page.goto(url + "/").status == 401
            page.goto(url + "/?token=tok-123")  # sets the cookie; the page drops the token
            page.wait_for_selector("#image[data-image-id]:not([hidden])")
            assert page.url == url + "/"
            assert page.evaluate("document.cookie") == ""  # HttpOnly: not readable by scripts
            assert [page.text_content(f'button[data-class="{c}"] kbd')
                    for c in ("cat", "dog", "bird")] == ["1", "2", "3"]
            shown = page.get_attribute("#image", "data-image-id")
            page.keyboard.press("4")  # no fourth class: nothing happens
            page.keyboard.press("2")
            shown = wait_next(page, shown)
            page.click('button[data-class="bird"]')
            shown = wait_next(page, shown)
            page.keyboard.press("1")
            assert wait_next(page, shown) is None
            assert page.is_visible("#empty")
        finally:
            context.close()
    with sqlite3.connect(proj / "project.sqlite") as db:
        rows = db.execute("SELECT image_id, label, who FROM labels ORDER BY id").fetchall()
    assert rows == [(queued[0], "dog", "u"), (queued[1], "bird", "u"), (queued[2], "cat", "u")]


def open_page(context, url: str):
    """A new tab on the labelling page, once it shows an image."""
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(url + "/")
    page.wait_for_selector("#image[data-image-id]:not([hidden])")
    return page


def shown_id(page) -> int:
    return int(page.get_attribute("#image", "data-image-id"))


def test_undo_with_keys_and_button_and_after_another_tab(tmp_path, browser):
    proj = make_project(tmp_path, n=10, budget=5)
    order = pending_ids(proj)
    with background_server(create_app(proj, user="ann")) as url:
        context = browser.new_context()
        try:
            page = open_page(context, url)
            assert page.is_disabled("#undo")  # nothing to undo yet
            a = shown_id(page)
            page.keyboard.press("3")
            b = int(wait_next(page, str(a)))
            page.keyboard.press("u")  # the label of a is undone: a is shown again at once
            page.wait_for_selector(f'#image[data-image-id="{a}"]')
            assert page.text_content("#status").startswith("undone: the label 3 of ")
            page.click('button[data-class="4"]')
            wait_next(page, str(a))
            page.keyboard.press("s")  # skip b
            wait_next(page, str(b))
            page.keyboard.press("Control+z")  # undoes the skip: b is back
            page.wait_for_selector(f'#image[data-image-id="{b}"]')
            page.click("#undo")  # undoes the label 4 of a: two steps back in all
            page.wait_for_selector(f'#image[data-image-id="{a}"]')
            page.wait_for_function("() => document.getElementById('undo').disabled")
            assert page.text_content("#progress") == "1 / 5 in round 0"
            rows = db_rows(proj, "SELECT image_id, label, kind, source FROM labels ORDER BY id")
            assert rows == [(a, "3", "class", "web"), (a, None, "none", "web-undo"),
                            (a, "4", "class", "web"), (a, None, "none", "web-undo")]
            assert pending_ids(proj) == order  # the skip is undone too

            # tab A labels a, tab B labels another image; A's undo leaves B's label alone
            page.keyboard.press("5")
            wait_next(page, str(a))
            other = open_page(context, url)
            c = shown_id(other)
            assert c != a
            other.keyboard.press("6")
            wait_next(other, str(c))
            page.keyboard.press("u")
            page.wait_for_selector(f'#image[data-image-id="{a}"]')
            with Project(proj) as p:
                assert p.current_labels() == {c: "6"}

            # A labels a again, then another tab relabels a: A's undo is refused and dropped
            page.keyboard.press("7")
            wait_next(page, str(a))
            status = other.evaluate(
                """async (id) => (await fetch('/api/label', {method: 'POST',
                     headers: {'Content-Type': 'application/json'},
                     body: JSON.stringify({image_id: id, label: '8', who: 'bob'})})).status""",
                a)
            assert status == 200
            before = shown_id(page)
            page.keyboard.press("u")
            page.wait_for_function("() => document.getElementById('status').textContent"
                                   ".startsWith('cannot undo')")
            assert "labelled again since" in page.text_content("#status")
            assert shown_id(page) == before
            assert page.is_disabled("#undo")  # the refused step left the stack
            with Project(proj) as p:
                assert p.current_labels() == {c: "6", a: "8"}
        finally:
            context.close()


def test_guess_enter_file_name_zoom_and_contrast(tmp_path, browser):
    proj = make_project(tmp_path, n=6, budget=3)
    with Project(proj) as p:
        first, second = p.pending()[:2]
        with p.transaction() as db:  # the guess a trained model would have stored
            db.execute("UPDATE queue SET predicted = '7', confidence = 0.87 WHERE image_id = ?",
                       (first.image_id,))
    with background_server(create_app(proj, user="ann")) as url:
        context = browser.new_context()
        try:
            page = open_page(context, url)
            assert shown_id(page) == first.image_id
            assert page.text_content("#filename") == first.path
            assert page.text_content("#guess") == "model's guess: 7 (87 %)"
            assert page.is_visible("#guess-accept")
            assert page.get_attribute('button[data-class="7"]', "class") == "guess"
            assert page.locator("#classes button.guess").count() == 1

            style = "(p) => document.getElementById('image').style[p]"
            page.keyboard.press("+")
            assert page.evaluate(style, "transform") == "scale(1.25)"
            page.keyboard.press("-")
            assert page.evaluate(style, "transform") == ""
            box = page.locator("#frame").bounding_box()
            page.mouse.move(box["x"] + box["width"] / 4, box["y"] + box["height"] / 4)
            page.mouse.wheel(0, -100)
            page.wait_for_function("() => document.getElementById('image').style.transform"
                                   " === 'scale(1.25)'")
            assert page.evaluate(style, "transformOrigin").startswith("25%")
            assert page.text_content("#zoom-level") == "125 %"
            page.click("#zoom-reset")
            assert page.evaluate(style, "transform") == ""
            page.keyboard.press("c")
            assert page.evaluate(style, "filter").startswith("brightness(")
            assert page.get_attribute("#contrast", "aria-pressed") == "true"
            page.click("#contrast")
            assert page.evaluate(style, "filter") == ""
            assert page.evaluate(
                "() => getComputedStyle(document.getElementById('image')).imageRendering"
            ) == "pixelated"

            # hidden guess: not shown, not highlighted, Enter does nothing; remembered
            page.uncheck("#show-guess")
            assert not page.is_visible("#guess")
            assert page.locator("#classes button.guess").count() == 0
            page.keyboard.press("Enter")
            page.reload()
            page.wait_for_selector("#image[data-image-id]:not([hidden])")
            assert not page.is_checked("#show-guess")
            assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 0
            page.check("#show-guess")

            page.keyboard.press("Enter")  # accepts the guess 7
            wait_next(page, str(first.image_id))
            assert db_rows(proj, "SELECT image_id, label, source FROM labels") == [
                (first.image_id, "7", "web")]
            assert page.text_content("#status") == "saved: 7"
            assert shown_id(page) == second.image_id
            assert page.text_content("#guess") == "no guess yet: cold-start round"
            assert page.locator("#classes button.guess").count() == 0
            page.keyboard.press("Enter")  # no guess: nothing happens
            page.keyboard.press("u")  # a later key: the Enter above sent nothing before it
            page.wait_for_selector(f'#image[data-image-id="{first.image_id}"]')
            assert db_rows(proj, "SELECT COUNT(*) FROM labels")[0][0] == 2
        finally:
            context.close()


def test_progress_bar_during_a_real_training(tmp_path, browser):
    truth = write_digits(tmp_path / "images", 60)
    proj = tmp_path / "proj"

    def label_all(p):
        for q in p.pending():
            p.add_label(q.image_id, str(truth[q.path]), who="t", source="api")

    events = []
    with Project.init(proj, tmp_path / "images", CLASSES, train={"epochs": 2},
                      cold_start_epochs=0, min_steps=80, log=lambda m: None) as p:
        p.query(20, progress=False, log=lambda m: None)
        label_all(p)
        p.query(10, progress=False, log=lambda m: None, on_progress=events.append)
        label_all(p)
    # this machine's pace after the first step (which pays one-time costs; one step an epoch:
    # 30 labels, batch 64) sets a training of ~5 s
    train = [e for e in events if e.phase == "training" and e.done > 0]
    pace = ((train[-1].elapsed_s - train[0].elapsed_s) / (train[-1].done - train[0].done)
            if len(train) > 1 else train[-1].elapsed_s / train[-1].done)
    steps = int(np.clip(5.0 / pace, 300, 5000))
    with sqlite3.connect(proj / "project.sqlite") as db:
        (raw,) = db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        db.execute("UPDATE meta SET value = ? WHERE key = 'config'",
                   (re.sub(r'"min_steps": \d+', f'"min_steps": {steps}', raw),))
    assert Project(proj).config.min_steps == steps
    with background_server(create_app(proj, budget=10)) as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.wait_for_selector("#empty:not([hidden])")
            assert page.is_hidden("#running")
            page.click("#train")
            bar = "document.getElementById('query-progress')"
            page.wait_for_function(f"() => {bar}.dataset.phase === 'training' && "
                                   f"{bar}.value > 0")
            assert page.evaluate(f"{bar}.tagName") == "PROGRESS"
            assert page.evaluate(f"{bar}.max") == steps
            first = page.evaluate(f"{bar}.value")
            text = page.text_content("#query-phase")
            assert re.match(rf"training: epoch \d+ / {steps}, loss \d", text), text
            page.wait_for_function(f"v => {bar}.dataset.phase === 'training' && "
                                   f"{bar}.value > v && {bar}.value < {bar}.max", arg=first)
            later = page.text_content("#query-phase")
            assert "left" in later, later  # the pace is known after the first update
            page.wait_for_function("() => document.getElementById('query-status')"
                                   ".textContent.startsWith('round 2: queued 10 images')")
            assert page.is_hidden("#running")
            page.wait_for_selector("#image[data-image-id]:not([hidden])")
        finally:
            context.close()
