"""Active learning with your own model and data: :class:`ActiveLearner`.

The learner holds a pool of images, the labels taught so far and a model; ``query(n)`` trains
the model on the labels with dalbt's recipe (cross-entropy + gamma * Barlow Twins, model
selection on a validation share of the labels) and returns the ``n`` dataset indices the
strategy wants labelled next; ``teach(indices, labels)`` adds their labels. Each round is
:func:`dalbt.al_round.run_round`, the same round the experiment loop and the labelling project
run.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from dalbt import rng as rngs
from dalbt.al_round import RoundData, RoundResult, run_round
from dalbt.data.datasets import ImageDataset
from dalbt.errors import DalbtError
from dalbt.models.net import DALBTNet, make_projector
from dalbt.outputs import Outputs
from dalbt.recipe import TrainConfig
from dalbt.strategies import STRATEGIES, Strategy, build_strategy
from dalbt.train import TrainResult, infer, with_min_steps

__all__ = ["ActiveLearner", "ClassifierModule", "as_dalbt_model"]

# Key of the stream that gives each image its role (train or validation) once labelled.
_ROLE_KEY = 1


@runtime_checkable
class ClassifierModule(Protocol):
    """What dalbt needs of your model.

    Attributes:
        encoder: ``(B, C, H, W)`` float images in ``[0, 1]`` -> latent ``(B, D)``.
        classifier: Latent ``(B, D)`` -> logits ``(B, K)`` (it must also accept ``(T, B, D)``
            for MC-dropout strategies; ``nn.Linear`` does).

    An optional ``projector`` (latent ``(B, D)`` -> ``(B, P)``) is used for the Barlow Twins
    term; without one, dalbt adds its own (three linear layers, as in the paper).
    """

    encoder: nn.Module
    classifier: nn.Module


def _dims(encoder: nn.Module, classifier: nn.Module, sample: Tensor) -> tuple[int, int]:
    """(latent D, classes K) from one forward pass of a float sample (1, C, H, W)."""
    was = encoder.training, classifier.training
    encoder.eval()
    classifier.eval()
    try:
        with torch.no_grad():
            z = encoder(sample)
            logits = classifier(z)
    except Exception as exc:
        raise DalbtError(f"your model fails on an image of shape {tuple(sample.shape)} "
                         f"({type(exc).__name__}: {exc}); its encoder must take (B, C, H, W) "
                         "float images in [0, 1]") from None
    finally:
        encoder.train(was[0])
        classifier.train(was[1])
    if z.dim() != 2 or logits.dim() != 2:
        raise DalbtError(f"the encoder must return (B, D) latents and the classifier (B, K) "
                         f"logits; got {tuple(z.shape)} and {tuple(logits.shape)}")
    return int(z.shape[1]), int(logits.shape[1])


def as_dalbt_model(model: nn.Module, sample: Tensor, *, dropout: float = 0.0,
                   projector_dims: Sequence[int] = (256, 256, 256)) -> DALBTNet:
    """Your model as dalbt trains it: a :class:`~dalbt.models.DALBTNet` sharing its modules.

    Args:
        model: A :class:`ClassifierModule` (or a ``DALBTNet``, returned as is when its dropout
            is already ``dropout``).
        sample: One image batch ``(1, C, H, W)`` uint8, to find the latent size and classes.
        dropout: Dropout on the latent before the classifier (MC-dropout strategies).
        projector_dims: Widths of the projector dalbt adds when the model has none.

    Raises:
        DalbtError: The model lacks ``encoder``/``classifier`` or fails on the sample.
    """
    if isinstance(model, DALBTNet) and float(getattr(model.dropout, "p", 0.0)) == dropout:
        return model
    if not isinstance(model, nn.Module) or not isinstance(model, ClassifierModule):
        raise DalbtError(f"{type(model).__name__} is not a model dalbt can train: give an "
                         "nn.Module with an 'encoder' (images -> latent) and a 'classifier' "
                         "(latent -> logits), and optionally a 'projector' (see "
                         "dalbt.ClassifierModule)")
    latent, classes = _dims(model.encoder, model.classifier, sample.float() / 255.0)
    projector = getattr(model, "projector", None)
    if not isinstance(projector, nn.Module):
        with torch.random.fork_rng(devices=[]):  # its initial weights are redrawn per round
            projector = make_projector(latent, tuple(projector_dims))
    net = DALBTNet(model.encoder, projector, latent, classes, dropout)
    net.classifier = model.classifier  # type: ignore[assignment]
    return net


def _fresh(template: DALBTNet, seed: int) -> DALBTNet:
    """A copy of ``template`` with every layer re-initialised from ``seed``."""
    model = copy.deepcopy(template)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


def _as_images(data: Any, **kw: Any) -> ImageDataset:
    """Your data as dalbt's in-memory :class:`ImageDataset` (see :mod:`dalbt.data.adapters`)."""
    if isinstance(data, ImageDataset):
        return data
    from dalbt.data import adapters

    if isinstance(data, str | Path):
        return adapters.from_image_folder(data, **kw)
    if isinstance(data, tuple) and len(data) == 2:
        return adapters.from_tensors(data[0], data[1], **kw)
    if isinstance(data, np.ndarray | Tensor):
        return adapters.from_tensors(data, None, **kw)
    if hasattr(data, "features") and hasattr(data, "__getitem__"):
        return adapters.from_hf(data, **kw)
    return adapters.from_dataset(data, **kw)


class ActiveLearner:
    """Pool-based active learning with your model and your images.

    Args:
        model: Your model: an ``nn.Module`` with ``encoder`` and ``classifier`` (see
            :class:`ClassifierModule`), or a function ``() -> nn.Module`` that builds one (then
            every round's model comes from it, under the round's seed). Every round trains a
            fresh copy from the round's seed (the paper's protocol); a module's layers are
            re-initialised with their ``reset_parameters``.
        data: The pool: a :class:`dalbt.data.ImageDataset`, ``(images, labels)`` arrays, an
            images array, a folder path (torchvision ``ImageFolder`` layout), a torch
            ``Dataset`` of ``(image, label)`` or a Hugging Face ``datasets`` split. Labels in
            it are ignored: the learner knows only what :meth:`teach` gives it.
        strategy: A registered strategy name (``dalbt strategies``) or a ``Strategy``.
        recipe: The training recipe (default: dalbt's; ``TrainConfig(gamma=0)`` trains with
            cross-entropy only).
        seed: The one seed of every random stream.
        num_classes: Number of classes (default: the classifier's output size).
        val_fraction: Share of the taught labels held out to select the epoch (each image's
            role is fixed by the seed); with fewer than ``min_val`` such images, every label
            trains and the last epoch is kept.
        min_val: See ``val_fraction``.
        min_steps: Fewest optimiser steps per round: with few labels an epoch is a step or
            two, so the recipe's epochs are raised to reach this many steps (as the labelling
            project does; 0 keeps the recipe's epochs).
        test: Images and labels to measure each round's model on (same forms as ``data``).
        cold_start_strategy: The label-free strategy of a query with no label yet (default
            ``dalbt``, TypiClust before any label: the best cold start on held-out
            Fashion-MNIST seeds, BENCHMARKS.md "Issue 14").
        cold_start_epochs: Barlow Twins epochs before that first query.
        data_options: Options of the data adapter (e.g. ``image_size=32, channels=3``).
        progress: Show progress bars.
        **strategy_options: Options of the strategy.

    Example:
        >>> learner = ActiveLearner(MyNet(), (x_pool, None), strategy="margin")
        >>> idx = learner.query(20)
        >>> learner.teach(idx, oracle(idx))
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], data: Any, *,
                 strategy: str | Strategy = "margin", recipe: TrainConfig | None = None,
                 seed: int = 0, num_classes: int | None = None, val_fraction: float = 0.2,
                 min_val: int = 20, min_steps: int = 200, test: Any = None,
                 cold_start_strategy: str = "dalbt", cold_start_epochs: int = 10,
                 data_options: dict[str, Any] | None = None,
                 progress: bool = False, **strategy_options: Any) -> None:
        self.data = _as_images(data, **(data_options or {}))
        if self.data.n_train == 0:
            raise DalbtError("the pool holds no image")
        self.test = None if test is None else _as_images(test, **(data_options or {}))
        self.recipe = recipe or TrainConfig()
        self.recipe.check()
        self.seed = int(seed)
        if not 0 <= val_fraction < 1:
            raise DalbtError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction, self.min_val = float(val_fraction), int(min_val)
        self.min_steps = int(min_steps)
        self.strategy = (strategy if isinstance(strategy, Strategy)
                         else build_strategy(strategy, **strategy_options))
        self.cold_strategy = build_strategy(cold_start_strategy)
        if not self.cold_strategy.label_free:
            free = ", ".join(sorted(n for n, c in STRATEGIES.items() if c.label_free))
            raise DalbtError(f"cold_start_strategy {cold_start_strategy!r} needs labels; use "
                             f"one of: {free}")
        self.cold_start_epochs = int(cold_start_epochs)
        self.progress = progress
        if isinstance(model, nn.Module):
            self._user_model: nn.Module | None = model
            self._factory: Callable[[], nn.Module] | None = None
        elif callable(model):
            self._user_model, self._factory = None, model
        else:
            raise DalbtError(f"model must be an nn.Module or a function that builds one, got "
                             f"{type(model).__name__}")
        sample = self.data.x_train[:1]
        self._template = {d: as_dalbt_model(self._build(), sample, dropout=d)
                          for d in {0.0, self.strategy.train_dropout}}
        classes = self._template[0.0].num_classes
        self.num_classes = classes if num_classes is None else int(num_classes)
        if self.num_classes != classes:
            raise DalbtError(f"num_classes={num_classes} but the classifier gives {classes} "
                             "logits")
        self.labels = np.full(self.data.n_train, -1, dtype=np.int64)
        self.round = 0
        self.model: DALBTNet | None = None
        self.history: list[dict[str, Any]] = []
        self._fitted: tuple[int, TrainResult] | None = None  # (labels version, result)
        self._version = 0
        self._role = rngs.numpy_rng(self.seed, rngs.SPLIT, _ROLE_KEY).random(self.data.n_train)

    def _build(self, seed: int | None = None) -> nn.Module:
        """The user's module, or a new one from the user's function (under ``seed``)."""
        if self._factory is None:
            assert self._user_model is not None
            return self._user_model
        if seed is None:
            return self._factory()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._factory()

    # -- state ---------------------------------------------------------------------------

    @property
    def labelled(self) -> np.ndarray:
        """Dataset indices with a label, (L,) int64, sorted."""
        return np.flatnonzero(self.labels >= 0)

    @property
    def unlabelled(self) -> np.ndarray:
        """Dataset indices without a label (the pool), (U,) int64, sorted."""
        return np.flatnonzero(self.labels < 0)

    def teach(self, indices: Sequence[int] | np.ndarray | Tensor,
              labels: Sequence[int] | np.ndarray | Tensor) -> None:
        """Give labels: ``labels[i]`` is the class of dataset index ``indices[i]``.

        Raises:
            DalbtError: Lengths differ, an index outside the pool's range or given twice, or a
                label outside ``0 .. num_classes - 1``.
        """
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices).reshape(-1)
        lab = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).reshape(-1)
        if len(idx) != len(lab):
            raise DalbtError(f"teach() got {len(idx)} indices and {len(lab)} labels")
        if len(idx) == 0:
            return
        if not (np.issubdtype(idx.dtype, np.integer) and np.issubdtype(lab.dtype, np.integer)):
            raise DalbtError("teach() takes integer dataset indices and integer class labels")
        if idx.min() < 0 or idx.max() >= self.data.n_train:
            raise DalbtError(f"teach(): index {int(idx[(idx < 0) | (idx >= self.data.n_train)][0])}"
                             f" is outside the pool's {self.data.n_train} images")
        if len(np.unique(idx)) != len(idx):
            raise DalbtError("teach(): an index is given twice")
        if lab.min() < 0 or lab.max() >= self.num_classes:
            raise DalbtError(f"teach(): label {int(lab[(lab < 0) | (lab >= self.num_classes)][0])}"
                             f" is outside 0..{self.num_classes - 1}")
        self.labels[idx.astype(np.int64)] = lab.astype(np.int64)
        self._version += 1

    # -- rounds --------------------------------------------------------------------------

    def _new_model(self, dropout: float) -> Callable[[int], DALBTNet]:
        device = torch.device(self.recipe.device)

        def new_model(seed: int) -> DALBTNet:
            if self._factory is not None:
                net = as_dalbt_model(self._build(seed), self.data.x_train[:1],
                                                dropout=dropout)
            else:
                net = _fresh(self._template[dropout], seed)
            return net.to(device)

        return new_model

    def _round_data(self) -> RoundData:
        lab = self.labelled
        val = lab[self._role[lab] < self.val_fraction]
        if len(val) < self.min_val:
            val = val[:0]
        test = None if self.test is None else (self.test.x_train, self.test.y_train)
        return RoundData(images=self.data.x_train, targets=torch.from_numpy(self.labels.copy()),
                         num_classes=self.num_classes, labelled=np.setdiff1d(lab, val),
                         validation=val, unlabelled=self.unlabelled, test=test,
                         known=lab)

    def _round(self, budget: int) -> RoundResult:
        data = self._round_data()
        cold = len(data.labelled) == 0
        if cold and budget == 0:
            raise DalbtError("fit() needs labels: teach() some first (query() with no label "
                             "picks the first images to label)")
        strategy = self.cold_strategy if cold else self.strategy
        fitted = self._fitted
        reuse = (fitted is not None and fitted[0] == self._version and self.model is not None
                 and not cold)
        recipe = self.recipe if cold else with_min_steps(self.recipe, len(data.labelled),
                                                          self.min_steps)
        res = run_round(strategy, data, recipe, seed=self.seed, round_=self.round,
                        budget=budget, new_model=self._new_model(strategy.train_dropout),
                        model=self.model if reuse else None,
                        trained=fitted[1] if reuse and fitted is not None else None,
                        cold_start_epochs=self.cold_start_epochs, progress=self.progress)
        self.model = res.model
        if res.train is not None:
            self._fitted = (self._version, res.train)
            self._copy_back(res.model)
        return res

    def _copy_back(self, net: nn.Module) -> None:
        """The trained weights into the user's own module (its encoder, classifier and, when
        it has one, projector), so that it is usable after the round."""
        user = self._user_model
        if user is None or user is net:
            return
        for part in ("encoder", "classifier", "projector"):
            mine = getattr(user, part, None)
            if isinstance(mine, nn.Module) and mine is not getattr(net, part):
                mine.load_state_dict(getattr(net, part).state_dict())

    def fit(self) -> dict[str, Any]:
        """Train the model on the labels taught so far (no query).

        Returns:
            The round's figures (``val_acc``, ``test_acc``, ``best_epoch``, losses, times).
        """
        res = self._round(0)
        return {"round": self.round, "n_labelled": len(self.labelled), **res.metrics()}

    def query(self, n: int) -> np.ndarray:
        """Train on the labels so far (unless :meth:`fit` just did) and choose ``n`` images.

        With no label yet this is a cold start: the encoder is pre-trained with Barlow Twins
        on the pool and the cold-start strategy picks on its features.

        Returns:
            (min(n, U),) int64 dataset indices to label next, most wanted first.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
            raise DalbtError(f"query() needs a positive number of images, got {n!r}")
        if len(self.unlabelled) == 0:
            raise DalbtError("every image of the pool is labelled; nothing left to query")
        res = self._round(int(n))
        self.history.append({"round": self.round, "n_labelled": len(self.labelled),
                             "cold_start": res.cold_start, "queried": res.queried,
                             **res.metrics()})
        self.round += 1
        return res.queried

    def predict_proba(self, images: Any = None) -> Tensor:
        """Class probabilities of the current model, (M, K).

        Args:
            images: Images in any form the learner takes (default: the whole pool).
        """
        if self.model is None or self._fitted is None:
            raise DalbtError("no trained model yet: call fit() or query() after teach()")
        x = self.data.x_train if images is None else _as_images(images).x_train
        out: Outputs = infer(self.model, x, np.arange(len(x)))
        return out.probs

    def predict(self, images: Any = None) -> Tensor:
        """Predicted classes of the current model, (M,) int64."""
        return self.predict_proba(images).argmax(dim=1)
