"""Bad input to every ``dalbt`` command: exit code 2, one ``dalbt: error:`` line, no traceback.

Each row is an argv (``{tmp}`` stands for a fresh temporary directory, ``{file}`` for a file in
it, ``{garbled}`` for a directory whose ``dalbt.sqlite`` is not a database) and a piece of the
expected message. The rows run in-process through ``dalbt.cli.main``; argparse errors arrive as
``SystemExit(2)``.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

from dalbt import cli
from dalbt.cli import main

RUN = ["run", "--dataset", "digits", "--rounds", "0", "--epochs", "1"]

CASES = [
    # --- run: numbers at parse time (item 3) ---
    (["run", "--lr", "nan"], "argument --lr: expected a finite number > 0 and <= 1e+06, got 'nan'"),
    (["run", "--lr", "inf"], "argument --lr: expected a finite number > 0 and <= 1e+06, got 'inf'"),
    (["run", "--lr=-inf"], "argument --lr: expected a finite number > 0"),
    (["run", "--lr", "0"], "argument --lr: expected a finite number > 0 and <= 1e+06, got '0'"),
    (["run", "--lr=-1e-3"], "argument --lr"),
    (["run", "--lr", "fast"], "argument --lr: expected a finite number > 0 and <= 1e+06"),
    (["run", "--gamma", "nan"], "argument --gamma: expected a finite number >= 0, got 'nan'"),
    (["run", "--gamma", "-1"], "argument --gamma: expected a finite number >= 0, got '-1'"),
    (["run", "--gamma", "inf"], "argument --gamma"),
    (["run", "--lambd", "nan"], "argument --lambd: expected a finite number >= 0"),
    (["run", "--lambd", "-0.1"], "argument --lambd"),
    (["run", "--weight-decay", "NaN"], "argument --weight-decay: expected a finite number >= 0"),
    (["run", "--weight-decay=-1e-5"], "argument --weight-decay"),
    (["run", "--budget", "0"], "argument --budget: must be positive"),
    (["run", "--epochs", "ten"], "argument --epochs: expected an integer"),
    (["run", "--seed", "-1"], "argument --seed: expected a seed from 0 to"),
    (["run", "--projector", "0-16"], "argument --projector"),
    # --- run: values too large for torch or SQLite (they overflowed inside Adam, torch or
    # sqlite3 with a traceback) ---
    (["run", "--lr", "1e300"], "argument --lr: expected a finite number > 0 and <= 1e+06"),
    (["run", "--weight-decay", "1e300"], "argument --weight-decay: expected a finite number >= 0 "
     "that float32 can hold"),
    (["run", "--gamma", "1e39"], "that float32 can hold"),
    (["run", "--seed", "99999999999999999999999999"], "argument --seed: expected a seed"),
    (["run", "--batch-size", "99999999999999999999"], "argument --batch-size: expected a batch "
     "size from 2 to"),
    (["run", "--batch-size", "1"], "argument --batch-size: expected a batch size from 2"),
    (["run", "--pretrain-batch", "99999999999999999999"], "argument --pretrain-batch"),
    (["run", "--projector", "99999999999-2"], "argument --projector: expected widths from 1"),
    (["run", "--latent-dim", "99999999999"], "argument --latent-dim: expected a width"),
    (["run", "--threads", "100000000000"], "argument --threads: expected a number of threads"),
    (["run", "--ood-policy", "keep"], "invalid choice"),
    # --- run: strategy options (item 6), checked against the catalogue before torch loads ---
    ([*RUN, "-O", "tail_frac=abc"],
     "bad options for strategy 'weibull': option tail_frac expects a finite number in (0, 1], "
     "got 'abc'"),
    ([*RUN, "-O", "tail_frac=0"], "option tail_frac expects a finite number in (0, 1], got 0"),
    ([*RUN, "-O", "tail_frac=nan"], "option tail_frac expects a finite number"),
    ([*RUN, "-O", "min_tail=1.5"],
     "bad options for strategy 'weibull': option min_tail expects an integer >= 1, got 1.5"),
    ([*RUN, "-O", "distance=manhattan"],
     "option distance expects one of 'euclidean', 'cosine', 'eucos', got 'manhattan'"),
    ([*RUN, "-O", "balance=maybe"], "option balance expects true or false, got 'maybe'"),
    ([*RUN, "-O", "nosuch=1"],
     "bad options for strategy 'weibull': no option 'nosuch'; its options: distance, assign, "
     "tail_frac, min_tail, direction, balance"),
    ([*RUN, "--strategy", "random", "-O", "k=1"],
     "bad options for strategy 'random': no option 'k'; it takes no options"),
    ([*RUN, "--strategy", "bald", "-O", "samples=1"],
     "bad options for strategy 'bald': option samples expects an integer >= 2, got 1"),
    ([*RUN, "--strategy", "bald", "-O", "dropout=1"], "option dropout expects a finite number "
                                                        "in (0, 1), got 1"),
    ([*RUN, "--strategy", "ensemble-varratio", "-O", "epochs=0"],
     "option epochs expects an integer >= 1 or None, got 0"),
    ([*RUN, "--strategy", "waal", "-O", "penalty=none"], "option penalty expects one of"),
    ([*RUN, "-O", "nokeyvalue"], "argument --strategy-option/-O: expected KEY=VALUE"),
    ([*RUN, "-O", "=3"], "expected KEY=VALUE"),
    # --- run: names (item 7: no torch, no data) ---
    ([*RUN, "--strategy", "nosuch"], "unknown strategy 'nosuch'; known strategies: badge"),
    ([*RUN, "--model", "nosuch"],
     "unknown model 'nosuch'; known models: lenet, resnet18, resnet18-w16, vgg16"),
    ([*RUN, "--model", "timm:nosuch"], "unknown timm model 'nosuch'"),
    ([*RUN, "--model", "timm:resnet18", "--weights", "{tmp}/none.pth"],
     "--weights file {tmp}/none.pth does not exist"),
    ([*RUN, "--model", "timm:test_vit", "--weights", "none", "--input-size", "33"],
     "timm:test_vit refuses 33x33 inputs"),
    ([*RUN, "--dataset", "nosuch"], "unknown dataset 'nosuch'; known datasets: digits"),
    ([*RUN, "--mix", "nope:5"], "unknown dataset 'nope' in --mix"),
    # --- report ---
    (["report", "{tmp}", "--seeds", "abc"], "argument --seeds: expected seeds"),
    (["report", "{tmp}", "--seeds", "0,-1"], "argument --seeds"),
    (["report", "{tmp}/missing"], "no dalbt results in"),
    (["report"], "the following arguments are required: directory"),
    (["report", "{garbled}"], "dalbt.sqlite"),
    # --- bench ---
    (["bench"], "give a bench CONFIG file or --preset NAME"),
    (["bench", "--preset", "nosuch"], "unknown preset 'nosuch'; presets: "),
    (["bench", "{tmp}/missing.yaml"], "cannot read bench config {tmp}/missing.yaml: no such file"),
    (["bench", "{tmp}"], "cannot read bench config {tmp}: it is a directory"),
    (["bench", "{file}"], "{file}"),
    (["bench", "--list-presets", "--preset", "digits"], "--list-presets takes no CONFIG"),
    (["bench", "--preset", "digits", "--jobs", "0"], "argument --jobs: must be positive"),
    # --- listings ---
    (["datasets", "extra"], "unrecognized arguments: extra"),
    (["strategies", "--verbose"], "unrecognized arguments: --verbose"),
    (["models", "x"], "unrecognized arguments: x"),
    (["nosuch"], "argument command: invalid choice: 'nosuch'"),
    ([], "the following arguments are required: command"),
    # --- labelling commands ---
    (["init", "{tmp}/p"], "the following arguments are required: --images"),
    (["init", "{tmp}/p", "--images", "{tmp}", "--epochs", "0"], "argument --epochs"),
    (["init", "{tmp}/p", "--images", "{tmp}", "--channels", "2"], "argument --channels"),
    (["init", "{tmp}/p", "--images", "{tmp}", "--gamma", "nan"],
     "argument --gamma: expected a finite number >= 0, got 'nan'"),
    (["init", "{tmp}/p", "--images", "{tmp}", "--val-fraction", "inf"], "argument --val-fraction"),
    (["query", "{tmp}", "--budget", "5"], "is not a dalbt labelling project"),
    (["query", "{tmp}", "--budget", "0"], "argument --budget: expected a number of images from 1"),
    (["query", "{tmp}"], "the following arguments are required: --budget"),
    (["serve", "{tmp}/missing"], "is not a dalbt labelling project"),
    (["serve", "{tmp}", "--port", "http"], "argument --port"),
    (["export", "{tmp}/missing"], "is not a dalbt labelling project"),
    (["export", "{tmp}", "--format", "xml"], "argument --format: invalid choice"),
    (["import", "{tmp}/missing", "{file}"], "is not a dalbt labelling project"),
    (["import", "{tmp}"], "the following arguments are required: file"),
]


def _fill(text: str, tmp: Path) -> str:
    return (text.replace("{tmp}", str(tmp)).replace("{file}", str(tmp / "notes.txt"))
            .replace("{garbled}", str(tmp / "garbled")))


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def _assert_one_error(capsys: pytest.CaptureFixture[str], code: int, expected: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dalbt: error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], err
    return lines[0]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                   expected: str) -> None:
    (tmp_path / "notes.txt").write_text("not: [a bench config\n")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "dalbt.sqlite").write_bytes(b"garbage page " * 400)
    code = _exit_code([_fill(a, tmp_path) for a in argv])
    _assert_one_error(capsys, code, _fill(expected, tmp_path))


@pytest.mark.parametrize("message, says, never", [
    ("database is locked", "is locked", "damaged"),
    ("file is not a database", "is damaged (file is not a database)", "another dalbt process"),
    ("database disk image is malformed", "is damaged", "another dalbt process"),
    ("attempt to write a readonly database", "readonly", "another dalbt process"),
])
def test_database_errors_say_what_happened(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, message: str,
                                           says: str, never: str) -> None:
    """An SQLite error that reaches the CLI names the database file, and blames another process
    only when the database is locked."""
    def fail(args: object) -> int:
        raise sqlite3.OperationalError(message)

    monkeypatch.setattr(cli, "cmd_report", fail)
    line = _assert_one_error(capsys, _exit_code(["report", str(tmp_path)]), says)
    assert str(tmp_path / "dalbt.sqlite") in line
    assert never not in line
    monkeypatch.setattr(cli, "dispatch", fail)
    line = _assert_one_error(capsys, _exit_code(["export", str(tmp_path)]), says)
    assert str(tmp_path / "project.sqlite") in line


def test_valid_options_reach_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the catalogue accepts is passed on checked: bool text becomes a bool, numbers stay
    as given (the stored config, and so --resume, does not change)."""
    seen = {}

    def fake_run(args: object, dist: object, device: str) -> int:
        seen["options"] = args.strategy_option  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(cli, "_run", fake_run)
    assert main([*RUN, "-O", "balance=false", "-O", "tail_frac=1", "-O", "min_tail=4",
                 "--device", "cpu"]) == 0
    assert seen["options"] == {"balance": False, "tail_frac": 1, "min_tail": 4}
    assert isinstance(seen["options"]["tail_frac"], int)


def test_console_script_reports_bad_number_without_traceback() -> None:
    import subprocess

    res = subprocess.run([sys.executable, "-m", "dalbt", "run", "--lr", "nan"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("dalbt: error: argument --lr: expected a finite number > 0")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
