"""Active learning with your own PyTorch model: a 2-layer MLP on scikit-learn's digits.

The labels of the pool play the oracle: each round, the learner asks for 20 images and is
taught their true classes. Run: ``python examples/learner_own_model.py [--rounds N]``.
"""

import argparse

import torch
from torch import nn

import dalbt


class MLP(nn.Module):
    """Your model: dalbt needs an ``encoder`` (images -> latent) and a ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(),
                                     nn.Linear(128, 64), nn.ReLU())
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    digits = dalbt.load_dataset("digits")  # 1500 pool images (1, 8, 8) and 297 test images
    test = (digits.x_test, digits.y_test)
    learner = dalbt.ActiveLearner(MLP(), digits, strategy="margin", test=test, seed=0,
                                  recipe=dalbt.TrainConfig(epochs=args.epochs),
                                  cold_start_epochs=5)
    oracle = digits.y_train  # in real use: a person labels the queried images
    for _ in range(args.rounds):
        picked = learner.query(20)
        learner.teach(picked, oracle[picked])
        report = learner.fit()
        print(f"{report['n_labelled']:4d} labels: test accuracy {report['test_acc']:.3f}")


if __name__ == "__main__":
    main()
