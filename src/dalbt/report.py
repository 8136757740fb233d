"""Learning curves and tables from an experiment directory's store."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dalbt.errors import DalbtError
from dalbt.store import Store


@dataclass
class Curve:
    """Test accuracy per round of one (dataset, strategy) group over its seeds.

    Attributes:
        dataset: Dataset name.
        label: Strategy name, with its options when it has any.
        seeds: Seeds of the runs, (S,).
        n_labelled: Labels bought by each round, ``initial + budget * round``, (R,). Without
            out-of-distribution images this is the labelled-set size; with them, queried OOD
            images are paid for but give no label, so the labelled set is smaller.
        acc: Test accuracy, (S, R); NaN where a run has not reached that round.
        ood: Fraction of each round's queries that were out of distribution, (S, R); NaN
            where not recorded.
    """

    dataset: str
    label: str
    seeds: list[int]
    n_labelled: np.ndarray
    acc: np.ndarray
    ood: np.ndarray | None = None

    @property
    def mean(self) -> np.ndarray:
        return np.nanmean(self.acc, axis=0)

    @property
    def std(self) -> np.ndarray:
        if self.acc.shape[0] < 2:
            return np.zeros(self.acc.shape[1])
        return np.nanstd(self.acc, axis=0, ddof=1)


def _label(strategy: str, options: dict) -> str:
    if not options:
        return strategy
    return strategy + "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


_NOT_PROTOCOL = ("seed", "device", "data_root", "progress")


def _protocol(config: dict) -> dict[str, object]:
    """A run's config flattened (``train.gamma`` -> ``gamma``) without seed and device."""
    flat: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict) and k != "strategy_options":
            flat.update({kk: vv for kk, vv in v.items() if kk not in _NOT_PROTOCOL})
        elif k not in _NOT_PROTOCOL:
            flat[k] = v
    return flat


def load_curves(store: Store) -> list[Curve]:
    """Group the store's runs into curves: runs that differ only in their seed form one curve.

    Curves of one dataset and strategy that differ in other settings (gamma, epochs, ...) are
    labelled with those settings, e.g. ``random [gamma=0.0]``.
    """
    groups: dict[str, list[tuple[int, list[dict]]]] = {}
    protos: dict[str, dict] = {}
    for run in store.runs():
        rounds = store.rounds(run.id)
        if rounds:
            proto = _protocol(run.config)
            key = json.dumps(proto, sort_keys=True, default=str)
            protos[key] = proto
            groups.setdefault(key, []).append((run.seed, rounds))
    curves = []
    for key, runs in groups.items():
        proto = protos[key]
        base = _label(str(proto.get("strategy")), proto.get("strategy_options") or {})
        siblings = [p for p in protos.values() if p.get("dataset") == proto.get("dataset")
                    and p.get("strategy") == proto.get("strategy")
                    and p.get("strategy_options") == proto.get("strategy_options")]
        differ = sorted(k for k in proto if any(p.get(k) != proto[k] for p in siblings))
        label = base + (" [" + ",".join(f"{k}={proto[k]}" for k in differ) + "]" if differ
                        else "")
        length = max(len(r) for _, r in runs)
        longest = max(runs, key=lambda sr: len(sr[1]))[1]
        acc = np.full((len(runs), length), np.nan)
        ood = np.full((len(runs), length), np.nan)
        for i, (_, rounds) in enumerate(runs):
            for rec in rounds:
                acc[i, rec["round"]] = np.nan if rec["test_acc"] is None else rec["test_acc"]
                if rec.get("n_ood") is not None and len(rec["queried"]):
                    ood[i, rec["round"]] = rec["n_ood"] / len(rec["queried"])
        if "initial" in proto and "budget" in proto:
            bought = int(proto["initial"]) + int(proto["budget"]) * np.arange(length)
        else:
            bought = np.array([r["n_labelled"] for r in longest])
        curves.append(Curve(dataset=str(proto.get("dataset")), label=label,
                            seeds=[s for s, _ in runs], n_labelled=bought, acc=acc,
                            ood=None if np.isnan(ood).all() else ood))
    return sorted(curves, key=lambda c: (c.dataset, c.label))


def table_rows(curves: list[Curve]) -> tuple[list[str], list[list[str]]]:
    """A round x strategy table of mean ± std test accuracy (%)."""
    header = ["dataset", "bought"] + [c.label for c in curves]
    rows = []
    for dataset in sorted({c.dataset for c in curves}):
        cs = [c for c in curves if c.dataset == dataset]
        sizes = sorted({int(n) for c in cs for n in c.n_labelled})
        for n in sizes:
            row = [dataset, str(n)]
            for c in curves:
                hit = np.flatnonzero(c.n_labelled == n) if c.dataset == dataset else []
                if len(hit) == 0 or np.isnan(c.acc[:, hit[0]]).all():
                    row.append("")
                    continue
                m, s = c.mean[hit[0]] * 100, c.std[hit[0]] * 100
                row.append(f"{m:.2f} ± {s:.2f}" if c.acc.shape[0] > 1 else f"{m:.2f}")
            rows.append(row)
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table with aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def plot_curves(curves: list[Curve], path: Path) -> None:
    """Test accuracy vs labelled images, mean line and ± std band per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c.dataset for c in curves})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for c in (c for c in curves if c.dataset == dataset):
            m, s = c.mean * 100, c.std * 100
            ax.plot(c.n_labelled, m, marker="o", ms=3, label=f"{c.label} (n={len(c.seeds)})")
            if len(c.seeds) > 1:
                ax.fill_between(c.n_labelled, m - s, m + s, alpha=0.2)
        ax.set_title(dataset)
        ax.set_xlabel("labels bought (initial + budget x round)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(directory: str | Path, out: str | Path | None = None) -> dict[str, Path | str]:
    """Write ``learning_curve.png``, ``results.csv``, ``results.md`` and ``rounds.csv`` (every
    stored round with its timings and out-of-distribution count) for a directory.

    Args:
        directory: Experiment directory holding the store.
        out: Where the files go (default: the experiment directory).

    Returns:
        Paths of the files and the plain-text table under ``"table"``.
    """
    directory = Path(directory)
    with Store(directory, create=False) as store:
        curves = load_curves(store)
        round_rows = [(run, rec) for run in store.runs() for rec in store.rounds(run.id)]
    if not curves:
        raise DalbtError(f"no finished rounds in {directory}; run 'dalbt run --out "
                         f"{directory}' first")
    out_dir = Path(out) if out else directory
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(curves)
    png = out_dir / "learning_curve.png"
    plot_curves(curves, png)
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "strategy", "seed", "round", "n_labelled", "test_acc"])
        for c in curves:
            for i, seed in enumerate(c.seeds):
                for r, n in enumerate(c.n_labelled):
                    if not np.isnan(c.acc[i, r]):
                        w.writerow([c.dataset, c.label, seed, r, int(n), f"{c.acc[i, r]:.6f}"])
    rounds_csv = out_dir / "rounds.csv"
    with rounds_csv.open("w", newline="") as f:
        w = csv.writer(f)
        fields = ["n_labelled", "test_acc", "val_acc", "best_epoch", "train_ce", "train_bt",
                  "t_train", "t_score", "t_select", "n_ood"]
        w.writerow(["run", "dataset", "strategy", "seed", "round", *fields, "n_queried"])
        for run, rec in round_rows:
            w.writerow([run.id, run.dataset, run.strategy, run.seed, rec["round"],
                        *("" if rec[k] is None else rec[k] for k in fields),
                        len(rec["queried"])])
    ood_curves = [c for c in curves if c.ood is not None]
    if ood_curves:
        ood_csv = out_dir / "ood.csv"
        with ood_csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["dataset", "strategy", "round", "mean_ood_fraction", "seeds"])
            for c in ood_curves:
                for r in range(c.ood.shape[1]):
                    col = c.ood[:, r]
                    if not np.isnan(col).all():
                        w.writerow([c.dataset, c.label, r, f"{np.nanmean(col):.4f}",
                                    int((~np.isnan(col)).sum())])
    md = out_dir / "results.md"
    md.write_text("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                  + "".join("| " + " | ".join(r) + " |\n" for r in rows))
    return {"png": png, "csv": csv_path, "md": md, "rounds": rounds_csv,
            "table": format_table(header, rows)}
