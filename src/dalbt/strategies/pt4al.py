"""PT4AL: active learning guided by the loss of a self-supervised rotation-prediction task.

Before the first query a rotation-prediction model (which of 0/90/180/270 degrees an image was
turned by) is trained on the images alone; every candidate image gets its pretext loss, the
candidates are sorted by it (hardest first) and cut into one batch per query round. Round 0
samples its batch uniformly along the loss order (cold start); round i queries the samples of
batch i that the task model is least confident about.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalbt.options import NonNegativeInt, PositiveInt
from dalbt.rng import isolated_torch_rng
from dalbt.strategies.base import POOL_OUTPUTS, QueryContext, Strategy, tie_keys, top_k
from dalbt.train import batches, to_float

ROTATIONS = 4  # 0, 90, 180 and 270 degrees
INFERENCE_CHUNK = 512  # images per pretext-loss pass (x 4 rotations)


def rotate_all(x: Tensor) -> tuple[Tensor, Tensor]:
    """The four rotations of a batch of square images and their rotation labels.

    Args:
        x: Images, (B, C, H, H).

    Returns:
        (4B, C, H, H) images, rotation 0 of every image first, then 90, 180, 270 degrees
        (``torch.rot90`` over the spatial axes), and (4B,) int64 labels 0..3.
    """
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(len(x))
    return rotated, labels


class RotationNet(nn.Module):
    """Pretext model: an encoder of the run's kind and a linear 4-way rotation head.

    Args:
        encoder: ``(B, C, H, W)`` images in [0, 1] -> ``(B, latent_dim)``.
        latent_dim: Encoder output size.
    """

    def __init__(self, encoder: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(latent_dim, ROTATIONS)

    def forward(self, x: Tensor) -> Tensor:
        """Rotation logits, ``(B, C, H, W) -> (B, 4)``."""
        return self.head(self.encoder(x))


def train_rotation(net: nn.Module, images: Tensor, indices: np.ndarray, epochs: int, batch: int,
                   lr: float, weight_decay: float, generator: torch.Generator,
                   device: str | torch.device) -> list[float]:
    """Train ``net`` in place to predict the rotation of the images at ``indices``.

    Each step takes ``batch`` images, all four rotations of each in one forward pass, and the
    cross-entropy over the 4B rotated images; Adam.

    Args:
        net: Rotation model on ``device``, ``(B, C, H, H) -> (B, 4)``.
        images: All training images, (N, C, H, H) uint8.
        indices: Dataset indices to train on, (M,).
        epochs: Passes over ``indices``.
        batch: Images per step (before rotation).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        generator: Generator of the mini-batch order.
        device: Device of ``net``.

    Returns:
        Mean training loss of each epoch.
    """
    idx = torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    net.train()
    for _ in range(epochs):
        total, steps = 0.0, 0
        for pos in batches(len(idx), batch, generator):
            x, y = rotate_all(to_float(images[idx[pos]], device))
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        history.append(total / max(steps, 1))
    return history


@torch.inference_mode()
def rotation_losses(net: nn.Module, images: Tensor, indices: np.ndarray,
                    device: str | torch.device, chunk: int = INFERENCE_CHUNK) -> Tensor:
    """Each image's pretext loss: the mean cross-entropy over its four rotations (eval mode).

    Args:
        net: Rotation model, ``(B, C, H, H) -> (B, 4)``.
        images: All training images, (N, C, H, H) uint8.
        indices: Dataset indices, (M,).
        device: Device of ``net``.
        chunk: Images per forward pass.

    Returns:
        (M,) float64 CPU losses, in the order of ``indices``.
    """
    was_training = net.training
    net.eval()
    out = []
    for part in torch.as_tensor(np.ascontiguousarray(indices, dtype=np.int64)).split(chunk):
        x, y = rotate_all(to_float(images[part], device))
        ce = F.cross_entropy(net(x).double(), y, reduction="none")  # (4B,), rotation-major
        out.append(ce.view(ROTATIONS, len(part)).mean(0).cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def pretext_batches(losses: np.ndarray | Tensor, indices: np.ndarray, k: int,
                    rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Sort the candidates by pretext loss, highest first, and cut them into ``k`` batches.

    The losses are compared as numbers (the reference code sorted their string forms, which puts
    ``1e-05`` above ``0.5``). Ties go in random order from ``rng`` (None: the smaller dataset
    index first); NaN losses rank last.

    Args:
        losses: Pretext loss of each candidate, (N,).
        indices: Dataset indices of the candidates, (N,).
        k: Number of batches (>= 1).
        rng: Generator that orders equal losses.

    Returns:
        ``k`` consecutive int64 arrays of dataset indices (``np.array_split``: sizes differ by at
        most one, the larger ones first), each in descending loss order.
    """
    s = losses.detach().cpu().numpy() if isinstance(losses, Tensor) else np.asarray(losses)
    s = np.where(np.isnan(s), -np.inf, s.astype(np.float64))
    indices = np.asarray(indices, dtype=np.int64)
    if s.shape != indices.shape or s.ndim != 1:
        raise ValueError(f"losses {s.shape} and indices {indices.shape} must be equal 1-D shapes")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k}")
    order = np.lexsort((tie_keys(rng, indices), -s))
    return np.array_split(indices[order], int(k))


def uniform_from_batch(batch: np.ndarray, n: int) -> np.ndarray:
    """PT4AL's cold start: ``n`` elements evenly spaced along a loss-sorted batch.

    Every ``k``-th element from the first, ``k = len(batch) // n`` (the reference code takes
    positions 0, 5, 10, ... of a 5,000 batch for 1,000 samples).

    Args:
        batch: Dataset indices in loss order, (B,).
        n: How many to take (>= 0).

    Returns:
        (min(n, B),) int64 dataset indices.
    """
    batch = np.asarray(batch, dtype=np.int64)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n == 0:
        return batch[:0].copy()
    if len(batch) <= n:
        return batch.copy()
    return batch[:: len(batch) // n][:n].copy()


def query_from_batch(batch: np.ndarray, pool: np.ndarray, log_confidence: np.ndarray | Tensor,
                     n: int, cold_start: bool, rng: np.random.Generator | None = None
                     ) -> np.ndarray:
    """One PT4AL query from this round's batch, filled from the rest of the pool if short.

    Args:
        batch: This round's batch, dataset indices in loss order, (B,); indices no longer in
            ``pool`` are skipped.
        pool: Dataset indices of the unlabelled pool, (U,).
        log_confidence: Any increasing function of the task model's top-1 probability of each
            pool sample, in the order of ``pool``, (U,).
        n: How many to query (<= U).
        cold_start: Take the batch uniformly along its loss order (round 0) instead of its
            least confident samples.
        rng: The query's generator, which orders equal confidences.

    Returns:
        (n,) int64 dataset indices: the batch's picks first, then the least confident samples
        of the rest of the pool when the batch has fewer than ``n`` left.
    """
    pool = np.asarray(pool, dtype=np.int64)
    conf = (log_confidence.detach().cpu().numpy() if isinstance(log_confidence, Tensor)
            else np.asarray(log_confidence)).astype(np.float64)
    batch = np.asarray(batch, dtype=np.int64)
    batch = batch[np.isin(batch, pool)]
    if cold_start:
        chosen = uniform_from_batch(batch, n)
    else:
        in_batch = np.isin(pool, batch)
        chosen = top_k(-conf[in_batch], pool[in_batch], min(n, int(in_batch.sum())), rng=rng)
    if len(chosen) < n:
        rest = ~np.isin(pool, chosen)
        chosen = np.concatenate([chosen, top_k(-conf[rest], pool[rest], n - len(chosen),
                                               rng=rng)])
    return chosen


def pretext_seed(seed: int, candidates: np.ndarray) -> int:
    """A 63-bit seed from the ``seed`` option and the content of the candidate set.

    The candidate set (every training image outside the validation split) is the same at every
    round of a run, so the pretext model is the same whether it is built at the first query or
    rebuilt after a resume.
    """
    digest = hashlib.sha256(np.ascontiguousarray(candidates, dtype=np.int64).tobytes()).digest()
    ss = np.random.SeedSequence([int(seed), int.from_bytes(digest[:16], "little")])
    return int(ss.generate_state(2, np.uint32).view(np.uint64)[0] >> np.uint64(1))


class PT4ALStrategy(Strategy):
    """PT4AL (Yi, Seo, Park & Choi, 2022, "Using Self-Supervised Pretext Tasks for Active
    Learning", ECCV; arXiv 2201.07459).

    At the first query of a run, a rotation-prediction model (encoder of the run's kind from
    ``ctx.model_factory`` plus a linear 4-way head) is trained on the four rotations of every
    candidate image, the candidates are sorted by their pretext loss (mean cross-entropy over
    the four rotations, eval mode), highest first, *as numbers*, and split into
    ``ctx.total_rounds`` consecutive batches of equal size. Query round ``i`` uses batch ``i``:
    round 0 (the paper's cold start) takes every ``len(batch) // n``-th sample along the loss
    order; later rounds take the ``n`` samples of the batch with the lowest task-model top-1
    softmax probability. The paper argues that hard pretext samples are hard downstream and
    that batches keep each round to one difficulty level while uncertainty picks within it.

    Deviations and choices: the candidates are every training image outside the validation
    split (``ctx.unlabelled`` and ``ctx.labelled``), so dalbt's random initial set is ranked
    too and, like any image already labelled, is skipped when its batch is used. When a batch
    has fewer than ``n`` unlabelled samples left, the query is filled with the least confident
    samples of the rest of the pool; rounds beyond ``ctx.total_rounds`` use no batch (plain
    least confidence). The pretext model is trained with Adam at the run's learning rate and
    weight decay for ``pretext_epochs`` (default 5, CPU-sized: about 30 s per epoch on the 55,000
    Fashion-MNIST candidates with a LeNet on one CPU core) at ``batch`` 64 images, where the
    reference code trains a ResNet-18 with SGD (lr 0.1, momentum 0.9, wd 5e-4, steps at
    30/60/90) for 120 epochs at batch 256 and keeps the epoch of best rotation accuracy on the
    test set (here: the last epoch's model); all four rotations of a batch go through one
    forward pass (the reference code makes one pass per rotation, so batch norm sees one
    rotation at a time). The reference code L2-normalises the logits before the
    softmax of its confidence; here the confidence is the plain top-1 softmax probability
    (ranked through its logarithm, which does not saturate). The pretext model's randomness
    (initialisation, batch order) comes from the ``seed`` option and a hash of the candidate
    set, not from the query rng, so a resumed run rebuilds the same ranking; runs of different
    seeds differ through their validation splits (with ``--val-size 0`` they share it unless
    ``seed`` differs).

    Args:
        pretext_epochs: Epochs of rotation training (0: rank with the untrained model).
        batch: Images per pretext step (each contributes its four rotations; reference: 256).
        seed: Seed of the pretext model's initialisation and batch order.
    """

    name = "pt4al"
    description = "PT4AL: rotation-loss batches, then least confidence within each round's batch"
    requires = frozenset({POOL_OUTPUTS})

    def __init__(self, pretext_epochs: NonNegativeInt = 5, batch: PositiveInt = 64,
                 seed: NonNegativeInt = 0) -> None:
        for key, value, low in (("pretext_epochs", pretext_epochs, 0), ("batch", batch, 1),
                                ("seed", seed, 0)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value}")
        self.pretext_epochs, self.batch, self.seed = int(pretext_epochs), int(batch), int(seed)
        self.batches: list[np.ndarray] | None = None
        self.pretext_history: list[float] = []
        self._key: tuple | None = None

    @staticmethod
    def _candidates(ctx: QueryContext) -> np.ndarray:
        # The loop passes every index outside the validation split; it does not change across
        # rounds (images set aside or labelled since stay in it and are skipped in batches).
        if ctx.candidates is not None:
            return np.asarray(ctx.candidates, dtype=np.int64)
        return np.union1d(ctx.unlabelled, ctx.labelled)

    def _state_key(self, ctx: QueryContext, candidates: np.ndarray) -> tuple:
        return (max(1, int(ctx.total_rounds)), pretext_seed(self.seed, candidates))

    def prepare(self, ctx: QueryContext) -> None:
        """Train the pretext model and build the loss-ordered batches, once per run (again only
        when the candidate set or the number of rounds is not the one they were built for)."""
        candidates = self._candidates(ctx)
        key = self._state_key(ctx, candidates)
        if self.batches is not None and self._key == key:
            return
        images = ctx.require("images")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"PT4AL's rotations need square images, got {tuple(images.shape)}")
        cfg = ctx.require("train_config")
        factory = ctx.require("model_factory")
        device = torch.device(ctx.device)
        base = np.random.SeedSequence(key[1])
        init_seed, shuffle_seed, global_seed, tie_seed = (
            int(s >> np.uint64(1)) for s in base.generate_state(4, np.uint64))
        with isolated_torch_rng(init_seed, "cpu"):
            model = factory(init_seed)
            net = RotationNet(model.encoder, model.latent_dim).to(device)
        del model
        gen = torch.Generator()
        gen.manual_seed(shuffle_seed)
        with isolated_torch_rng(global_seed, device):  # for layers that draw (dropout)
            self.pretext_history = train_rotation(
                net, images, candidates, self.pretext_epochs, self.batch, float(cfg.lr),
                float(cfg.weight_decay), gen, device)
        losses = rotation_losses(net, images, candidates, device)
        # equal losses in an order drawn from the pretext seed, not from the query's stream:
        # the batches are built once per run, and a resumed run builds them at a later round
        self.batches = pretext_batches(losses, candidates, key[0],
                                       rng=np.random.default_rng(tie_seed))
        self._key = key

    def _select(self, ctx: QueryContext, n: int) -> np.ndarray:
        self.prepare(ctx)  # no-op once built for this run
        built = self.batches or []
        r = int(ctx.round)
        batch = built[r] if 0 <= r < len(built) else np.empty(0, dtype=np.int64)
        logits = ctx.pool_outputs().logits.double()
        log_conf = torch.log_softmax(logits, dim=1).max(dim=1).values
        return query_from_batch(batch, ctx.unlabelled, log_conf, n, cold_start=r == 0,
                                rng=ctx.rng)


STRATEGY_CLASSES = (PT4ALStrategy,)
