"""Training one AL round: the joint CE + gamma * Barlow Twins objective, model selection on
the validation split, and batched inference."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from dalbt.data.augment import TwoViewAugment, ViewConfig, augment
from dalbt.distributed import SINGLE, Dist
from dalbt.errors import TrainingDiverged
from dalbt.inference import (  # infer is re-exported: dalbt.train.infer
    INFERENCE_BATCH,
    TrainResult,
    infer,  # noqa: F401
    to_float,
)
from dalbt.losses import barlow_twins_loss, joint_loss
from dalbt.recipe import TrainConfig
from dalbt.rng import isolated_torch_rng

if TYPE_CHECKING:
    from dalbt.models.net import DALBTNet


# The view the cross-entropy sees with ``TrainConfig.ce_augment``: the weak, supervised-style
# augmentation (random resized crop of >= 75 % of the area, horizontal flip; no colour, blur or
# solarisation), as MoBYv2AL's weak view. The Barlow Twins views (8 % crops, blur) are too strong
# for a classifier that is tested on clean images.
CE_VIEW = ViewConfig(blur_p=0.0, solarize_p=0.0, jitter_p=0.0, gray_p=0.0,
                     crop_scale=(0.75, 1.0))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Precision:
    """Autocast and gradient scaling of one training run (``cfg.amp`` on CUDA; else off)."""

    def __init__(self, cfg: TrainConfig) -> None:
        cuda = torch.device(cfg.device).type == "cuda"
        self.dtype = AMP_DTYPES[cfg.amp] if cfg.amp and cuda else None
        self.scaler = (torch.amp.GradScaler("cuda") if self.dtype is torch.float16 else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.dtype)

    def step(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        """Backward and optimiser step (scaled under fp16)."""
        if self.scaler is None:
            loss.backward()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()


class _Joint(nn.Module):
    """One training step's forward passes as one module (what DDP wraps): logits of the
    undistorted batch (B, K) and, when given, projections of the two views (B', P) each."""

    def __init__(self, model: DALBTNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, v1: Tensor | None = None, v2: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        # Separate passes, so batch-norm statistics of the classifier's input are those of
        # undistorted images, and each view is normalised on its own (as Barlow Twins does).
        logits = self.model(x)
        if v1 is None or v2 is None:
            return logits, None, None
        return logits, self.model.project(v1), self.model.project(v2)


class _Views(nn.Module):
    """Projections of two views through encoder and projector (pre-training's DDP module)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, v1: Tensor, v2: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector(self.encoder(v1)), self.projector(self.encoder(v2))


@dataclass(frozen=True)
class RoundPlan:
    """The optimiser steps and checkpoints of one round's training.

    The epoch recipe (``TrainConfig.steps`` None) has a checkpoint after every epoch; the step
    recipe one every ``eval_every_steps`` steps (default: one pass over the labelled set) and
    one after the last step. A checkpoint is numbered by its epoch, or by the steps done.

    Attributes:
        n: Labelled images.
        size: Batch size.
        total: Optimiser steps of the round.
        every: Validation interval: epochs (``eval_every``), or steps.
        last: Number of the last checkpoint (``epochs``, or ``steps``).
        by_step: The step recipe.
        balanced: Class-balanced batches (``TrainConfig.balanced``).
    """

    n: int
    size: int
    total: int
    every: int
    last: int
    by_step: bool = False
    balanced: bool = False

    @classmethod
    def of(cls, cfg: TrainConfig, n_labelled: int) -> RoundPlan:
        """The plan of ``cfg`` on ``n_labelled`` labelled images."""
        per_pass = n_batches(n_labelled, cfg.batch_size)
        if cfg.steps is None:
            return cls(n_labelled, cfg.batch_size, cfg.epochs * per_pass, cfg.eval_every,
                       cfg.epochs, False, cfg.balanced)
        every = cfg.eval_every_steps or per_pass or cfg.steps  # no labels: no pass
        return cls(n_labelled, cfg.batch_size, cfg.steps, every, cfg.steps, True, cfg.balanced)

    def due(self, mark: int) -> bool:
        """Whether checkpoint ``mark`` validates (every ``every`` and the last)."""
        return mark % self.every == 0 or mark == self.last

    def periods(self, generator: torch.Generator, labels: Tensor | None = None
                ) -> Iterator[tuple[int, Iterable[Tensor]]]:
        """The round's batches, grouped by checkpoint.

        Args:
            generator: Draws the batches (a new shuffle each pass over the labelled set).
            labels: Labels of the labelled images, (n,); needed when ``balanced``.

        Yields:
            (checkpoint number, its batches): (b,) int64 positions into the labelled set.
            An epoch is one pass cut by :func:`batches`; the step recipe cycles through such
            passes (reshuffled each) and stops after ``total`` steps, so with fewer labelled
            images than the batch size every step sees the whole labelled set. With
            ``balanced``, a pass has the same batch sizes but its positions are drawn by a
            :class:`BalancedSampler` (an image may then come twice in a pass, or not at all).
        """
        draw = self._pass_drawer(generator, labels)
        if not self.by_step:
            for epoch in range(1, self.last + 1):
                yield epoch, draw()
            return
        stream: Iterator[Tensor] = (itertools.chain.from_iterable(
            draw() for _ in itertools.count()) if self.n else iter(()))
        for start in range(0, self.last, self.every):
            stop = min(start + self.every, self.last)
            yield stop, itertools.islice(stream, stop - start)

    def _pass_drawer(self, generator: torch.Generator, labels: Tensor | None
                     ) -> Callable[[], list[Tensor]]:
        """A function that draws the batches of one pass over the labelled set."""
        if not self.balanced:
            return lambda: batches(self.n, self.size, generator)
        if labels is None or len(labels) != self.n:
            raise ValueError("balanced batches need the labels of the labelled set")
        sampler = BalancedSampler(labels, generator)
        cut = _cut(self.n, self.size, min_batch(self.size))
        return lambda: [sampler.take(k) for k in cut]


class BalancedSampler:
    """Class-balanced draws of positions into a labelled set.

    Classes (those present) are drawn in rounds of a random permutation of them, so every class
    is drawn equally often (exactly, after each multiple of the number of classes); each class's
    images are drawn in passes of a random permutation of them (again after each pass), so
    a rare class repeats its images and a common one is subsampled.

    Args:
        labels: Labels of the labelled images, (n,) int.
        generator: Source of all the draws.
    """

    def __init__(self, labels: Tensor, generator: torch.Generator) -> None:
        labels = torch.as_tensor(labels)
        classes, inverse = torch.unique(labels, return_inverse=True)
        self.classes = classes
        self.members = [torch.nonzero(inverse == c).flatten() for c in range(len(classes))]
        self.generator = generator
        self._class_queue = torch.empty(0, dtype=torch.int64)
        self._queues = [torch.empty(0, dtype=torch.int64) for _ in self.members]

    def take(self, k: int) -> Tensor:
        """The next ``k`` positions, (k,) int64."""
        cls = self._draw_classes(k)
        out = torch.empty(k, dtype=torch.int64)
        for c, members in enumerate(self.members):
            where = torch.nonzero(cls == c).flatten()
            if len(where):
                out[where] = self._draw_members(c, members, len(where))
        return out

    def _draw_classes(self, k: int) -> Tensor:
        while len(self._class_queue) < k:
            perm = torch.randperm(len(self.members), generator=self.generator)
            self._class_queue = torch.cat([self._class_queue, perm])
        cls, self._class_queue = self._class_queue[:k], self._class_queue[k:]
        return cls

    def _draw_members(self, c: int, members: Tensor, k: int) -> Tensor:
        queue = self._queues[c]
        while len(queue) < k:
            queue = torch.cat([queue, members[torch.randperm(len(members),
                                                             generator=self.generator)]])
        self._queues[c] = queue[k:]
        return queue[:k]


def lr_factor(step: int, total: int, warmup: int = 0, schedule: str = "constant") -> float:
    """Multiplier of the learning rate at optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up ``(step + 1) / warmup`` over the first ``warmup`` steps (from lr / warmup to
    lr), then 1 (``constant``) or the cosine ``(1 + cos(pi * t)) / 2`` with ``t = (step -
    warmup) / (total - warmup)``, which falls from 1 and reaches 0 just after the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def lr_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
                 ) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The schedule of ``cfg`` (:func:`lr_factor`) over ``total`` steps; step it after each
    optimiser step. None for a constant rate without warm-up (the paper's recipe)."""
    if cfg.schedule == "constant" and not cfg.warmup_steps:
        return None
    warmup, schedule = cfg.warmup_steps, cfg.schedule
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total, warmup, schedule))


class BestOnValidation:
    """Model selection on the validation split: keeps the weights of the best checkpoint.

    Args:
        x_val: Validation images, (V, C, H, W) uint8.
        y_val: Their labels, (V,).
        cfg: ``select``: ``best`` keeps the best validated weights, ``last`` the final ones
            (validated once, at the end, for the report).
        dist: In a distributed run, the accuracy is sharded and summed, so every rank takes the
            same decision (and keeps the same weights).
        plan: When to validate (:meth:`RoundPlan.due`); default: the epoch recipe of ``cfg``
            (``eval_every``, ``epochs``). Give the round's plan with the step recipe.
    """

    def __init__(self, x_val: Tensor, y_val: Tensor, cfg: TrainConfig, dist: Dist = SINGLE,
                 plan: RoundPlan | None = None) -> None:
        if plan is None and cfg.steps is not None:
            raise ValueError("with the step recipe, give BestOnValidation the round's plan")
        self.x_val, self.y_val, self.cfg, self.dist = x_val, y_val, cfg, dist
        self.plan = plan if plan is not None else RoundPlan.of(cfg, 0)
        self.best_acc, self.best_epoch = -math.inf, 0
        self.best_state: dict[str, Any] | None = None
        self.best_losses = (float("nan"), float("nan"))
        self.history: list[tuple[int, float]] = []

    def end_epoch(self, model: nn.Module, epoch: int, losses: tuple[float, float],
                  metrics: dict) -> None:
        """At checkpoint ``epoch`` (an epoch, or the steps done): evaluate when due (adds
        ``val_acc`` to ``metrics``) and keep the best weights."""
        last = self.cfg.select == "last"
        if not len(self.y_val) or not self.plan.due(epoch) or (last and epoch != self.plan.last):
            return
        acc = accuracy(model, self.x_val, self.y_val, dist=self.dist)
        self.history.append((epoch, acc))
        metrics["val_acc"] = acc
        if last or acc > self.best_acc:
            self.best_acc, self.best_epoch, self.best_losses = acc, epoch, losses
            if not last:
                self.best_state = copy.deepcopy(model.state_dict())

    def result(self, model: nn.Module, last_losses: tuple[float, float]) -> TrainResult:
        """Load the selected weights into ``model`` and describe them (the last checkpoint
        when there is no validation split)."""
        if not self.history:
            return TrainResult(val_acc=float("nan"), best_epoch=self.plan.last,
                               train_ce=last_losses[0], train_bt=last_losses[1],
                               history=self.history)
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return TrainResult(val_acc=self.best_acc, best_epoch=self.best_epoch,
                           train_ce=self.best_losses[0], train_bt=self.best_losses[1],
                           history=self.history)


# A mean cross-entropy above this many nats (a uniform guess costs ln K, about 2.3) is not
# training any more but an explosion: logits hundreds of units on the wrong side.
EXPLODED_CE = 1e3


def check_finite(what: str, epoch: int, losses: dict[str, float], lr: float,
                 model: nn.Module | None = None, unit: str = "epoch") -> None:
    """Stop training whose losses (or, with ``model``, weights) are no longer finite, or whose
    cross-entropy ``losses["ce"]`` exploded past :data:`EXPLODED_CE`.

    ``epoch`` is the checkpoint's number in ``unit`` (``"step"`` with the step recipe: the
    message then names the steps done).

    Raises:
        TrainingDiverged: Naming the epoch, the loss and the likely cause (the learning rate).
    """
    bad = {k: v for k, v in losses.items()
           if not math.isfinite(v) or (k == "ce" and v > EXPLODED_CE)}
    if not bad and model is not None and not all(
            bool(torch.isfinite(p).all()) for p in model.parameters()):
        bad = {"weights": float("nan")}
    if bad:
        which = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TrainingDiverged(
            f"{what} diverged in {unit} {epoch} ({which}): the learning rate {lr:g} is probably "
            "too high (the paper uses 1e-3), or a loss weight (--gamma, --lambd); nothing of "
            "this round was stored, so rerun with smaller values")


def min_batch(size: int) -> int:
    """Smallest mini-batch a training step may see with batch size ``size``: half of it.

    The Barlow Twins loss standardises every projector dimension over the batch and batch norm
    normalises over it; on a remainder of 2-6 samples both are noise, and one such step per
    epoch wrecked training (130 labels at batch 64 gave 15 % test accuracy on digits, 128
    gave 59 %).
    """
    return max(2, (size + 1) // 2)


def _cut(n: int, size: int, min_size: int) -> list[int]:
    """Batch sizes :func:`batches` cuts ``n`` positions into."""
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    if len(sizes) > 1 and sizes[-1] < min_size:
        tail = sizes[-2] + sizes[-1]
        # re-cut the last full batch and the small remainder into two near-equal halves (the
        # epoch keeps its number of steps); merge them only where a half would still be short
        sizes[-2:] = [(tail + 1) // 2, tail // 2] if tail // 2 >= min_size else [tail]
    return sizes


def n_batches(n: int, size: int) -> int:
    """How many batches :func:`batches` cuts ``n`` positions into (optimiser steps an epoch)."""
    return len(_cut(n, size, min_batch(size)))


def with_min_steps(cfg: TrainConfig, n: int, min_steps: int) -> TrainConfig:
    """``cfg`` with its epochs raised so that ``n`` labelled images give at least ``min_steps``
    optimiser steps (with few labels an epoch is a step or two); with the step recipe, its
    ``steps`` raised to ``min_steps``."""
    if cfg.steps is not None:
        return replace(cfg, steps=max(cfg.steps, min_steps))
    steps = n_batches(n, cfg.batch_size)
    return replace(cfg, epochs=max(cfg.epochs, math.ceil(min_steps / max(steps, 1))))


def batches(n: int, size: int, generator: torch.Generator | None = None,
            min_size: int | None = None) -> list[Tensor]:
    """Positions 0..n-1 split into mini-batches, shuffled when a generator is given.

    Batches of ``size``; when the remainder is smaller than ``min_size`` (default
    :func:`min_batch`), the last full batch and the remainder are cut again into two halves
    (130 at batch 64: 64, 33, 33 instead of 64, 64, 2), so that no step sees a handful of
    samples and an epoch keeps its ``ceil(n / size)`` steps. ``n < size`` gives one batch of
    all. The order drawn is the same whatever ``min_size``: only the cut changes, and only
    where the remainder is small.

    Returns:
        (b,) int64 position tensors, together a permutation of 0..n-1.
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    floor = min_batch(size) if min_size is None else min_size
    return list(order.split(_cut(n, size, floor)))


def pretrain_barlow(model: DALBTNet, x_train: Tensor, indices: np.ndarray, cfg: TrainConfig,
                    shuffle_gen: torch.Generator, augment_gen: torch.Generator,
                    on_epoch: Callable[[int, dict], object] | None = None,
                    dist: Dist = SINGLE) -> list[float]:
    """Barlow Twins pre-training of encoder + projector on unlabelled images (no labels).

    Args:
        model: DALBTNet on ``cfg.device`` (trained in place; the classifier is untouched).
        x_train: All training images, (N, C, H, W) uint8.
        indices: Dataset indices to pre-train on, (P,).
        cfg: ``pretrain_epochs``, ``pretrain_batch``, ``lr``, ``weight_decay``, ``lambd``,
            ``amp``.
        shuffle_gen: Generator of the batch order.
        augment_gen: Generator of the augmentations.
        on_epoch: Called after each epoch with (epoch, {"bt": mean loss}).
        dist: In a distributed run, every rank takes its slice of each batch under DDP, with
            batch norm and the loss over the whole batch (see :mod:`dalbt.distributed`).

    Returns:
        Mean Barlow Twins loss per epoch.
    """
    device = torch.device(cfg.device)
    params = [*model.encoder.parameters(), *model.projector.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    aug = TwoViewAugment()
    precision = _Precision(cfg)
    idx_all = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    losses = []
    seed = int(torch.randint(0, 2**62, (1,), generator=shuffle_gen))
    with isolated_torch_rng(seed + dist.rank, cfg.device), dist.synced_batchnorm(model):
        net = dist.wrap(_Views(model.encoder, model.projector))
        model.train()
        for epoch in range(1, cfg.pretrain_epochs + 1):
            total, steps = 0.0, 0
            for pos in batches(len(idx_all), cfg.pretrain_batch, shuffle_gen):
                a, b = dist.shard(len(pos))
                rows = torch.arange(a, b) if dist.active else None
                v1, v2 = aug(to_float(x_train[idx_all[pos[a:b]]], device), augment_gen, rows,
                             len(pos) if dist.active else None)
                with precision.autocast():
                    p1, p2 = net(v1, v2)
                loss = barlow_twins_loss(p1.float(), p2.float(), cfg.lambd,
                                         all_reduce=dist.all_reduce)
                opt.zero_grad(set_to_none=True)
                precision.step(loss, opt)
                total += float(loss.detach())
                steps += 1
            losses.append(total / max(steps, 1))
            check_finite("Barlow Twins pre-training", epoch, {"bt": losses[-1]}, cfg.lr, model)
            if on_epoch is not None:
                on_epoch(epoch, {"bt": losses[-1]})
        del net
    dist.broadcast_module(model)
    return losses


@torch.inference_mode()
def mc_dropout_probs(model: DALBTNet, images: Tensor, indices: np.ndarray, samples: int,
                     generator: torch.Generator, batch_size: int = INFERENCE_BATCH,
                     dist: Dist = SINGLE) -> Tensor:
    """MC-dropout class probabilities with dropout on the latent before the classifier.

    The encoder runs once per image; ``samples`` Bernoulli masks (inverted dropout, rate
    ``model.dropout.p``) are drawn from ``generator`` and applied to z before the classifier.

    Args:
        model: A DALBTNet built with ``dropout > 0``.
        images: All training images, (N, C, H, W) uint8.
        indices: Dataset indices, (M,).
        samples: Number of dropout samples T.
        generator: CPU generator of the masks.
        batch_size: Images per forward pass.
        dist: In a distributed run (a collective call with the same arguments and generator
            state on every rank), each rank computes its contiguous slice of ``indices``; the
            masks of all rows are drawn on every rank, so each row gets the masks it gets in
            one process, and every rank returns all rows.

    Returns:
        (M, T, K) float32 probabilities on the CPU.
    """
    p = float(getattr(getattr(model, "dropout", None), "p", 0.0))
    if p <= 0:
        raise ValueError("MC dropout needs a model built with dropout > 0")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    d = model.latent_dim
    idx = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64))
    lo, hi = dist.shard(len(idx))
    out = []
    for first in range(0, len(idx), batch_size):
        last = min(first + batch_size, len(idx))
        a, b = max(lo, first), min(hi, last)
        keep = torch.rand((samples, last - first, d), generator=generator)
        if a >= b:
            continue
        z = model.embed(to_float(images[idx[a:b]], device))
        keep = keep[:, a - first:b - first].ge_(p).to(device)
        logits = model.classifier(z.unsqueeze(0) * keep / (1.0 - p))  # (T, B, K)
        out.append(torch.softmax(logits.float(), dim=-1).permute(1, 0, 2).cpu())
    model.train(was_training)
    k = model.num_classes
    return dist.gather_rows(torch.cat(out) if out else torch.empty(0, samples, k), len(idx))


@torch.inference_mode()
def accuracy(model: nn.Module, images: Tensor, targets: Tensor,
             batch_size: int | None = None, dist: Dist = SINGLE) -> float:
    """Top-1 accuracy on (N, C, H, W) uint8 images and (N,) targets; NaN when N = 0.

    In a distributed run (a collective call), each rank counts its slice and the counts are
    summed, so every rank returns the same accuracy.
    """
    if len(images) == 0:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    if batch_size is None:
        batch_size = int(getattr(model, "inference_batch", INFERENCE_BATCH))
    start, stop = dist.shard(len(images))
    for chunk in torch.arange(start, stop).split(batch_size):
        pred = model(to_float(images[chunk], device)).argmax(1).cpu()
        correct += int((pred == targets[chunk]).sum())
    model.train(was_training)
    return int(dist.sum(correct)) / len(images)


class _JointStep:
    """One training step of :func:`train_round` (paper Eq. 2): CE on the clean labelled batch
    (with ``ce_augment``, on a :data:`CE_VIEW` augmentation of it) plus ``gamma`` times the
    Barlow Twins loss of two augmented views of it (and, with a pool, of as many pool images,
    whose labels are never read); then the optimiser step and the schedule's."""

    def __init__(self, net: nn.Module, x_train: Tensor, y_train: Tensor, pool: Tensor | None,
                 cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int,
                 shuffle_gen: torch.Generator, augment_gen: torch.Generator, dist: Dist) -> None:
        self.net, self.x_train, self.y_train, self.pool = net, x_train, y_train, pool
        self.cfg, self.opt, self.dist = cfg, opt, dist
        self.aug, self.precision = TwoViewAugment(), _Precision(cfg)
        self.sched = lr_scheduler(opt, cfg, total_steps)
        self.shuffle_gen, self.augment_gen = shuffle_gen, augment_gen
        self.device = torch.device(cfg.device)

    def run(self, lab: Tensor, period: Iterable[Tensor]) -> tuple[float, float]:
        """Take a step on each batch ``lab[pos]`` of ``period``; mean (ce, bt) of the steps."""
        ce_sum = bt_sum = 0.0
        steps = 0
        for pos in period:
            loss, ce, bt = self(lab, pos)
            self.opt.zero_grad(set_to_none=True)
            self.precision.step(loss, self.opt)
            if self.sched is not None:
                self.sched.step()
            ce_sum += float(ce.detach())
            bt_sum += float(bt.detach())
            steps += 1
        return ce_sum / max(steps, 1), bt_sum / max(steps, 1)

    def __call__(self, lab: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, ce, bt)`` of the batch ``lab[pos]`` (this rank's rows of it)."""
        dist, cfg, device = self.dist, self.cfg, self.device
        n = len(pos)  # the whole batch; this rank takes rows a:b of it
        a, b = dist.shard(n)
        idx = lab[pos[a:b]]
        x = to_float(self.x_train[idx], device)
        y = self.y_train[idx].to(device)
        if cfg.gamma <= 0 or n < 2:
            with self.precision.autocast():
                logits, _, _ = self.net(self._ce_view(x, a, n))
            return joint_loss(logits.float(), y, None, None, 0.0, all_reduce=dist.all_reduce)
        xv, rows = x, torch.arange(a, b)
        pool = self.pool
        if pool is not None:  # pool images join the views only: their labels are never read
            u = pool[torch.randint(len(pool), (n,), generator=self.shuffle_gen)]
            xv = torch.cat([x, to_float(self.x_train[u[a:b]], device)])
            rows = torch.cat([rows, rows + n])
        if dist.active:
            v1, v2 = self.aug(xv, self.augment_gen, rows, n * (2 if pool is not None else 1))
        else:
            v1, v2 = self.aug(xv, self.augment_gen)
        with self.precision.autocast():  # the CE view is drawn after the two views
            logits, p1, p2 = self.net(self._ce_view(x, a, n), v1, v2)
        return joint_loss(logits.float(), y, p1.float(), p2.float(), cfg.gamma, cfg.lambd,
                          all_reduce=dist.all_reduce)

    def _ce_view(self, x: Tensor, a: int, n: int) -> Tensor:
        """What the cross-entropy sees of ``x`` (rows ``a:`` of a batch of ``n``): ``x``, or
        with ``ce_augment`` a :data:`CE_VIEW` augmentation of it."""
        if not self.cfg.ce_augment:
            return x
        if self.dist.active:
            return augment(x, CE_VIEW, self.augment_gen, torch.arange(a, a + len(x)), n)
        return augment(x, CE_VIEW, self.augment_gen)


def train_round(
    model: DALBTNet,
    x_train: Tensor,
    y_train: Tensor,
    labelled: np.ndarray,
    validation: np.ndarray,
    cfg: TrainConfig,
    shuffle_gen: torch.Generator,
    augment_gen: torch.Generator,
    on_epoch: Callable[[int, dict], object] | None = None,
    unlabelled: np.ndarray | None = None,
    dist: Dist = SINGLE,
) -> TrainResult:
    """Train ``model`` in place on the labelled set and keep the best validated weights.

    Each step: CE on the undistorted labelled batch plus ``gamma`` times the Barlow Twins loss
    of the projections of two augmented views of the same batch (paper Eq. 2). Layers that draw
    from torch's global RNG (dropout) see a fork of it seeded from ``shuffle_gen``, so training
    is reproducible and the caller's global RNG state is left as it was.

    The epoch recipe (``cfg.steps`` None, the paper's) trains ``cfg.epochs`` passes over the
    labelled set; the step recipe exactly ``cfg.steps`` optimiser steps, cycling through the
    labelled set (:class:`RoundPlan`). Either takes ``cfg.schedule`` and ``cfg.warmup_steps``
    (:func:`lr_factor`), ``cfg.balanced`` (:class:`BalancedSampler`), ``cfg.ce_augment``
    (:data:`CE_VIEW`) and ``cfg.select``.

    Args:
        model: DALBTNet on ``cfg.device``.
        x_train: All training images, (N, C, H, W) uint8 (CPU).
        y_train: Their labels, (N,) int64.
        labelled: Labelled dataset indices, (L,).
        validation: Validation dataset indices, (V,); model selection uses only these.
        cfg: The recipe.
        shuffle_gen: Generator of the mini-batch order (and of the dropout seed).
        augment_gen: Generator of the augmentations.
        on_epoch: Called at each checkpoint with (epoch, or steps done with the step recipe;
            metrics dict: ``ce``, ``bt`` and, when validated, ``val_acc``).
        unlabelled: Pool indices; with ``cfg.ssl_unlabelled`` each step also adds the Barlow
            Twins loss of an equally large batch of them (their labels are never read).
        dist: In a distributed run (every rank calls it with the same arguments), training runs
            under DDP: every rank draws the same batches and augmentations and takes its slice
            of each batch; batch norm, the cross-entropy and the Barlow Twins loss cover the
            whole batch, so each step is the one-process step up to rounding (dropout masks
            aside: each rank draws its own). Validation is sharded; every rank ends with the
            same weights.

    Returns:
        :class:`TrainResult`; ``model`` holds the selected weights on return.
    """
    if cfg.finetune == "head":
        from dalbt.probe import train_head
        return train_head(model, x_train, y_train, labelled, validation, cfg, shuffle_gen,
                          augment_gen, on_epoch=on_epoch, unlabelled=unlabelled, dist=dist)
    seed = int(torch.randint(0, 2**62, (1,), generator=shuffle_gen))
    use_bt = cfg.gamma > 0
    with isolated_torch_rng(seed + dist.rank, cfg.device), dist.synced_batchnorm(model):
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        lab = torch.as_tensor(np.asarray(labelled, dtype=np.int64))
        pool = torch.as_tensor(np.asarray(unlabelled if unlabelled is not None else [],
                                          dtype=np.int64))
        ssl_pool = use_bt and cfg.ssl_unlabelled and len(pool) >= 2
        val = torch.as_tensor(np.asarray(validation, dtype=np.int64))
        plan = RoundPlan.of(cfg, len(lab))
        selector = BestOnValidation(x_train[val], y_train[val], cfg, dist, plan)
        # The projector is unused by steps without the Barlow Twins term; DDP must know.
        net = dist.wrap(_Joint(model), find_unused_parameters=not use_bt or len(lab) < 2)
        step = _JointStep(net, x_train, y_train, pool if ssl_pool else None, cfg, opt,
                          plan.total, shuffle_gen, augment_gen, dist)
        losses = (float("nan"), float("nan"))
        unit = "step" if plan.by_step else "epoch"
        for mark, period in plan.periods(shuffle_gen, y_train[lab] if cfg.balanced else None):
            model.train()
            losses = step.run(lab, period)
            metrics = {"ce": losses[0], "bt": losses[1]}
            check_finite("training", mark, metrics, cfg.lr, model, unit)
            selector.end_epoch(model, mark, losses, metrics)
            if on_epoch is not None:
                on_epoch(mark, metrics)
        del net, step
        result = selector.result(model, losses)
    dist.broadcast_module(model)
    return result
