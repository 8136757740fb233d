"""Put the benches of one protocol under several training recipes side by side.

Reads each bench directory's ``summary.csv``, ``results.csv`` and ``summary.md`` (written by
``dalbt report DIR``), prints a markdown table (AUBC and final accuracy per strategy and
recipe, the full-data reference per recipe) and draws one panel per strategy with the mean
learning curve of each recipe.

    python benchmarks/recipe_compare.py \\
        "(a) paper=benchmarks/results/fashion-mnist-paper4" \\
        "(b) steps=benchmarks/results/fashion-mnist-steps" \\
        "(c) steps + encoder=benchmarks/results/fashion-mnist-ssl" \\
        "(d) linear head=benchmarks/results/fashion-mnist-probe" \\
        --plot benchmarks/results/recipes.png
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        sys.exit(f"error: {path} is missing; run 'dalbt report {path.parent}' first")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _full_data(directory: Path) -> str:
    match = re.search(r"Full-data accuracy: ([0-9.]+) %",
                      (directory / "summary.md").read_text(encoding="utf-8"))
    return f"{match.group(1)} %" if match else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benches", nargs="+", metavar="LABEL=DIR")
    p.add_argument("--plot", help="write the learning curves here (png; an svg beside it)")
    args = p.parse_args()
    benches: dict[str, Path] = {}
    for item in args.benches:
        label, sep, directory = item.partition("=")
        if not sep:
            sys.exit(f"error: {item!r} is not LABEL=DIR")
        benches[label] = Path(directory)

    summary = {label: {row["strategy"]: row for row in _read_csv(d / "summary.csv")}
               for label, d in benches.items()}
    strategies = sorted({s for rows in summary.values() for s in rows})
    print("| strategy | " + " | ".join(benches) + " |")
    print("|---|" + "---|" * len(benches))
    for strategy in strategies:
        cells = []
        for label in benches:
            row = summary[label].get(strategy)
            if row is None:
                cells.append("-")
                continue
            cells.append(f"{float(row['aubc_mean']):.3f} ± {float(row['aubc_std']):.3f}; "
                         f"{100 * float(row['final_acc_mean']):.2f} ± "
                         f"{100 * float(row['final_acc_ci95']):.2f} % @ {row['final_bought']}")
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    print("| full data | " + " | ".join(_full_data(d) for d in benches.values()) + " |")

    if args.plot:
        _plot(benches, strategies, Path(args.plot))


def _plot(benches: dict[str, Path], strategies: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, d in benches.items():
        for row in _read_csv(d / "results.csv"):
            curves[(label, row["strategy"])][int(row["n_labelled"])].append(
                100 * float(row["test_acc"]))
    fig, axes = plt.subplots(1, len(strategies), figsize=(4 * len(strategies), 3.6),
                             sharey=True, squeeze=False)
    for ax, strategy in zip(axes[0], strategies, strict=True):
        for label in benches:
            points = curves.get((label, strategy))
            if not points:
                continue
            xs = sorted(points)
            ax.plot(xs, [np.mean(points[x]) for x in xs], marker=".", label=label)
        ax.set_title(strategy)
        ax.set_xlabel("labels bought")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean over seeds")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    fig.savefig(out.with_suffix(".svg"))
    print(f"plot: {out} (and {out.with_suffix('.svg').name})")


if __name__ == "__main__":
    main()
