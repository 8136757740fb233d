"""Issue 14's held-out tables and figure: the three protocols side by side.

Reads bench directories (``LABEL=DIR``) through :mod:`dalbt.report`, prints one markdown
table per protocol (AUBC, final accuracy, labels to reach 90 % of the full-data accuracy,
rounds significantly better / worse than ``random`` with a paired t-test over the shared
seeds, and, on open-set pools, the mean fraction of queries out of distribution and the labels
gained), and draws one panel of mean learning curves per protocol plus, when a bench has an
open-set pool, one of its out-of-distribution fraction per round.

    python benchmarks/heldout.py "(a) closed=benchmarks/results/heldout" \\
        "(b) open=benchmarks/results/heldout-open" \\
        "(c) cold start=benchmarks/results/heldout-cold" \\
        --seeds 3,4,5,6,7 --plot benchmarks/results/heldout.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dalbt.report import (
    Curve,
    bench_labels,
    ci95_halfwidth,
    labels_to_reach,
    load_ceilings,
    load_curves,
    paired_wins,
    select_seeds,
)
from dalbt.store import Store


def _gained(store: Store, names: dict[str, str]) -> dict[tuple[str, int], int]:
    """Labels each finished run obtained after its initial set, by (label, seed) (the oracle
    labels only images of known classes)."""
    out = {}
    for run in store.runs():
        rounds = store.rounds(run.id) if run.status == "finished" else []
        if rounds and run.key in names:
            out[names[run.key], run.seed] = rounds[-1]["n_labelled"] - rounds[0]["n_labelled"]
    return out


def _versus(a: Curve, b: Curve) -> str:
    """'wins/losses' of ``a`` against ``b`` over their shared seeds."""
    shared = sorted(set(a.seeds) & set(b.seeds))
    ia = [a.seeds.index(s) for s in shared]
    ib = [b.seeds.index(s) for s in shared]
    r = min(a.acc.shape[1], b.acc.shape[1])
    won, n = paired_wins(a.acc[ia, :r], b.acc[ib, :r])
    lost, _ = paired_wins(b.acc[ib, :r], a.acc[ia, :r])
    return f"{won} / {lost} of {n}"


def table(label: str, directory: Path, seeds: list[int] | None) -> list[Curve]:
    """Print the protocol's markdown table; return its curves."""
    names = bench_labels(directory)
    with Store(directory) as store:
        curves = load_curves(store, names)
        ceiling = load_ceilings(store)
        gained = _gained(store, names)
    if seeds is not None:
        curves = select_seeds(curves, seeds)
    # only the seeds whose run finished, and only curves with at least two of them
    done = [select_seeds([c], [s for s, row in zip(c.seeds, c.acc, strict=True)
                               if not np.isnan(row).any()]) for c in curves]
    curves = [cs[0] for cs in done if cs and len(cs[0].seeds) >= 2]
    full = next(iter(ceiling.values()), None)
    base = next((c for c in curves if c.label == "random"), None)
    open_set = any(c.ood is not None for c in curves)
    head = ["strategy", "seeds", "AUBC", "final acc (% ± 95 % CI)", "labels to 90 % of full",
            "vs random: better / worse rounds"]
    if open_set:
        head += ["OOD fraction of queries", "labels gained"]
    print(f"\n### {label}" + (f" (full-data accuracy {100 * full:.2f} %)" if full else ""))
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for c in sorted(curves, key=lambda c: -float(np.nanmean(c.aubc_per_seed))):
        a = c.aubc_per_seed
        done = c.acc[:, -1]  # every seed kept finished its run
        half = ci95_halfwidth(done[:, None])[0]
        reach = labels_to_reach(c.n_labelled, c.mean, full, 90) if full else None
        row = [c.label, str(len(c.seeds)), f"{np.nanmean(a):.3f} ± {np.nanstd(a, ddof=1):.3f}",
               f"{100 * done.mean():.2f} ± {100 * half:.2f} @ {c.n_labelled[-1]}",
               "—" if reach is None else str(int(reach)),
               "" if base is None or c is base else _versus(c, base)]
        if open_set:
            ood = "" if c.ood is None else f"{np.nanmean(c.ood):.3f}"
            row += [ood, f"{np.mean([gained[c.label, s] for s in c.seeds]):.0f}"]
        print("| " + " | ".join(row) + " |")
    return curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benches", nargs="+", metavar="LABEL=DIR")
    p.add_argument("--seeds", default=None, help="only these seeds, e.g. 3,4,5,6,7")
    p.add_argument("--plot", help="write the figure here (png; an svg beside it)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    panels: list[tuple[str, list[Curve]]] = []
    for item in args.benches:
        label, sep, directory = item.partition("=")
        if not sep or not Path(directory, "dalbt.sqlite").is_file():
            sys.exit(f"error: {item!r} is not LABEL=DIR with a dalbt store in DIR")
        panels.append((label, table(label, Path(directory), seeds)))
    if args.plot:
        plot(panels, Path(args.plot))


def plot(panels: list[tuple[str, list[Curve]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ood = [(label, cs) for label, cs in panels if any(c.ood is not None for c in cs)]
    n = len(panels) + len(ood)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    colours: dict[str, object] = {}
    cmap = plt.get_cmap("tab20")
    for ax, (label, curves) in zip(axes[0], panels, strict=False):
        for c in curves:
            colour = colours.setdefault(c.label, cmap(len(colours) % 20))
            bold = c.label in ("dalbt", "random")
            ax.plot(c.n_labelled, 100 * c.mean, label=c.label, color=colour,
                    lw=2.4 if bold else 1.2, ls="-" if c.label != "random" else "--")
        ax.set_title(label)
        ax.set_xlabel("labels bought")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.grid(alpha=0.3)
    for ax, (label, curves) in zip(axes[0][len(panels):], ood, strict=False):
        for c in curves:
            if c.ood is not None:  # the last round queries nothing
                ax.plot(np.arange(c.ood.shape[1] - 1), np.nanmean(c.ood[:, :-1], axis=0),
                        label=c.label, color=colours[c.label],
                        lw=2.4 if c.label in ("dalbt", "random") else 1.2)
        ax.set_title(f"{label}: queries out of distribution")
        ax.set_xlabel("round whose queries are counted")
        ax.set_ylabel("fraction of the batch, mean over seeds")
        ax.grid(alpha=0.3)
    handles: dict[str, object] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    fig.savefig(path.with_suffix(".svg"))
    print(f"\nfigure: {path} (and {path.with_suffix('.svg').name})")


if __name__ == "__main__":
    main()
