"""DAL-OSR: a variational classifier and Weibull outlier sampling (Mandivarapu et al. 2020)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalbt.options import Fraction, NonNegativeFloat, PositiveInt
from dalbt.strategies.base import QueryContext, Strategy
from dalbt.strategies.weibull import (
    ASSIGNMENTS,
    DIRECTIONS,
    Assignment,
    Direction,
    WeibullStrategy,
)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) of each sample.

    Args:
        mu: Posterior means, (B, D).
        logvar: Posterior log-variances, (B, D).

    Returns:
        (B,) ``0.5 * sum_d(mu^2 + exp(logvar) - 1 - logvar)``.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> nn.Linear:
    """Re-draw a layer's weights like PyTorch's default init, from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
    return layer


class VariationalClassifier(nn.Module):
    """Encoder with Gaussian posterior heads and a linear classifier on a sampled latent.

    Args:
        encoder: ``(B, C, H, W)`` images in [0, 1] -> ``(B, D)`` features.
        latent_dim: D (features, and latent size).
        num_classes: K.
        generator: Initialises the heads.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, num_classes: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # layer construction draws from the global RNG
            self.encoder = encoder
            self.mu = _init_linear(nn.Linear(latent_dim, latent_dim), generator)
            self.logvar = _init_linear(nn.Linear(latent_dim, latent_dim), generator)
            self.classifier = _init_linear(nn.Linear(latent_dim, num_classes), generator)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (mu (B, D), logvar (B, D))``."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def forward(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Logits on ``z = mu + exp(logvar / 2) * eps`` (eps from ``generator``).

        Returns:
            (logits (B, K), mu (B, D), logvar (B, D)).
        """
        mu, logvar = self.encode(x)
        eps = torch.randn(mu.shape, generator=generator).to(mu.device)
        return self.classifier(mu + (0.5 * logvar).exp() * eps), mu, logvar


@torch.inference_mode()
def _encode_mean(net: VariationalClassifier, images: Tensor, indices: np.ndarray,
                 batch_size: int) -> tuple[Tensor, Tensor]:
    """Posterior means (N, D) and the classifier's predictions on them (N,), on the CPU."""
    from dalbt.train import to_float  # dalbt.train imports this package

    device = next(net.parameters()).device
    net.eval()
    mus, preds = [], []
    for chunk in torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64)).split(batch_size):
        mu, _ = net.encode(to_float(images[chunk], device))
        mus.append(mu.float().cpu())
        preds.append(net.classifier(mu).argmax(1).cpu())
    d = net.mu.out_features
    return (torch.cat(mus) if mus else torch.empty(0, d),
            torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64))


class DalOsrStrategy(Strategy):
    """DAL-OSR (Mandivarapu, Camp & Estrada, 2020, "Deep Active Learning via Open Set
    Recognition").

    Each round a variational classifier of its own is trained on the labelled set: the run's
    encoder architecture (fresh weights) with linear heads for the posterior mean ``mu`` and
    log-variance of a latent of the encoder's size, and a linear classifier on a reparameterised
    sample ``z``; loss ``CE + beta * KL(q(z|x) || N(0, I))`` (KL summed over latent dimensions,
    averaged over the batch), Adam with the run's learning rate, weight decay and batch size,
    the last epoch kept. Then, as open-set recognition (libMR / ``weibull``'s fit), per class
    the posterior means of the correctly classified labelled samples give a class mean and a
    Weibull fitted to the tail of their cosine distances to it; pool samples are scored by the
    outlier probability of their ``mu`` against their predicted class and the most outlying
    are queried.

    Deviations from the reference code: it negates the scores before ``topk`` and so queries
    the *least* outlying samples, ``budget / classes`` per predicted class when its
    ``samplePerClass`` is set (``lib/OpenSet/meta_recognition.py``); by default the highest
    outlier probability is queried, as the paper describes, and ``direction="inlier"`` with
    ``balance=True`` gives the reference code's behaviour. The decoder (reconstruction)
    variant is not implemented. Mini-batches of one sample are skipped (batch normalisation),
    so a labelled set of one trains nothing.

    Args:
        beta: Weight of the KL term (paper: 0.1).
        epochs: Training epochs; ``None`` uses the run's recipe (with the step recipe, its
            steps, schedule and class balance; there is no validation, and the cross-entropy
            sees the clean image).
        tail_frac: Fraction of each class's correct samples fitted (paper: 0.05; 0.5 on MNIST).
        min_tail: Smallest tail size (as ``weibull``).
        assign: Class a pool sample is scored against (as ``weibull``; default its prediction).
        direction: ``outlier`` (default, the paper: highest outlier probability first) or
            ``inlier`` (lowest first, as the reference code).
        balance: Take the batch round-robin over the assigned classes (as the reference code's
            ``samplePerClass``) instead of one global ranking.
    """

    name = "dal-osr"
    description = "DAL-OSR: variational classifier, query the highest Weibull outlier probability"

    def __init__(self, beta: NonNegativeFloat = 0.1, epochs: PositiveInt | None = None,
                 tail_frac: Fraction = 0.05, min_tail: PositiveInt = 3,
                 assign: Assignment = "predicted", direction: Direction = "outlier",
                 balance: bool = False) -> None:
        if not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        if epochs is not None and (int(epochs) != epochs or epochs < 1):
            raise ValueError(f"epochs must be a positive integer or None, got {epochs}")
        if assign not in ASSIGNMENTS:
            raise ValueError(f"unknown class assignment {assign!r}; choose one of {ASSIGNMENTS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; choose one of {DIRECTIONS}")
        self.beta = float(beta)
        self.epochs = None if epochs is None else int(epochs)
        self.weibull = WeibullStrategy(distance="cosine", assign=assign, tail_frac=tail_frac,
                                       min_tail=min_tail, direction=direction, balance=balance)
        # (context, labelled mu, labelled predictions, pool mu, pool predictions) of this query
        self._state: tuple[QueryContext, Tensor, Tensor, Tensor, Tensor] | None = None

    def fit_model(self, ctx: QueryContext) -> VariationalClassifier:
        """Train a fresh variational classifier on the labelled set (returned in eval mode)."""
        from dalbt.train import RoundPlan, lr_scheduler, to_float  # imports this package

        images: Tensor = ctx.require("images")
        cfg = ctx.require("train_config")
        if self.epochs is not None:  # its own epochs: the epoch recipe
            cfg = dataclasses.replace(cfg, epochs=self.epochs, steps=None, eval_every_steps=None)
        base = ctx.require("model_factory")(int(ctx.rng.integers(0, 2**63 - 1)))
        device = next(base.parameters()).device
        net = VariationalClassifier(base.encoder, base.latent_dim, ctx.num_classes,
                                    ctx.torch_generator()).to(device)
        del base
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        shuffle_gen, noise_gen = ctx.torch_generator(), ctx.torch_generator()
        lab = torch.from_numpy(ctx.labelled)
        y_lab = torch.from_numpy(ctx.labelled_targets)
        plan = RoundPlan.of(cfg, len(lab))
        sched = lr_scheduler(opt, cfg, plan.total)
        net.train()
        for _, period in plan.periods(shuffle_gen, y_lab if cfg.balanced else None):
            for pos in period:
                if len(pos) < 2:
                    continue
                logits, mu, logvar = net(to_float(images[lab[pos]], device), noise_gen)
                loss = (F.cross_entropy(logits, y_lab[pos].to(device))
                        + self.beta * kl_divergence(mu, logvar).mean())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
        return net.eval()

    def prepare(self, ctx: QueryContext) -> None:
        """Train the variational classifier and encode the labelled set and the pool."""
        from dalbt.train import INFERENCE_BATCH

        net = self.fit_model(ctx)
        images = ctx.require("images")
        lab_mu, lab_pred = _encode_mean(net, images, ctx.labelled, INFERENCE_BATCH)
        pool_mu, pool_pred = _encode_mean(net, images, ctx.unlabelled, INFERENCE_BATCH)
        self._state = (ctx, lab_mu, lab_pred, pool_mu, pool_pred)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        if self._state is None or self._state[0] is not ctx:
            self.prepare(ctx)
        assert self._state is not None
        _, lab_mu, lab_pred, pool_mu, pool_pred = self._state
        self._state = None
        return self.weibull.rank(lab_mu, ctx.labelled_targets, lab_pred.numpy(), pool_mu,
                                 pool_pred, ctx.unlabelled, n, ctx.num_classes, rng=ctx.rng)


STRATEGY_CLASSES = (DalOsrStrategy,)
