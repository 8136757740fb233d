"""Pre-train the shared encoders of a bench config into its encoder cache, one seed at a time.

``dalbt bench`` pre-trains the encoders it needs before its workers start; this does only that,
so that the long pre-training of a stronger encoder (about an hour per seed for
``resnet18-w16`` on 2 CPU cores) can run across sessions, a seed at a time, and each finished
encoder be committed::

    python benchmarks/pretrain_encoders.py benchmarks/configs/fashion-mnist-heldout-r18.yaml \
        --seeds 3 4 5 6 7 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from dalbt.bench import expand, load_config
from dalbt.errors import DalbtError
from dalbt.loop import prepare_encoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="bench config (YAML) with pretrain_epochs > 0")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds, in this order (default: the config's)")
    p.add_argument("--out", default="runs/pretrain", help="experiment directory when the "
                   "config has no pretrain_cache")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        bench = load_config(args.config)
        template = expand(bench)[0][0].config  # the encoder ignores the strategy
        for seed in args.seeds if args.seeds is not None else bench.seeds:
            cfg = dataclasses.replace(template, seed=seed)
            key, made = prepare_encoder(cfg, args.out, progress=sys.stderr.isatty())
            print(f"seed {seed}: encoder {key} {'pre-trained' if made else 'already cached'}",
                  flush=True)
    except DalbtError as exc:
        print(f"pretrain_encoders: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
