"""The training recipe of a round and the config of a run, as plain data (no torch: the CLI and
the labelling project read and validate them, and take their defaults, without loading torch)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dalbt.errors import DalbtError

DEFAULT_LAMBDA = 0.0051  # Barlow Twins off-diagonal weight (Zbontar et al. 2021)
DEFAULT_GAMMA = 0.001  # weight of the Barlow Twins term in the joint loss (DALBT paper)

# Upper limits of settings: beyond them torch overflows (float32, C long) or memory runs out
# long before a useful run, so they are refused with a message instead of a traceback.
FLOAT32_MAX = 3.4028234663852886e38
MAX_BATCH = 1 << 20
MAX_WIDTH = 1 << 16  # latent and projector widths
MAX_SEED = 2**63 - 1  # SQLite's largest integer
MAX_EPOCHS = 1 << 30
MAX_LR = 1e6  # Adam's first step is lr / 0.1: far above it float32 overflows mid-step

AMP_MODES = ("bf16", "fp16")  # TrainConfig.amp, besides None (float32)
OOD_POLICIES = ("return", "discard")  # RunConfig.ood_policy
SCHEDULES = ("constant", "cosine")  # TrainConfig.schedule
SELECTIONS = ("best", "last")  # TrainConfig.select
FINETUNE_MODES = ("all", "head")  # TrainConfig.finetune
MAX_STEPS = 1 << 30


def check_int(flag: str, value: object, low: int, high: int) -> None:
    """Raise :class:`DalbtError` unless ``value`` is an integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not low <= int(value) <= high:
        raise DalbtError(f"{flag} must be an integer from {low} to {high}, got {value!r}")


def check_float(flag: str, value: object, positive: bool = False,
                high: float = FLOAT32_MAX) -> None:
    """Raise :class:`DalbtError` unless ``value`` is a finite number >= 0 (> 0 if
    ``positive``) and at most ``high``."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(float(value)) and 0 <= float(value) <= high
          and (float(value) > 0 or not positive))
    if not ok:
        too_big = isinstance(value, numbers.Real) and float(value) > high
        most = f" and at most {high:g}" if high < FLOAT32_MAX or too_big else ""
        raise DalbtError(f"{flag} must be a finite number {'>' if positive else '>='} 0{most}, "
                         f"got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation recipe of one round (paper: Adam 1e-3, wd 1e-5, batch 64, gamma 0.001).

    Attributes:
        epochs: Epochs per round (paper: 150; 20 on MNIST).
        batch_size: Labelled mini-batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        gamma: Weight of the Barlow Twins term; 0 trains with CE only (no augmentation unless
            ``ce_augment``).
        lambd: Barlow Twins off-diagonal weight.
        warm_start: Continue from the previous round's model instead of re-initialising.
        eval_every: Evaluate on the validation split every this many epochs (and at the end;
            epoch recipe only).
        device: torch device string.
        ssl_unlabelled: Semi-supervised DALBT: each step's Barlow Twins term covers the labelled
            batch and an equally large batch of unlabelled pool images.
        pretrain_epochs: Barlow Twins pre-training epochs on the whole pool before round 0;
            every round then fine-tunes from the pre-trained weights (0: off).
        pretrain_batch: Batch size of the pre-training.
        amp: Mixed-precision training on CUDA: ``bf16`` or ``fp16`` (with a gradient scaler)
            autocast; None: float32.
        steps: Step-based recipe: train each round for exactly this many optimiser steps
            whatever the labelled-set size (the sampler cycles through the labelled set in
            passes cut as an epoch's, reshuffled each pass; with fewer labelled images than
            ``batch_size`` every step sees the whole labelled set); None: ``epochs`` epochs
            (the paper's recipe).
        schedule: Learning-rate schedule over the round's steps (``steps``, or all the steps of
            the epoch recipe): ``constant`` or ``cosine`` (from ``lr`` down to 0 at the end of
            the last step; after the warm-up).
        warmup_steps: Linear warm-up of the learning rate over the first steps, from
            ``lr / warmup_steps`` to ``lr`` (0: none).
        balanced: Draw labelled batches class-balanced: the classes present in rounds of a
            random permutation (each class equally often), then an image of the class (each
            class's images in reshuffled passes, so rare ones repeat).
        ce_augment: The cross-entropy sees a weak augmentation of the labelled batch (random
            resized crop of >= 75 % of the area and flip, ``dalbt.train.CE_VIEW``) instead of
            the clean image; the Barlow Twins views and term are unchanged (also with
            ``gamma`` 0, when the augmentation serves the cross-entropy alone).
        eval_every_steps: With ``steps``: validate every this many steps (and at the end);
            None: once per pass over the labelled set.
        select: ``best``: keep the weights that were best on validation; ``last``: the final
            weights (no validation split needed; with one, it is evaluated once, at the end,
            for the report).
        embedding_cache: Directory of the frozen encoder's pool embeddings
            (:mod:`dalbt.embeddings`; ``--finetune head`` only); None: kept in memory only.
        finetune: ``all``: train the whole network; ``head``: freeze the (pre-trained)
            encoder and train only the linear classifier on its features.
    """

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    gamma: float = DEFAULT_GAMMA
    lambd: float = DEFAULT_LAMBDA
    warm_start: bool = False
    eval_every: int = 1
    device: str = "cpu"
    ssl_unlabelled: bool = False
    pretrain_epochs: int = 0
    pretrain_batch: int = 256
    amp: str | None = None
    steps: int | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    balanced: bool = False
    ce_augment: bool = False
    eval_every_steps: int | None = None
    select: str = "best"
    finetune: str = "all"
    embedding_cache: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise :class:`DalbtError` naming the first setting out of range (flags as the CLI
        spells them)."""
        check_int("--epochs", self.epochs, 1, MAX_EPOCHS)
        check_int("--batch-size", self.batch_size, 2, MAX_BATCH)
        check_float("--lr", self.lr, positive=True, high=MAX_LR)
        check_float("--weight-decay", self.weight_decay)
        check_float("--gamma", self.gamma)
        check_float("--lambd", self.lambd)
        check_int("--eval-every", self.eval_every, 1, MAX_EPOCHS)
        check_int("--pretrain-epochs", self.pretrain_epochs, 0, MAX_EPOCHS)
        check_int("--pretrain-batch", self.pretrain_batch, 2, MAX_BATCH)
        if self.amp is not None and self.amp not in AMP_MODES:
            raise DalbtError(f"--amp must be {' or '.join(AMP_MODES)}, got {self.amp!r}")
        if self.steps is not None:
            check_int("--steps", self.steps, 1, MAX_STEPS)
        check_int("--warmup-steps", self.warmup_steps, 0, MAX_STEPS)
        if self.eval_every_steps is not None:
            check_int("--eval-every-steps", self.eval_every_steps, 1, MAX_STEPS)
            if self.steps is None:
                raise DalbtError("--eval-every-steps needs the step-based recipe: give --steps")
        for flag, value, allowed in (("--schedule", self.schedule, SCHEDULES),
                                     ("--select", self.select, SELECTIONS),
                                     ("--finetune", self.finetune, FINETUNE_MODES)):
            if value not in allowed:
                raise DalbtError(f"{flag} must be {' or '.join(allowed)}, got {value!r}")

    def key_dict(self) -> dict[str, Any]:
        """The settings that change results (see :meth:`RunConfig.key_dict`): settings added
        after the first stores are left out while at their defaults, so older runs keep their
        keys."""
        d = self.to_dict()
        for k in _NOT_IN_KEY:
            d.pop(k, None)
        for k, default in _LATER_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k, None)
        return d


# Recipe settings added after the first stores, with their defaults (left out of run keys
# while at them; ``amp`` None is float32, as before mixed precision).
_LATER_DEFAULTS: dict[str, Any] = {"amp": None, "steps": None, "schedule": "constant",
                                   "warmup_steps": 0, "balanced": False, "ce_augment": False,
                                   "eval_every_steps": None, "select": "best", "finetune": "all"}


# Config fields that do not change a run's results' meaning: excluded from its key, so a run
# can be resumed on another device, with the data or the shared pre-trained encoders in another
# directory.
_NOT_IN_KEY = ("device", "data_root", "progress", "pretrain_cache", "embedding_cache")

#: ``initial_strategy`` value: the run's own strategy chooses its initial set.
SAME = "same"

#: Every setting (run or recipe) added after the first stores, with its default: a stored config
#: that lacks one means that default (run keys and report protocols leave them out there).
LATER_DEFAULTS: dict[str, Any] = {**_LATER_DEFAULTS, "initial_strategy": "random",
                                  "weights": None, "input_size": None}


@dataclass
class RunConfig:
    """Everything that defines one AL run (one strategy, one seed).

    Attributes:
        dataset: Registered dataset name.
        model: Registered model name.
        strategy: Registered strategy name.
        strategy_options: Keyword options of the strategy.
        initial: Initial labelled set size.
        budget: Samples queried per round.
        rounds: Query rounds (the run trains rounds + 1 models).
        seed: The run's one seed; every random stream derives from it.
        val_size: Validation images held out of the pool (None: min(5000, 10% of train)).
        latent_dim: Encoder output size (None: the model's default, LeNet 60, VGG16 512).
        projector_dims: Barlow Twins projector widths.
        train: Training recipe.
        data_root: Where to look for dataset files.
        unknown_classes: Open-set pool: these classes (names or indices) stay in the pool as
            out-of-distribution images without labels; test accuracy is on the known classes.
        mix: Cross-dataset pool, e.g. ``"svhn:5000,kmnist:5000"``: images of other datasets
            (resized, channel-matched) added to the pool as out-of-distribution.
        ood_policy: What happens to a queried out-of-distribution image (it costs budget and
            gets no label): ``return`` to the pool (the paper) or ``discard`` it.
        pretrain_cache: Directory of the shared pre-trained encoders (``<dir>/encoders``),
            which several experiment directories can share; None: the experiment directory.
        weights: A ``timm:``/``torchvision:`` backbone's weights: a ``.pth``/``.safetensors``
            file, ``default`` (the library's download; also None) or ``none`` (random). The
            run key records the file's SHA-256, not its path.
        input_size: Side a backbone's input is resized to (None: the backbone's own).
        initial_strategy: Who chooses the initial labelled set: ``random`` (the seed's split,
            shared by every strategy), a label-free strategy (on the shared pre-trained
            encoder's features, before any label), or ``same`` (the run's own strategy, which
            must be label-free): a cold start.
    """

    dataset: str = "digits"
    model: str = "lenet"
    strategy: str = "weibull"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    initial: int = 100
    budget: int = 100
    rounds: int = 10
    seed: int = 0
    val_size: int | None = None
    latent_dim: int | None = None
    projector_dims: tuple[int, ...] = (256, 256, 256)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_root: str | None = None
    unknown_classes: list[str] = field(default_factory=list)
    mix: str | None = None
    ood_policy: str = "return"
    pretrain_cache: str | None = None
    initial_strategy: str = "random"
    weights: str | None = None
    input_size: int | None = None

    def initial_choice(self) -> str:
        """The strategy that chooses the initial set (``same`` resolved to the run's)."""
        return self.strategy if self.initial_strategy == SAME else self.initial_strategy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["projector_dims"] = list(self.projector_dims)
        return d

    def key_dict(self) -> dict[str, Any]:
        """The part of the config that identifies the run."""
        d = self.to_dict()
        for k in _NOT_IN_KEY:
            d.pop(k, None)
        d["train"] = self.train.key_dict()
        d["initial_strategy"] = self.initial_choice()
        if d["initial_strategy"] == LATER_DEFAULTS["initial_strategy"]:  # older runs' keys
            del d["initial_strategy"]
        for k in ("weights", "input_size"):  # backbones' settings, absent from older keys
            if d.get(k) is None:
                d.pop(k, None)
        if d.get("weights") is not None:  # the file's content, not where it lies
            from dalbt.weightfiles import weights_digest

            d["weights"] = weights_digest(d["weights"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        d["projector_dims"] = tuple(d.get("projector_dims", (256, 256, 256)))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
