"""Dataset readers: files written in the real on-disk formats, parsed by the real loaders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from dalbt.data import DATASETS, ImageDataset, list_datasets, load_dataset
from dalbt.data import datasets as ds
from dalbt.data.formats import read_idx, read_image_folder
from dalbt.errors import DalbtError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    """Keep the search away from the real machine: no $DALBT_DATA, a private cache and system
    root."""
    monkeypatch.delenv("DALBT_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(ds, "SYSTEM_ROOT", tmp_path / "system")


# --------------------------------------------------------------------------------------------
# Writers for the real formats
# --------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, gz: bool, type_code: int = 0x08) -> Path:
    """IDX: 2 zero bytes, type code, ndim, then ndim big-endian uint32 sizes, then the data."""
    dtype = {0x08: ">u1", 0x0C: ">i4"}[type_code]
    payload = struct.pack(">HBB", 0, type_code, arr.ndim)
    payload += struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(dtype).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_set(directory: Path, gz: bool, seed: int = 0, n_train: int = 6, n_test: int = 3):
    """Four MNIST-style files of 4x3 images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for key, name in names.items():
        write_idx(directory / name, arrays[key], gz)
    return arrays


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------------------------
# IDX: MNIST, Fashion-MNIST, KMNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "subdir", "gz", "first_class"),
    [
        ("mnist", "MNIST/raw", True, "0"),  # torchvision's layout
        ("fashion-mnist", "", False, "T-shirt/top"),  # files directly in the root
        ("kmnist", "kmnist", True, "o"),  # <root>/<name>
    ],
)
def test_idx_datasets_load_exact_pixels(tmp_path, name, subdir, gz, first_class):
    arrays = make_idx_set(tmp_path / "data" / subdir, gz)
    d = load_dataset(name, root=tmp_path / "data")
    assert isinstance(d, ImageDataset) and d.name == name
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    assert tuple(d.x_train.shape) == (6, 1, 4, 3) and tuple(d.x_test.shape) == (3, 1, 4, 3)
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), arrays["x_train"])
    np.testing.assert_array_equal(d.x_test[:, 0].numpy(), arrays["x_test"])
    np.testing.assert_array_equal(d.y_train.numpy(), arrays["y_train"])
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["y_test"])
    assert d.classes[0] == first_class and d.num_classes == 10
    assert (d.channels, d.image_size, d.n_train, d.n_test) == (1, 4, 6, 3)


def test_kmnist_class_names(tmp_path):
    make_idx_set(tmp_path, gz=False)
    assert load_dataset("kmnist", root=tmp_path).classes == [
        "o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


def test_dalbt_data_env_is_searched(tmp_path, monkeypatch):
    arrays = make_idx_set(tmp_path / "env" / "MNIST" / "raw", gz=True)
    monkeypatch.setenv("DALBT_DATA", str(tmp_path / "env"))
    d = load_dataset("mnist")
    np.testing.assert_array_equal(d.y_test.numpy(), arrays["y_test"])


def test_explicit_root_wins_over_env(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "env", gz=False, seed=1)
    mine = make_idx_set(tmp_path / "mine", gz=False, seed=2)
    monkeypatch.setenv("DALBT_DATA", str(tmp_path / "env"))
    d = load_dataset("mnist", root=tmp_path / "mine")
    np.testing.assert_array_equal(d.x_train[:, 0].numpy(), mine["x_train"])


def test_read_idx_int32_and_no_gz_suffix_needed(tmp_path):
    arr = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    path = write_idx(tmp_path / "ints", arr, gz=True, type_code=0x0C)
    renamed = path.rename(tmp_path / "ints-without-suffix")  # detected by gzip magic bytes
    out = read_idx(renamed)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_corrupt_idx_magic(tmp_path):
    make_idx_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[0:2] = b"\x12\x34"
    path.write_bytes(bytes(raw))
    with pytest.raises(DalbtError, match="not an IDX file.*magic"):
        load_dataset("mnist", root=tmp_path)


def test_unknown_idx_type_code(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(struct.pack(">HBBI", 0, 0x42, 1, 2) + b"\x00\x00")
    with pytest.raises(DalbtError, match="type code 0x42"):
        read_idx(path)


def test_truncated_idx(tmp_path):
    make_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DalbtError, match="truncated"):
        load_dataset("fashion-mnist", root=tmp_path)
    path.write_bytes(struct.pack(">HBB", 0, 8, 3) + b"\x00\x00")  # cut inside the header
    with pytest.raises(DalbtError, match="truncated inside its IDX header"):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x", np.arange(2000, dtype=np.uint8).reshape(2, 1000) % 7, True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DalbtError, match=r"truncated gzip.*x\.gz"):
        read_idx(path)


def test_gz_suffix_without_gzip_data(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(struct.pack(">HBBI", 0, 8, 1, 1) + b"\x05")
    with pytest.raises(DalbtError, match="not gzip-compressed"):
        read_idx(path)


def test_idx_label_count_mismatch(tmp_path):
    make_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    with pytest.raises(DalbtError, match="6 images .* 5 labels"):
        load_dataset("mnist", root=tmp_path)


def test_missing_files_lists_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("DALBT_DATA", str(tmp_path / "env"))
    with pytest.raises(DalbtError) as info:
        load_dataset("fashion-mnist", root=tmp_path / "nowhere")
    msg = str(info.value)
    for place in [tmp_path / "nowhere", tmp_path / "nowhere" / "FashionMNIST" / "raw",
                  tmp_path / "nowhere" / "fashion-mnist", tmp_path / "env",
                  tmp_path / "system" / "fashion-mnist", tmp_path / "cache" / "dalbt"]:
        assert str(place) in msg
    for hint in ["apt-get install dataset-fashion-mnist", "--data-root", "DALBT_DATA",
                 "--download", "train-images-idx3-ubyte"]:
        assert hint in msg
    assert "\n" not in msg


def test_failed_download_raises(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DalbtError, match="download failed.*Error downloading"):
        load_dataset("mnist", root=tmp_path, download=True)


def test_download_goes_to_root_and_is_parsed(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def fake_kmnist(root, train, download):
        calls.append(root)
        make_idx_set(Path(root) / "KMNIST" / "raw", gz=True, seed=5)

    monkeypatch.setattr(tvd, "KMNIST", fake_kmnist)
    d = load_dataset("kmnist", root=tmp_path / "dl", download=True)
    assert calls == [str(tmp_path / "dl")] and d.n_train == 6
    load_dataset("kmnist", root=tmp_path / "dl", download=True)  # present now: no new download
    assert len(calls) == 1


def test_unknown_dataset_lists_names():
    with pytest.raises(DalbtError, match="unknown dataset 'nope'.*digits.*fashion-mnist.*folder"):
        load_dataset("nope")


def test_registry_and_listing():
    names = [n for n, _ in list_datasets()]
    assert names == list(DATASETS)
    assert {"digits", "mnist", "fashion-mnist", "kmnist", "cifar10", "svhn", "folder"} <= set(names)
    assert all(desc and "\n" not in desc for _, desc in list_datasets())


# --------------------------------------------------------------------------------------------
# CIFAR-10 pickle batches
# --------------------------------------------------------------------------------------------


def write_cifar(directory: Path, per_batch: int = 2, n_test: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    out = []
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if fname == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": fname.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with (directory / fname).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
        out.append((data, labels))
    names = [f"class{k}".encode() for k in range(10)]
    with (directory / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f, protocol=2)
    return out


def test_cifar10_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", root=tmp_path)
    assert tuple(d.x_train.shape) == (10, 3, 32, 32) and tuple(d.x_test.shape) == (3, 3, 32, 32)
    assert d.x_train.dtype == torch.uint8 and d.y_test.dtype == torch.int64
    assert d.classes == [f"class{k}" for k in range(10)]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    data2, labels2 = batches[1]
    assert d.x_train[2, 1, 5, 7].item() == data2[0, 1024 + 5 * 32 + 7]
    np.testing.assert_array_equal(d.x_train[2:4].reshape(2, -1).numpy(), data2)
    np.testing.assert_array_equal(d.y_train[2:4].numpy(), labels2)
    np.testing.assert_array_equal(d.x_test.reshape(3, -1).numpy(), batches[5][0])
    np.testing.assert_array_equal(d.y_test.numpy(), batches[5][1])


def test_cifar10_corrupt_batch(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DalbtError, match="corrupt CIFAR-10 batch .*data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


# --------------------------------------------------------------------------------------------
# SVHN .mat files
# --------------------------------------------------------------------------------------------


def write_svhn(path: Path, labels: list[int], seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
    scipy.io.savemat(path, {"X": x, "y": np.array(labels, dtype=np.uint8).reshape(-1, 1)})
    return x


def test_svhn_mat(tmp_path):
    x_tr = write_svhn(tmp_path / "train_32x32.mat", [10, 1, 9, 10], seed=0)
    x_te = write_svhn(tmp_path / "test_32x32.mat", [3, 10, 2], seed=1)
    d = load_dataset("svhn", root=tmp_path)
    assert tuple(d.x_train.shape) == (4, 3, 32, 32) and tuple(d.x_test.shape) == (3, 3, 32, 32)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    assert d.y_train.tolist() == [0, 1, 9, 0] and d.y_test.tolist() == [3, 0, 2]
    assert d.x_train[3, 2, 4, 17].item() == x_tr[4, 17, 2, 3]
    np.testing.assert_array_equal(d.x_test.numpy(), x_te.transpose(3, 2, 0, 1))
    assert d.classes == [str(k) for k in range(10)]


def test_svhn_corrupt_mat(tmp_path):
    write_svhn(tmp_path / "train_32x32.mat", [1], seed=0)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 50)
    with pytest.raises(DalbtError, match="SVHN file .*test_32x32.mat"):
        load_dataset("svhn", root=tmp_path)


# --------------------------------------------------------------------------------------------
# The user's own image folders
# --------------------------------------------------------------------------------------------


def rgb(seed: int, h: int = 5, w: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_read_image_folder_rgb_exact(tmp_path):
    imgs = {("cat", "a.png"): rgb(0), ("cat", "b.png"): rgb(1), ("dog", "a.png"): rgb(2)}
    for (cls, fname), arr in imgs.items():
        save_png(tmp_path / cls / fname, arr)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"junk")  # hidden: skipped
    x, y, classes = read_image_folder(tmp_path)
    assert classes == ["cat", "dog"] and y.dtype == np.int64 and y.tolist() == [0, 0, 1]
    assert x.dtype == np.uint8 and x.shape == (3, 3, 5, 6)
    for i, key in enumerate(imgs):
        np.testing.assert_array_equal(x[i], imgs[key].transpose(2, 0, 1))


def test_read_image_folder_grayscale_and_sizes(tmp_path):
    grays = [np.full((7, 4), v, np.uint8) for v in (0, 100, 255)]
    for k, g in enumerate(grays):
        save_png(tmp_path / "gray" / "a" / f"{k}.png", g)
    save_png(tmp_path / "gray" / "a" / "odd.png", np.zeros((3, 3), np.uint8))  # resized
    x, y, _ = read_image_folder(tmp_path / "gray")
    assert x.shape == (4, 1, 7, 4)  # one channel; most common size (H=7, W=4)
    for k, g in enumerate(grays):
        np.testing.assert_array_equal(x[k, 0], g)
    x, _, _ = read_image_folder(tmp_path / "gray", image_size=(2, 3))
    assert x.shape == (4, 1, 2, 3)
    # Mixed grayscale and colour: everything becomes 3 channels, gray replicated.
    save_png(tmp_path / "gray" / "b" / "c.png", rgb(3, 7, 4))
    x, y, classes = read_image_folder(tmp_path / "gray")
    assert x.shape == (5, 3, 7, 4) and classes == ["a", "b"] and y.tolist() == [0, 0, 0, 0, 1]
    np.testing.assert_array_equal(x[1], np.full((3, 7, 4), 100, np.uint8))


def test_unreadable_image_names_the_file(tmp_path):
    save_png(tmp_path / "a" / "good.png", rgb(0))
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DalbtError, match="cannot read image .*broken.png"):
        load_dataset("folder", root=tmp_path)


def test_folder_class_subfolders_split(tmp_path):
    for cls in ("ant", "bee", "cow"):
        for k in range(5):
            save_png(tmp_path / cls / f"{k}.png", rgb(10 * len(cls) + k + ord(cls[0])))
    d = load_dataset("folder", root=tmp_path)
    assert d.name == "folder" and d.classes == ["ant", "bee", "cow"]
    assert (d.n_train, d.n_test, d.channels, d.image_size) == (12, 3, 3, 5)
    assert sorted(d.y_test.tolist()) == [0, 1, 2]  # stratified: one of each class
    torch.manual_seed(123)
    np.random.seed(123)
    again = load_dataset("folder", root=tmp_path)  # deterministic, seed-independent
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)
    # Train and test together are exactly the images on disk.
    x_all, _, _ = read_image_folder(tmp_path)
    got = sorted(map(bytes, torch.cat([d.x_train, d.x_test]).numpy()))
    assert got == sorted(map(bytes, x_all))


def test_folder_train_test_layout(tmp_path):
    save_png(tmp_path / "train" / "x" / "0.png", rgb(0))
    save_png(tmp_path / "train" / "y" / "0.png", rgb(1))
    save_png(tmp_path / "train" / "y" / "1.png", rgb(2))
    save_png(tmp_path / "test" / "y" / "0.png", rgb(3))
    save_png(tmp_path / "test" / "z" / "0.png", rgb(4, 10, 12))  # resized to train's size
    d = load_dataset("folder", root=tmp_path)
    assert d.classes == ["x", "y", "z"]
    assert d.y_train.tolist() == [0, 1, 1] and d.y_test.tolist() == [1, 2]
    assert tuple(d.x_test.shape) == (2, 3, 5, 6)
    np.testing.assert_array_equal(d.x_test[0].numpy(), rgb(3).transpose(2, 0, 1))


def test_folder_flat_unlabelled(tmp_path):
    for k in range(3):
        save_png(tmp_path / f"img{k}.png", np.full((4, 4), 10 * k, np.uint8))
    (tmp_path / "readme.md").write_text("hello")
    d = load_dataset("folder", root=tmp_path)
    assert d.y_train.tolist() == [-1, -1, -1] and d.classes == [] and d.n_test == 0
    assert tuple(d.x_train.shape) == (3, 1, 4, 4) and tuple(d.x_test.shape) == (0, 1, 4, 4)
    assert d.x_train[2].unique().tolist() == [20]


def test_folder_errors(tmp_path):
    with pytest.raises(DalbtError, match="--data-root"):
        load_dataset("folder")
    with pytest.raises(DalbtError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DalbtError, match="no images found"):
        load_dataset("folder", root=tmp_path / "empty")
    save_png(tmp_path / "mixed" / "loose.png", rgb(0))
    save_png(tmp_path / "mixed" / "cls" / "a.png", rgb(1))
    with pytest.raises(DalbtError, match="mixes loose images"):
        load_dataset("folder", root=tmp_path / "mixed")


# --------------------------------------------------------------------------------------------
# digits (embedded) and the dataset container
# --------------------------------------------------------------------------------------------


def test_digits_split_and_scaling():
    from sklearn.datasets import load_digits

    d = load_dataset("digits")
    assert (d.n_train, d.n_test) == (1500, 297)
    assert tuple(d.x_train.shape[1:]) == (1, 8, 8) and d.x_train.dtype == torch.uint8
    assert d.classes == [str(k) for k in range(10)]
    counts = torch.bincount(d.y_test, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 30  # stratified
    # 0..16 -> 0..255 with rounding: 8 -> 127.5 -> 128, 16 -> 255.
    raw = load_digits().images
    levels = set(torch.cat([d.x_train, d.x_test]).unique().tolist())
    assert levels == {int(np.floor(v * 255 / 16 + 0.5)) for v in np.unique(raw)}
    assert {0, 128, 255} <= levels
    torch.manual_seed(7)
    np.random.seed(7)
    again = load_dataset("digits")
    assert torch.equal(again.x_test, d.x_test) and torch.equal(again.y_train, d.y_train)


def test_image_dataset_validates_and_reprs():
    x = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    y = torch.zeros(2, dtype=torch.int64)
    d = ImageDataset("t", x, y, x[:0], y[:0], ["a"])
    assert "n_train=2" in repr(d) and d.num_classes == 1
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset("t", x.float(), y, x, y, ["a"])
    with pytest.raises(ValueError, match="int64"):
        ImageDataset("t", x, y[:1], x, y, ["a"])


# --------------------------------------------------------------------------------------------
# The real Fashion-MNIST (Debian's dataset-fashion-mnist)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_FASHION.is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_system_root(monkeypatch):
    monkeypatch.setattr(ds, "SYSTEM_ROOT", REAL_FASHION.parent)
    d = load_dataset("fashion-mnist")
    assert (d.n_train, d.n_test, d.channels, d.image_size) == (60000, 10000, 1, 28)
    assert tuple(d.x_train.shape) == (60000, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert torch.bincount(d.y_test).tolist() == [1000] * 10
    assert d.classes[9] == "Ankle boot"
