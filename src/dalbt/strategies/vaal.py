"""VAAL: Variational Adversarial Active Learning (Sinha, Ebrahimi & Darrell, 2019).

A VAE learns a latent space of labelled and unlabelled images while a discriminator on the
VAE's latent means learns to tell labelled from unlabelled samples; the VAE plays against it,
trying to make every sample look labelled. The samples the discriminator is most sure are
unlabelled (lowest probability of "labelled") are queried.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalbt.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from dalbt.rng import isolated_torch_rng
from dalbt.strategies.base import QueryContext, Strategy, top_k
from dalbt.train import to_float

INFERENCE_CHUNK = 1024
MAX_DOWNSAMPLINGS = 3


class ConvVAE(nn.Module):
    """Small convolutional VAE for images in [0, 1] of any channel count and size.

    The encoder halves the image with ``Conv(4, stride 2) - BN - ReLU`` blocks (channels
    ``width, 2 width, 4 width``; at most three, while both sides are >= 4), as the VAAL reference
    encoder does with wider layers; linear heads give ``mu`` and ``logvar``. The decoder mirrors
    it with transposed convolutions back to exactly the input size, and a sigmoid output.

    Args:
        channels: Image channels C.
        height: Image height H.
        width_px: Image width W.
        latent: Latent size.
        width: Channels of the first convolution.
    """

    def __init__(self, channels: int, height: int, width_px: int, latent: int, width: int) -> None:
        super().__init__()
        self.shapes = [(channels, height, width_px)]  # (C, H, W) at each encoder stage
        enc: list[nn.Module] = []
        c, h, w = channels, height, width_px
        while len(enc) < MAX_DOWNSAMPLINGS and min(h, w) >= 4:
            c_out = width * 2 ** len(enc)
            enc.append(nn.Sequential(nn.Conv2d(c, c_out, 4, 2, 1, bias=False),
                                     nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)))
            c, h, w = c_out, h // 2, w // 2  # Conv(4, 2, 1) maps a side s to floor(s / 2)
            self.shapes.append((c, h, w))
        self.encoder = nn.ModuleList(enc)
        flat = c * h * w
        self.fc_mu = nn.Linear(flat, latent)
        self.fc_logvar = nn.Linear(flat, latent)
        self.fc_dec = nn.Linear(latent, flat)
        dec: list[nn.Module] = []
        for i in range(len(enc), 0, -1):
            c_in, c_out = self.shapes[i][0], self.shapes[i - 1][0]
            last = i == 1
            dec.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=last))
            if not last:
                dec += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.decoder = nn.ModuleList(dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (mu, logvar)``, each (B, latent)."""
        for block in self.encoder:
            x = block(x)
        x = x.flatten(1)
        return self.fc_mu(x), self.fc_logvar(x)

    def decode(self, z: Tensor) -> Tensor:
        """``(B, latent) -> (B, C, H, W)`` reconstruction in (0, 1)."""
        x = self.fc_dec(z).view(len(z), *self.shapes[-1])
        stage = len(self.shapes) - 1
        for layer in self.decoder:
            if isinstance(layer, nn.ConvTranspose2d):
                stage -= 1
                # A stride-2 transposed conv can give 2s or 2s + 1: ask for the encoder's size.
                x = layer(x, output_size=list(self.shapes[stage][1:]))
            else:
                x = layer(x)
        return torch.sigmoid(x)


def make_discriminator(latent: int, hidden: int, layers: int) -> nn.Sequential:
    """MLP ``(B, latent) -> (B,)`` logit of "labelled": ``layers`` ReLU layers of ``hidden``."""
    mods: list[nn.Module] = []
    d = latent
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods += [nn.Linear(d, 1), nn.Flatten(0)]
    return nn.Sequential(*mods)


def vae_loss(x: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor, beta: float) -> Tensor:
    """Negative ELBO with a unit-variance Gaussian decoder, averaged over the batch.

    Per sample: summed squared reconstruction error plus ``beta`` times
    ``KL(N(mu, exp(logvar)) || N(0, I))``.

    Args:
        x: Images, (B, C, H, W).
        recon: Reconstructions, (B, C, H, W).
        mu: Latent means, (B, Z).
        logvar: Latent log variances, (B, Z).
        beta: KL weight.

    Returns:
        Scalar loss.
    """
    rec = (recon - x).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    return (rec + beta * kl).mean()


def cycle_batches(n: int, size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of ``size`` positions in 0..n-1, like a shuffling loader that is cycled:
    consecutive shuffled epochs, cut into batches across epoch boundaries.

    Yields:
        (size,) int64 positions.
    """
    order, pos = torch.randperm(n, generator=generator), 0
    while True:
        parts, need = [], size
        while need:
            if pos == n:
                order, pos = torch.randperm(n, generator=generator), 0
            take = min(need, n - pos)
            parts.append(order[pos:pos + take])
            pos, need = pos + take, need - take
        yield torch.cat(parts)


def rank_lowest_first(labelled_scores: Tensor, indices: np.ndarray, n: int,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """VAAL's query: the ``n`` samples the discriminator finds least likely to be labelled.

    Args:
        labelled_scores: Discriminator probability (or any increasing function of it, such as
            the logit) that each candidate is labelled, (U,).
        indices: Dataset indices of the candidates, (U,).
        n: How many to return.
        rng: The query's generator, which orders equal scores (None: the smaller index first).

    Returns:
        (n,) int64 dataset indices, lowest score first.
    """
    return top_k(-labelled_scores.double(), indices, n, rng=rng)


class VAALStrategy(Strategy):
    """VAAL (Sinha, Ebrahimi & Darrell, 2019, "Variational Adversarial Active Learning", ICCV).

    Each round a fresh VAE (encoder -> ``mu``, ``logvar``; decoder back to the input) and an MLP
    discriminator on ``mu`` are trained on the images alone. Every iteration makes
    ``vae_steps`` VAE updates on a labelled and an unlabelled batch with the negative ELBO of
    both (the paper's transductive loss) plus ``adversary_param`` times the BCE that pushes the
    discriminator to call *both* batches labelled (its adversarial loss), then ``adv_steps``
    discriminator updates with BCE on labelled = 1 / unlabelled = 0; Adam 5e-4 for both, as
    the paper. The query is the unlabelled samples with the lowest discriminator probability of
    being labelled, computed from ``mu`` (no sampling) with both models in eval mode.

    Deviations, for CPU-sized rounds: the paper trains VAE and discriminator alongside the task
    model, for as many iterations (reference code: 100 epochs of the training set at batch
    128), with a 128-256-512-1024 channel encoder and a 4 x 512 discriminator. Here: ``steps``
    iterations (default 300, about 5 s on 8x8 digits and 25 s on 28x28 images on one CPU
    core; raise it for better VAEs), a ``width``-``2 width``-``4 width`` encoder (default
    16-32-64) and a ``disc_layers`` x ``disc_hidden`` discriminator (default 2 x 256). The
    reconstruction term is the per-sample summed squared error (the ELBO of a unit-variance
    Gaussian decoder) where the reference code takes the mean squared error with a KL summed
    over the batch. The labelled and unlabelled batches go through the VAE in one pass, so
    they share batch-norm statistics (separate passes would normalise away part of the very
    difference the discriminator has to find). The decoder ends in a sigmoid, as images are in
    [0, 1].

    Args:
        latent: VAE latent size (paper: 32).
        steps: Training iterations per round.
        batch: Labelled and unlabelled samples per batch (each).
        vae_steps: VAE updates per iteration (reference code: 2).
        adv_steps: Discriminator updates per iteration (reference code: 1).
        beta: KL weight (paper: 1).
        adversary_param: Weight of the adversarial term in the VAE loss (paper lambda: 1).
        lr: Adam learning rate of both models (paper: 5e-4).
        width: Channels of the first encoder convolution.
        disc_hidden: Width of the discriminator's hidden layers.
        disc_layers: Number of hidden layers of the discriminator.
    """

    name = "vaal"
    description = "VAAL: query what a VAE-latent discriminator deems least likely labelled"

    def __init__(self, latent: PositiveInt = 32, steps: NonNegativeInt = 300,
                 batch: PositiveInt = 64, vae_steps: PositiveInt = 2, adv_steps: PositiveInt = 1,
                 beta: NonNegativeFloat = 1.0, adversary_param: NonNegativeFloat = 1.0,
                 lr: PositiveFloat = 5e-4, width: PositiveInt = 16,
                 disc_hidden: PositiveInt = 256, disc_layers: PositiveInt = 2) -> None:
        for key, value, low in (("latent", latent, 1), ("steps", steps, 0), ("batch", batch, 1),
                                ("vae_steps", vae_steps, 1), ("adv_steps", adv_steps, 1),
                                ("width", width, 1), ("disc_hidden", disc_hidden, 1),
                                ("disc_layers", disc_layers, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if adversary_param < 0:
            raise ValueError(f"adversary_param must be >= 0, got {adversary_param}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.latent, self.steps, self.batch = int(latent), int(steps), int(batch)
        self.vae_steps, self.adv_steps = int(vae_steps), int(adv_steps)
        self.beta, self.adversary_param, self.lr = float(beta), float(adversary_param), float(lr)
        self.width, self.disc_hidden, self.disc_layers = int(width), int(disc_hidden), int(
            disc_layers)
        self.vae: ConvVAE | None = None
        self.discriminator: nn.Module | None = None
        self._prepared_for: weakref.ref | None = None

    def prepare(self, ctx: QueryContext) -> None:
        """Train a fresh VAE and discriminator on this round's labelled and unlabelled images."""
        images = ctx.require("images")
        if len(ctx.labelled) == 0:
            raise RuntimeError("VAAL needs at least one labelled sample")
        device = torch.device(ctx.device)
        _, c, h, w = images.shape
        seed = int(ctx.rng.integers(0, 2**63 - 1))
        with isolated_torch_rng(seed, "cpu"):  # weights are created on the CPU
            vae = ConvVAE(c, h, w, self.latent, self.width)
            disc = make_discriminator(self.latent, self.disc_hidden, self.disc_layers)
        vae, disc = vae.to(device), disc.to(device)
        self.vae, self.discriminator = vae, disc
        self._prepared_for = weakref.ref(ctx)
        if len(ctx.unlabelled) == 0 or self.steps == 0:
            return
        gen = ctx.torch_generator()
        lab_idx, unl_idx = torch.as_tensor(ctx.labelled), torch.as_tensor(ctx.unlabelled)
        lab_batches = cycle_batches(len(lab_idx), self.batch, gen)
        unl_batches = cycle_batches(len(unl_idx), self.batch, gen)
        opt_vae = torch.optim.Adam(vae.parameters(), lr=self.lr)
        opt_disc = torch.optim.Adam(disc.parameters(), lr=self.lr)
        b = self.batch
        ones = torch.ones(b, device=device)
        zeros = torch.zeros(b, device=device)
        vae.train()
        disc.train()
        for _ in range(self.steps):
            for j in range(self.vae_steps + self.adv_steps):
                batch = torch.cat([lab_idx[next(lab_batches)], unl_idx[next(unl_batches)]])
                x = to_float(images[batch], device)
                if j < self.vae_steps:
                    mu, logvar = vae.encode(x)
                    eps = torch.randn(mu.shape, generator=gen).to(device)
                    recon = vae.decode(mu + eps * (0.5 * logvar).exp())
                    # The VAE wants the discriminator to call labelled and unlabelled alike
                    # "labelled" (paper Eq. 3), hence target 1 for both halves.
                    logits = disc(mu)
                    loss = (vae_loss(x[:b], recon[:b], mu[:b], logvar[:b], self.beta)
                            + vae_loss(x[b:], recon[b:], mu[b:], logvar[b:], self.beta)
                            + self.adversary_param * (
                                F.binary_cross_entropy_with_logits(logits[:b], ones)
                                + F.binary_cross_entropy_with_logits(logits[b:], ones)))
                    opt_vae.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_vae.step()
                else:
                    with torch.no_grad():
                        mu, _ = vae.encode(x)
                    logits = disc(mu)
                    loss = (F.binary_cross_entropy_with_logits(logits[:b], ones)
                            + F.binary_cross_entropy_with_logits(logits[b:], zeros))
                    opt_disc.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_disc.step()

    @torch.inference_mode()
    def labelled_logits(self, images: Tensor, indices: np.ndarray, device: str) -> Tensor:
        """Discriminator logit of "labelled" for dataset indices, in chunks, (M,) CPU float32."""
        if self.vae is None or self.discriminator is None:
            raise RuntimeError("VAAL was not prepared")
        self.vae.eval()
        self.discriminator.eval()
        out = []
        for chunk in torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64)).split(
                INFERENCE_CHUNK):
            mu, _ = self.vae.encode(to_float(images[chunk], device))
            out.append(self.discriminator(mu).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        if self._prepared_for is None or self._prepared_for() is not ctx:
            self.prepare(ctx)
        logits = self.labelled_logits(ctx.require("images"), ctx.unlabelled, ctx.device)
        return rank_lowest_first(logits, ctx.unlabelled, n, rng=ctx.rng)


STRATEGY_CLASSES = (VAALStrategy,)
