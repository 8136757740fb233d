"""The torch-free catalogue behind the CLI's listings and validation, the typed strategy options,
``--help`` defaults, packaging and the learning-curve axis label."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dalbt import catalogue
from dalbt.cli import build_parser
from dalbt.errors import DalbtError
from dalbt.options import Range
from dalbt.strategies import STRATEGIES, build_strategy, list_strategies, strategy_options

ROOT = Path(__file__).resolve().parents[1]


def test_catalogue_strategies_equal_the_registry() -> None:
    """The catalogue read from source gives what importing the strategies gives."""
    infos = catalogue.strategies()
    assert sorted(infos) == sorted(STRATEGIES)
    assert catalogue.list_strategies() == list_strategies()
    for name, cls in STRATEGIES.items():
        assert infos[name].description == cls.description
        assert infos[name].label_free == cls.label_free
        assert dict(infos[name].options) == strategy_options(cls), name
        assert list(infos[name].options) == list(strategy_options(cls)), name


def test_catalogue_models_and_datasets_equal_the_registries() -> None:
    from dalbt.data import DATASETS, list_datasets
    from dalbt.models import MODELS, list_models

    assert catalogue.MODELS == {name: spec.description for name, spec in MODELS.items()}
    assert catalogue.list_models() == list_models()
    assert list(catalogue.DATASETS) == list(DATASETS)
    assert catalogue.list_datasets() == list_datasets()


def test_catalogue_presets_are_the_shipped_ones() -> None:
    from dalbt import bench

    for name, description in catalogue.list_presets():
        assert description == bench.load_preset(name).description and description


def _inside(spec_range: Range, kind: str) -> list[float]:
    """Values at (or, for an open bound, just inside) each end of a range."""
    out = []
    step = 1 if kind == "int" else 1e-6
    if spec_range.low is not None:
        out.append(spec_range.low + step if spec_range.low_open else spec_range.low)
    if spec_range.high is not None:
        out.append(spec_range.high - step if spec_range.high_open else spec_range.high)
    return [int(v) if kind == "int" else float(v) for v in out]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_what_the_annotations_accept_the_constructor_accepts(name: str) -> None:
    """Every typed option is usable: the bounds of its range and each of its choices construct
    the strategy; a value just outside is refused with the option named."""
    for key, spec in strategy_options(STRATEGIES[name]).items():
        values = list(spec.choices)
        if spec.range is not None:
            values += _inside(spec.range, spec.kind)
            outside = (spec.range.low - 1 if spec.range.low is not None
                       else spec.range.high + 1)
            with pytest.raises(DalbtError, match=f"option {key} expects"):
                build_strategy(name, **{key: outside})
        if spec.kind in ("int", "float"):
            assert spec.range is not None, f"{name}: option {key} has no range"
        for value in values + [spec.default] + ([None] if spec.nullable else []):
            build_strategy(name, **{key: value})
        with pytest.raises(DalbtError, match=f"option {key} expects"):
            build_strategy(name, **{key: [1]})


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["strategies"], ["strategies", "--options"], ["datasets"], ["models"],
    ["bench", "--list-presets"], ["run", "--help"], ["--help"],
    ["run", "--lr", "nan"], ["run", "-O", "tail_frac=abc"], ["run", "-O", "min_tail=1.5"],
    ["run", "--strategy", "nosuch"], ["run", "--model", "nosuch"], ["run", "--dataset", "nosuch"],
    ["bench", "--preset", "nosuch"], ["report", "/nonexistent/dir", "--seeds", "x"],
])
def test_listing_and_validation_import_no_torch(argv: list[str]) -> None:
    code = (f"import sys\nfrom dalbt.cli import main\ntry:\n    main({argv!r})\n"
            "except SystemExit:\n    pass\nheavy = sorted(m for m in ('torch', 'numpy', "
            "'dalbt.strategies', 'dalbt.data', 'dalbt.models') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_help_shows_meaningful_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(_help("run", capsys=capsys).split())
    for shown in ("(default: 0.001)", "(default: weibull)", "(default: 100)",
                  "(default: runs/default)", "(default: 64)", "(default: 256-256-256)"):
        assert shown in text, shown
    assert "default: None" not in text and "default: False" not in text
    assert "default: []" not in text
    # the labelling sub-parsers (dalbt.cli.label) get the formatter too
    serve = " ".join(_help("serve", capsys=capsys).split())
    assert "default: 8765" in serve and "default: None" not in serve
    assert "Write the learning-curve plot" in _help("report", capsys=capsys)


def test_every_float_option_is_checked_at_parse_time() -> None:
    """No option of any sub-command (the labelling ones too) takes a bare ``float``: nan and inf
    would pass it."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "run" in a.choices)
    floats = 0
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.type is not float, f"dalbt {name} {action.option_strings}"
            floats += getattr(action.type, "__name__", "") == "finite number"
    assert floats >= 6  # run's four and init's two


def test_pillow_is_declared() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in deps}
    imported = set()
    for path in (ROOT / "src" / "dalbt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
    assert "PIL" in imported and "pillow" in names


def test_axis_label_mentions_the_interval_only_with_a_band(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import matplotlib.axes

    from dalbt.report import Curve, plot_curves

    labels: list[str] = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, text, *a, **k: labels.append(text))
    rng = np.random.default_rng(0)

    def curve(dataset: str, seeds: int) -> Curve:
        return Curve(dataset, f"s{seeds}", list(range(seeds)), np.array([10, 20, 30]),
                     0.5 + 0.1 * rng.random((seeds, 3)))

    plot_curves([curve("a", 1), curve("b", 2), curve("c", 3), curve("d", 3), curve("d", 2)],
                tmp_path / "plot.png")
    assert labels == ["test accuracy (%)", "test accuracy (%), mean over seeds",
                      "test accuracy (%), mean and 95 % CI",
                      "test accuracy (%), mean (95 % CI where n >= 3 seeds)"]
