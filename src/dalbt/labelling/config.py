"""The settings of a labelling project, as plain data: no numpy, no torch, so that the command
line takes its defaults from here and checks a project's settings before anything heavy loads."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

from dalbt.errors import DalbtError
from dalbt.recipe import MAX_EPOCHS, MAX_SEED, TrainConfig, check_int

MAX_IMAGE_SIZE = 512  # model input side; larger sides make the pixel cache and training huge
CHANNELS = (1, 3)  # grayscale or RGB
PROJECT_EPOCHS = 50  # epochs per query of a project's recipe (raised further by min_steps)

# The labelling page (``dalbt serve``).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_ML_PORT = 9090  # dalbt serve-ml; Label Studio's examples use 9090 for ML backends
DEFAULT_BUDGET = 20  # images per query when neither the server nor an earlier batch says
MAX_BUDGET = 1_000_000  # images per query asked for on the command line or the page

EXPORT_FORMATS = ("csv", "labelstudio", "labelstudio-config")  # of ``dalbt export``


def project_recipe() -> TrainConfig:
    """The training recipe of a new project: :class:`TrainConfig`'s, with
    :data:`PROJECT_EPOCHS` epochs."""
    return TrainConfig(epochs=PROJECT_EPOCHS)


@dataclass
class ProjectConfig:
    """Settings of a labelling project, fixed at ``dalbt init`` (stored in the database).

    Attributes:
        classes: Class names, in button order.
        image_root: Absolute path of the image folder.
        image_size: Side of the square the images are resized to for the model.
        channels: 1 (grayscale) or 3 (RGB).
        strategy: Query strategy (default ``dalbt``: typical first while classes are thin, then
            margin, among the Weibull inliers; on held-out Fashion-MNIST seeds it had the
            highest AUBC from a cold start, 0.672 against random's 0.641, and tied margin on an
            open-set pool, 0.845 against random's 0.829, with 34 % of its queries out of
            distribution against random's 41 %: BENCHMARKS.md, "Issue 14").
        strategy_options: Its keyword options.
        model: Encoder architecture.
        seed: Root seed of every random stream.
        val_fraction: Share of the labelled images held out for model selection and the
            accuracy history (assigned by content hash, so an image keeps its role).
        min_val: Fewer held-out images than this: no validation split (all labels train).
        min_steps: Fewest optimiser steps per query: with few labels an epoch is one step, so
            the epochs are raised to reach this many steps.
        planned_rounds: Number of rounds strategies that plan ahead (PT4AL) assume.
        cold_start_epochs: Barlow Twins epochs on all images before the first query when there
            are no labels yet (the first batch is then chosen on those features).
        cold_start_strategy: The label-free strategy that chooses that first batch (default
            ``dalbt``, which before any label is TypiClust; k-centre greedy, ``coreset``, the
            earlier default, was the worst of five cold starts on held-out Fashion-MNIST seeds,
            AUBC 0.551 against random's 0.641).
        train: Training recipe of each round (default: :func:`project_recipe`); with
            ``finetune="head"`` the encoder stays frozen and its embeddings are cached in the
            project directory (:mod:`dalbt.embeddings`).
        weights: A ``timm:``/``torchvision:`` backbone's weights (a file, ``default`` or
            ``none``; see :mod:`dalbt.models.backbones`).
        input_size: Side a backbone's input is resized to (None: its own).
    """

    classes: list[str]
    image_root: str
    image_size: int
    channels: int
    strategy: str = "dalbt"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    model: str = "lenet"
    seed: int = 0
    val_fraction: float = 0.2
    min_val: int = 20
    min_steps: int = 200
    planned_rounds: int = 10
    cold_start_epochs: int = 10
    cold_start_strategy: str = "dalbt"
    train: TrainConfig = field(default_factory=project_recipe)
    weights: str | None = None
    input_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProjectConfig:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def validate_config(cfg: ProjectConfig) -> None:
    """Check every setting of a project before it is stored or used to train.

    Names and options are checked against the model and strategy registries; numbers must be
    finite and in range.

    Raises:
        DalbtError: Naming the first bad setting, its value and what is allowed.
    """
    from dalbt import catalogue  # no torch: init and the checks answer at once

    if not isinstance(cfg.model, str):
        raise DalbtError(f"the model must be a name, got {cfg.model!r}")
    catalogue.check_model(cfg.model, cfg.weights, cfg.input_size)
    if not isinstance(cfg.strategy, str):
        raise DalbtError(f"the strategy must be a name, got {cfg.strategy!r}")
    if not isinstance(cfg.strategy_options, dict):
        raise DalbtError(f"strategy options must be KEY=VALUE pairs, got "
                         f"{cfg.strategy_options!r}")
    catalogue.check_strategy(cfg.strategy, cfg.strategy_options)  # unknown name, bad options
    if not isinstance(cfg.cold_start_strategy, str):
        raise DalbtError(f"the cold-start strategy must be a name, got {cfg.cold_start_strategy!r}")
    catalogue.check_cold_start(cfg.cold_start_strategy)
    low = catalogue.min_image_size(cfg.model)
    check_int(f"--image-size for model {cfg.model!r}", cfg.image_size, low, MAX_IMAGE_SIZE)
    if cfg.channels not in CHANNELS or isinstance(cfg.channels, bool | float):
        raise DalbtError(f"--channels must be 1 or 3, got {cfg.channels!r}")
    cfg.train.check()  # the recipe's own ranges, as 'dalbt run' checks them
    for name, value, least in (("--seed", cfg.seed, 0),
                               ("--cold-start-epochs", cfg.cold_start_epochs, 0),
                               ("min_val", cfg.min_val, 0), ("min_steps", cfg.min_steps, 0),
                               ("planned_rounds", cfg.planned_rounds, 1)):
        check_int(name, value, least, MAX_SEED if name == "--seed" else MAX_EPOCHS)
    if isinstance(cfg.val_fraction, bool) or not isinstance(cfg.val_fraction, numbers.Real) \
            or not 0 <= cfg.val_fraction < 1:  # nan fails the comparison
        raise DalbtError(f"--val-fraction must be a finite number in [0, 1), got "
                         f"{cfg.val_fraction!r}")


__all__ = ["CHANNELS", "DEFAULT_BUDGET", "DEFAULT_HOST", "DEFAULT_ML_PORT", "DEFAULT_PORT",
           "EXPORT_FORMATS",
           "MAX_BUDGET",
           "MAX_IMAGE_SIZE", "PROJECT_EPOCHS", "ProjectConfig", "project_recipe",
           "validate_config"]
