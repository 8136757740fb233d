"""Training one AL round: the joint CE + gamma * Barlow Twins objective, model selection on
the validation split, and batched inference."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from dalbt.data.augment import TwoViewAugment
from dalbt.losses import DEFAULT_GAMMA, DEFAULT_LAMBDA, barlow_twins_loss, joint_loss
from dalbt.outputs import Outputs
from dalbt.rng import isolated_torch_rng

INFERENCE_BATCH = 2048


@dataclass
class TrainConfig:
    """Optimisation recipe of one round (paper: Adam 1e-3, wd 1e-5, batch 64, gamma 0.001).

    Attributes:
        epochs: Epochs per round (paper: 150; 20 on MNIST).
        batch_size: Labelled mini-batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        gamma: Weight of the Barlow Twins term; 0 trains with CE only (no augmentation).
        lambd: Barlow Twins off-diagonal weight.
        warm_start: Continue from the previous round's model instead of re-initialising.
        eval_every: Evaluate on the validation split every this many epochs (and at the end).
        device: torch device string.
        ssl_unlabelled: Semi-supervised DALBT: each step's Barlow Twins term covers the labelled
            batch and an equally large batch of unlabelled pool images.
        pretrain_epochs: Barlow Twins pre-training epochs on the whole pool before round 0;
            every round then fine-tunes from the pre-trained weights (0: off).
        pretrain_batch: Batch size of the pre-training.
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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What a round's training produced.

    Attributes:
        val_acc: Validation accuracy of the selected model (NaN without validation split).
        best_epoch: Epoch (1-based) of the selected model.
        train_ce: Mean cross-entropy of the selected epoch.
        train_bt: Mean Barlow Twins loss of the selected epoch (0 when gamma = 0).
        history: Per evaluated epoch: (epoch, val_acc).
    """

    val_acc: float
    best_epoch: int
    train_ce: float
    train_bt: float
    history: list[tuple[int, float]] = field(default_factory=list)


class BestOnValidation:
    """Model selection on the validation split: keeps the weights of the best epoch.

    Args:
        x_val: Validation images, (V, C, H, W) uint8.
        y_val: Their labels, (V,).
        cfg: ``eval_every`` and ``epochs`` decide when to evaluate.
    """

    def __init__(self, x_val: Tensor, y_val: Tensor, cfg: TrainConfig) -> None:
        self.x_val, self.y_val, self.cfg = x_val, y_val, cfg
        self.best_acc, self.best_epoch, self.best_state = -math.inf, 0, None
        self.best_losses = (float("nan"), float("nan"))
        self.history: list[tuple[int, float]] = []

    def end_epoch(self, model: nn.Module, epoch: int, losses: tuple[float, float],
                  metrics: dict) -> None:
        """Evaluate when due (adds ``val_acc`` to ``metrics``) and keep the best weights."""
        cfg = self.cfg
        if not len(self.y_val) or (epoch % cfg.eval_every and epoch != cfg.epochs):
            return
        acc = accuracy(model, self.x_val, self.y_val)
        self.history.append((epoch, acc))
        metrics["val_acc"] = acc
        if acc > self.best_acc:
            self.best_acc, self.best_epoch, self.best_losses = acc, epoch, losses
            self.best_state = copy.deepcopy(model.state_dict())

    def result(self, model: nn.Module, last_losses: tuple[float, float]) -> TrainResult:
        """Load the selected weights into ``model`` and describe them (the last epoch when
        there is no validation split)."""
        if self.best_state is None:
            return TrainResult(val_acc=float("nan"), best_epoch=self.cfg.epochs,
                               train_ce=last_losses[0], train_bt=last_losses[1],
                               history=self.history)
        model.load_state_dict(self.best_state)
        return TrainResult(val_acc=self.best_acc, best_epoch=self.best_epoch,
                           train_ce=self.best_losses[0], train_bt=self.best_losses[1],
                           history=self.history)


def to_float(x: Tensor, device: torch.device | str) -> Tensor:
    """uint8 images (B, C, H, W) -> float in [0, 1] on ``device``."""
    return x.to(device, non_blocking=True).float().div_(255.0)


def batches(n: int, size: int, generator: torch.Generator | None = None,
            drop_singleton: bool = False) -> list[Tensor]:
    """Positions 0..n-1 split into mini-batches, shuffled when a generator is given.

    A last batch of one sample is dropped when ``drop_singleton`` (batch norm needs two).
    """
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    out = list(order.split(size))
    if drop_singleton and len(out) > 1 and len(out[-1]) == 1:
        out.pop()
    return out


@torch.inference_mode()
def infer(model: nn.Module, images: Tensor, indices: np.ndarray,
          batch_size: int = INFERENCE_BATCH, progress: Callable[[int], None] | None = None
          ) -> Outputs:
    """Logits and latents of the model for dataset indices, in one batched pass.

    Args:
        model: A DALBTNet (``embed`` and ``classifier``).
        images: All training images, (N, C, H, W) uint8.
        indices: Dataset indices to score, (M,).
        batch_size: Images per forward pass.
        progress: Called with the number of images done after each batch.

    Returns:
        :class:`Outputs` with CPU float32 logits (M, K) and latents (M, D).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64))
    logits, latents = [], []
    for chunk in idx.split(batch_size):
        z = model.embed(to_float(images[chunk], device))
        latents.append(z.float().cpu())
        logits.append(model.classifier(z).float().cpu())
        if progress is not None:
            progress(len(chunk))
    model.train(was_training)
    k = model.classifier.out_features
    d = model.latent_dim
    return Outputs(
        indices=np.asarray(indices, dtype=np.int64),
        logits=torch.cat(logits) if logits else torch.empty(0, k),
        latents=torch.cat(latents) if latents else torch.empty(0, d),
    )


def pretrain_barlow(model: nn.Module, x_train: Tensor, indices: np.ndarray, cfg: TrainConfig,
                    shuffle_gen: torch.Generator, augment_gen: torch.Generator,
                    on_epoch: Callable[[int, dict], None] | None = None) -> list[float]:
    """Barlow Twins pre-training of encoder + projector on unlabelled images (no labels).

    Args:
        model: DALBTNet on ``cfg.device`` (trained in place; the classifier is untouched).
        x_train: All training images, (N, C, H, W) uint8.
        indices: Dataset indices to pre-train on, (P,).
        cfg: ``pretrain_epochs``, ``pretrain_batch``, ``lr``, ``weight_decay``, ``lambd``.
        shuffle_gen: Generator of the batch order.
        augment_gen: Generator of the augmentations.
        on_epoch: Called after each epoch with (epoch, {"bt": mean loss}).

    Returns:
        Mean Barlow Twins loss per epoch.
    """
    device = torch.device(cfg.device)
    params = [*model.encoder.parameters(), *model.projector.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    aug = TwoViewAugment()
    idx_all = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    losses = []
    seed = int(torch.randint(0, 2**62, (1,), generator=shuffle_gen))
    with isolated_torch_rng(seed, cfg.device):
        model.train()
        for epoch in range(1, cfg.pretrain_epochs + 1):
            total, steps = 0.0, 0
            for pos in batches(len(idx_all), cfg.pretrain_batch, shuffle_gen,
                               drop_singleton=True):
                v1, v2 = aug(to_float(x_train[idx_all[pos]], device), augment_gen)
                loss = barlow_twins_loss(model.project(v1), model.project(v2), cfg.lambd)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            losses.append(total / max(steps, 1))
            if on_epoch is not None:
                on_epoch(epoch, {"bt": losses[-1]})
    return losses


@torch.inference_mode()
def mc_dropout_probs(model: nn.Module, images: Tensor, indices: np.ndarray, samples: int,
                     generator: torch.Generator, batch_size: int = INFERENCE_BATCH) -> Tensor:
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

    Returns:
        (M, T, K) float32 probabilities on the CPU.
    """
    p = float(getattr(getattr(model, "dropout", None), "p", 0.0))
    if p <= 0:
        raise ValueError("MC dropout needs a model built with dropout > 0")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for chunk in torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64)).split(batch_size):
        z = model.embed(to_float(images[chunk], device))
        keep = torch.rand((samples, *z.shape), generator=generator).ge_(p).to(device)
        logits = model.classifier(z.unsqueeze(0) * keep / (1.0 - p))  # (T, B, K)
        out.append(torch.softmax(logits.float(), dim=-1).permute(1, 0, 2).cpu())
    model.train(was_training)
    k = model.classifier.out_features
    return torch.cat(out) if out else torch.empty(0, samples, k)


@torch.inference_mode()
def accuracy(model: nn.Module, images: Tensor, targets: Tensor,
             batch_size: int = INFERENCE_BATCH) -> float:
    """Top-1 accuracy on (N, C, H, W) uint8 images and (N,) targets; NaN when N = 0."""
    if len(images) == 0:
        return float("nan")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for chunk in torch.arange(len(images)).split(batch_size):
        pred = model(to_float(images[chunk], device)).argmax(1).cpu()
        correct += int((pred == targets[chunk]).sum())
    model.train(was_training)
    return correct / len(images)


def train_round(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    labelled: np.ndarray,
    validation: np.ndarray,
    cfg: TrainConfig,
    shuffle_gen: torch.Generator,
    augment_gen: torch.Generator,
    on_epoch: Callable[[int, dict], None] | None = None,
    unlabelled: np.ndarray | None = None,
) -> TrainResult:
    """Train ``model`` in place on the labelled set and keep the best validation epoch.

    Each step: CE on the undistorted labelled batch plus ``gamma`` times the Barlow Twins loss
    of the projections of two augmented views of the same batch (paper Eq. 2). Layers that draw
    from torch's global RNG (dropout) see a fork of it seeded from ``shuffle_gen``, so training
    is reproducible and the caller's global RNG state is left as it was.

    Args:
        model: DALBTNet on ``cfg.device``.
        x_train: All training images, (N, C, H, W) uint8 (CPU).
        y_train: Their labels, (N,) int64.
        labelled: Labelled dataset indices, (L,).
        validation: Validation dataset indices, (V,); model selection uses only these.
        cfg: The recipe.
        shuffle_gen: Generator of the mini-batch order (and of the dropout seed).
        augment_gen: Generator of the augmentations.
        on_epoch: Called after each epoch with (epoch, metrics dict).
        unlabelled: Pool indices; with ``cfg.ssl_unlabelled`` each step also adds the Barlow
            Twins loss of an equally large batch of them (their labels are never read).

    Returns:
        :class:`TrainResult`; ``model`` holds the selected weights on return.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=shuffle_gen))
    with isolated_torch_rng(seed, cfg.device):
        device = torch.device(cfg.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        aug = TwoViewAugment()
        use_bt = cfg.gamma > 0
        lab = torch.as_tensor(np.asarray(labelled, dtype=np.int64))
        pool = torch.as_tensor(np.asarray(unlabelled if unlabelled is not None else [],
                                          dtype=np.int64))
        ssl_pool = use_bt and cfg.ssl_unlabelled and len(pool) >= 2
        val = torch.as_tensor(np.asarray(validation, dtype=np.int64))
        selector = BestOnValidation(x_train[val], y_train[val], cfg)
        ce_mean = bt_mean = float("nan")
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            ce_sum = bt_sum = 0.0
            steps = 0
            for pos in batches(len(lab), cfg.batch_size, shuffle_gen, drop_singleton=use_bt):
                idx = lab[pos]
                x = to_float(x_train[idx], device)
                y = y_train[idx].to(device)
                if use_bt and len(idx) >= 2:
                    xv = x
                    if ssl_pool:  # pool images join the views only: their labels are never read
                        u = pool[torch.randint(len(pool), (len(idx),), generator=shuffle_gen)]
                        xv = torch.cat([x, to_float(x_train[u], device)])
                    v1, v2 = aug(xv, augment_gen)
                    # Separate passes, so batch-norm statistics of the classifier's input are
                    # those of undistorted images, and each view is normalised on its own (as
                    # Barlow Twins does).
                    loss, ce, bt = joint_loss(model(x), y, model.project(v1), model.project(v2),
                                              cfg.gamma, cfg.lambd)
                else:
                    loss, ce, bt = joint_loss(model(x), y, None, None, 0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ce_sum += float(ce.detach())
                bt_sum += float(bt.detach())
                steps += 1
            ce_mean, bt_mean = ce_sum / max(steps, 1), bt_sum / max(steps, 1)
            metrics = {"ce": ce_mean, "bt": bt_mean}
            selector.end_epoch(model, epoch, (ce_mean, bt_mean), metrics)
            if on_epoch is not None:
                on_epoch(epoch, metrics)
        return selector.result(model, (ce_mean, bt_mean))


