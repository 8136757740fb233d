"""OOD-polluted pools: open set by classes, cross-dataset mixing and the CLI mix spec."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch

from dalbt.data import ImageDataset, load_dataset
from dalbt.data import datasets as ds
from dalbt.data.mixing import make_open_set, match_images, mix_in, parse_mix
from dalbt.errors import DalbtError
from tests.test_data_formats import make_idx_set


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """Keep dataset searches away from the real machine."""
    monkeypatch.delenv("DALBT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ds, "SYSTEM_ROOT", tmp_path / "system")


def toy(name: str = "toy", n: int = 12, channels: int = 1, size: int = 4,
        classes: tuple[str, ...] = ("a", "b", "c", "d"), fill: str = "index") -> ImageDataset:
    """``n`` train images whose pixels all equal their index (mod 256), labels ``i % K``."""
    k = len(classes)
    if fill == "index":
        values = torch.arange(n) % 256
    else:
        values = torch.full((n,), int(fill))
    x = values.view(n, 1, 1, 1).expand(n, channels, size, size).to(torch.uint8).contiguous()
    y = torch.arange(n, dtype=torch.int64) % k
    x_test = (200 + torch.arange(2 * k)).view(-1, 1, 1, 1).expand(-1, channels, size, size)
    y_test = torch.arange(2 * k, dtype=torch.int64) % k
    return ImageDataset(name, x, y, x_test.to(torch.uint8).contiguous(), y_test, list(classes))


# --------------------------------------------------------------------------------------------
# The ood field
# --------------------------------------------------------------------------------------------


def test_ood_field_defaults_and_validates():
    d = toy()
    assert d.ood is None
    with pytest.raises(ValueError, match="ood must be bool"):
        ImageDataset("t", d.x_train, d.y_train, d.x_test, d.y_test, d.classes,
                     ood=torch.zeros(d.n_train, dtype=torch.int64))
    with pytest.raises(ValueError, match="ood must be bool"):
        ImageDataset("t", d.x_train, d.y_train, d.x_test, d.y_test, d.classes,
                     ood=torch.zeros(d.n_train - 1, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Open set by classes
# --------------------------------------------------------------------------------------------


def test_open_set_remaps_masks_and_filters():
    d = toy()  # labels 0,1,2,3,0,1,... ; classes a b c d
    o = make_open_set(d, [1, "d"])
    assert o.classes == ["a", "c"] and o.num_classes == 2 and o.name == "toy"
    assert torch.equal(o.x_train, d.x_train)  # every train image stays in the pool
    expected = {0: 0, 1: -1, 2: 1, 3: -1}
    assert o.y_train.tolist() == [expected[v] for v in d.y_train.tolist()]
    assert o.ood.tolist() == [v in (1, 3) for v in d.y_train.tolist()]
    assert o.ood.dtype == torch.bool and o.y_train.dtype == torch.int64
    # Test split: only known classes, remapped; images follow their labels.
    assert o.y_test.tolist() == [0, 1, 0, 1]
    assert o.x_test[:, 0, 0, 0].tolist() == [200, 202, 204, 206]
    assert d.classes == ["a", "b", "c", "d"] and d.ood is None  # input untouched


def test_open_set_names_and_indices_agree():
    d = toy()
    by_index = make_open_set(d, [0, 2])
    by_name = make_open_set(d, ["a", "c"])
    by_text = make_open_set(d, ["0", " c "])  # numeric string that is no class name -> index
    for o in (by_name, by_text):
        assert o.classes == by_index.classes == ["b", "d"]
        assert torch.equal(o.y_train, by_index.y_train) and torch.equal(o.ood, by_index.ood)
        assert torch.equal(o.y_test, by_index.y_test)
    # Digit class names: the name wins (and means the same index anyway).
    digits = toy(classes=tuple(str(k) for k in range(4)))
    assert make_open_set(digits, ["3", np.int64(2)]).classes == ["0", "1"]


def test_open_set_keeps_existing_unlabelled_and_empty_list():
    d = toy()
    d.y_train[5] = -1  # an unlabelled in-distribution image
    o = make_open_set(d, ["b"])
    assert o.y_train[5].item() == -1 and not o.ood[5].item()
    same = make_open_set(d, [])
    assert same.classes == d.classes and torch.equal(same.y_train, d.y_train)
    assert not same.ood.any() and same.n_test == d.n_test


@pytest.mark.parametrize(
    ("unknown", "match"),
    [
        (["e"], r"unknown class 'e' for toy: use a class name \(a, b, c, d\)"),
        ([4], r"unknown class index 4 for toy: use 0\.\.3"),
        ([-1], r"unknown class index -1"),
        ([1.5], r"give a class index \(int\) or name \(str\)"),
        (["a", "b", "c", "d"], r"all 4 classes of toy are unknown: leave at least 2"),
        (["a", "b", "c"], r"only 1 known class \('d'\).*at most 2 of its 4"),
        (["b", 1], r"class 'b' listed more than once"),
        ("a", r"must be a list"),
    ],
)
def test_open_set_errors(unknown, match):
    with pytest.raises(DalbtError, match=match):
        make_open_set(toy(), unknown)


# --------------------------------------------------------------------------------------------
# Resizing and channel matching
# --------------------------------------------------------------------------------------------


def test_rgb_to_gray_uses_luma_on_exact_values():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30],
                            [255, 255, 255], [0, 0, 0]], dtype=torch.uint8)
    x = colours.view(-1, 3, 1, 1).expand(-1, 3, 5, 5).contiguous()
    g = match_images(x, 1, (5, 5))
    assert g.shape == (6, 1, 5, 5) and g.dtype == torch.uint8
    # 0.299*255=76.2, 0.587*255=149.7, 0.114*255=29.1, 2.99+11.74+3.42=18.15
    assert g[:, 0, 2, 3].tolist() == [76, 150, 29, 18, 255, 0]
    assert all(len(img.unique()) == 1 for img in g)


def test_gray_to_rgb_repeats():
    x = torch.tensor([0, 7, 128, 255], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 3, 3)
    c = match_images(x.contiguous(), 3, (3, 3))
    assert c.shape == (4, 3, 3, 3)
    assert torch.equal(c, x.expand(4, 3, 3, 3))


def test_resize_constant_stays_constant_and_noop_is_identity():
    x = torch.tensor([0, 1, 99, 254, 255], dtype=torch.uint8).view(5, 1, 1, 1)
    x = x.expand(5, 3, 8, 8).contiguous()
    small = match_images(x, 3, (4, 4))
    assert small.shape == (5, 3, 4, 4)
    assert torch.equal(small, x[:, :, :4, :4])
    big = match_images(x[:, :1], 3, (12, 10))  # upsample and 1 -> 3 together
    assert big.shape == (5, 3, 12, 10) and torch.equal(big, x[:, :, :1, :1].expand(5, 3, 12, 10))
    assert match_images(x, 3, (8, 8)) is x


def test_resize_averages_with_antialias():
    # A 0/255 checkerboard is smoothed to about its mean (no aliasing to 0 or 255); away from
    # the borders the antialias filter (1, 3, 3, 1)/8 gives exactly 127.5 -> 128 (half up).
    board = ((torch.arange(8).view(8, 1) + torch.arange(8)) % 2 * 255).to(torch.uint8)
    out = match_images(board.view(1, 1, 8, 8), 1, (4, 4))
    assert out[0, 0, 1:3, 1:3].unique().tolist() == [128]
    assert out.min().item() >= 120 and out.max().item() <= 135


def test_unsupported_channel_counts():
    with pytest.raises(DalbtError, match="cannot convert 2-channel images to 3 channels"):
        match_images(torch.zeros(1, 2, 4, 4, dtype=torch.uint8), 3, (4, 4))
    with pytest.raises(DalbtError, match="cannot convert 3-channel images to 4"):
        mix_in(toy(channels=4), toy(channels=3), 2, seed=0)


# --------------------------------------------------------------------------------------------
# mix_in
# --------------------------------------------------------------------------------------------


def test_mix_in_shapes_labels_and_mask():
    data = toy("cifar", n=10, channels=3, size=4)
    other = toy("svhn", n=40, channels=1, size=8, classes=("0", "1"))
    m = mix_in(data, other, 7, seed=3)
    assert m.name == "cifar+svhn" and m.classes == data.classes
    assert m.x_train.shape == (17, 3, 4, 4) and m.x_train.dtype == torch.uint8
    assert m.y_train.dtype == torch.int64 and m.ood.dtype == torch.bool
    assert torch.equal(m.x_train[:10], data.x_train) and torch.equal(m.y_train[:10], data.y_train)
    assert m.y_train[10:].tolist() == [-1] * 7
    assert m.ood.tolist() == [False] * 10 + [True] * 7
    assert torch.equal(m.x_test, data.x_test) and torch.equal(m.y_test, data.y_test)
    # The appended images are distinct source images (without replacement), constant per image.
    drawn = m.x_train[10:, 0, 0, 0]
    assert len(set(drawn.tolist())) == 7 and all(0 <= v < 40 for v in drawn.tolist())
    assert torch.equal(m.x_train[10:], drawn.view(7, 1, 1, 1).expand(7, 3, 4, 4))


def test_mix_in_determinism_and_seed_dependence():
    data, other = toy(n=4), toy("o", n=200)
    a = mix_in(data, other, 20, seed=1)
    b = mix_in(data, other, 20, seed=1)
    c = mix_in(data, other, 20, seed=2)
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, c.x_train)
    # The documented stream: default_rng(SeedSequence(seed, spawn_key=(5,))), sorted indices.
    rng = np.random.default_rng(np.random.SeedSequence(1, spawn_key=(5,)))
    idx = np.sort(rng.choice(200, size=20, replace=False))
    assert a.x_train[4:, 0, 0, 0].tolist() == idx.tolist()
    everything = mix_in(data, other, 200, seed=9)
    assert sorted(everything.x_train[4:, 0, 0, 0].tolist()) == list(range(200))


def test_mix_in_count_errors():
    data, other = toy(), toy("o", n=5)
    for bad in (0, -3, 6):
        with pytest.raises(DalbtError, match=r"use a count in 1\.\.5"):
            mix_in(data, other, bad, seed=0)
    with pytest.raises(DalbtError, match="must be an integer"):
        mix_in(data, other, 2.0, seed=0)


def test_mix_into_open_set_keeps_earlier_ood():
    o = make_open_set(toy(n=12), ["b"])
    m = mix_in(o, toy("o", n=30, channels=3, size=6), 5, seed=0)
    assert m.name == "toy+o" and m.classes == ["a", "c", "d"]
    assert torch.equal(m.ood[:12], o.ood) and m.ood[:12].sum().item() == 3
    assert m.ood[12:].all() and m.y_train[12:].tolist() == [-1] * 5
    assert torch.equal(m.y_train[:12], o.y_train)
    twice = mix_in(m, toy("p", n=9), 2, seed=0)
    assert twice.name == "toy+o+p" and twice.ood.sum().item() == 3 + 5 + 2
    # ...and the other way round: open set made of an already mixed pool.
    back = make_open_set(mix_in(toy(n=12), toy("o", n=30), 5, seed=0), [0])
    assert back.ood.sum().item() == 5 + 3 and back.classes == ["b", "c", "d"]


# --------------------------------------------------------------------------------------------
# Real files: SVHN (.mat) mixed into KMNIST (IDX) and back
# --------------------------------------------------------------------------------------------


def test_real_svhn_and_kmnist_files_mix(tmp_path):
    # SVHN: 32x32x3xN uint8 "X", labels 1..10 (10 = digit 0) "y"; the first 3 images constant.
    x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 6), dtype=np.uint8)
    x[..., 0:3] = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8).T
    svhn_dir = tmp_path / "svhn"
    svhn_dir.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        scipy.io.savemat(svhn_dir / f"{split}_32x32.mat",
                         {"X": x[..., :n], "y": np.arange(1, n + 1, dtype=np.uint8)[:, None]})
    arrays = make_idx_set(tmp_path / "km" / "KMNIST" / "raw", gz=True, n_train=8, n_test=3)
    svhn = load_dataset("svhn", root=svhn_dir)
    kmnist = load_dataset("kmnist", root=tmp_path / "km")
    assert (svhn.channels, svhn.image_size, kmnist.channels, kmnist.x_train.shape[2:]) == (
        3, 32, 1, (4, 3))

    m = mix_in(kmnist, svhn, 6, seed=0)  # all of SVHN's train images, in order
    assert m.name == "kmnist+svhn" and m.x_train.shape == (14, 1, 4, 3)
    np.testing.assert_array_equal(m.x_train[:8, 0].numpy(), arrays["x_train"])
    assert m.ood.tolist() == [False] * 8 + [True] * 6 and m.y_train[8:].tolist() == [-1] * 6
    # Pure red, green, blue SVHN images -> constant luma after 32x32 -> 4x3.
    for i, value in enumerate([76, 150, 29]):
        assert m.x_train[8 + i].unique().tolist() == [value]
    # The random ones agree with the same conversion applied to the loaded tensor.
    assert torch.equal(m.x_train[11:], match_images(svhn.x_train[3:], 1, (4, 3)))

    back = mix_in(make_open_set(svhn, ["9"]), kmnist, 3, seed=4)
    assert back.name == "svhn+kmnist" and back.x_train.shape == (9, 3, 32, 32)
    assert back.classes == [str(k) for k in range(9)]
    assert back.ood.tolist() == [False] * 6 + [True] * 3  # no SVHN train image is a 9
    gray = back.x_train[6:]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


# --------------------------------------------------------------------------------------------
# parse_mix
# --------------------------------------------------------------------------------------------


def test_parse_mix_accepts():
    assert parse_mix("svhn:5000,kmnist:5000") == [("svhn", 5000), ("kmnist", 5000)]
    assert parse_mix(" Fashion_MNIST : 7 ") == [("fashion-mnist", 7)]
    assert parse_mix("cifar10:1") == [("cifar10", 1)]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty mix spec"),
        ("   ", "empty mix spec"),
        ("svhn:10,", "empty item.*stray comma"),
        ("svhn", r"bad mix item 'svhn'.*NAME:COUNT"),
        (":10", r"bad mix item ':10'"),
        ("svhn:", r"bad mix item 'svhn:'"),
        ("nope:10", r"unknown dataset 'nope'.*known datasets: .*svhn"),
        ("svhn:ten", r"bad count 'ten' for svhn.*positive integer"),
        ("svhn:0", r"bad count '0'"),
        ("svhn:-5", r"bad count '-5'"),
        ("svhn:1.5", r"bad count '1.5'"),
        ("svhn:1:2", r"bad count '1:2'"),
        ("svhn:1,SVHN:2", r"'svhn' listed twice"),
    ],
)
def test_parse_mix_errors(spec, match):
    with pytest.raises(DalbtError, match=match):
        parse_mix(spec)
