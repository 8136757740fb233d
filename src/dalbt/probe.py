"""``--finetune head``: a linear probe on a frozen encoder.

The encoder (and the Barlow Twins projector) are never trained: the latents of the labelled and
validation images come from the frozen encoder's latents of every image, computed once per run
and encoder (:class:`FrozenLatents`; eval mode, :func:`dalbt.train.infer`), and only
``model.classifier``, an ``nn.Linear`` on the latents, is fitted to them by multinomial logistic
regression. Strategies score the pool with the same model as under ``--finetune all``
(:func:`head_outputs`: the classifier on the stored latents), so they see the same
:class:`~dalbt.strategies.QueryContext` either way.

How the head is fitted, and why:

* **Convex and full-batch.** Cross-entropy plus an L2 penalty on a linear map is a smooth convex
  problem, so it is solved by full-batch L-BFGS (strong-Wolfe line search) in float64, starting
  from zero weights, until the gradient or the change of the training loss is below a tolerance
  or :data:`MAX_ITER` iterations are spent (early stop on the training loss). Nothing in it is
  random: the result depends only on the latents, the labels and the recipe, not on the
  initial classifier nor on the generators (they are not drawn from), and it is the same on
  every run, machine thread count aside.
* **Standardised latents.** The latents are centred and scaled per dimension (statistics of the
  labelled set) before the fit, which makes L-BFGS well conditioned and the L2 strength mean the
  same for every encoder; the scaling is folded back into the weights and bias afterwards, so the
  classifier still reads raw latents. The L2 penalty ``l2 / 2 * ||W||^2`` is on the standardised
  weights (not the bias); ``l2`` is ``cfg.weight_decay`` (as Adam's weight decay, the gradient
  of the penalty is ``l2 * W``).
* **Selection on validation.** With ``cfg.select == "best"`` and a validation split, the L2
  strength is chosen on validation accuracy among :data:`L2_GRID` and ``cfg.weight_decay``: the
  fits run from the strongest penalty to the weakest, each starting from the previous solution,
  until :data:`PATIENCE` in a row are no better than the best; a tie keeps the stronger
  penalty. Otherwise (``select last`` or no validation split) the head is fitted once with
  ``cfg.weight_decay``.
* **What is not used.** Augmentation (the latents of the clean images are computed once;
  augmented views would need an encoder pass per view and step, which is what the frozen
  encoder saves), dropout on the latent (the model's dropout, for MC-dropout strategies, acts
  at scoring time only), the Barlow Twins term (train_bt is 0), mixed precision, the batch size
  and the learning rate.

One fit of 1,000 labels x 60 dimensions takes about 0.2 s on one core of a busy 2-core machine
(100 labels: 0.03 s); encoding the validation split through the encoder costs more than that.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalbt import embeddings
from dalbt.distributed import SINGLE, Dist
from dalbt.errors import TrainingDiverged
from dalbt.inference import INFERENCE_BATCH, TrainResult, infer, to_float
from dalbt.outputs import Outputs
from dalbt.recipe import TrainConfig

if TYPE_CHECKING:
    from dalbt.models.net import DALBTNet

log = logging.getLogger("dalbt.probe")

#: L2 strengths tried when the head is selected on validation (with ``cfg.weight_decay``).
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
#: Selection on validation stops after this many L2 strengths in a row no better than the best.
PATIENCE = 2
#: Most L-BFGS iterations of one fit.
MAX_ITER = 500
#: A fit stops when every gradient entry is below this ...
TOL_GRAD = 1e-5
#: ... or the training loss (or every weight) changes by less than this in an iteration.
TOL_CHANGE = 1e-7

RANDOM_ENCODER = ("the encoder is not pre-trained: --finetune head trains a linear head on "
                  "random features; give --pretrain-epochs")

# ids of the training-image tensors already warned about (a run's rounds share one, so a run
# warns once); an id leaves the set when its tensor is freed, so a new tensor can reuse it.
_warned: set[int] = set()


@dataclass
class HeadFit:
    """A fitted linear head on raw latents.

    Attributes:
        weight: (K, D) float64.
        bias: (K,) float64.
        l2: The L2 strength it was fitted with.
        ce: Mean training cross-entropy (without the penalty).
        iterations: L-BFGS iterations of the fit.
    """

    weight: Tensor
    bias: Tensor
    l2: float
    ce: float
    iterations: int

    def logits(self, z: Tensor) -> Tensor:
        """(N, D) latents -> (N, K) float64 logits."""
        return z.double() @ self.weight.T + self.bias

    def accuracy(self, z: Tensor, y: Tensor) -> float:
        """Top-1 accuracy on (N, D) latents and (N,) labels."""
        return float((self.logits(z).argmax(1) == y).double().mean())


class Standardised:
    """Per-dimension centring and scaling of latents, fitted on the labelled ones.

    Args:
        z: (L, D) latents; dimensions with (near) zero spread keep scale 1.
    """

    def __init__(self, z: Tensor) -> None:
        z = z.double()
        self.mean = z.mean(0)
        std = z.std(0, unbiased=False)
        tiny = std <= 1e-6 * float(std.max().clamp_min(1e-30))
        self.scale = torch.where(tiny, torch.ones_like(std), std)

    def __call__(self, z: Tensor) -> Tensor:
        """(N, D) -> (N, D) float64."""
        return (z.double() - self.mean) / self.scale

    def unfold(self, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """Weights on standardised latents -> the same map on raw latents."""
        w = weight / self.scale
        return w, bias - w @ self.mean


def fit_head(x: Tensor, y: Tensor, num_classes: int, l2: float,
             start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, float, int]:
    """Multinomial logistic regression by full-batch L-BFGS.

    Minimises ``mean CE(x W^T + b, y) + l2 / 2 * ||W||^2``.

    Args:
        x: (L, D) float64 inputs.
        y: (L,) int64 labels in ``[0, num_classes)``.
        num_classes: K.
        l2: L2 strength (>= 0).
        start: Initial ``(W (K, D), b (K,))``; None: zeros.

    Returns:
        ``(W, b, mean cross-entropy, iterations)``.
    """
    if start is None:
        start = (x.new_zeros(num_classes, x.shape[1]), x.new_zeros(num_classes))
    w = start[0].detach().clone().requires_grad_(True)
    b = start[1].detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=MAX_ITER, history_size=20,
                            tolerance_grad=TOL_GRAD, tolerance_change=TOL_CHANGE,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        iterations = int(opt.state[w].get("n_iter", 0))
    with torch.no_grad():
        ce = float(F.cross_entropy(x @ w.T + b, y))
    return w.detach(), b.detach(), ce, iterations


def fit_path(z: Tensor, y: Tensor, num_classes: int, l2s: list[float]) -> Iterator[HeadFit]:
    """Heads for each L2 strength of ``l2s`` (in that order), each fit starting from the
    previous one's solution (the first from zeros); lazily, so a caller may stop early.

    Args:
        z: (L, D) labelled latents.
        y: (L,) their labels.
        num_classes: K.
        l2s: L2 strengths on standardised latents.

    Yields:
        One :class:`HeadFit` (on raw latents) per strength.
    """
    std = Standardised(z)
    x = std(z)
    start: tuple[Tensor, Tensor] | None = None
    for l2 in l2s:
        w, b, ce, iterations = fit_head(x, y, num_classes, l2, start)
        start = (w, b)
        raw_w, raw_b = std.unfold(w, b)
        yield HeadFit(raw_w, raw_b, l2, ce, iterations)


def l2_candidates(cfg: TrainConfig, select_on_validation: bool) -> list[float]:
    """The L2 strengths to fit, strongest first: ``cfg.weight_decay`` alone, or with
    :data:`L2_GRID` when selecting on validation."""
    if not select_on_validation:
        return [float(cfg.weight_decay)]
    return sorted({float(cfg.weight_decay), *L2_GRID}, reverse=True)


def warn_random_encoder(cfg: TrainConfig, x_train: Tensor) -> None:
    """Warn (once per training-image tensor, so once per run) when ``--finetune head`` runs
    without Barlow Twins pre-training, i.e. on a random encoder."""
    if cfg.pretrain_epochs > 0 or id(x_train) in _warned:
        return
    _warned.add(id(x_train))
    weakref.finalize(x_train, _warned.discard, id(x_train))
    log.warning(RANDOM_ENCODER)


def select_on_validation(fits: Iterable[HeadFit], z_val: Tensor, y_val: Tensor
                         ) -> tuple[HeadFit, float, list[tuple[int, float]]]:
    """The fit best on validation accuracy (ties: the earlier, i.e. the stronger penalty).

    Fits are drawn until :data:`PATIENCE` in a row are no better than the best so far (along a
    regularisation path validation accuracy typically rises and then falls, and the weakly
    penalised fits are the slow ones).

    Args:
        fits: Candidate heads, strongest penalty first.
        z_val: (V, D) validation latents, V > 0.
        y_val: (V,) their labels.

    Returns:
        ``(best fit, its accuracy, (iterations, accuracy) of every fit drawn)``.
    """
    best: HeadFit | None = None
    best_acc, worse, history = -math.inf, 0, []
    for fit in fits:
        acc = fit.accuracy(z_val, y_val)
        history.append((fit.iterations, acc))
        if acc > best_acc:
            best, best_acc, worse = fit, acc, 0
        else:
            worse += 1
            if worse >= PATIENCE:
                break
    if best is None:
        raise ValueError("no head to select from")
    return best, best_acc, history


def encoder_fingerprint(model: DALBTNet) -> str:
    """A digest of the encoder's weights, buffers and architecture: equal digests, equal
    latents."""
    return embeddings.encoder_fingerprint(model.encoder)


class FrozenLatents:
    """The latents of every image under a frozen encoder, computed once and reused.

    Under ``--finetune head`` the encoder is the same in every round of a run (the shared
    pre-trained one, or a pretrained backbone), so encoding the 55,000-image pool again each
    round is wasted work: the first request encodes all N images (eval mode,
    :func:`dalbt.train.infer`), later requests index the stored (N, D) latents. Entries are
    keyed by the image tensor (a weak reference) and :func:`encoder_fingerprint`, so changed
    weights or other images recompute them; two are kept (the training and the test images).

    With a ``cache_dir`` (``TrainConfig.embedding_cache``) the latents also go to the on-disk
    :class:`~dalbt.embeddings.EmbeddingCache` and are read back from it, memory-mapped, by
    later processes: later runs, strategies and labelling rounds do not encode again. A
    distributed run keeps them in memory only.
    """

    KEEP = 2

    def __init__(self) -> None:
        self._entries: list[tuple[weakref.ref[Tensor], str, Tensor | np.ndarray]] = []
        self.encodings = 0  # how many times a whole image set was encoded (tests read it)
        self.reads = 0  # how many times an entry was read from the disk cache

    def __call__(self, model: DALBTNet, images: Tensor, indices: np.ndarray,
                 dist: Dist = SINGLE, cache_dir: str | None = None,
                 progress: Callable[[int], None] | None = None) -> Tensor:
        """(M, D) float32 CPU latents of ``images[indices]``."""
        fingerprint = encoder_fingerprint(model)
        entry = next((e for e in self._entries if e[0]() is images and e[1] == fingerprint),
                     None)
        if entry is None:
            self._entries = [e for e in self._entries if e[0]() is not None][-(self.KEEP - 1):]
            latents = self._compute(model, images, fingerprint, dist, cache_dir, progress)
            entry = (weakref.ref(images), fingerprint, latents)
            self._entries.append(entry)
        stored = entry[2]
        idx = np.ascontiguousarray(indices, dtype=np.int64)
        if isinstance(stored, np.ndarray):  # memory-mapped: read just these rows
            return torch.from_numpy(np.asarray(stored[idx], dtype=np.float32))
        return stored[torch.from_numpy(idx)]

    def _compute(self, model: DALBTNet, images: Tensor, fingerprint: str, dist: Dist,
                 cache_dir: str | None, progress: Callable[[int], None] | None
                 ) -> Tensor | np.ndarray:
        if cache_dir is None or dist.active:
            self.encodings += 1
            return infer(model, images, np.arange(len(images)), dist=dist,
                         progress=progress).latents.clone()
        latents, made = cached_latents(model, images, embeddings.EmbeddingCache(cache_dir),
                                       progress, fingerprint)
        if made:
            self.encodings += 1
        else:
            self.reads += 1
        return latents


def cached_latents(model: DALBTNet, images: Tensor, cache: embeddings.EmbeddingCache,
                   progress: Callable[[int], None] | None = None,
                   fingerprint: str | None = None) -> tuple[np.ndarray, bool]:
    """The (N, D) latents of every image under the model's encoder, read from ``cache`` or
    computed into it now (eval mode, ``model.inference_batch`` images a pass).

    Returns:
        (the memory-mapped latents, whether they were computed now).
    """
    fingerprint = fingerprint or encoder_fingerprint(model)
    key = embeddings.cache_key(embeddings.images_digest(images), fingerprint, cache.dtype)
    found = cache.read(key, len(images))
    if found is not None:
        return found, False

    def fill(out: np.ndarray) -> None:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        with torch.inference_mode():
            embeddings.embed(lambda x: model.embed(to_float(x, device)), images,
                             int(getattr(model, "inference_batch", INFERENCE_BATCH)), out,
                             progress)
        model.train(was_training)

    return cache.write(key, len(images), model.latent_dim, fill,
                       {"images": list(images.shape), "encoder": fingerprint}), True


#: The process's frozen-encoder latents (see :class:`FrozenLatents`).
frozen_latents = FrozenLatents()


def _latents(model: DALBTNet, images: Tensor, indices: np.ndarray, dist: Dist,
             cache_dir: str | None = None,
             progress: Callable[[int], None] | None = None) -> Tensor:
    """(M, D) float32 CPU latents of ``images[indices]`` under the frozen encoder."""
    return frozen_latents(model, images, indices, dist, cache_dir, progress)


@torch.no_grad()
def head_outputs(model: DALBTNet, images: Tensor, indices: np.ndarray,
                 dist: Dist = SINGLE, cache_dir: str | None = None,
                 progress: Callable[[int], None] | None = None) -> Outputs:
    """What :func:`dalbt.train.infer` returns, from the frozen encoder's stored latents: the
    classifier alone runs each round.

    Args:
        model: The DALBTNet with the frozen encoder.
        images: All images of the set, (N, C, H, W) uint8.
        indices: Which of them, (M,).
        dist: The process's place in a distributed run.
        cache_dir: The on-disk embedding cache's directory (None: in memory only).
        progress: Called with images done while the set is encoded the first time.

    Returns:
        :class:`Outputs` with CPU float32 logits (M, K) and latents (M, D).
    """
    z = _latents(model, images, indices, dist, cache_dir, progress)
    device = next(model.classifier.parameters()).device
    was_training = model.training
    model.eval()
    logits = torch.cat([model.classifier(c.to(device)).float().cpu()
                        for c in z.split(INFERENCE_BATCH)])  # (0, D) splits into one chunk
    model.train(was_training)
    return Outputs(indices=np.asarray(indices, dtype=np.int64), logits=logits, latents=z)


@torch.no_grad()
def _load(classifier: nn.Linear, fit: HeadFit) -> None:
    """Copy a fitted head into the model's classifier (its device and dtype)."""
    weight = classifier.weight
    weight.copy_(fit.weight.to(weight.device, weight.dtype))
    classifier.bias.copy_(fit.bias.to(weight.device, weight.dtype))


def train_head(
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
    """Fit ``model.classifier`` on the frozen encoder's latents (``--finetune head``).

    Same arguments and result as :func:`dalbt.train.train_round`; see the module docstring
    for the method. Every encoder and projector weight (and buffer) is left as it was.

    Args:
        model: DALBTNet on ``cfg.device``; only ``model.classifier`` changes.
        x_train: All training images, (N, C, H, W) uint8.
        y_train: Their labels, (N,) int64 (read at ``labelled`` and ``validation`` only).
        labelled: Labelled dataset indices, (L,).
        validation: Validation dataset indices, (V,).
        cfg: ``weight_decay`` (the L2 strength), ``select``, ``pretrain_epochs`` (a warning
            when 0); the other settings do not apply to a linear head.
        shuffle_gen: Unused (the fit is deterministic); kept for the signature.
        augment_gen: Unused (no augmentation).
        on_epoch: Called once, after the fit, with (1, metrics).
        unlabelled: Unused (their labels are never read).
        dist: In a distributed run, every rank gets all latents and runs the same fit; rank 0's
            classifier is then broadcast, so every rank ends with the same weights.

    Returns:
        :class:`~dalbt.train.TrainResult`: ``val_acc`` of the selected head (NaN without a
        validation split), ``best_epoch`` its L-BFGS iterations, ``train_ce`` its final
        training cross-entropy, ``train_bt`` 0, ``history`` one ``(iterations, val_acc)`` per
        L2 strength tried (strongest first; empty without selection on validation).
    """
    del shuffle_gen, augment_gen, unlabelled
    if not getattr(model, "pretrained", False):
        warn_random_encoder(cfg, x_train)
    lab = np.asarray(labelled, dtype=np.int64)
    val = np.asarray(validation, dtype=np.int64)
    if len(lab) == 0:  # nothing to fit: the classifier stays as it is
        return TrainResult(val_acc=float("nan"), best_epoch=0, train_ce=float("nan"),
                           train_bt=0.0)
    cache = cfg.embedding_cache
    z, z_val = (_latents(model, x_train, lab, dist, cache),
                _latents(model, x_train, val, dist, cache))
    y, y_val = y_train[torch.from_numpy(lab)], y_train[torch.from_numpy(val)]
    if not (bool(torch.isfinite(z).all()) and bool(torch.isfinite(z_val).all())):
        raise TrainingDiverged("the frozen encoder gives non-finite latents, so no linear head "
                               "can be fitted: pre-train it again with a smaller --lr")
    selecting = cfg.select == "best" and len(val) > 0
    fits = fit_path(z, y, model.num_classes, l2_candidates(cfg, selecting))
    if selecting:
        fit, val_acc, history = select_on_validation(fits, z_val, y_val)
    else:  # one fit; its validation accuracy is reported when there is a split
        fit, history = next(fits), []
        val_acc = fit.accuracy(z_val, y_val) if len(val) else math.nan
    _load(model.classifier, fit)
    dist.broadcast_module(model.classifier)
    if on_epoch is not None:
        on_epoch(1, {"ce": fit.ce, "bt": 0.0, "val_acc": val_acc})
    return TrainResult(val_acc=val_acc, best_epoch=fit.iterations, train_ce=fit.ce,
                       train_bt=0.0, history=history)


@torch.no_grad()
def head_accuracy(model: DALBTNet, images: Tensor, targets: Tensor, dist: Dist = SINGLE,
                  cache_dir: str | None = None) -> float:
    """Top-1 accuracy of the head on the frozen encoder's stored latents of ``images`` (the
    test set is encoded once per run, not once per round); NaN when there is no image."""
    if len(images) == 0:
        return float("nan")
    out = head_outputs(model, images, np.arange(len(images)), dist, cache_dir)
    return float((out.logits.argmax(1) == targets).double().mean())
