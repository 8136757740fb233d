"""Named image datasets: where their files are looked for, and how they are loaded.

``load_dataset(name, root, download)`` returns an :class:`ImageDataset` of uint8 tensors. Files
are searched for in, in order: the explicit ``root``, ``$DALBT_DATA``,
``/usr/share/datasets/<name>`` (Debian's ``dataset-*`` packages) and the download cache
``$XDG_CACHE_HOME/dalbt`` (``~/.cache/dalbt``). Inside each of these, torchvision's layouts
(``FashionMNIST/raw``, ``cifar-10-batches-py``, ...) and a ``<name>`` sub-folder are searched
too, so data downloaded by torchvision is found as is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dalbt.catalogue import DATASETS as DESCRIPTIONS  # the torch-free listing
from dalbt.data import formats
from dalbt.errors import DalbtError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "ImageDataset",
    "candidate_roots",
    "default_download_root",
    "list_datasets",
    "load_dataset",
    "load_folder",
]

#: Environment variable naming a directory that holds (or receives) the datasets.
DATA_ENV = "DALBT_DATA"
#: Where Debian's ``dataset-*`` packages install their files (``<SYSTEM_ROOT>/<name>``).
SYSTEM_ROOT = Path("/usr/share/datasets")


@dataclass(repr=False)
class ImageDataset:
    """An image classification dataset held in memory.

    Attributes:
        name: Dataset name, e.g. ``"fashion-mnist"``.
        x_train: Training images ``(N, C, H, W)``, uint8.
        y_train: Training labels ``(N,)``, int64; ``-1`` marks an image without a label.
        x_test: Test images ``(M, C, H, W)``, uint8 (``M`` may be 0).
        y_test: Test labels ``(M,)``, int64.
        classes: Class names; label ``k`` is ``classes[k]``.
        ood: Optional ``(N,)`` bool mask over ``x_train``; ``True`` marks an out-of-distribution
            image (label ``-1``). ``None`` when the pool holds no OOD images.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str] = field(default_factory=list)
    ood: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train),
                            ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} "
                                 f"{tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} must be int64 ({x.shape[0]},), got {y.dtype} "
                                 f"{tuple(y.shape)}")
        if self.x_test.shape[0] and self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(f"train images {tuple(self.x_train.shape[1:])} and test images "
                             f"{tuple(self.x_test.shape[1:])} differ in shape")
        if self.ood is not None and (self.ood.dtype != torch.bool
                                     or self.ood.shape != (self.x_train.shape[0],)):
            raise ValueError(f"ood must be bool ({self.x_train.shape[0]},), got {self.ood.dtype} "
                             f"{tuple(self.ood.shape)}")

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Channels per image (1 or 3)."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        """Image height ``H`` in pixels."""
        return int(self.x_train.shape[2])

    @property
    def n_train(self) -> int:
        """Number of training images."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test images."""
        return int(self.x_test.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.x_train.shape[1:]
        return (f"ImageDataset(name={self.name!r}, n_train={self.n_train}, n_test={self.n_test}, "
                f"shape=({c}, {h}, {w}), num_classes={self.num_classes})")


Loader = Callable[[Path | None, bool], ImageDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one named dataset.

    Attributes:
        name: The dataset's name in :data:`DATASETS`.
        description: One line for listings.
        loader: ``loader(root, download)`` returning the :class:`ImageDataset`.
    """

    name: str
    description: str
    loader: Loader


# --------------------------------------------------------------------------------------------
# Where to look
# --------------------------------------------------------------------------------------------


def default_download_root() -> Path:
    """The download cache used when neither ``root`` nor ``$DALBT_DATA`` is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "dalbt"


def _unique(paths: Sequence[Path]) -> list[Path]:
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def candidate_roots(name: str, root: str | os.PathLike | None) -> list[Path]:
    """Base directories searched for dataset ``name``, in order.

    Args:
        name: Dataset name.
        root: Explicit data root (searched first), or ``None``.

    Returns:
        ``[root, $DALBT_DATA, /usr/share/datasets/<name>, download cache]`` without the unset
        ones; just ``[root]`` for the ``folder`` dataset.
    """
    roots = [Path(root).expanduser()] if root is not None else []
    if name == "folder":
        return roots
    env = os.environ.get(DATA_ENV)
    if env:
        roots.append(Path(env).expanduser())
    roots.append(SYSTEM_ROOT / name)
    roots.append(default_download_root())
    return _unique(roots)


def _search_dirs(name: str, roots: Sequence[Path], layouts: Sequence[str]) -> list[Path]:
    """Each root itself, its ``<name>`` sub-folder and the given (torchvision) layouts."""
    dirs = []
    for r in roots:
        dirs.append(r)
        dirs.extend(r / sub for sub in layouts)
        if r.name != name:  # /usr/share/datasets/<name> needs no second <name>
            dirs.append(r / name)
    return _unique(dirs)


def _download_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else default_download_root()


def _missing_error(display: str, name: str, wanted: str, searched: Sequence[Path],
                   download_failed: str | None = None) -> DalbtError:
    hints = []
    if name == "fashion-mnist":
        hints.append("install Debian's package (sudo apt-get install dataset-fashion-mnist)")
    hints.append("pass --download to fetch them with torchvision (needs internet)")
    hints.append(f"put the files in a directory DIR and pass --data-root DIR or set "
                 f"${DATA_ENV}=DIR")
    msg = (f"{display} files not found: looked for {wanted} in "
           f"{', '.join(str(p) for p in searched)}. To get them: {'; or '.join(hints)}.")
    if download_failed:
        msg = f"{display}: download failed ({download_failed}); " + msg
    return DalbtError(msg)


def _try_download(fetch: Callable[[Path], None],
                  root: str | os.PathLike | None) -> tuple[Path, str | None]:
    """Run ``fetch(target)``; returns the target root and an error text (``None`` if ok)."""
    target = _download_root(root)
    try:
        target.mkdir(parents=True, exist_ok=True)
        fetch(target)
    except Exception as exc:  # network, permission and torchvision errors alike
        return target, f"{type(exc).__name__}: {exc}"
    return target, None


def _tensor(arr: np.ndarray) -> torch.Tensor:
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    return torch.from_numpy(arr)


def _make(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
          y_test: np.ndarray, classes: Sequence[str]) -> ImageDataset:
    return ImageDataset(
        name=name,
        x_train=_tensor(x_train.astype(np.uint8, copy=False)),
        y_train=_tensor(y_train.astype(np.int64, copy=False)),
        x_test=_tensor(x_test.astype(np.uint8, copy=False)),
        y_test=_tensor(y_test.astype(np.int64, copy=False)),
        classes=list(classes),
    )


def _check_labels(name: str, y: np.ndarray, num_classes: int, where: Path) -> None:
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DalbtError(f"{name} labels in {where} fall outside 0..{num_classes - 1} "
                         f"(found {y.min()}..{y.max()}); the files are corrupt or mixed up")


# --------------------------------------------------------------------------------------------
# IDX datasets: MNIST, Fashion-MNIST, KMNIST
# --------------------------------------------------------------------------------------------

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


def _find_idx_file(directory: Path, base: str) -> Path | None:
    dotted = base.replace("-idx", ".idx")  # "train-images.idx3-ubyte", as some archives name it
    for fname in (base, base + ".gz", dotted, dotted + ".gz"):
        if (directory / fname).is_file():
            return directory / fname
    return None


def _find_idx_set(dirs: Sequence[Path]) -> dict[str, Path] | None:
    for d in dirs:
        found = {key: _find_idx_file(d, base) for key, base in _IDX_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _read_idx_set(name: str, display: str, files: dict[str, Path],
                  classes: list[str]) -> ImageDataset:
    arrays = {key: formats.read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xp, yp = files[f"x_{split}"], files[f"y_{split}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DalbtError(f"{xp}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
        if y.ndim != 1:
            raise DalbtError(f"{yp}: expected labels (N,), got shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise DalbtError(f"{display} {split} split: {x.shape[0]} images in {xp} but "
                             f"{y.shape[0]} labels in {yp}")
        _check_labels(display, y, len(classes), yp)
    return _make(name, arrays["x_train"][:, None], arrays["y_train"],
                 arrays["x_test"][:, None], arrays["y_test"], classes)


def _idx_loader(name: str, display: str, tv_dir: str, tv_class: str,
                classes: list[str]) -> Loader:
    def load(root: Path | None, download: bool) -> ImageDataset:
        dirs = _search_dirs(name, candidate_roots(name, root), [f"{tv_dir}/raw"])
        files = _find_idx_set(dirs)
        error = None
        if files is None and download:
            def fetch(target: Path) -> None:
                import torchvision.datasets as tvd

                getattr(tvd, tv_class)(root=str(target), train=True, download=True)

            target, error = _try_download(fetch, root)
            if error is None:
                files = _find_idx_set(_search_dirs(name, [target], [f"{tv_dir}/raw"]))
        if files is None:
            wanted = " ".join(f"{b}[.gz]" for b in _IDX_FILES.values())
            raise _missing_error(display, name, wanted, dirs, error)
        return _read_idx_set(name, display, files, classes)

    return load


# --------------------------------------------------------------------------------------------
# CIFAR-10 and SVHN
# --------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_CIFAR_LAYOUTS = ["cifar-10-batches-py"]


def _find_cifar(dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        if all((d / f).is_file() for f in _CIFAR_FILES):
            return d
    return None


def _load_cifar10(root: Path | None, download: bool) -> ImageDataset:
    dirs = _search_dirs("cifar10", candidate_roots("cifar10", root), _CIFAR_LAYOUTS)
    found = _find_cifar(dirs)
    error = None
    if found is None and download:
        def fetch(target: Path) -> None:
            import torchvision.datasets as tvd

            tvd.CIFAR10(root=str(target), train=True, download=True)

        target, error = _try_download(fetch, root)
        if error is None:
            found = _find_cifar(_search_dirs("cifar10", [target], _CIFAR_LAYOUTS))
    if found is None:
        raise _missing_error("CIFAR-10", "cifar10", " ".join(_CIFAR_FILES), dirs, error)
    x_train, y_train, x_test, y_test = formats.read_cifar10(found)
    classes = (formats.read_cifar10_classes(found) if (found / "batches.meta").is_file()
               else CIFAR10_CLASSES)
    _check_labels("CIFAR-10", y_train, len(classes), found)
    _check_labels("CIFAR-10", y_test, len(classes), found)
    return _make("cifar10", x_train, y_train, x_test, y_test, classes)


_SVHN_FILES = ["train_32x32.mat", "test_32x32.mat"]
_SVHN_LAYOUTS = ["SVHN"]


def _find_svhn(dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        if all((d / f).is_file() for f in _SVHN_FILES):
            return d
    return None


def _load_svhn(root: Path | None, download: bool) -> ImageDataset:
    dirs = _search_dirs("svhn", candidate_roots("svhn", root), _SVHN_LAYOUTS)
    found = _find_svhn(dirs)
    error = None
    if found is None and download:
        def fetch(target: Path) -> None:
            import torchvision.datasets as tvd

            for split in ("train", "test"):
                tvd.SVHN(root=str(target), split=split, download=True)

        target, error = _try_download(fetch, root)
        if error is None:
            found = _find_svhn(_search_dirs("svhn", [target], _SVHN_LAYOUTS))
    if found is None:
        raise _missing_error("SVHN", "svhn", " ".join(_SVHN_FILES), dirs, error)
    x_train, y_train = formats.read_svhn(found / "train_32x32.mat")
    x_test, y_test = formats.read_svhn(found / "test_32x32.mat")
    return _make("svhn", x_train, y_train, x_test, y_test, DIGIT_CLASSES)


# --------------------------------------------------------------------------------------------
# digits (embedded in scikit-learn) and the user's own folder of images
# --------------------------------------------------------------------------------------------

DIGITS_TEST_SIZE = 297


def _load_digits(root: Path | None, download: bool) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # 0..16 -> 0..255, rounding half up.
    x = np.floor(bunch.images * (255.0 / 16.0) + 0.5).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE,
                                           random_state=0, stratify=y)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return _make("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test], DIGIT_CLASSES)


FOLDER_TEST_FRACTION = 0.2


def _stratified_split(y: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (seed-independent) per-class split; returns sorted train and test indices."""
    rng = np.random.default_rng(0)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_test = int(len(idx) * test_fraction + 0.5)
        test.append(rng.permutation(idx)[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    train_mask = np.ones(len(y), dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_folder(root: str | os.PathLike | None,
                image_size: int | Sequence[int] | None = None) -> ImageDataset:
    """Load the user's own images from a folder.

    Layouts: ``root/train/`` and ``root/test/`` (each with class sub-folders, or flat); or class
    sub-folders directly in ``root``, split 80/20 per class with a fixed seed; or a flat folder
    of unlabelled images (label ``-1``, empty test set).

    Args:
        root: The folder (required).
        image_size: Common size ``S`` or ``(H, W)``; ``None`` for the most common size.

    Returns:
        The dataset, named ``"folder"``.

    Raises:
        DalbtError: If ``root`` is missing or holds no readable images.
    """
    if root is None:
        raise DalbtError("the 'folder' dataset needs the folder of your images: pass "
                         "--data-root DIR (one sub-folder per class, or a flat folder)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DalbtError(f"image folder {root} does not exist or is not a directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_paths, train_names = formats.scan_image_folder(root / "train")
        test_paths, test_names = formats.scan_image_folder(root / "test")
        # Decode together so both splits share one size and channel count.
        x = formats.load_images(train_paths + test_paths, image_size)
        names = train_names + test_names
        classes = sorted({n for n in names if n is not None})
        index = {n: i for i, n in enumerate(classes)}
        y = np.array([index[n] if n is not None else -1 for n in names], dtype=np.int64)
        n = len(train_paths)
        return _make("folder", x[:n], y[:n], x[n:], y[n:], classes)
    x, y, classes = formats.read_image_folder(root, image_size)
    if not classes:
        return _make("folder", x, y, x[:0], y[:0], classes)
    idx_train, idx_test = _stratified_split(y, FOLDER_TEST_FRACTION)
    return _make("folder", x[idx_train], y[idx_train], x[idx_test], y[idx_test], classes)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec("digits", DESCRIPTIONS["digits"], _load_digits),
        DatasetSpec("mnist", DESCRIPTIONS["mnist"],
                    _idx_loader("mnist", "MNIST", "MNIST", "MNIST", DIGIT_CLASSES)),
        DatasetSpec("fashion-mnist", DESCRIPTIONS["fashion-mnist"],
                    _idx_loader("fashion-mnist", "Fashion-MNIST", "FashionMNIST",
                                "FashionMNIST", FASHION_MNIST_CLASSES)),
        DatasetSpec("kmnist", DESCRIPTIONS["kmnist"],
                    _idx_loader("kmnist", "KMNIST", "KMNIST", "KMNIST", KMNIST_CLASSES)),
        DatasetSpec("cifar10", DESCRIPTIONS["cifar10"], _load_cifar10),
        DatasetSpec("svhn", DESCRIPTIONS["svhn"], _load_svhn),
        DatasetSpec("folder", DESCRIPTIONS["folder"], lambda root, download: load_folder(root)),
    ]
}


def list_datasets() -> list[tuple[str, str]]:
    """Names and one-line descriptions of the known datasets.

    Returns:
        ``[(name, description), ...]`` in registry order.
    """
    return [(spec.name, spec.description) for spec in DATASETS.values()]


def load_dataset(name: str, root: str | os.PathLike | None = None,
                 download: bool = False) -> ImageDataset:
    """Load a dataset by name.

    Args:
        name: One of :data:`DATASETS` (case-insensitive; ``_`` may stand for ``-``).
        root: Directory to search first (``--data-root``); required for ``folder``.
        download: Fetch missing files with torchvision into ``root``, ``$DALBT_DATA`` or the
            download cache.

    Returns:
        The dataset with uint8 images ``(N, C, H, W)`` and int64 labels.

    Raises:
        DalbtError: For an unknown name, missing files (the message lists every place searched
            and how to get the files), a failed download or corrupt files.
    """
    key = name.strip().lower().replace("_", "-")
    spec = DATASETS.get(key)
    if spec is None:
        raise DalbtError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return spec.loader(Path(root).expanduser() if root is not None else None, download)
