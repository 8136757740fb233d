"""The command line: listings, a small run with report, and every bad-input case."""

import subprocess
import sys

import pytest

from dalbt.cli import main

SMALL = ["--dataset", "digits", "--initial", "20", "--budget", "10", "--rounds", "1",
         "--epochs", "1", "--val-size", "100", "--projector", "16-16", "--no-progress"]


def _fails(capsys, argv, pattern):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert pattern in err, err
    return err


def test_listings(capsys):
    for cmd, names in [("datasets", ["digits", "fashion-mnist", "cifar10", "svhn", "folder"]),
                       ("strategies", ["random", "weibull"]),
                       ("models", ["lenet", "vgg16", "resnet18"])]:
        assert main([cmd]) == 0
        out = capsys.readouterr().out
        for n in names:
            assert n in out


@pytest.mark.slow
def test_run_then_report(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["run", *SMALL, "--out", str(out), "--seed", "0", "1"]) == 0
    text = capsys.readouterr().out
    assert "learning_curve.png" in text and "weibull" in text
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    csv = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,strategy,seed,round") and len(csv) == 1 + 2 * 2
    # rerunning the same config without --resume is refused; with --resume it is skipped
    _fails(capsys, ["run", *SMALL, "--out", str(out)], "--resume")
    assert main(["run", *SMALL, "--out", str(out), "--resume"]) == 0


@pytest.mark.parametrize("argv, pattern", [
    (["run", "--dataset", "nope"], "unknown dataset"),
    (["run", "--strategy", "nope"], "unknown strategy"),
    (["run", "--model", "nope"], "unknown model"),
    (["run", "--budget", "0"], "must be positive"),
    (["run", "--budget", "-5"], "must be positive"),
    (["run", "--budget", "ten"], "expected an integer"),
    (["run", "--rounds", "-1"], "must be >= 0"),
    (["run", *SMALL, "--initial", "1000", "--budget", "100", "--rounds", "5"], "exceeds the pool"),
    (["run", *SMALL, "--val-size", "1490"], "exceed"),
    (["run", *SMALL, "-O", "distance=manhattan"], "option distance expects one of"),
    (["run", *SMALL, "-O", "nokeyvalue"], "KEY=VALUE"),
    (["run", *SMALL, "--device", "cuda:7"], "--device"),
    (["run", *SMALL, "--gamma", "-1"], "--gamma"),
    (["run", *SMALL, "--lr", "-1"], "--lr"),
    (["run", *SMALL, "--weight-decay", "-0.1"], "--weight-decay"),
    (["report", "/nonexistent/dir"], "no dalbt results"),
    (["run", *SMALL, "--unknown-classes", "42"], "42"),
    (["run", *SMALL, "--mix", "nope:5"], "nope"),
    (["run", *SMALL, "--mix", "kmnist"], "kmnist"),
    (["run", *SMALL, "--ssl-pool", "--gamma", "0"], "--gamma"),
    (["run", *SMALL, "--ood-policy", "keep"], "invalid choice"),
])
def test_bad_input_is_one_line_nonzero(capsys, argv, pattern):
    import torch

    if "cuda:7" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _fails(capsys, argv, pattern)


def test_missing_and_unreadable_files(tmp_path, capsys):
    err = _fails(capsys, ["run", "--dataset", "mnist", "--data-root", str(tmp_path)], "mnist")
    assert str(tmp_path) in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dalbt.sqlite").write_text("this is not a database" * 100)
    _fails(capsys, ["report", str(bad)], "not a readable dalbt database")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["run", *SMALL, "--out", str(blocker / "sub")], "cannot")


def test_console_script_error_has_no_traceback():
    res = subprocess.run([sys.executable, "-m", "dalbt", "run", "--dataset", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("dalbt: error: unknown dataset")
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
