"""Pilot for choosing the step-based recipe (issue 13), on a seed the reported benches never use.

Trains one round on a random labelled set of each size under each candidate recipe and prints
validation accuracy (what the choice is made on) and seconds. Test accuracy is not printed: the
recipe is frozen on validation, and the presets' seeds 0-4 report it afterwards.

    python benchmarks/recipe_pilot.py --dataset fashion-mnist --sizes 100 1100 --seed 100
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dalbt import rng as rngs
from dalbt.al_round import RoundData, run_round
from dalbt.data import load_dataset
from dalbt.distributed import SINGLE
from dalbt.loop import _Experiment
from dalbt.recipe import RunConfig, TrainConfig
from dalbt.strategies import Strategy

PAPER = TrainConfig(epochs=20)
CANDIDATES = {
    "paper (20 epochs)": PAPER,
    "steps 300": TrainConfig(steps=300, eval_every_steps=100),
    "steps 600": TrainConfig(steps=600, eval_every_steps=100),
    "steps 600 cosine": TrainConfig(steps=600, eval_every_steps=100, schedule="cosine",
                                    warmup_steps=30),
    "steps 600 cosine ce-aug": TrainConfig(steps=600, eval_every_steps=100, schedule="cosine",
                                           warmup_steps=30, ce_augment=True),
    "steps 600 cosine ce-aug balanced": TrainConfig(steps=600, eval_every_steps=100,
                                                    schedule="cosine", warmup_steps=30,
                                                    ce_augment=True, balanced=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1100])
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--pretrain-epochs", type=int, default=0,
                        help="also try the candidates fine-tuning a Barlow Twins encoder, and a "
                             "linear head on it")
    parser.add_argument("--only", nargs="*", help="candidate names to run")
    parser.add_argument("--cache", default="runs/pilot-cache", help="shared encoder cache")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    run = RunConfig(dataset=args.dataset, seed=args.seed, val_size=args.val_size,
                    train=TrainConfig(pretrain_epochs=args.pretrain_epochs),
                    pretrain_cache=args.cache)
    ex = _Experiment(run, None, data, SINGLE, print)  # the run's splits and models
    ex.directory = Path(args.cache)
    validation = ex.splits.validation
    order = rngs.numpy_rng(args.seed, rngs.SPLIT, 7).permutation(ex.candidates)
    new_model = ex.new_model

    candidates = {k: v for k, v in CANDIDATES.items() if not args.only or k in args.only}
    pretrained = None
    if args.pretrain_epochs:
        t0 = time.perf_counter()
        pretrained = ex.encoder().state(data.x_train, ex.candidates, new_model, True, print)
        print(f"pre-training: {time.perf_counter() - t0:.0f}s")
        for name, rec in list(candidates.items()):
            candidates[f"BT encoder + {name}"] = rec
        candidates["BT encoder, linear head"] = TrainConfig(
            finetune="head", pretrain_epochs=args.pretrain_epochs)
    print(f"| recipe | {' | '.join(f'val acc @ {n}' for n in args.sizes)} | seconds |")
    print(f"|---|{'---|' * len(args.sizes)}---|")
    for name, recipe in candidates.items():
        accs, secs = [], []
        for n in args.sizes:
            model = new_model(rngs.int_seed(args.seed, rngs.INIT, 0))
            if name.startswith("BT encoder") and pretrained is not None:
                model.load_state_dict(pretrained)
            rd = RoundData(images=data.x_train, targets=data.y_train,
                           num_classes=data.num_classes, labelled=np.sort(order[:n]),
                           validation=validation, unlabelled=order[n:])
            t0 = time.perf_counter()
            res = run_round(Strategy(), rd, replace(recipe), seed=args.seed, round_=0,
                            budget=0, new_model=new_model, model=model)
            secs.append(time.perf_counter() - t0)
            assert res.train is not None
            accs.append(res.train.val_acc)
        print(f"| {name} | {' | '.join(f'{100 * a:.1f}' for a in accs)} | "
              f"{' / '.join(f'{s:.0f}' for s in secs)} |", flush=True)


if __name__ == "__main__":
    main()
