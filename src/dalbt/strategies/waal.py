"""WAAL's query rule (Shui, Zhou, Gagné & Wang, 2020): uncertainty plus Wasserstein diversity.

A critic trained to estimate the Wasserstein distance between the unlabelled and the labelled
latent distributions scores how unlike the labelled set each unlabelled sample is; the query
trades that diversity off against WAAL's min-max uncertainty of the classifier.
"""

from __future__ import annotations

import weakref
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from dalbt.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from dalbt.rng import isolated_torch_rng
from dalbt.strategies.base import LABELLED_OUTPUTS, POOL_OUTPUTS, QueryContext, Strategy, top_k

Uncertainty = Literal["mixed", "worst", "l2", "l1"]
Penalty = Literal["one-sided", "two-sided"]
UNCERTAINTIES: tuple[str, ...] = get_args(Uncertainty)
PENALTIES: tuple[str, ...] = get_args(Penalty)
CHUNK = 8192


def worst_case_loss(log_probs: Tensor, kind: str = "mixed") -> Tensor:
    """WAAL's min-max uncertainty: the worst-case loss over the unknown label, or an upper bound.

    With the label of an unlabelled x unknown, WAAL bounds its loss by the worst case over labels,
    ``max_y -log p(y|x)``, and queries the samples that *minimise* it (min-max): the bound is
    smallest, ``log K``, for a uniform prediction and grows as the prediction gets confident.
    ``worst`` is that maximum; ``l2`` and ``l1`` are its upper bounds ``||-log p||_2`` and
    ``||-log p||_1``; ``mixed`` (the reference code's choice) is ``(l2 + l1) / 2``.

    Args:
        log_probs: Log class probabilities, (U, K).
        kind: One of ``mixed``, ``worst``, ``l2``, ``l1``.

    Returns:
        (U,) float64 bound; lower = more uncertain.
    """
    nll = -log_probs.double()
    if kind == "worst":
        return nll.max(dim=1).values
    if kind == "l2":
        return nll.norm(dim=1)
    if kind == "l1":
        return nll.sum(dim=1)
    if kind == "mixed":
        return 0.5 * (nll.norm(dim=1) + nll.sum(dim=1))
    raise ValueError(f"unknown uncertainty {kind!r}; choose one of {', '.join(UNCERTAINTIES)}")


def waal_scores(log_probs: Tensor, diversity: Tensor, selection: float,
                kind: str = "mixed") -> Tensor:
    """WAAL's decision score, higher = queried first.

    The reference code queries the lowest ``U(x) - selection * D(x)`` with ``U`` the worst-case
    loss bound and ``D`` the critic; this is its negation.

    Args:
        log_probs: Log class probabilities of the pool, (U, K).
        diversity: Critic score of each pool sample (relative to the labelled set), (U,).
        selection: Weight of the diversity term.
        kind: Uncertainty bound (see :func:`worst_case_loss`).

    Returns:
        (U,) float64 scores.
    """
    return -worst_case_loss(log_probs, kind) + selection * diversity.double()


def make_critic(dim: int, hidden: int) -> nn.Sequential:
    """The reference critic's MLP, ``(B, dim) -> (B,)`` logits (the sigmoid is applied after)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1),
                         nn.Flatten(0))


def gradient_penalty(critic: nn.Module, a: Tensor, b: Tensor, generator: torch.Generator,
                     one_sided: bool = True) -> Tensor:
    """Penalty on the critic's gradient norm at random interpolates of paired rows.

    Two-sided (WGAN-GP, Gulrajani et al. 2017, as the WAAL code): ``E[(||grad c|| - 1)^2]``.
    One-sided (WGAN-LP, Petzka et al. 2018): ``E[max(0, ||grad c|| - 1)^2]``, which only
    enforces the Lipschitz bound and does not force a unit slope where the two distributions
    agree.

    Args:
        critic: ``(B, D) -> (B,)`` logits; the penalty is on ``sigmoid`` of them.
        a: Latents, (B, D).
        b: Latents, (B, D).
        generator: CPU generator of the interpolation weights.
        one_sided: Which penalty.

    Returns:
        Scalar penalty (differentiable w.r.t. the critic's parameters).
    """
    alpha = torch.rand(len(a), 1, generator=generator).to(a.device)
    x = (a + alpha * (b - a)).requires_grad_(True)
    out = torch.sigmoid(critic(x))
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    excess = grad.norm(dim=1) - 1
    if one_sided:
        excess = excess.clamp_min(0)
    return excess.pow(2).mean()


class WAALStrategy(Strategy):
    """WAAL query (Shui, Zhou, Gagné & Wang, 2020, "Deep Active Learning: Unified and Principled
    Method for Query and Training", AISTATS).

    WAAL models AL as matching the labelled to the unlabelled distribution under the Wasserstein
    distance. Its query picks, with ``p`` the classifier's probabilities and ``c`` a critic of
    that distance on the latents (high on unlabelled-like samples), the samples with the highest
    ``-U(p) + selection * (c(x) - mean_labelled c)``, where ``U`` is the worst-case loss over
    the unknown label (the min-max uncertainty, lowest for a uniform prediction; the reference
    code's ``(||-log p||_2 + ||-log p||_1) / 2`` by default, see :func:`worst_case_loss`).
    Subtracting the labelled mean only shifts all scores; it makes the term read as "how much
    more unlabelled-like than the labelled set".

    Deviation: WAAL also *trains* the task network adversarially against the critic (its
    min-max training loss). dalbt trains every strategy's model with one recipe, so here the
    critic is trained on the frozen latents of the run's model after its training: balanced
    labelled/unlabelled batches, the Wasserstein estimate ``mean c(unlabelled) -
    mean c(labelled)`` maximised with Adam, and a gradient penalty at labelled/unlabelled
    interpolates added to the critic's loss (the reference code's critic step subtracts it).
    The penalty is one-sided by default: with the reference's two-sided one (option
    ``penalty``) the critic must keep a unit slope even where labelled and unlabelled latents
    coincide, so its score varies there about as much as on truly novel samples, and it can
    settle with the slope pointing the wrong way (novel samples scored labelled-like) behind
    the penalty's barrier at zero slope. The critic is the reference's one-hidden-layer MLP
    (without its dropout) with a sigmoid output, so the diversity term lies in (-1, 1), on the
    scale the reference's ``selection = 10`` was set for. The reference weights the labelled
    term by L / U (its labelled set is resampled to the pool's size); the balanced batches here
    estimate the unweighted distance.

    Args:
        selection: Weight of the diversity term (reference code: 10).
        uncertainty: ``mixed`` (reference), ``worst``, ``l2`` or ``l1``.
        steps: Critic training steps per round (0 with ``selection = 0``: pure uncertainty).
        batch: Labelled and unlabelled latents per critic batch (each).
        lr: Adam learning rate of the critic.
        gp_weight: Gradient-penalty weight (reference critic step: 2).
        penalty: ``one-sided`` (default) or ``two-sided`` (the reference's), see
            :func:`gradient_penalty`.
        hidden: Hidden width of the critic (reference: 50).
    """

    name = "waal"
    description = "WAAL: min-max uncertainty plus Wasserstein-critic diversity on the latents"
    requires = frozenset({POOL_OUTPUTS, LABELLED_OUTPUTS})

    def __init__(self, selection: NonNegativeFloat = 10.0, uncertainty: Uncertainty = "mixed",
                 steps: NonNegativeInt = 500, batch: PositiveInt = 64, lr: PositiveFloat = 1e-3,
                 gp_weight: NonNegativeFloat = 2.0, penalty: Penalty = "one-sided",
                 hidden: PositiveInt = 50) -> None:
        if penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {penalty!r}; choose one of {', '.join(PENALTIES)}")
        if uncertainty not in UNCERTAINTIES:
            raise ValueError(f"unknown uncertainty {uncertainty!r}; choose one of "
                             f"{', '.join(UNCERTAINTIES)}")
        for key, value, low in (("steps", steps, 0), ("batch", batch, 1), ("hidden", hidden, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value}")
        if not selection >= 0:
            raise ValueError(f"selection must be >= 0, got {selection}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not gp_weight >= 0:
            raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
        self.selection, self.uncertainty = float(selection), uncertainty
        self.steps, self.batch, self.hidden = int(steps), int(batch), int(hidden)
        self.lr, self.gp_weight, self.penalty = float(lr), float(gp_weight), penalty
        self.critic: nn.Module | None = None
        self._diversity: tuple[weakref.ref, Tensor] | None = None

    def train_critic(self, z_lab: Tensor, z_unl: Tensor, seed: int,
                     generator: torch.Generator) -> nn.Module:
        """Fit the Wasserstein critic (sigmoid of the returned module's logits).

        Args:
            z_lab: Labelled latents, (L, D), L >= 1.
            z_unl: Unlabelled latents, (U, D), U >= 1.
            seed: Seed of the critic's initial weights.
            generator: CPU generator of the batches and interpolation weights.

        Returns:
            The trained critic, in eval mode, on the latents' device.
        """
        with isolated_torch_rng(seed, "cpu"):  # weights are created on the CPU
            critic = make_critic(z_lab.shape[1], self.hidden)
        critic = critic.to(z_lab.device)
        opt = torch.optim.Adam(critic.parameters(), lr=self.lr)
        b = self.batch
        for _ in range(self.steps):
            zl = z_lab[torch.randint(len(z_lab), (b,), generator=generator).to(z_lab.device)]
            zu = z_unl[torch.randint(len(z_unl), (b,), generator=generator).to(z_unl.device)]
            distance = torch.sigmoid(critic(zu)).mean() - torch.sigmoid(critic(zl)).mean()
            penalty = gradient_penalty(critic, zl, zu, generator, self.penalty == "one-sided")
            loss = -distance + self.gp_weight * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return critic.eval()

    @torch.no_grad()
    def critic_scores(self, critic: nn.Module, z: Tensor) -> Tensor:
        """``sigmoid(critic(z))`` in float64, in chunks, (N,)."""
        out = [torch.sigmoid(critic(chunk).double()) for chunk in z.split(CHUNK)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)

    def prepare(self, ctx: QueryContext) -> None:
        """Train the critic on this round's latents and keep the pool's diversity scores."""
        if len(ctx.labelled) == 0:
            raise RuntimeError("WAAL needs at least one labelled sample")
        pool = ctx.pool_outputs()
        diversity = torch.zeros(len(pool.indices), dtype=torch.float64)
        if self.selection > 0 and len(pool.indices) > 0:
            device = torch.device(ctx.device)
            z_lab = ctx.labelled_outputs().latents.float().to(device)
            z_unl = pool.latents.float().to(device)
            seed = int(ctx.rng.integers(0, 2**63 - 1))
            critic = self.train_critic(z_lab, z_unl, seed, ctx.torch_generator())
            self.critic = critic
            diversity = (self.critic_scores(critic, z_unl)
                         - self.critic_scores(critic, z_lab).mean()).cpu()
        self._diversity = (weakref.ref(ctx), diversity)

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        if self._diversity is None or self._diversity[0]() is not ctx:
            self.prepare(ctx)
        assert self._diversity is not None
        diversity = self._diversity[1]
        log_probs = torch.log_softmax(ctx.pool_outputs().logits.double(), dim=1)
        scores = waal_scores(log_probs, diversity, self.selection, self.uncertainty)
        return top_k(scores, ctx.unlabelled, n, rng=ctx.rng)


STRATEGY_CLASSES = (WAALStrategy,)
