"""The step-recipe presets keep fashion-mnist-small's protocol and change only the recipe."""

from __future__ import annotations

import pytest

from dalbt.bench import expand, load_preset

PROTOCOL = ("dataset", "model", "initial", "budget", "rounds", "val_size", "seed",
            "projector_dims")


def _configs(name):
    return {(r.config.strategy, r.config.seed): r.config for r in expand(load_preset(name))[0]}


@pytest.mark.parametrize(("preset", "recipe"), [
    ("fashion-mnist-steps", {"steps": 600, "eval_every_steps": 100, "pretrain_epochs": 0,
                             "finetune": "all"}),
    ("fashion-mnist-ssl", {"steps": 600, "eval_every_steps": 100, "pretrain_epochs": 10,
                           "finetune": "all"}),
    ("fashion-mnist-probe", {"steps": None, "pretrain_epochs": 10, "finetune": "head"}),
])
def test_step_presets_share_the_small_protocol(preset, recipe):
    small = _configs("fashion-mnist-small")
    runs = _configs(preset)
    assert sorted({s for s, _ in runs}) == ["badge", "margin", "random", "weibull-balanced"]
    assert sorted({seed for _, seed in runs}) == [0, 1, 2, 3, 4]
    reference = small[("random", 0)]
    for cfg in runs.values():
        for name in PROTOCOL[:-2]:
            assert getattr(cfg, name) == getattr(reference, name), name
        assert cfg.projector_dims == reference.projector_dims
        for name, value in recipe.items():
            assert getattr(cfg.train, name) == value, name
        # random runs under the same self-supervision as the strategies it is compared with
        assert cfg.train == runs[("random", cfg.seed)].train


def test_paper_presets_are_unchanged_by_the_step_settings():
    for name in ("fashion-mnist-small", "digits", "fashion-mnist-100", "mnist-100"):
        for cfg in _configs(name).values():
            assert cfg.train.steps is None and cfg.train.finetune == "all"
            assert "steps" not in cfg.key_dict()["train"]
