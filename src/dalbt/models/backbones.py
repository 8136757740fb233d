"""Pretrained backbones by name: ``timm:NAME`` and ``torchvision:NAME``.

A backbone becomes the encoder ``E`` of a :class:`~dalbt.models.net.DALBTNet`; the Barlow Twins
projector and the linear classifier sit on its pooled features (timm's ``num_classes=0``; for
torchvision, the model's classifier attribute, ``fc``, ``classifier``, ``heads`` or ``head``,
replaced by an identity). Before the backbone, :class:`BackboneEncoder` repeats grey images to
the backbone's 3 channels, resizes them (bilinear, antialiased) to its input size and normalises
them with its mean and std. Input size, mean and std come from the backbone's own config (timm's
``pretrained_cfg``, torchvision's default weights' transforms); ``input_size`` overrides the
size (a smaller side makes CPU inference much cheaper).

Weights (``weights=``):

* a path: a ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file of a state dict (also
  inside ``{"state_dict": ...}`` or ``{"model": ...}``, keys with a ``module.`` prefix
  accepted). The checkpoint's classifier tensors are ignored; any other tensor that is missing,
  left over or of another shape is an error naming it;
* ``None`` or ``"default"``: the library's own pretrained weights, downloaded (and cached by the
  library) when online;
* ``"none"``: random weights from the model's seed.

Nothing here downloads unless ``weights`` asks for the library's weights.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dalbt.catalogue import BACKBONE_LIBRARIES, is_backbone
from dalbt.errors import DalbtError
from dalbt.weightfiles import (
    DEFAULT_WEIGHTS,
    NO_WEIGHTS,
    check_weights,
    file_key,
    weights_digest,
)

LIBRARIES = BACKBONE_LIBRARIES
_TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
#: Images per inference pass are scaled down from 2048 at 28x28 by the input's pixels.
_PIXEL_BUDGET = 2048 * 28 * 28


def split_name(name: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; a clear error for a bad spelling."""
    library, sep, arch = name.partition(":")
    if not sep or library not in LIBRARIES or not arch.strip():
        raise DalbtError(f"model {name!r} is not LIBRARY:NAME; write timm:NAME or "
                         "torchvision:NAME (e.g. timm:resnet18)")
    return library, arch.strip()


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone takes and gives.

    Attributes:
        name: ``LIBRARY:NAME``.
        input_size: Side of the square input it is fed (its config's, or the override).
        default_size: Its config's input side.
        in_chans: Channels it takes (3 for nearly all).
        mean: Per-channel normalisation mean of its config.
        std: Per-channel normalisation std of its config.
        num_features: Size of its pooled features.
        classifier: Key prefixes of the classifier in a full checkpoint of the model.
    """

    name: str
    input_size: int
    default_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_features: int
    classifier: tuple[str, ...]


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise DalbtError("timm models need timm: pip install 'dalbt[backbones]' (or "
                         "pip install timm)") from None
    return timm


def _check_arch(library: str, arch: str) -> None:
    if library == "timm":
        timm = _timm()
        if timm.is_model(arch):
            return
        known = timm.list_models()
    else:
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if arch in known:
            return
    close = difflib.get_close_matches(arch, known, n=4, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    lister = ("timm.list_models('*NAME*')" if library == "timm"
              else "torchvision.models.list_models(module=torchvision.models)")
    raise DalbtError(f"unknown {library} model {arch!r}{hint} ({lister} lists them)")


def _create(library: str, arch: str, pretrained: bool) -> tuple[nn.Module, tuple[str, ...]]:
    """The backbone without its classifier, and the classifier's key prefixes."""
    if library == "timm":
        net = _timm().create_model(arch, pretrained=pretrained, num_classes=0)
        head = net.pretrained_cfg.get("classifier") or "head"
        return net, tuple(head) if isinstance(head, list | tuple) else (str(head),)
    import torchvision

    net = torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None)
    for attr in _TORCHVISION_HEADS:
        if isinstance(getattr(net, attr, None), nn.Module):
            setattr(net, attr, nn.Identity())
            return net, (attr,)
    raise DalbtError(f"torchvision:{arch} has none of the classifier attributes "
                     f"{', '.join(_TORCHVISION_HEADS)}; it is not a classification model")


def _config(library: str, arch: str, net: nn.Module) -> tuple[int, int, tuple, tuple]:
    """(input side, channels, mean, std) from the backbone's own config."""
    if library == "timm":
        cfg = getattr(net, "pretrained_cfg", {}) or {}
        chans, _, side = cfg.get("input_size", (3, 224, 224))
        return (int(side), int(chans), tuple(cfg.get("mean", _IMAGENET[0])),
                tuple(cfg.get("std", _IMAGENET[1])))
    import torchvision

    try:
        tf = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        return int(tf.crop_size[0]), 3, tuple(tf.mean), tuple(tf.std)
    except (ValueError, AttributeError, KeyError):  # no weights enum: ImageNet's defaults
        return 224, 3, *_IMAGENET


@functools.lru_cache(maxsize=16)
def backbone_info(name: str, input_size: int | None = None) -> BackboneInfo:
    """Check a backbone name and the input size it will be fed, and say what it gives.

    A random-weight copy is created (nothing is downloaded) and run on one image of the input
    size, which also tells the size of its pooled features.

    Raises:
        DalbtError: Bad spelling, library missing, unknown name, or a size it refuses.
    """
    library, arch = split_name(name)
    _check_arch(library, arch)
    with torch.random.fork_rng(devices=[]):
        net, classifier = _create(library, arch, pretrained=False)
    default, chans, mean, std = _config(library, arch, net)
    side = default if input_size is None else int(input_size)
    if side < 1:
        raise DalbtError(f"--input-size must be >= 1, got {side}")
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, chans, side, side))
    except Exception as exc:  # noqa: BLE001 - any refusal of the size, in one line
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DalbtError(f"{name} refuses {side}x{side} inputs ({reason}); give --input-size "
                         f"{default} (its own size) or another size it accepts") from None
    if out.dim() != 2:
        raise DalbtError(f"{name} gives features of shape {tuple(out.shape)}, not pooled "
                         "(B, D) features; choose a classification backbone")
    return BackboneInfo(name, side, default, chans, mean, std, int(out.shape[1]), classifier)


@functools.lru_cache(maxsize=4)
def _read(key: tuple[str, int, int]) -> dict[str, torch.Tensor]:
    path = key[0]
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader says, in one line
        why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise DalbtError(f"cannot read --weights {path} as a PyTorch or safetensors file "
                         f"({type(exc).__name__}{': ' + why if why else ''}); give a state "
                         "dict saved with torch.save or safetensors") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DalbtError(f"--weights {path} holds no state dict of tensors; save the model's "
                         "state_dict() (torch.save(model.state_dict(), PATH))")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (read once per process while the file is unchanged)."""
    return _read(file_key(path))


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], info: BackboneInfo,
               path: str) -> None:
    own = net.state_dict()
    heads = tuple(f"{c}." for c in info.classifier)
    given = {k: v for k, v in state.items() if not k.startswith(heads)}
    missing = [k for k in own if k not in given]
    extra = [k for k in given if k not in own]
    shaped = [k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its {len(own)} tensors missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} tensors it does not have (e.g. {extra[0]})")
    if shaped:
        k = shaped[0]
        problems.append(f"{len(shaped)} of another shape (e.g. {k}: file "
                        f"{tuple(given[k].shape)}, model {tuple(own[k].shape)})")
    if problems:
        raise DalbtError(f"--weights {path} do not fit {info.name}: {'; '.join(problems)}; give "
                         f"weights saved from {info.name} itself (its state_dict())")
    net.load_state_dict(given, strict=True)


class BackboneEncoder(nn.Module):
    """A pretrained backbone as dalbt's encoder: ``(B, C, H, W)`` images in [0, 1] ->
    ``(B, latent_dim)``.

    Grey images are repeated to the backbone's channels, resized to ``info.input_size`` and
    normalised with the backbone's statistics; a linear map follows when ``latent_dim`` is not
    the backbone's feature size.

    Args:
        net: The backbone without classifier (pooled features).
        info: Its :class:`BackboneInfo`.
        in_channels: Channels of the images (1 or ``info.in_chans``).
        latent_dim: Output size.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, info: BackboneInfo, in_channels: int,
                 latent_dim: int) -> None:
        super().__init__()
        if in_channels not in (1, info.in_chans):
            raise DalbtError(f"{info.name} takes {info.in_chans}-channel images; the data has "
                             f"{in_channels} channels (give 1-channel grey or "
                             f"{info.in_chans}-channel images)")
        self.repeat = info.in_chans if in_channels == 1 and info.in_chans != 1 else 0
        self.input_size = info.input_size
        self.register_buffer("mean", torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.net = net
        self.head: nn.Module = (nn.Identity() if latent_dim == info.num_features
                                else nn.Linear(info.num_features, latent_dim))
        #: Images per inference pass (:func:`dalbt.train.infer` reads it).
        self.inference_batch = max(16, _PIXEL_BUDGET // (info.input_size ** 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in [0, 1] -> ``(B, latent_dim)``."""
        if self.repeat:
            x = x.expand(-1, self.repeat, -1, -1)
        size = self.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.head(self.net((x - self.mean) / self.std))


def build_backbone(name: str, in_channels: int, latent_dim: int | None = None, *,
                   weights: str | None = None, input_size: int | None = None
                   ) -> tuple[BackboneEncoder, int]:
    """A :class:`BackboneEncoder` with its weights, and its latent size.

    Args:
        name: ``timm:NAME`` or ``torchvision:NAME``.
        in_channels: Channels of the images.
        latent_dim: Output size (None: the backbone's feature size).
        weights: A weights file, ``"default"``/None (the library's download) or ``"none"``.
        input_size: Side the images are resized to (None: the backbone's).

    Raises:
        DalbtError: Any bad name, size, file or download, in one line naming the fix.
    """
    info = backbone_info(name, input_size)
    library, arch = split_name(name)
    keyword = (weights or DEFAULT_WEIGHTS).lower()
    if keyword == DEFAULT_WEIGHTS:
        try:
            net, _ = _create(library, arch, pretrained=True)
        except DalbtError:
            raise
        except Exception as exc:  # noqa: BLE001 - offline, hub refusal, ...
            raise DalbtError(f"could not get {name}'s pretrained weights from {library} "
                             f"({type(exc).__name__}); give --weights PATH (a local .pth or "
                             ".safetensors file), or --weights none for random weights"
                             ) from None
    else:
        net, _ = _create(library, arch, pretrained=False)
        if keyword != NO_WEIGHTS:
            assert weights is not None
            _load_into(net, read_weights(weights), info, weights)
    latent = info.num_features if latent_dim is None else int(latent_dim)
    return BackboneEncoder(net, info, in_channels, latent), latent


__all__ = ["DEFAULT_WEIGHTS", "LIBRARIES", "NO_WEIGHTS", "BackboneEncoder", "BackboneInfo",
           "backbone_info", "build_backbone", "check_weights", "is_backbone", "read_weights",
           "split_name", "weights_digest"]
