"""MoBYv2AL: joint supervised + MoBY contrastive training of the task model, then core-set
(greedy k-centre) selection on its latents (Caramalau et al., BMVC 2022).

The strategy overrides :meth:`Strategy.train_model`, so the run's model itself is trained with
the MoBYv2AL objective each round; selection is then plain k-centre greedy on the latents of that
jointly trained encoder, with the labelled set as the initial centres.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalbt.data.augment import ViewConfig, augment
from dalbt.losses.moby import (
    DEFAULT_MOMENTUM,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_TEMPERATURE,
    KeyQueue,
    moby_loss,
    momentum_schedule,
    momentum_update,
)
from dalbt.options import NonNegativeFloat, PositiveFloat, PositiveInt, UnitInterval
from dalbt.rng import isolated_torch_rng
from dalbt.strategies.base import LABELLED_OUTPUTS, POOL_OUTPUTS, QueryContext, Strategy
from dalbt.strategies.coreset import k_center_greedy

if TYPE_CHECKING:
    from dalbt.models.net import DALBTNet

# Weak view: crop + flip only. The reference pads by 4 and crops 32x32 (a translation that keeps
# >= ~77 % of the image); here a mild random resized crop (>= 75 % of the area) stands for it.
WEAK_VIEW = ViewConfig(blur_p=0.0, solarize_p=0.0, jitter_p=0.0, gray_p=0.0,
                       crop_scale=(0.75, 1.0))
# Strong view: the reference's MoBY/BYOL-style transform (crop scale 0.2-1, flip, colour jitter
# 0.8, grayscale 0.2, blur 0.2, solarisation 0.2).
STRONG_VIEW = ViewConfig(blur_p=0.2, solarize_p=0.2, crop_scale=(0.2, 1.0))


def moby_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoBY's two-layer head: ``Linear-BN1d-ReLU-Linear``, (B, in_dim) -> (B, out_dim)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class MoBYLearner:
    """The MoBY branch around a task model's encoder.

    Online: ``encoder`` (shared with the task model, trained) -> ``projector`` -> ``predictor``.
    Momentum: ``key_encoder`` -> ``key_projector``, deep copies of the online encoder and
    projector made at construction, never given gradients, moved towards the online weights by
    :func:`momentum_update` before each step's keys are computed. Two FIFO queues hold the
    normalised keys of each view (training images only: whatever is passed to :meth:`loss`).

    Args:
        encoder: The online encoder, ``(B, C, H, W) -> (B, latent_dim)``.
        latent_dim: Its output dimension.
        proj_dim: Projection (and prediction) dimension.
        hidden_dim: Hidden width of the projector and predictor.
        queue_size: Capacity of each key queue.
        temperature: InfoNCE temperature.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, proj_dim: int = 128,
                 hidden_dim: int = 4096, queue_size: int = DEFAULT_QUEUE_SIZE,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        device = next(encoder.parameters()).device
        self.encoder = encoder
        self.projector = moby_mlp(latent_dim, hidden_dim, proj_dim).to(device)
        self.predictor = moby_mlp(proj_dim, hidden_dim, proj_dim).to(device)
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.queue1 = KeyQueue(proj_dim, queue_size, device=device)
        self.queue2 = KeyQueue(proj_dim, queue_size, device=device)
        self.temperature = float(temperature)

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the online heads (projector, predictor)."""
        return [*self.projector.parameters(), *self.predictor.parameters()]

    def train(self) -> None:
        """Train mode for the heads and the key branch (batch statistics, as MoBY)."""
        for m in (self.projector, self.predictor, self.key_encoder, self.key_projector):
            m.train()

    @torch.no_grad()
    def momentum_step(self, m: float) -> None:
        """``key = m * key + (1 - m) * online`` for the encoder and the projector."""
        momentum_update(self.encoder, self.key_encoder, m)
        momentum_update(self.projector, self.key_projector, m)

    def loss(self, v1: Tensor, v2: Tensor, m: float) -> Tensor:
        """Per-sample symmetric MoBY loss of two views; updates the key branch and the queues.

        Args:
            v1: First (weak) view, (B, C, H, W), B >= 2 (batch norm).
            v2: Second (strong) view, (B, C, H, W).
            m: Momentum of this step's key update.

        Returns:
            (B,) losses (with gradient to the online encoder and heads).
        """
        q1 = self.predictor(self.projector(self.encoder(v1)))
        q2 = self.predictor(self.projector(self.encoder(v2)))
        with torch.no_grad():
            self.momentum_step(m)
            k1 = F.normalize(self.key_projector(self.key_encoder(v1)), dim=1)
            k2 = F.normalize(self.key_projector(self.key_encoder(v2)), dim=1)
        out = moby_loss(q1, q2, k1, k2, self.queue1.keys, self.queue2.keys, self.temperature,
                        reduction="none")
        self.queue1.enqueue(k1)
        self.queue2.enqueue(k2)
        return out


class _Cycler:
    """Endless shuffled passes over positions 0..n-1 (a new permutation after each pass)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.int64)
        self.pos = 0

    def take(self, b: int) -> Tensor:
        """The next ``min(b, n)`` positions, (b,) int64."""
        need, parts = min(b, self.n), []
        while need > 0:
            if self.pos >= len(self.order):
                self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
            part = self.order[self.pos : self.pos + need]
            parts.append(part)
            self.pos += len(part)
            need -= len(part)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


class _MoBYStep:
    """The optimiser steps of MoBYv2AL's training: CE on the labelled batch (with the recipe's
    ``ce_augment``, on a ``CE_VIEW`` augmentation of it) plus the weighted MoBY losses of its
    weak and strong views (and of as many pool images); one step for the encoder, classifier
    and heads, then the recipe's learning-rate schedule."""

    def __init__(self, strategy: MoBYv2ALStrategy, model: Any, learner: MoBYLearner,
                 opt: torch.optim.Optimizer, sched: Any, x_train: Tensor, y_train: Tensor,
                 pool: Tensor, cfg: Any, total_steps: int, cycler: _Cycler | None,
                 augment_gen: torch.Generator) -> None:
        self.s, self.model, self.learner, self.opt, self.sched = (strategy, model, learner,
                                                                  opt, sched)
        self.x_train, self.y_train, self.pool, self.cfg = x_train, y_train, pool, cfg
        self.total_steps, self.cycler, self.augment_gen = total_steps, cycler, augment_gen
        from dalbt.train import CE_VIEW, to_float  # dalbt.train imports this package

        self.ce_view, self.to_float = CE_VIEW, to_float
        self.device = torch.device(cfg.device)
        self.use_con = strategy.labelled_weight > 0 or strategy.unlabelled_weight > 0
        self.step = 0

    def run(self, lab: Tensor, period: Any) -> tuple[float, float]:
        """Take a step on each batch ``lab[pos]`` of ``period``; mean (ce, moby) losses."""
        ce_sum = con_sum = 0.0
        n_steps = n_con = 0
        for pos in period:
            ce, con = self._loss(lab[pos])
            n_steps += 1
            ce_sum += ce
            if con is not None:
                con_sum += con
                n_con += 1
        return (ce_sum / n_steps if n_steps else float("nan"),
                con_sum / n_con if n_con else 0.0)

    def _loss(self, idx: Tensor) -> tuple[float, float | None]:
        """One step on the labelled images ``idx``: (ce, mean MoBY loss or None)."""
        s, device, to_float = self.s, self.device, self.to_float
        x = to_float(self.x_train[idx], device)
        x_ce = augment(x, self.ce_view, self.augment_gen) if self.cfg.ce_augment else x
        ce = F.cross_entropy(self.model(x_ce), self.y_train[idx].to(device))
        loss, con = ce, None
        xu = x[:0]
        if self.cycler is not None:  # use_unl
            xu = to_float(self.x_train[self.pool[self.cycler.take(len(idx))]], device)
        if self.use_con and len(x) + len(xu) >= 2:
            xc = torch.cat([x, xu])
            v1 = augment(xc, s.weak_view, self.augment_gen)
            v2 = augment(xc, s.strong_view, self.augment_gen)
            per = self.learner.loss(v1, v2, momentum_schedule(self.step, self.total_steps,
                                                              s.momentum))
            loss = loss + s.labelled_weight * per[: len(x)].mean()
            if len(xu):
                loss = loss + s.unlabelled_weight * per[len(x) :].mean()
            con = float(per.detach().mean())
        # one step for everything (encoder, classifier, heads) after summing the losses
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.step += 1
        return float(ce.detach()), con


class MoBYv2ALStrategy(Strategy):
    """MoBYv2AL (Caramalau, Bhattarai, Stoyanov & Kim, 2022, "MoBYv2AL: Self-supervised Active
    Learning for Image Classification", BMVC).

    Each round the task model is trained jointly with MoBY self-supervision: a query branch
    (the model's encoder, a projector and a predictor MLP) and a momentum key branch (EMA copies
    of encoder and projector, made at the start of the round; momentum 0.99 rising to 1 on a
    cosine over the round's steps) are trained with MoBY's symmetric InfoNCE between a weak
    (crop + flip) and a strong (BYOL-like) view, with temperature 0.2 and two queues of 4,096
    negative keys. Every step takes a labelled batch (cross-entropy on the undistorted images +
    ``labelled_weight`` x contrastive) and an equally large unlabelled batch drawn from the pool
    (``unlabelled_weight`` x contrastive only; its labels are never read); all terms are summed
    and one Adam step (the run's lr and weight decay) updates encoder, classifier and heads. The
    epoch with the best validation accuracy is kept, as in the default training. Selection is
    greedy k-centre (Core-Set) on the jointly trained latents, labelled points as initial centres.

    Deviations from the reference code (documented defects not repeated): labels of unlabelled
    batches are never used; classifier gradients are not zeroed before its step; no LR schedule
    is stepped with the loss; model selection uses the validation split, not the test set; only
    training images (labelled and pool) enter the key queues. Also: Adam and the run's epochs
    instead of SGD with 200+ epochs; the queues start empty instead of random vectors; labelled
    and unlabelled images share one contrastive forward pass (batch-norm statistics over both);
    the weak view is a mild random resized crop (see ``WEAK_VIEW``).

    Args:
        temperature: InfoNCE temperature (> 0).
        queue_size: Keys per queue (>= 1).
        momentum: Base momentum of the key branch, in [0, 1].
        labelled_weight: Weight of the contrastive loss on labelled batches (>= 0).
        unlabelled_weight: Weight of the contrastive loss on unlabelled batches (>= 0; 0 skips
            them).
        proj_dim: Projection / prediction dimension (>= 1).
        hidden_dim: Hidden width of projector and predictor (>= 1).
    """

    name = "mobyv2al"
    description = "MoBYv2AL: joint CE + MoBY contrastive training, k-centre greedy on latents"
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})
    weak_view: ViewConfig = WEAK_VIEW
    strong_view: ViewConfig = STRONG_VIEW

    def __init__(self, temperature: PositiveFloat = DEFAULT_TEMPERATURE,
                 queue_size: PositiveInt = DEFAULT_QUEUE_SIZE,
                 momentum: UnitInterval = DEFAULT_MOMENTUM,
                 labelled_weight: NonNegativeFloat = 0.5,
                 unlabelled_weight: NonNegativeFloat = 0.5,
                 proj_dim: PositiveInt = 128, hidden_dim: PositiveInt = 4096) -> None:
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if int(queue_size) < 1 or int(queue_size) != queue_size:
            raise ValueError(f"queue_size must be a positive integer, got {queue_size}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if not (float(labelled_weight) >= 0 and float(unlabelled_weight) >= 0):
            raise ValueError(f"weights must be >= 0, got {labelled_weight}, {unlabelled_weight}")
        if int(proj_dim) < 1 or int(hidden_dim) < 1:
            raise ValueError(f"proj_dim and hidden_dim must be >= 1, got {proj_dim}, "
                             f"{hidden_dim}")
        self.temperature = float(temperature)
        self.queue_size = int(queue_size)
        self.momentum = float(momentum)
        self.labelled_weight = float(labelled_weight)
        self.unlabelled_weight = float(unlabelled_weight)
        self.proj_dim = int(proj_dim)
        self.hidden_dim = int(hidden_dim)

    def make_learner(self, model: DALBTNet) -> MoBYLearner:
        """The MoBY branch around ``model.encoder`` (heads drawn from torch's global RNG)."""
        return MoBYLearner(model.encoder, model.latent_dim, self.proj_dim, self.hidden_dim,
                           self.queue_size, self.temperature)

    def train_model(self, model: Any, x_train: Tensor, y_train: Tensor, labelled: np.ndarray,
                    validation: np.ndarray, cfg: Any, shuffle_gen: torch.Generator,
                    augment_gen: torch.Generator, on_epoch: Callable | None = None,
                    unlabelled: np.ndarray | None = None, dist: Any = None) -> Any:
        """Train ``model`` in place with the MoBYv2AL objective; keep the best validation epoch.

        In a distributed run every rank trains the whole model (no DDP here: ``dist`` is not
        used); the loop then gives every rank rank 0's weights.

        Args:
            model: DALBTNet on ``cfg.device``.
            x_train: All training images, (N, C, H, W) uint8.
            y_train: Labels, (N,); read only at ``labelled`` and ``validation``.
            labelled: Labelled dataset indices, (L,).
            validation: Validation dataset indices, (V,) (model selection only).
            cfg: ``dalbt.train.TrainConfig`` (epochs, batch_size, lr, weight_decay, eval_every,
                device, and the step recipe's steps, schedule, warmup_steps, balanced,
                ce_augment, eval_every_steps and select, as ``train_round``; the Barlow Twins
                settings ``gamma``, ``lambd`` and ``ssl_unlabelled`` are not used: the pool
                always feeds the MoBY loss here).
            shuffle_gen: Batch order, unlabelled batches, head initialisation and the seed of
                the global-RNG fork (dropout).
            augment_gen: The augmentations.
            on_epoch: Called at each checkpoint with (epoch, or steps done with the step
                recipe; metrics dict).
            unlabelled: Pool indices, (U,); their images feed the contrastive loss only.

        Returns:
            ``dalbt.train.TrainResult`` (``train_bt`` holds the mean MoBY loss).
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=shuffle_gen))
        with isolated_torch_rng(seed, cfg.device):
            return self._train(model, x_train, y_train, labelled, validation, cfg, shuffle_gen,
                               augment_gen, on_epoch, unlabelled)

    def _train(self, model: Any, x_train: Tensor, y_train: Tensor, labelled: np.ndarray,
               validation: np.ndarray, cfg: Any, shuffle_gen: torch.Generator,
               augment_gen: torch.Generator, on_epoch: Callable | None,
               unlabelled: np.ndarray | None) -> Any:
        from dalbt.train import BestOnValidation, RoundPlan, check_finite, lr_scheduler

        learner = self.make_learner(model)
        opt = torch.optim.Adam([*model.parameters(), *learner.head_parameters()], lr=cfg.lr,
                               weight_decay=cfg.weight_decay)
        lab = torch.as_tensor(np.asarray(labelled, dtype=np.int64))
        pool = torch.as_tensor(np.asarray(unlabelled if unlabelled is not None else [],
                                          dtype=np.int64))
        use_unl = self.unlabelled_weight > 0 and len(pool) > 0
        val = torch.as_tensor(np.asarray(validation, dtype=np.int64))
        plan = RoundPlan.of(cfg, len(lab))
        selector = BestOnValidation(x_train[val], y_train[val], cfg, plan=plan)
        step = _MoBYStep(self, model, learner, opt, lr_scheduler(opt, cfg, plan.total),
                         x_train, y_train, pool, cfg, max(1, plan.total),
                         _Cycler(len(pool), shuffle_gen) if use_unl else None, augment_gen)
        losses = (float("nan"), float("nan"))
        unit = "step" if plan.by_step else "epoch"
        for mark, period in plan.periods(shuffle_gen, y_train[lab] if cfg.balanced else None):
            model.train()
            learner.train()
            losses = step.run(lab, period)
            metrics = {"ce": losses[0], "moby": losses[1]}
            check_finite("MoBYv2AL training", mark, metrics, cfg.lr, model, unit)
            selector.end_epoch(model, mark, losses, metrics)
            if on_epoch is not None:
                on_epoch(mark, metrics)
        return selector.result(model, losses)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        pool = ctx.pool_outputs().latents
        lab = ctx.labelled_outputs().latents if len(ctx.labelled) else pool[:0]
        return ctx.unlabelled[k_center_greedy(pool, lab, n, rng=ctx.rng)]


STRATEGY_CLASSES = (MoBYv2ALStrategy,)
