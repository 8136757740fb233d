"""The layout of the command line and the labelling package: defaults taken from the config
dataclasses, the web server as the optional extra ``label``, ``python -m dalbt``, the static
files shipped as package data."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
from dataclasses import asdict
from importlib import resources
from pathlib import Path, PurePosixPath

import pytest

from dalbt.cli import build_parser, main
from dalbt.labelling.config import DEFAULT_HOST, DEFAULT_PORT, ProjectConfig
from dalbt.recipe import RunConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_run_defaults_are_the_run_config_defaults() -> None:
    args = build_parser().parse_args(["run"])
    run, train = RunConfig(), TrainConfig()
    for flag, field in (("dataset", "dataset"), ("model", "model"), ("strategy", "strategy"),
                        ("initial", "initial"), ("budget", "budget"), ("rounds", "rounds"),
                        ("val_size", "val_size"), ("latent_dim", "latent_dim"),
                        ("projector", "projector_dims"), ("unknown_classes", "unknown_classes"),
                        ("mix", "mix"), ("ood_policy", "ood_policy"),
                        ("data_root", "data_root")):
        assert getattr(args, flag) == getattr(run, field), flag
    assert args.seed == [run.seed]
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "lr"),
                        ("weight_decay", "weight_decay"), ("gamma", "gamma"),
                        ("lambd", "lambd"), ("warm_start", "warm_start"),
                        ("eval_every", "eval_every"), ("ssl_pool", "ssl_unlabelled"),
                        ("pretrain_epochs", "pretrain_epochs"),
                        ("pretrain_batch", "pretrain_batch"), ("amp", "amp")):
        assert getattr(args, flag) == getattr(train, field), flag


def test_init_defaults_are_the_project_config_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["init", str(tmp_path / "p"), "--images", str(tmp_path)])
    cfg = ProjectConfig(classes=["a", "b"], image_root=str(tmp_path), image_size=8, channels=1)
    for name in ("strategy", "model", "seed", "val_fraction"):
        assert getattr(args, name) == getattr(cfg, name), name
    # resolved by init: the project's default, or 0 for a backbone (its features choose)
    assert args.cold_start_epochs is None and args.finetune is None
    for name in ("epochs", "batch_size", "gamma"):
        assert getattr(args, name) == getattr(cfg.train, name), name
    serve = build_parser().parse_args(["serve", str(tmp_path)])
    assert (serve.host, serve.port) == (DEFAULT_HOST, DEFAULT_PORT)


def test_project_made_from_python_trains_like_one_made_by_init(tmp_path: Path) -> None:
    """Project.init without a recipe gets the recipe 'dalbt init' gives (one default)."""
    from dalbt.labelling.project import Project
    from tests.test_project import CLASSES, write_digits

    write_digits(tmp_path / "images", 4)
    with Project.init(tmp_path / "api", tmp_path / "images", CLASSES, log=lambda m: None) as p:
        api = asdict(p.config.train)
    with Project.init(tmp_path / "changed", tmp_path / "images", CLASSES, log=lambda m: None,
                      train={"gamma": 0.5}) as p:
        changed = asdict(p.config.train)
    assert main(["init", str(tmp_path / "cli"), "--images", str(tmp_path / "images"),
                 "--classes", ",".join(CLASSES)]) == 0
    with Project(tmp_path / "cli") as p:
        cli = asdict(p.config.train)
    assert api == cli
    assert changed == {**cli, "gamma": 0.5}  # a dict changes the project's recipe


@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_serve_without_the_label_extra_names_it(tmp_path: Path, package: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # 'import <package>' now fails
    monkeypatch.delitem(sys.modules, "dalbt.labelling.server", raising=False)
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dalbt: error: 'dalbt serve' needs {package}, which is not installed: "
                   "pip install 'dalbt[label]'"]


def test_the_label_extra_holds_the_web_server() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("<")[0].strip() for d in meta["optional-dependencies"]["label"]}
    assert names == {"fastapi", "uvicorn"}
    assert not any(d.startswith(("fastapi", "uvicorn")) for d in meta["dependencies"])
    assert ".[dev,label]" in (ROOT / "Makefile").read_text()


def test_static_files_are_package_data() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["dalbt"]
    static = resources.files("dalbt.labelling") / "static"
    names = sorted(f.name for f in static.iterdir())
    assert {"label.html", "label.js", "label.css"} <= set(names)
    for name in names:
        assert any(PurePosixPath("labelling/static", name).match(g) for g in globs), name


def test_old_module_paths_are_gone() -> None:
    for old in ("dalbt.project", "dalbt.serve", "dalbt.interchange", "dalbt.cli_label",
                "dalbt.cli_types"):
        assert importlib.util.find_spec(old) is None, old


def test_python_dash_m_dalbt_runs_the_cli() -> None:
    res = subprocess.run([sys.executable, "-m", "dalbt", "models"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "lenet" in res.stdout and "resnet18" in res.stdout
