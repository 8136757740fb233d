"""Active learning on a folder of images (torchvision's ImageFolder layout) with a small CNN.

The example writes 200 digits as PNG files into ``<dir>/<class>/`` first; point ``--images``
at your own folder instead. Run: ``python examples/learner_image_folder.py [--images DIR]``.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

import dalbt


class SmallCNN(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                                     nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def write_folder(root: Path, n: int = 200) -> None:
    d = load_digits()
    for i in range(n):
        folder = root / str(d.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=Path, help="an ImageFolder tree (default: digits)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.images or Path(tmp) / "digits"
        if args.images is None:
            write_folder(root)
        pool = dalbt.from_image_folder(root, image_size=16, channels=1)
        learner = dalbt.ActiveLearner(SmallCNN(len(pool.classes)), pool, strategy="badge",
                                      recipe=dalbt.TrainConfig(epochs=10), cold_start_epochs=2)
        for _ in range(args.rounds):
            picked = learner.query(10)
            # the folder names are the answers here; a person would label these images
            learner.teach(picked, pool.y_train[picked])
            print(f"queried {picked.tolist()}")
        print(f"labelled {len(learner.labelled)} of {pool.n_train} images")


if __name__ == "__main__":
    main()
