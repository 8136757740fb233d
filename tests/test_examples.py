"""Every script under examples/ runs (on small settings) and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# script -> (arguments that keep it small, text its output must contain)
SMALL = {
    "learner_own_model.py": (["--rounds", "2", "--epochs", "2"], "40 labels: test accuracy"),
    "learner_image_folder.py": (["--rounds", "2"], "labelled 20 of 200 images"),
    "select_from_arrays.py": ([], "margin   dataset indices"),
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALL))
def test_example_runs(script):
    args, expected = SMALL[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout
