"""Take ``docs/labelling.png``: the labelling page mid-batch on a digits project.

The project gets a few rounds first (their batches labelled from the digits' true classes) so
that the accuracy plot has a history; then a headless Chromium labels a few images of the
current batch by key presses (the model's guess shown beside each), presses "Train and queue
next batch" and takes the screenshot while the training's progress bar runs.

Usage: ``.venv/bin/python docs/screenshot_labelling.py [--out docs/labelling.png]`` (needs
Playwright and Debian's ``chromium``; under a minute on one CPU core).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from dalbt.labelling.project import Project
from dalbt.labelling.server import background_server, create_app

CLASSES = [str(c) for c in range(10)]


def build_project(folder: Path, n_images: int, rounds: int, batch: int) -> dict[int, str]:
    """A digits project with ``rounds`` labelled batches and one more queued.

    Returns:
        Image id -> true class.
    """
    digits = load_digits()
    images = folder / "images"
    images.mkdir(parents=True)
    for i in range(n_images):
        pixels = np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i:04d}_{digits.target[i]}.png")
    with Project.init(folder / "proj", images, CLASSES, train={"epochs": 100}, min_val=5,
                      cold_start_epochs=5, log=lambda m: None) as p:
        truth = {i: rel.split("_")[1][0] for rel, i in p.image_ids().items()}
        for _ in range(rounds):
            p.query(batch, progress=False)
            for q in p.pending():
                p.add_label(q.image_id, truth[q.image_id], who="maria", source="web")
        p.query(batch, progress=False)
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("labelling.png")))
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batch", type=int, default=30)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    torch.set_num_threads(1)
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        truth = build_project(Path(tmp), args.images, args.rounds, args.batch)
        app = create_app(Path(tmp) / "proj", user="maria", budget=args.batch)
        with background_server(app) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True,
                                         args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1240, "height": 860})
            page.goto(url + "/")
            page.wait_for_selector("#image[data-image-id]:not([hidden])")
            for _ in range(6):  # label a few of the batch, as a person would
                shown = page.get_attribute("#image", "data-image-id")
                page.keyboard.press(truth[int(shown)])
                page.wait_for_function(
                    "prev => document.getElementById('image').dataset.imageId !== prev",
                    arg=shown)
            page.click("#train")  # a training starts: the progress bar shows it
            page.wait_for_function(
                "() => !document.getElementById('running').hidden"
                " && document.getElementById('query-progress').value > 0.25"
                " && /^training: .* left/.test("
                "document.getElementById('query-phase').textContent)",
                timeout=120_000)
            page.wait_for_function("() => document.getElementById('history').complete")
            page.wait_for_timeout(300)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
            app.state.query_job.thread.join()  # let the training end before the server stops
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
