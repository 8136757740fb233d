"""Time one Fashion-MNIST AL round, split into train / score pool / select.

Runs the real loop (``run_experiment`` with rounds=1) on the paper's protocol (100 initial,
budget 100, LeNet, 5,000 validation images) and prints the timings it stored for round 0 (the
round-1 model it also trains is not reported), then measures raw pool-scoring throughput of
LeNet (target: >= 15,000 images/s on 2 cores).

Usage: python benchmarks/round_time.py [--epochs 20] [--strategy weibull] [--threads 2]

The step recipe and the shared encoder (issue 13), e.g. a round on 1,100 labels::

    python benchmarks/round_time.py --initial 1100 --val-size 1000 --steps 600 \
        --eval-every-steps 100 --pretrain-epochs 10 --pretrain-cache benchmarks/results/encoders
    python benchmarks/round_time.py --initial 1100 --val-size 1000 --finetune head \
        --pretrain-epochs 10 --pretrain-cache benchmarks/results/encoders --round 1

(the encoder is read from the cache when the benches pre-trained it; its one-off time is in
the cache's JSON and is not part of a round). ``--round 1`` reports a run's second round (with
``--initial`` labels in it): under ``--finetune head`` round 0 also encodes every image once,
which later rounds reuse.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from dalbt.data import load_dataset
from dalbt.loop import RunConfig, run_experiment
from dalbt.models import build_model
from dalbt.store import Store
from dalbt.train import TrainConfig, infer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--strategy", nargs="+", default=["weibull", "random"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--initial", type=int, default=100, help="labelled images of the round")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--eval-every-steps", type=int, default=None)
    p.add_argument("--finetune", default="all")
    p.add_argument("--pretrain-epochs", type=int, default=0)
    p.add_argument("--pretrain-cache", default=None)
    p.add_argument("--round", type=int, default=0, dest="report_round",
                   help="report this round (later rounds of a --finetune head run reuse the "
                        "frozen encoder's latents that round 0 computed)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)

    recipe = (f"{args.steps} steps" if args.steps else f"{args.epochs} epochs") + (
        f", finetune {args.finetune}, pre-trained {args.pretrain_epochs} epochs"
        if args.pretrain_epochs else "")
    print(f"{args.dataset}: {data.n_train} train, {args.threads} threads, LeNet, {recipe}, "
          f"round {args.report_round}, {args.initial} labelled, {args.val_size} validation, "
          "budget 100")
    print(f"{'strategy':>10} {'train s':>8} {'score s':>8} {'select s':>9} {'total s':>8}")
    for name in ["warm-up", *args.strategy]:
        # the first run pays one-off costs (thread pools, allocator): it is not reported
        warm = name == "warm-up"
        train = TrainConfig(epochs=1) if warm else TrainConfig(
            epochs=args.epochs, steps=args.steps, eval_every_steps=args.eval_every_steps,
            finetune=args.finetune, pretrain_epochs=args.pretrain_epochs)
        cfg = RunConfig(dataset=args.dataset, strategy=args.strategy[0] if warm else name,
                        initial=args.initial - 100 * args.report_round, budget=100,
                        rounds=args.report_round + 1, val_size=args.val_size,
                        train=train, pretrain_cache=args.pretrain_cache)
        with tempfile.TemporaryDirectory() as d, Store(d) as store:
            run = run_experiment(cfg, store, progress=False, data=data, log=lambda s: None)
            rec = store.rounds(run.id)[args.report_round]
        if warm:
            continue
        total = rec["t_train"] + rec["t_score"] + rec["t_select"]
        print(f"{name:>10} {rec['t_train']:8.2f} {rec['t_score']:8.2f} {rec['t_select']:9.3f} "
              f"{total:8.2f}")

    model = build_model("lenet", data.channels, data.image_size, data.num_classes, seed=0)
    pool = np.arange(data.n_train)
    infer(model, data.x_train, pool[:4096])  # warm-up
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        infer(model, data.x_train, pool)
        best = max(best, len(pool) / (time.perf_counter() - t0))
    print(f"pool scoring (logits + latents, LeNet, {len(pool)} images): {best:,.0f} images/s "
          f"(best of 3)")


if __name__ == "__main__":
    main()
