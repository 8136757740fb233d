"""The DALBT network (encoder, Barlow Twins projector, linear classifier) and the model registry.

Weights use PyTorch's default initialisation, so they are determined by the CPU random state
when :func:`build_model` runs: pass ``seed`` (or call it under ``torch.manual_seed`` /
``torch.random.fork_rng``) for reproducible weights.

MC dropout: build with ``dropout > 0``, call ``model.eval()`` and then
:meth:`DALBTNet.enable_dropout`, which puts only the dropout modules back in train mode (batch
norm keeps its running statistics).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dalbt import catalogue
from dalbt.errors import DalbtError
from dalbt.models.lenet import LeNetEncoder
from dalbt.models.resnet import ResNetEncoder, narrow_resnet18
from dalbt.models.vgg import VGGEncoder

#: Builds a backbone ``(B, C, H, W) normalised -> (B, latent_dim)`` from
#: ``(in_channels, image_size, latent_dim)``.
BackboneBuilder = Callable[[int, int, int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """Registry entry of an encoder architecture.

    Attributes:
        description: One-line description for ``--help`` / listings.
        latent_dim: Default dimension of ``z``.
        min_image_size: Smallest supported image side.
        builder: Backbone constructor ``(in_channels, image_size, latent_dim) -> nn.Module``.
    """

    description: str
    latent_dim: int
    min_image_size: int
    builder: BackboneBuilder


MODELS: dict[str, ModelSpec] = {
    # descriptions and minimum sizes live in the torch-free catalogue (listing, validation)
    name: ModelSpec(catalogue.MODELS[name], latent, catalogue.MODEL_MIN_IMAGE_SIZE[name], enc)
    for name, latent, enc in (("lenet", 60, LeNetEncoder), ("vgg16", 512, VGGEncoder),
                              ("resnet18", 512, ResNetEncoder),
                              ("resnet18-w16", 128, narrow_resnet18))
}


def list_models() -> list[tuple[str, str]]:
    """Return ``(name, description)`` of every registered model, sorted by name."""
    return [(name, MODELS[name].description) for name in sorted(MODELS)]


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers.

    Args:
        mean: One value per channel (or a single value for all channels).
        std: One positive value per channel (or a single value for all channels).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        shape = (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return (x - self.mean) / self.std


def make_projector(latent_dim: int, dims: Sequence[int]) -> nn.Sequential:
    """Barlow Twins projector as in the official code.

    ``Linear(no bias)-BN1d-ReLU`` blocks followed by a plain ``Linear(no bias)``.

    Args:
        latent_dim: Input dimension (``z``).
        dims: Output sizes of the linear layers; the last one is the projection size.

    Returns:
        Module mapping ``(B, latent_dim) -> (B, dims[-1])``.
    """
    sizes = [latent_dim, *dims]
    layers: list[nn.Module] = []
    for d_in, d_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class DALBTNet(nn.Module):
    """Encoder ``E``, Barlow Twins projector ``P`` on ``z = E(x)`` and linear classifier ``C``.

    Args:
        encoder: ``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B, latent_dim)``.
        projector: ``(B, latent_dim) -> (B, projection_dim)``.
        latent_dim: Dimension of ``z``.
        num_classes: Number of classes of the classifier.
        dropout: Dropout probability applied to ``z`` before the classifier (0 disables it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        latent_dim: int,
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(latent_dim, num_classes)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        #: Images per inference pass (smaller for backbones fed large inputs).
        self.inference_batch = 2048
        #: The encoder came with pretrained weights (a backbone's), not from Barlow Twins.
        self.pretrained = False

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latent ``z`` (no dropout): ``(B, C, H, W) -> (B, latent_dim)``."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``C(dropout(E(x)))``: ``(B, C, H, W) -> (B, num_classes)``."""
        return self.classifier(self.dropout(self.embed(x)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Barlow Twins projection ``P(E(x))``: ``(B, C, H, W) -> (B, projection_dim)``."""
        return self.projector(self.embed(x))

    def enable_dropout(self) -> None:
        """Put only the dropout modules in train mode (MC dropout after ``model.eval()``)."""
        for module in self.modules():
            if isinstance(module, _DROPOUT_TYPES):
                module.train()


def _channel_stats(values: Sequence[float] | None, in_channels: int, what: str) -> list[float]:
    if values is None:
        return [0.5] * in_channels
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * in_channels
    if len(values) != in_channels:
        raise DalbtError(
            f"normalisation {what} has {len(values)} values but the images have "
            f"{in_channels} channels; give one value per channel"
        )
    if what == "std" and any(v <= 0 for v in values):
        raise DalbtError(f"normalisation std must be positive, got {values}")
    return values


def build_model(
    name: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    latent_dim: int | None = None,
    projector_dims: tuple[int, ...] = (256, 256, 256),
    dropout: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = None,
    weights: str | None = None,
    input_size: int | None = None,
) -> DALBTNet:
    """Build a :class:`DALBTNet` from the registry, or on a pretrained backbone.

    Args:
        name: Registered model name (see :data:`MODELS`), or ``timm:NAME`` /
            ``torchvision:NAME`` (:mod:`dalbt.models.backbones`: input size and normalisation
            are the backbone's, ``mean``/``std``/``image_size`` do not apply).
        in_channels: Channels of the input images.
        image_size: Side of the square input images.
        num_classes: Number of classes.
        latent_dim: Dimension of ``z``; ``None`` uses the model's default.
        projector_dims: Linear layer sizes of the Barlow Twins projector.
        dropout: Dropout probability on ``z`` before the classifier (0 disables it).
        mean: Per-channel normalisation mean (``None``: 0.5 for every channel).
        std: Per-channel normalisation std (``None``: 0.5 for every channel).
        seed: When given, the weights are drawn from ``torch.manual_seed(seed)`` inside
            ``torch.random.fork_rng``, leaving the global random state untouched; when ``None``
            they come from the current global CPU random state (a backbone's loaded weights
            aside).
        weights: A backbone's weights: a ``.pth``/``.safetensors`` file, ``"default"``/None
            (the library's download) or ``"none"`` (random). Registered models take none.
        input_size: Side a backbone's input is resized to (None: the backbone's own).

    Returns:
        The network, on the CPU, in train mode.

    Raises:
        DalbtError: Unknown name or invalid sizes / normalisation.
    """
    if not projector_dims or any(d < 1 for d in projector_dims):
        raise DalbtError(f"projector_dims must be non-empty positive sizes, got {projector_dims}")
    if not 0.0 <= dropout < 1.0:
        raise DalbtError(f"dropout must be in [0, 1), got {dropout}")
    if catalogue.is_backbone(name):
        return _build_on_backbone(name, in_channels, num_classes, latent_dim, projector_dims,
                                  dropout, seed, weights, input_size)
    if weights is not None:
        raise DalbtError(f"--weights is for timm:NAME or torchvision:NAME backbones, not model "
                         f"{name!r}")
    if name not in MODELS:
        raise DalbtError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    latent = spec.latent_dim if latent_dim is None else int(latent_dim)
    if in_channels < 1 or num_classes < 1 or latent < 1:
        raise DalbtError(
            f"in_channels, num_classes and latent_dim must be >= 1 "
            f"(got {in_channels}, {num_classes}, {latent})"
        )
    if image_size < spec.min_image_size:
        raise DalbtError(
            f"model {name!r} needs images of at least {spec.min_image_size}x"
            f"{spec.min_image_size} pixels, got {image_size}x{image_size}"
        )
    mean_v = _channel_stats(mean, in_channels, "mean")
    std_v = _channel_stats(std, in_channels, "std")

    def make() -> DALBTNet:
        encoder = nn.Sequential(
            OrderedDict(
                normalize=Normalize(mean_v, std_v),
                backbone=spec.builder(in_channels, image_size, latent),
            )
        )
        return DALBTNet(
            encoder, make_projector(latent, projector_dims), latent, num_classes, dropout
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator: the weights are created on the CPU, and CUDA states stay
        # untouched.
        torch.default_generator.manual_seed(seed)
        return make()


def _build_on_backbone(name: str, in_channels: int, num_classes: int, latent_dim: int | None,
                       projector_dims: tuple[int, ...], dropout: float, seed: int | None,
                       weights: str | None, input_size: int | None) -> DALBTNet:
    """:func:`build_model` for ``timm:NAME`` / ``torchvision:NAME``."""
    from dalbt.models.backbones import build_backbone
    from dalbt.weightfiles import DEFAULT_WEIGHTS, NO_WEIGHTS

    if num_classes < 1 or (latent_dim is not None and latent_dim < 1):
        raise DalbtError(f"num_classes and latent_dim must be >= 1 (got {num_classes}, "
                         f"{latent_dim})")

    def make() -> DALBTNet:
        backbone, latent = build_backbone(name, in_channels, latent_dim, weights=weights,
                                          input_size=input_size)
        encoder = nn.Sequential(OrderedDict(backbone=backbone))
        net = DALBTNet(encoder, make_projector(latent, projector_dims), latent, num_classes,
                       dropout)
        net.inference_batch = backbone.inference_batch
        net.pretrained = (weights or DEFAULT_WEIGHTS).lower() != NO_WEIGHTS
        return net

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return make()
