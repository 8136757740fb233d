"""Adapters from the user's data (arrays, torch datasets, image folders, Hugging Face splits) to
dalbt's in-memory ImageDataset, on small data written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd
from torchvision.transforms import ToTensor

import dalbt.data
from dalbt.data import ImageDataset, from_dataset, from_hf, from_image_folder, from_tensors
from dalbt.errors import DalbtError


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(ds: ImageDataset, n: int, chw: tuple[int, int, int]) -> None:
    assert isinstance(ds, ImageDataset)
    assert ds.x_train.dtype == torch.uint8 and tuple(ds.x_train.shape) == (n, *chw)
    assert ds.y_train.dtype == torch.int64 and tuple(ds.y_train.shape) == (n,)
    assert ds.n_test == 0 and tuple(ds.x_test.shape[1:]) == chw


# --------------------------------------------------------------------------------------------
# from_tensors
# --------------------------------------------------------------------------------------------


def test_from_tensors_uint8_nchw_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 6, 7), dtype=np.uint8)
    y = np.array([0, 2, -1, 1, 2])
    a = from_tensors(x, y)
    b = from_tensors(torch.from_numpy(x), torch.from_numpy(y), name="t")
    _check(a, 5, (3, 6, 7))
    assert np.array_equal(a.x_train.numpy(), x) and torch.equal(a.x_train, b.x_train)
    assert a.y_train.tolist() == y.tolist() == b.y_train.tolist()
    assert a.classes == ["0", "1", "2"] and a.name == "tensors" and b.name == "t"


def test_from_tensors_grayscale_nhw():
    x = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    ds = from_tensors(x, classes=["a", "b"])
    _check(ds, 2, (1, 4, 5))
    assert np.array_equal(ds.x_train[:, 0].numpy(), x)
    assert ds.y_train.tolist() == [-1, -1] and ds.classes == ["a", "b"]


def test_from_tensors_float_rounds_to_uint8():
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (3, 1, 4, 4))
    x = torch.from_numpy(k / 255.0).float()  # as ToTensor makes them
    ds = from_tensors(x)
    assert np.array_equal(ds.x_train.numpy(), k.astype(np.uint8))
    half = from_tensors(np.full((1, 1, 1, 2), 0.5)).x_train.flatten().tolist()
    assert half == [128, 128]  # 127.5 rounds half up
    assert ds.y_train.tolist() == [-1, -1, -1] and ds.classes == []


@pytest.mark.parametrize("bad", [1.5, -0.01, float("nan")])
def test_from_tensors_float_outside_unit_interval(bad):
    x = np.zeros((2, 1, 3, 3), dtype=np.float32)
    x[1, 0, 1, 1] = bad
    with pytest.raises(DalbtError, match=r"\[0, 1\].*divide"):
        from_tensors(x)


def test_from_tensors_channels_last_only_when_unambiguous():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    ds = from_tensors(x)
    _check(ds, 4, (3, 6, 5))
    assert np.array_equal(ds.x_train.numpy(), x.transpose(0, 3, 1, 2))
    gray = from_tensors(x[..., :1])
    assert np.array_equal(gray.x_train.numpy(), x[..., :1].transpose(0, 3, 1, 2))
    # (N, 3, H, 3): both readings are possible, channels first is kept.
    tie = rng.integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)
    assert np.array_equal(from_tensors(tie).x_train.numpy(), tie)


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (2, 5, 5, 4), (2, 2, 5, 5), (5, 5),
                                   (1, 2, 3, 4, 5)])
def test_from_tensors_bad_shapes(shape):
    with pytest.raises(DalbtError, match="shape"):
        from_tensors(np.zeros(shape, dtype=np.uint8))


def test_from_tensors_labels_checked():
    x = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    with pytest.raises(DalbtError, match="outside the 2 classes"):
        from_tensors(x, [0, 1, 2], classes=["a", "b"])
    with pytest.raises(DalbtError, match="label -2 is invalid"):
        from_tensors(x, [0, -2, 1])
    with pytest.raises(DalbtError, match="one label per image"):
        from_tensors(x, np.array([0, 1]))
    with pytest.raises(DalbtError, match="must be integers"):
        from_tensors(x, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(DalbtError, match="no images"):
        from_tensors(np.zeros((0, 1, 2, 2), dtype=np.uint8))
    with pytest.raises(DalbtError, match="0..255"):
        from_tensors(np.full((1, 1, 2, 2), 300))
    assert from_tensors(x, [1, None, 0]).y_train.tolist() == [1, -1, 0]


# --------------------------------------------------------------------------------------------
# from_dataset
# --------------------------------------------------------------------------------------------


def test_from_dataset_pil_items_same_size():
    rng = np.random.default_rng(3)
    arrays = [_rgb(rng, 5, 7) for _ in range(4)]
    items = [(Image.fromarray(a), lab) for a, lab in zip(arrays, [1, None, 0, -1], strict=True)]
    ds = from_dataset(items)
    _check(ds, 4, (3, 5, 7))
    assert np.array_equal(ds.x_train.numpy(), np.stack(arrays).transpose(0, 3, 1, 2))
    assert ds.y_train.tolist() == [1, -1, 0, -1] and ds.classes == ["0", "1"]
    assert ds.name == "list"


def test_from_dataset_mixed_sizes_need_image_size():
    rng = np.random.default_rng(4)
    images = [Image.fromarray(_rgb(rng, h, w)) for h, w in [(8, 8), (8, 8), (10, 6)]]
    items = [(im, 0) for im in images]
    with pytest.raises(DalbtError, match=r"item 2 is 10x6.*image_size"):
        from_dataset(items)
    ds = from_dataset(items, image_size=(4, 5))
    _check(ds, 3, (3, 4, 5))
    expected = np.asarray(images[2].resize((5, 4), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(ds.x_train[2].numpy(), expected)


def test_from_dataset_rgb_to_gray_and_gray_to_rgb():
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(_rgb(rng, 6, 6))
    gray = rgb.convert("L")
    with pytest.raises(DalbtError, match="channels=1"):
        from_dataset([(rgb, 0), (gray, 1)])
    ds = from_dataset([(rgb, 0), (gray, 1)], channels=1)
    _check(ds, 2, (1, 6, 6))
    assert np.array_equal(ds.x_train[0, 0].numpy(), np.asarray(gray))
    assert torch.equal(ds.x_train[0], ds.x_train[1])
    up = from_dataset([(gray, 0)], channels=3)
    assert all(np.array_equal(up.x_train[0, c].numpy(), np.asarray(gray)) for c in range(3))


def test_from_dataset_tensor_and_array_items():
    rng = np.random.default_rng(6)
    k = rng.integers(0, 256, (3, 4, 5))
    items = [
        (torch.from_numpy(k / 255.0).float(), torch.tensor(1)),  # float (C, H, W)
        (torch.from_numpy(k.astype(np.uint8)), np.int64(0)),  # uint8 (C, H, W)
        (k.transpose(1, 2, 0).astype(np.uint8), None),  # NumPy (H, W, C)
    ]
    ds = from_dataset(items)
    _check(ds, 3, (3, 4, 5))
    for i in range(3):
        assert np.array_equal(ds.x_train[i].numpy(), k.astype(np.uint8))
    assert ds.y_train.tolist() == [1, 0, -1]
    gray = from_dataset([(k[0].astype(np.uint8), 0)])  # NumPy (H, W)
    assert np.array_equal(gray.x_train[0, 0].numpy(), k[0])


def test_from_dataset_torch_datasets_and_classes_attribute():
    class Squares(torch.utils.data.Dataset):
        classes = ["dark", "light"]

        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int):
            return torch.full((1, 4, 4), i / 2), i % 2

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ((torch.full((1, 4, 4), i / 2), i % 2) for i in range(3))

    a, b = from_dataset(Squares()), from_dataset(Stream())
    _check(a, 3, (1, 4, 4))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.x_train[:, 0, 0, 0].tolist() == [0, 128, 255]
    assert a.classes == ["dark", "light"] and b.classes == ["0", "1"]
    assert a.name == "Squares"
    with pytest.raises(DalbtError, match="outside the 1 classes"):
        from_dataset(Squares(), classes=["only"])


def test_from_dataset_grows_past_first_capacity(monkeypatch):
    from dalbt.data import adapters

    monkeypatch.setattr(adapters, "_FIRST_CAPACITY", 2)
    ds = from_dataset(iter([(np.full((2, 2), i, dtype=np.uint8), i) for i in range(5)]))
    assert ds.x_train[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] == ds.y_train.tolist()


@pytest.mark.parametrize("items, match", [
    ([], "no images"),
    (["cat.png"], "item 0 is str: expected an \\(image, label\\) pair"),
    ([("cat.png", 0)], "item 0 is a str: images must be"),
    ([(np.zeros((2, 2), np.uint8),)], "1-tuple"),
    ([(np.zeros((2, 2), np.uint8), 0.5)], "label must be an int"),
    ([(np.zeros((4, 2, 2), np.uint8), 0)], "C = 1 \\(gray\\) or 3"),
])
def test_from_dataset_errors(items, match):
    with pytest.raises(DalbtError, match=match):
        from_dataset(items)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_from_dataset_bad_channels_argument(channels):
    with pytest.raises(DalbtError, match="channels="):
        from_dataset([(np.zeros((2, 2), np.uint8), 0)], channels=channels)


@pytest.mark.parametrize("size", [8.5, (4, 4, 4), 0, (4, -1)])
def test_from_dataset_bad_image_size(size):
    with pytest.raises(DalbtError, match="image.size"):
        from_dataset([(np.zeros((2, 2), np.uint8), 0)], image_size=size)


def test_from_dataset_progress_bar(capsys):
    from_dataset([(np.zeros((2, 2), np.uint8), 0)] * 3, progress=True, name="tiny")
    err = capsys.readouterr().err
    assert "loading tiny" in err and "3/3" in err


# --------------------------------------------------------------------------------------------
# from_image_folder
# --------------------------------------------------------------------------------------------


def _write_folder(root: Path, rng: np.random.Generator) -> dict[str, list[Path]]:
    """Two classes of PNGs of mixed sizes, one of them gray, plus files to skip."""
    files: dict[str, list[Path]] = {}
    for cls, sizes in {"cat": [(9, 7), (12, 12)], "dog": [(9, 7), (5, 11), (9, 7)]}.items():
        (root / cls).mkdir(parents=True)
        files[cls] = []
        for j, (h, w) in enumerate(sizes):
            img = Image.fromarray(_rgb(rng, h, w))
            if cls == "dog" and j == 1:
                img = img.convert("L")
            path = root / cls / f"{j}.png"
            img.save(path)
            files[cls].append(path)
    (root / "dog" / ".hidden.png").write_bytes(b"not an image")
    (root / "dog" / "notes.txt").write_text("skip me")
    return files


def test_from_image_folder_matches_from_dataset(tmp_path):
    files = _write_folder(tmp_path, np.random.default_rng(7))
    ds = from_image_folder(tmp_path, 8, channels=3)
    _check(ds, 5, (3, 8, 8))
    assert ds.classes == ["cat", "dog"] and ds.y_train.tolist() == [0, 0, 1, 1, 1]
    assert ds.name == "folder"
    # The same images through torchvision's own RGB loader and ToTensor (float tensors); it
    # would read the hidden file, which dalbt skips.
    tv = tvd.ImageFolder(str(tmp_path), transform=ToTensor(),
                         is_valid_file=lambda f: Path(f).name[0] != "." and f.endswith(".png"))
    via_tv = from_dataset(tv, image_size=8)
    assert torch.equal(ds.x_train, via_tv.x_train) and torch.equal(ds.y_train, via_tv.y_train)
    assert via_tv.classes == ds.classes
    # And as a plain list of opened images, in the folder's order.
    paths = files["cat"] + files["dog"]
    pairs = [(Image.open(p), lab) for p, lab in zip(paths, [0, 0, 1, 1, 1], strict=True)]
    assert torch.equal(from_dataset(pairs, 8, 3).x_train, ds.x_train)


def test_from_image_folder_keeps_gray_and_native_size(tmp_path):
    rng = np.random.default_rng(8)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(rng.integers(0, 256, (6, 4), dtype=np.uint8)).save(tmp_path / cls / "x.png")
    ds = from_image_folder(tmp_path, None)
    _check(ds, 2, (1, 6, 4))
    assert np.array_equal(ds.x_train[1, 0].numpy(), np.asarray(Image.open(tmp_path / "b/x.png")))


def test_from_image_folder_errors(tmp_path):
    with pytest.raises(DalbtError, match="does not exist"):
        from_image_folder(tmp_path / "missing", 8)
    with pytest.raises(DalbtError, match="one sub-folder per class"):
        from_image_folder(tmp_path, 8)
    (tmp_path / "a").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DalbtError, match=r"cannot read image .*broken\.png"):
        from_image_folder(tmp_path, 8)


# --------------------------------------------------------------------------------------------
# from_hf
# --------------------------------------------------------------------------------------------


class _ClassLabel:
    def __init__(self, names: list[str]) -> None:
        self.names = names


class _FakeSplit(list):
    """What from_hf uses of a ``datasets.Dataset``: rows as dicts, ``len``, ``features``."""

    def __init__(self, rows: list[dict], features: dict) -> None:
        super().__init__(rows)
        self.features = features


def _fake_split(rng: np.random.Generator) -> tuple[_FakeSplit, list[np.ndarray]]:
    arrays = [_rgb(rng, 6, 6) for _ in range(4)]
    rows = [{"img": Image.fromarray(a), "fine": lab, "id": i}
            for i, (a, lab) in enumerate(zip(arrays, [2, 0, -1, 1], strict=True))]
    features = {"img": object(), "fine": _ClassLabel(["ant", "bee", "cow"]), "id": object()}
    return _FakeSplit(rows, features), arrays


def test_from_hf_fake_split():
    split, arrays = _fake_split(np.random.default_rng(9))
    ds = from_hf(split, image_column="img", label_column="fine", channels=1, image_size=3)
    _check(ds, 4, (1, 3, 3))
    assert ds.classes == ["ant", "bee", "cow"] and ds.y_train.tolist() == [2, 0, -1, 1]
    full = from_hf(split, "img", None)
    assert full.y_train.tolist() == [-1] * 4 and full.classes == [] and full.name == "hf"
    assert np.array_equal(full.x_train.numpy(), np.stack(arrays).transpose(0, 3, 1, 2))


def test_from_hf_errors():
    split, _ = _fake_split(np.random.default_rng(10))
    with pytest.raises(DalbtError, match=r"no image column 'image' \(columns: img, fine, id\)"):
        from_hf(split)
    with pytest.raises(DalbtError, match="label_column=None"):
        from_hf(split, "img")
    with pytest.raises(DalbtError, match="pick a split"):
        from_hf({"train": split})
    with pytest.raises(DalbtError, match="outside the 2 classes"):
        from_hf(split, "img", "fine", classes=["x", "y"])
    class _Value:
        dtype = "string"

    split.features["id"] = _Value()
    with pytest.raises(DalbtError, match=r"class_encode_column\('id'\)"):
        from_hf(split, "img", "id")


def test_from_hf_real_datasets_split():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(11)
    arrays = [_rgb(rng, 5, 5) for _ in range(3)]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "note": datasets.Value("string")})
    split = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in arrays], "label": [1, 0, -1],
         "note": ["a", "b", "c"]}, features=features)
    ds = from_hf(split)
    _check(ds, 3, (3, 5, 5))
    assert ds.classes == ["no", "yes"] and ds.y_train.tolist() == [1, 0, -1]
    assert np.array_equal(ds.x_train.numpy(), np.stack(arrays).transpose(0, 3, 1, 2))


def test_adapters_exported_lazily():
    for name in ("from_tensors", "from_dataset", "from_image_folder", "from_hf"):
        assert name in dalbt.data.__all__ and callable(getattr(dalbt.data, name))
    with pytest.raises(AttributeError):
        dalbt.data.from_nothing  # noqa: B018
