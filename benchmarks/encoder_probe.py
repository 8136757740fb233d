"""Linear-probe test accuracy of a shared encoder at 100 / 1,000 / all labels (issue 22).

The encoder's latents of all Fashion-MNIST images (eval mode), then the frozen-encoder recipe's
head (multinomial logistic regression, L2 chosen on the seed's 1,000-image validation split) on
the first 100, 1,000 and all of a seed-permuted order of the other 59,000 training images::

    python benchmarks/encoder_probe.py benchmarks/results/encoders/encoders/KEY.pt MODEL SEED
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dalbt import load_dataset
from dalbt.data.pool import make_splits
from dalbt.models import build_model
from dalbt.probe import L2_GRID, fit_path, select_on_validation
from dalbt.train import infer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("weights", help="an encoder cache .pt file")
    p.add_argument("model", help="its model name (lenet, resnet18-w16, ...)")
    p.add_argument("seed", type=int, help="its seed (the validation split)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("fashion-mnist")
    x, y = ds.x_train, ds.y_train
    model = build_model(args.model, 1, 28, 10, seed=0)
    model.load_state_dict(torch.load(args.weights, weights_only=True), strict=False)
    val = make_splits(len(x), 1000, 100, args.seed).validation
    order = np.random.default_rng(args.seed).permutation(np.setdiff1d(np.arange(len(x)), val))
    t0 = time.time()
    z = infer(model, x, np.arange(len(x))).latents
    z_test = infer(model, ds.x_test, np.arange(len(ds.x_test))).latents
    print(f"embedded {len(x) + len(z_test)} images in {time.time() - t0:.0f}s", flush=True)
    l2s = sorted(set(L2_GRID) | {1e-5}, reverse=True)
    for n in (100, 1000, len(order)):
        lab = order[:n]
        fit, _, _ = select_on_validation(fit_path(z[lab], y[lab], 10, l2s), z[val], y[val])
        print(f"{args.model} seed {args.seed}, {n} labels: linear probe test "
              f"{100 * fit.accuracy(z_test, ds.y_test):.2f} %", flush=True)


if __name__ == "__main__":
    main()
