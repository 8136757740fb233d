"""Tests of the DALBT network, the encoders and the model registry."""

import pytest
import torch
from torch import nn

from dalbt.errors import DalbtError
from dalbt.models import MODELS, DALBTNet, build_model, list_models

SHAPES = [(1, 8), (1, 28), (3, 32)]
LATENT = {"lenet": 60, "vgg16": 512, "resnet18": 512}


@pytest.mark.parametrize("name", sorted(LATENT))
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_output_shapes(name: str, channels: int, size: int) -> None:
    model = build_model(name, channels, size, 10, seed=0).eval()
    x = torch.rand(3, channels, size, size)
    with torch.inference_mode():
        assert model.embed(x).shape == (3, LATENT[name])
        assert model(x).shape == (3, 10)
        assert model.project(x).shape == (3, 256)
    assert model.latent_dim == LATENT[name] == MODELS[name].latent_dim
    assert model.num_classes == 10
    assert isinstance(model.classifier, nn.Linear)


def test_custom_latent_and_projector() -> None:
    model = build_model("resnet18", 3, 16, 5, latent_dim=64, projector_dims=(32, 16), seed=0)
    x = torch.rand(4, 3, 16, 16)
    assert model.embed(x).shape == (4, 64)
    assert model.project(x).shape == (4, 16)
    assert model(x).shape == (4, 5)


def test_projector_structure() -> None:
    model = build_model("lenet", 1, 28, 10, projector_dims=(128, 64, 32), seed=0)
    layers = list(model.projector)
    types = [type(layer) for layer in layers]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
    assert all(layer.bias is None for layer in linears)
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (60, 128),
        (128, 64),
        (64, 32),
    ]


def test_normalisation_buffers() -> None:
    model = build_model("lenet", 3, 32, 10, mean=(0.1, 0.2, 0.3), std=(0.5,), seed=0)
    norm = model.encoder.normalize
    assert torch.allclose(norm.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(norm.std.flatten(), torch.full((3,), 0.5))
    assert "encoder.normalize.mean" in model.state_dict()
    with pytest.raises(DalbtError, match="channels"):
        build_model("lenet", 3, 32, 10, mean=(0.1, 0.2))
    with pytest.raises(DalbtError, match="positive"):
        build_model("lenet", 1, 28, 10, std=(0.0,))


def test_seed_determines_weights_and_keeps_global_rng() -> None:
    state = torch.get_rng_state()
    a = build_model("lenet", 1, 28, 10, seed=7)
    b = build_model("lenet", 1, 28, 10, seed=7)
    c = build_model("lenet", 1, 28, 10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unseeded_build_follows_global_seed() -> None:
    torch.manual_seed(3)
    a = build_model("lenet", 1, 28, 10)
    torch.manual_seed(3)
    b = build_model("lenet", 1, 28, 10)
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_dropout_only_when_positive() -> None:
    x = torch.rand(8, 1, 28, 28)
    plain = build_model("lenet", 1, 28, 10, seed=0).train()
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert torch.equal(plain(x), plain(x))

    model = build_model("lenet", 1, 28, 10, dropout=0.5, seed=0).train()
    assert not torch.equal(model(x), model(x))
    assert torch.equal(model.embed(x), model.embed(x))  # dropout is after z only
    model.eval()
    assert torch.equal(model(x), model(x))
    model.enable_dropout()  # MC dropout: only the dropout modules go back to train mode
    assert not model.encoder.training
    assert not torch.equal(model(x), model(x))


def test_mc_dropout_keeps_batchnorm_in_eval() -> None:
    model = build_model("vgg16", 3, 8, 10, dropout=0.3, seed=0).eval()
    model.enable_dropout()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)


def test_unknown_model_and_bad_sizes() -> None:
    with pytest.raises(DalbtError, match="lenet.*resnet18.*vgg16"):
        build_model("alexnet", 3, 32, 10)
    with pytest.raises(DalbtError, match="at least 8"):
        build_model("lenet", 1, 7, 10)
    with pytest.raises(DalbtError, match="dropout"):
        build_model("lenet", 1, 28, 10, dropout=1.0)


def test_list_models() -> None:
    listed = list_models()
    assert [name for name, _ in listed] == sorted(MODELS)
    assert all(isinstance(desc, str) and desc and "\n" not in desc for _, desc in listed)


def test_lenet_large_batch() -> None:
    model = build_model("lenet", 1, 28, 10, seed=0).eval()
    assert isinstance(model, DALBTNet)
    with torch.inference_mode():
        out = model(torch.rand(4096, 1, 28, 28))
    assert out.shape == (4096, 10) and torch.isfinite(out).all()


def test_lenet_backward() -> None:
    model = build_model("lenet", 1, 28, 10, seed=0)
    x = torch.rand(16, 1, 28, 28)
    loss = model(x).logsumexp(1).mean() + model.project(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
