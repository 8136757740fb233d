"""Pretrained backbones (timm:NAME, torchvision:NAME), their weights, and the embedding cache."""

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalbt import probe
from dalbt.cli import main
from dalbt.errors import DalbtError
from dalbt.loop import RunConfig, run_experiment
from dalbt.models import build_model
from dalbt.store import Store
from dalbt.train import TrainConfig

timm = pytest.importorskip("timm")
ARCH = "test_resnet"  # timm's tiny test network: no download, a fraction of a second


def _saved(tmp_path, suffix=".pth", num_classes=10, wrap=False):
    torch.manual_seed(123)
    net = timm.create_model(ARCH, pretrained=False, num_classes=num_classes).eval()
    path = tmp_path / f"w{suffix}"
    state = net.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap
                   else state, path)
    return net, path


def _features(net, x, size=32):
    """What the saved model computes on dalbt's input: grey repeated, resized, normalised."""
    cfg = net.pretrained_cfg
    x3 = F.interpolate(x.expand(-1, 3, -1, -1), size=(size, size), mode="bilinear",
                       align_corners=False, antialias=True)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return net.forward_head(net.forward_features((x3 - mean) / std), pre_logits=True)


@pytest.mark.parametrize("suffix,wrap", [(".pth", False), (".pth", True), (".safetensors", False)])
def test_loaded_weights_give_the_saved_models_features(tmp_path, suffix, wrap):
    net, path = _saved(tmp_path, suffix, wrap=wrap)
    model = build_model(f"timm:{ARCH}", 1, 20, 4, weights=str(path), input_size=32, seed=0)
    model.eval()
    x = torch.rand(5, 1, 20, 20)
    with torch.no_grad():
        assert torch.allclose(model.embed(x), _features(net, x), atol=1e-5)
    assert model.latent_dim == net.num_features and model.pretrained
    assert model.classifier.out_features == 4


def test_torchvision_backbone_loads_its_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(5)
    net = torchvision.models.resnet18().eval()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = build_model("torchvision:resnet18", 3, 32, 10, weights=str(tmp_path / "r18.pth"),
                        input_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.allclose(model.embed(x), net((x - mean) / std), atol=1e-5)
    assert model.latent_dim == 512


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "timm:no_such_net"}, "unknown timm model"),
    ({"name": "torchvision:resnet181"}, "close names: resnet18"),
    ({"name": "timm:"}, "LIBRARY:NAME"),
    ({"name": "timm:test_vit", "input_size": 33}, "refuses 33x33 inputs"),
    ({"name": "lenet", "weights": "x.pth"}, "--weights is for timm"),
    ({"name": f"timm:{ARCH}", "weights": "/nonexistent/w.pth"}, "does not exist"),
])
def test_bad_backbones_are_one_line_errors(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(DalbtError, match=message):
        build_model(name, 1, 20, 4, **{"weights": "none", **kwargs})


def test_weights_that_do_not_fit_or_cannot_be_read(tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "o.pth")
    with pytest.raises(DalbtError, match="do not fit timm:test_resnet.*missing"):
        build_model(f"timm:{ARCH}", 1, 20, 4, weights=str(tmp_path / "o.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DalbtError, match="cannot read --weights"):
        build_model(f"timm:{ARCH}", 1, 20, 4, weights=str(tmp_path / "bad.pth"))


def test_library_weights_offline_name_the_fix(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("no network")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DalbtError, match="give --weights PATH"):
        build_model(f"timm:{ARCH}", 1, 20, 4)


def test_cli_bad_backbone_exits_2_with_one_line(capsys, tmp_path):
    code = main(["run", "--model", "timm:no_such_net", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dalbt: error: unknown timm model")
    assert len(err.strip().splitlines()) == 1


def test_run_key_records_the_weights_content_not_the_path(tmp_path):
    _, path = _saved(tmp_path)
    moved = tmp_path / "elsewhere.pth"
    shutil.copy(path, moved)
    a = RunConfig(model=f"timm:{ARCH}", weights=str(path)).key_dict()
    b = RunConfig(model=f"timm:{ARCH}", weights=str(moved)).key_dict()
    assert a == b and a["weights"].startswith("sha256:")
    assert "weights" not in RunConfig().key_dict()  # older keys unchanged


def _head_run(digits, tmp_path, weights, strategy):
    cfg = RunConfig(dataset="digits", model=f"timm:{ARCH}", weights=str(weights),
                    input_size=32, strategy=strategy, initial=30, budget=20, rounds=1,
                    val_size=100, projector_dims=(16, 16),
                    train=TrainConfig(finetune="head"))
    with Store(tmp_path / "exp") as store:
        return run_experiment(cfg, store, progress=False, data=digits, log=lambda s: None)


def test_embedding_cache_is_reused_by_a_second_run(tmp_path, digits, monkeypatch):
    _, weights = _saved(tmp_path)
    first = probe.FrozenLatents()
    monkeypatch.setattr(probe, "frozen_latents", first)
    assert _head_run(digits, tmp_path, weights, "margin").status == "finished"
    assert first.encodings == 2  # the training and the test images, once each
    files = sorted((tmp_path / "exp" / "embeddings").glob("*.npy"))
    assert len(files) == 2
    second = probe.FrozenLatents()  # a new process: nothing in memory
    monkeypatch.setattr(probe, "frozen_latents", second)
    assert _head_run(digits, tmp_path, weights, "random").status == "finished"
    assert second.encodings == 0 and second.reads == 2
    assert sorted((tmp_path / "exp" / "embeddings").glob("*.npy")) == files
    z = np.load(files[0], mmap_mode="r")
    assert z.dtype == np.float32 and z.shape[1] == timm.create_model(ARCH).num_features


def test_a_damaged_cache_file_is_a_one_line_error(tmp_path, digits, monkeypatch):
    _, weights = _saved(tmp_path)
    monkeypatch.setattr(probe, "frozen_latents", probe.FrozenLatents())
    _head_run(digits, tmp_path, weights, "margin")
    for f in (tmp_path / "exp" / "embeddings").glob("*.npy"):
        f.write_bytes(f.read_bytes()[:200])
    monkeypatch.setattr(probe, "frozen_latents", probe.FrozenLatents())
    with pytest.raises(DalbtError, match="embedding cache .* is damaged .* delete it"):
        _head_run(digits, tmp_path, weights, "random")  # another run, the same cache


def test_dalbt_embed_writes_what_a_run_reads(tmp_path, digits, monkeypatch, capsys):
    _, weights = _saved(tmp_path)
    args = ["embed", "--model", f"timm:{ARCH}", "--weights", str(weights), "--input-size",
            "32", "--out", str(tmp_path / "exp"), "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("written to") == 2
    assert main(args) == 0
    assert capsys.readouterr().out.count("already in") == 2
    cache = probe.FrozenLatents()
    monkeypatch.setattr(probe, "frozen_latents", cache)
    _head_run(digits, tmp_path, weights, "margin")
    assert cache.encodings == 0 and cache.reads == 2


def test_a_project_on_a_backbone_trains_a_head_and_embeds_once(tmp_path, monkeypatch):
    from PIL import Image

    from dalbt.labelling.project import Project

    rng = np.random.default_rng(0)
    for name in ("a/0", "a/1", "a/2", "b/0", "b/1", "b/2", "u0", "u1", "u2", "u3"):
        (tmp_path / "img" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((12, 12)) * 255).astype("uint8")).save(
            tmp_path / "img" / f"{name}.png")
    _, weights = _saved(tmp_path)
    assert main(["init", str(tmp_path / "p"), "--images", str(tmp_path / "img"), "--model",
                 f"timm:{ARCH}", "--weights", str(weights), "--input-size", "32"]) == 0
    cache = probe.FrozenLatents()
    monkeypatch.setattr(probe, "frozen_latents", cache)
    with Project(tmp_path / "p") as project:
        assert project.config.train.finetune == "head" and project.config.cold_start_epochs == 0
        project.query(2, log=lambda m: None)
        monkeypatch.setattr(probe, "frozen_latents", probe.FrozenLatents())
        project.query(2, log=lambda m: None)
        assert probe.frozen_latents.encodings == 0 and probe.frozen_latents.reads == 1
    assert cache.encodings == 1
    assert len(list((tmp_path / "p" / "embeddings").glob("*.npy"))) == 1
