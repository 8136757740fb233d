"""The training recipe of a round, as plain data (no torch: the CLI and the labelling project
read and validate it without loading torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_LAMBDA = 0.0051  # Barlow Twins off-diagonal weight (Zbontar et al. 2021)
DEFAULT_GAMMA = 0.001  # weight of the Barlow Twins term in the joint loss (DALBT paper)


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
        amp: Mixed-precision training on CUDA: ``bf16`` or ``fp16`` (with a gradient scaler)
            autocast; None: float32.
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

    def to_dict(self) -> dict:
        return asdict(self)
