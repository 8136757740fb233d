"""Class balance of the queried batches in a bench directory.

For every curve (runs grouped as ``dalbt report`` groups them), the share of each round's batch
taken by its most frequent true class, averaged over rounds and seeds, and the largest share
seen; 0.1 is a perfectly balanced batch on a 10-class dataset.

    python benchmarks/query_balance.py benchmarks/results/fashion-mnist-small [--only PATTERN]
"""

from __future__ import annotations

import argparse
import fnmatch
from collections import defaultdict
from pathlib import Path

import numpy as np

from dalbt.data import load_dataset
from dalbt.report import _label, bench_labels
from dalbt.store import FULL_DATA, Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("directory")
    ap.add_argument("--only", action="append", default=None, help="label pattern (repeatable)")
    args = ap.parse_args()
    directory = Path(args.directory)
    names = bench_labels(directory)
    shares: dict[str, list[float]] = defaultdict(list)
    targets: dict[str, np.ndarray] = {}
    with Store(directory, create=False) as store:
        for run in store.runs():
            if run.strategy == FULL_DATA:
                continue
            label = names.get(run.key) or _label(run.strategy,
                                                 run.config.get("strategy_options") or {})
            if args.only and not any(fnmatch.fnmatchcase(label, p) for p in args.only):
                continue
            if run.dataset not in targets:
                targets[run.dataset] = load_dataset(run.dataset).y_train.numpy()
            y = targets[run.dataset]
            for rec in store.rounds(run.id):
                q = np.asarray(rec["queried"], dtype=np.int64)
                if len(q):
                    shares[label].append(np.bincount(y[q]).max() / len(q))
    print(f"{'strategy':32s} {'batches':>7s} {'mean top-class share':>21s} {'max':>6s}")
    for label in sorted(shares, key=lambda k: np.mean(shares[k])):
        s = np.array(shares[label])
        print(f"{label:32s} {len(s):7d} {s.mean():21.3f} {s.max():6.2f}")


if __name__ == "__main__":
    main()
