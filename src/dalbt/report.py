"""Learning curves and tables from an experiment directory's store."""

from __future__ import annotations

import csv
import fnmatch
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dalbt.errors import DalbtError
from dalbt.recipe import LATER_DEFAULTS
from dalbt.store import FULL_DATA, RunRecord, Store


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
        times: Mean seconds per round of ``t_train``, ``t_score`` and ``t_select`` over every
            round of every seed (NaN where never recorded).
    """

    dataset: str
    label: str
    seeds: list[int]
    n_labelled: np.ndarray
    acc: np.ndarray
    ood: np.ndarray | None = None
    times: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return np.nanmean(self.acc, axis=0)

    @property
    def std(self) -> np.ndarray:
        if self.acc.shape[0] < 2:
            return np.zeros(self.acc.shape[1])
        return np.nanstd(self.acc, axis=0, ddof=1)

    @property
    def ci95(self) -> np.ndarray:
        """Half-width of the 95 % Student-t interval of the mean per round, (R,) (NaN below 2
        seeds)."""
        return ci95_halfwidth(self.acc)

    @property
    def complete(self) -> int:
        """Number of leading rounds that every seed has reached."""
        done = ~np.isnan(self.acc).any(axis=0)
        return int(np.argmin(done)) if not done.all() else len(done)

    @property
    def aubc_per_seed(self) -> np.ndarray:
        """AUBC of each seed over the rounds that every seed has reached, (S,)."""
        r = self.complete
        if r == 0:
            return np.full(self.acc.shape[0], np.nan)
        return np.array([aubc(self.n_labelled[:r], a[:r]) for a in self.acc])


TIME_FIELDS = ("t_train", "t_score", "t_select")


def ci95_halfwidth(acc: np.ndarray) -> np.ndarray:
    """Half-width of the 95 % confidence interval of the mean over seeds, per round.

    Uses Student's t: ``t.ppf(0.975, n - 1) * std / sqrt(n)`` with the sample std (ddof=1) and
    n the number of seeds with a value in that round.

    Args:
        acc: Values, (S, R); NaN where missing.

    Returns:
        Half-widths, (R,); NaN where fewer than two seeds have a value.
    """
    from scipy.stats import t

    acc = np.atleast_2d(np.asarray(acc, dtype=float))
    n = (~np.isnan(acc)).sum(axis=0)
    out = np.full(acc.shape[1], np.nan)
    ok = n >= 2
    if ok.any():
        std = np.nanstd(acc[:, ok], axis=0, ddof=1)
        out[ok] = t.ppf(0.975, n[ok] - 1) * std / np.sqrt(n[ok])
    return out


def aubc(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """Normalised area under the budget curve.

    The trapezoidal area under accuracy ``y`` against labels bought ``x``, divided by the
    x-range, so it lies in [0, 1] for accuracies in [0, 1] and equals the accuracy of a flat
    curve. A single point gives its own value.

    Args:
        x: Labels bought per round, increasing, (R,).
        y: Accuracy per round, (R,).

    Returns:
        The normalised area.

    Raises:
        ValueError: Empty, mismatched, non-increasing or non-finite input.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"aubc needs two equal-length non-empty 1-d arrays, got {x.shape} "
                         f"and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("aubc needs finite values")
    if len(x) == 1:
        return float(y[0])
    if (np.diff(x) <= 0).any():
        raise ValueError("aubc needs strictly increasing x")
    area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))
    return area / float(x[-1] - x[0])


def labels_to_reach(x: np.ndarray | list[float], mean: np.ndarray | list[float],
                    ceiling: float, percent: float) -> int | None:
    """The fewest labels bought at which the mean accuracy reaches a share of the ceiling.

    Args:
        x: Labels bought per round, (R,).
        mean: Mean accuracy per round, (R,); NaN rounds are skipped.
        ceiling: Full-data accuracy.
        percent: Target share of the ceiling, in percent (e.g. 90).

    Returns:
        The smallest ``x`` with ``mean >= percent / 100 * ceiling``, or None if never reached.
    """
    x, mean = np.asarray(x), np.asarray(mean, dtype=float)
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(mean >= percent / 100 * ceiling)
    return int(x[hit].min()) if len(hit) else None


def paired_wins(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> tuple[int, int]:
    """Rounds in which A is significantly better than B (paired t-test over seeds).

    Per round, a two-sided paired t-test (``scipy.stats.ttest_rel``) over the seeds with a
    value in both; a win is ``p < alpha`` with a positive mean difference. Rounds with fewer
    than two such seeds are not compared; rounds with no difference at all are no win.

    Args:
        a: Accuracy of A, (S, R), rows paired with ``b``'s (same seed).
        b: Accuracy of B, (S, R).
        alpha: Significance level.

    Returns:
        ``(wins, rounds compared)``.
    """
    from scipy.stats import ttest_rel

    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_wins needs the same seeds, got {a.shape[0]} and {b.shape[0]}")
    wins = compared = 0
    for r in range(min(a.shape[1], b.shape[1])):
        ok = ~(np.isnan(a[:, r]) | np.isnan(b[:, r]))
        if ok.sum() < 2:
            continue
        compared += 1
        diff = a[ok, r] - b[ok, r]
        if not np.any(diff):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p = ttest_rel(a[ok, r], b[ok, r]).pvalue
        if np.isfinite(p) and p < alpha and diff.mean() > 0:
            wins += 1
    return wins, compared


@dataclass
class Matrix:
    """Pairwise comparison of the curves of one dataset and budget axis.

    Attributes:
        dataset: Dataset name.
        labels: Curve labels, rows and columns.
        wins: ``wins[i][j]`` = (rounds where i is significantly better than j, rounds
            compared), or None where the pair shares fewer than two seeds (and on the diagonal).
    """

    dataset: str
    labels: list[str]
    wins: list[list[tuple[int, int] | None]]


def pairwise_matrices(curves: list[Curve], alpha: float = 0.05) -> list[Matrix]:
    """Paired t-test win counts between every two curves of a dataset.

    Curves are compared when they share the dataset and the labels bought per round (same
    initial size and budget), round by round over the seeds they share (at least two).

    Args:
        curves: Curves from :func:`load_curves`.
        alpha: Significance level.

    Returns:
        One matrix per (dataset, budget axis) with at least two curves.
    """
    groups: dict[tuple[str, tuple[int, ...]], list[Curve]] = {}
    for c in curves:
        groups.setdefault((c.dataset, tuple(int(n) for n in c.n_labelled[:2])), []).append(c)
    out = []
    for (dataset, _), cs in sorted(groups.items()):
        if len(cs) < 2:
            continue
        wins: list[list[tuple[int, int] | None]] = []
        for ca in cs:
            row: list[tuple[int, int] | None] = []
            for cb in cs:
                common = sorted(set(ca.seeds) & set(cb.seeds))
                if ca is cb or len(common) < 2:
                    row.append(None)
                    continue
                ia = [ca.seeds.index(s) for s in common]
                ib = [cb.seeds.index(s) for s in common]
                r = min(ca.acc.shape[1], cb.acc.shape[1])
                row.append(paired_wins(ca.acc[ia, :r], cb.acc[ib, :r], alpha))
            wins.append(row)
        out.append(Matrix(dataset=dataset, labels=[c.label for c in cs], wins=wins))
    return out


def _label(strategy: str, options: dict) -> str:
    if not options:
        return strategy
    return strategy + "(" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


_NOT_PROTOCOL = ("seed", "device", "data_root", "progress", "pretrain_cache")


def _protocol(config: dict) -> dict[str, object]:
    """A run's config flattened (``train.gamma`` -> ``gamma``) without seed and device, and
    without settings at the default they had before they existed (so that runs stored before
    and after a setting was added fall on one curve)."""
    flat: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict) and k != "strategy_options":
            flat.update({kk: vv for kk, vv in v.items() if kk not in _NOT_PROTOCOL})
        elif k not in _NOT_PROTOCOL:
            flat[k] = v
    return {k: v for k, v in flat.items()
            if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


def load_curves(store: Store, names: dict[str, str] | None = None) -> list[Curve]:
    """Group the store's runs into curves: runs that differ only in their seed form one curve.

    Curves of one dataset and strategy that differ in other settings (gamma, epochs, ...) are
    labelled with those settings, e.g. ``random [gamma=0.0]``, unless ``names`` (run key ->
    label, as a bench's ``bench.json`` records) gives all runs of the curve one label that no
    other curve has. Full-data reference runs (strategy ``full-data``) are left out;
    :func:`load_ceilings` reads them.
    """
    names = names or {}
    run_keys: dict[str, list[str]] = {}
    groups: dict[str, list[tuple[int, list[dict]]]] = {}
    protos: dict[str, dict] = {}
    for run in store.runs():
        rounds = store.rounds(run.id)
        if rounds and run.strategy != FULL_DATA:
            proto = _protocol(run.config)
            key = json.dumps(proto, sort_keys=True, default=str)
            protos[key] = proto
            groups.setdefault(key, []).append((run.seed, rounds))
            run_keys.setdefault(key, []).append(run.key)
    given = {key: {names.get(k) for k in keys} for key, keys in run_keys.items()}
    given = {key: next(iter(v)) for key, v in given.items() if len(v) == 1 and None not in v}
    taken = Counter(given.values())
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
        if key in given and taken[given[key]] == 1:
            label = given[key]
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
        times = {}
        for k in TIME_FIELDS:
            vals = [rec[k] for _, rounds in runs for rec in rounds if rec[k] is not None]
            times[k] = float(np.mean(vals)) if vals else float("nan")
        curves.append(Curve(dataset=str(proto.get("dataset")), label=label,
                            seeds=[s for s, _ in runs], n_labelled=bought, acc=acc,
                            ood=None if np.isnan(ood).all() else ood, times=times))
    return sorted(curves, key=lambda c: (c.dataset, c.label))


def load_ceilings(store: Store) -> dict[str, float]:
    """Full-data accuracy per dataset: the mean final test accuracy of its ``full-data`` runs.

    Args:
        store: The experiment store.

    Returns:
        Dataset name -> ceiling accuracy, for datasets with a finished full-data round.
    """
    accs: dict[str, list[float]] = {}
    for run in store.runs():
        if run.strategy != FULL_DATA:
            continue
        done = [r["test_acc"] for r in store.rounds(run.id) if r["test_acc"] is not None]
        if done:
            accs.setdefault(run.dataset, []).append(float(done[-1]))
    return {d: float(np.mean(v)) for d, v in accs.items()}


REACH = (90.0, 95.0)
SUMMARY_FIELDS = ["dataset", "strategy", "seeds", "rounds", "aubc_mean", "aubc_std",
                  "final_bought", "final_acc_mean", "final_acc_ci95",
                  *(f"labels_to_{x:g}pct" for x in REACH), *TIME_FIELDS]


def summary_records(curves: list[Curve], ceilings: dict[str, float],
                    reach: tuple[float, ...] = REACH) -> list[dict[str, object]]:
    """One record of summary statistics per curve.

    AUBC and the final accuracy use the rounds that every seed has reached, so unfinished
    seeds do not shorten or bias the others. Labels to reach X % of the full-data accuracy use
    the mean curve over all seeds; they are None without a full-data run for the dataset or
    when the curve never gets there.

    Args:
        curves: Curves from :func:`load_curves`.
        ceilings: Full-data accuracy per dataset (:func:`load_ceilings`).
        reach: Target shares of the ceiling, in percent.

    Returns:
        Records keyed like ``SUMMARY_FIELDS`` (floats are fractions, NaN where undefined).
    """
    out = []
    for c in curves:
        r = c.complete
        per_seed = c.aubc_per_seed
        rec: dict[str, object] = {
            "dataset": c.dataset, "strategy": c.label, "seeds": len(c.seeds), "rounds": r,
            "aubc_mean": float(np.mean(per_seed)) if r else float("nan"),
            "aubc_std": float(np.std(per_seed, ddof=1)) if r and len(per_seed) > 1
            else float("nan"),
            "final_bought": int(c.n_labelled[r - 1]) if r else None,
            "final_acc_mean": float(c.mean[r - 1]) if r else float("nan"),
            "final_acc_ci95": float(c.ci95[r - 1]) if r else float("nan"),
        }
        ceiling = ceilings.get(c.dataset)
        for x in reach:
            rec[f"labels_to_{x:g}pct"] = (None if ceiling is None
                                          else labels_to_reach(c.n_labelled, c.mean, ceiling, x))
        rec.update({k: c.times.get(k, float("nan")) for k in TIME_FIELDS})
        out.append(rec)
    return out


def _pm(m: float, h: float, scale: float, digits: int) -> str:
    if np.isnan(m):
        return ""
    return f"{m * scale:.{digits}f}" + ("" if np.isnan(h) else f" ± {h * scale:.{digits}f}")


def summary_table(records: list[dict[str, object]], ceilings: dict[str, float]
                  ) -> tuple[list[str], list[list[str]]]:
    """Human-readable summary table (accuracies in %, AUBC in [0, 1], seconds per round)."""
    header = ["dataset", "strategy", "seeds", "AUBC", "final acc (% ± 95% CI)",
              *(f"labels to {x:g}% full" for x in REACH),
              "train s/round", "score s/round", "select s/round"]
    rows = []
    for rec in records:
        ceiling = ceilings.get(str(rec["dataset"]))
        reach = ["" if ceiling is None else "not reached" if rec[f"labels_to_{x:g}pct"] is None
                 else str(rec[f"labels_to_{x:g}pct"]) for x in REACH]
        num = {k: float("nan") if v is None else v for k, v in rec.items()
               if isinstance(v, float | int | type(None))}
        final = _pm(num["final_acc_mean"], num["final_acc_ci95"], 100, 2)
        if final and rec["final_bought"] is not None:
            final += f" @ {rec['final_bought']}"
        rows.append([str(rec["dataset"]), str(rec["strategy"]), str(rec["seeds"]),
                     _pm(num["aubc_mean"], num["aubc_std"], 1, 3),
                     final, *reach,
                     *("" if np.isnan(num[k]) else f"{num[k]:.2f}" for k in TIME_FIELDS)])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    return ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
            + "".join("| " + " | ".join(r) + " |\n" for r in rows))


def summary_markdown(records: list[dict[str, object]], ceilings: dict[str, float],
                     matrices: list[Matrix], alpha: float = 0.05) -> str:
    """``summary.md``: a summary table per dataset, then the pairwise comparison matrices."""
    header, rows = summary_table(records, ceilings)
    parts = ["# Summary\n",
             "AUBC: area under accuracy vs labels bought, divided by the range of labels bought "
             "(mean ± std over seeds). Final accuracy: mean ± 95 % Student-t interval, at the "
             "last round every seed reached. Seconds: mean per round.\n"]
    for dataset in sorted({str(r["dataset"]) for r in records}):
        parts.append(f"## {dataset}\n")
        if dataset in ceilings:
            parts.append(f"Full-data accuracy: {ceilings[dataset] * 100:.2f} %\n")
        parts.append(_md_table(header, [r for r in rows if r[0] == dataset]))
        for m in (m for m in matrices if m.dataset == dataset):
            parts.append(f"### Pairwise comparison ({dataset})\n")
            parts.append(f"Rounds where the row strategy is significantly better than the "
                         f"column strategy (paired t-test over shared seeds, two-sided, "
                         f"alpha {alpha:g}) / rounds compared; blank: fewer than 2 shared "
                         f"seeds.\n")
            cells = [[a] + ["" if w is None else f"{w[0]}/{w[1]}" for w in row]
                     for a, row in zip(m.labels, m.wins, strict=True)]
            parts.append(_md_table(["A \\ B", *m.labels], cells))
    return "\n".join(parts)


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


def accuracy_axis_label(banded: list[bool], seeds: list[int]) -> str:
    """The y-axis label of a learning-curve panel: it mentions the 95 % interval only where a
    band is drawn.

    Args:
        banded: Per curve of the panel, whether its confidence band is drawn.
        seeds: Per curve, its number of seeds.
    """
    if banded and all(banded):
        return "test accuracy (%), mean and 95 % CI"
    if any(banded):
        return "test accuracy (%), mean (95 % CI where n >= 3 seeds)"
    if max(seeds, default=1) > 1:
        return "test accuracy (%), mean over seeds"
    return "test accuracy (%)"


def plot_curves(curves: list[Curve], path: Path, ceilings: dict[str, float] | None = None,
                svg: Path | None = None) -> None:
    """Test accuracy vs labels bought: mean line per strategy, with its 95 % confidence band
    where it has at least 3 seeds (the y-axis label says which applies).

    Args:
        curves: Curves to draw, one panel per dataset.
        path: PNG to write.
        ceilings: Full-data accuracy per dataset, drawn as a dashed horizontal line.
        svg: Also write the figure as SVG here.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c.dataset for c in curves})
    most = max(sum(c.dataset == d for c in curves) for d in datasets)
    # distinct colours and line styles for up to 40 curves; legend outside the axes
    colours = plt.get_cmap("tab20").colors if most > 10 else plt.get_cmap("tab10").colors
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets) + 2.5, 5),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        lows, highs, banded, seeds = [], [], [], []
        for i, c in enumerate(c for c in curves if c.dataset == dataset):
            m, h = c.mean * 100, c.ci95 * 100
            colour, style = colours[i % len(colours)], styles[(i // len(colours)) % 4]
            ax.plot(c.n_labelled, m, marker="o", ms=3, color=colour, ls=style,
                    label=f"{c.label} (n={len(c.seeds)})")
            lows.append(np.nanmin(m))
            highs.append(np.nanmax(m))
            seeds.append(len(c.seeds))
            # with two seeds the t quantile is 12.7: such a band says nothing and hides the rest
            banded.append(len(c.seeds) >= 3 and not np.isnan(h).all())
            if banded[-1]:
                ax.fill_between(c.n_labelled, m - h, m + h, alpha=0.12, color=colour, lw=0)
        # the axis follows the means (and the ceiling): wide intervals of few seeds are clipped
        top = max(highs + ([ceilings[dataset] * 100] if ceilings and dataset in ceilings
                           else []))
        ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, top + 3))
        if ceilings and dataset in ceilings:
            ax.axhline(ceilings[dataset] * 100, color="black", ls="--", lw=1,
                       label=f"full data ({ceilings[dataset] * 100:.1f} %)")
        ax.set_title(dataset)
        ax.set_xlabel("labels bought (initial + budget x round)")
        ax.set_ylabel(accuracy_axis_label(banded, seeds))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if svg is not None:
        fig.savefig(svg)
    plt.close(fig)


def bench_labels(directory: Path) -> dict[str, str]:
    """Run key -> label from a bench's ``bench.json`` in the directory (empty if none)."""
    path = directory / "bench.json"
    try:
        labels = json.loads(path.read_text()).get("labels", {}) if path.exists() else {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def select_curves(curves: list[Curve], only: list[str] | None) -> list[Curve]:
    """The curves whose label matches any of the shell-style patterns (all if none given).

    Raises:
        DalbtError: If a pattern matches no curve (the message lists the labels).
    """
    if not only:
        return curves
    for pattern in only:
        if not any(fnmatch.fnmatchcase(c.label, pattern) for c in curves):
            labels = ", ".join(sorted({c.label for c in curves}))
            raise DalbtError(f"--only {pattern!r} matches no strategy; the labels are: {labels}")
    return [c for c in curves if any(fnmatch.fnmatchcase(c.label, p) for p in only)]


def select_seeds(curves: list[Curve], seeds: list[int] | None) -> list[Curve]:
    """The curves restricted to the given seeds (curves with none of them are dropped), so that
    strategies run with different numbers of seeds are compared on the same ones."""
    if not seeds:
        return curves
    out = []
    for c in curves:
        rows = [i for i, s in enumerate(c.seeds) if s in seeds]
        if rows:
            out.append(replace(c, seeds=[c.seeds[i] for i in rows], acc=c.acc[rows],
                               ood=None if c.ood is None else c.ood[rows]))
    if not out:
        raise DalbtError(f"no run has any of the seeds {seeds}")
    return out


def _write_results_csv(path: Path, curves: list[Curve]) -> None:
    """``results.csv``: the test accuracy of every curve, seed and round (NaN rows left out)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "strategy", "seed", "round", "n_labelled", "test_acc"])
        for c in curves:
            for i, seed in enumerate(c.seeds):
                for r, n in enumerate(c.n_labelled):
                    if not np.isnan(c.acc[i, r]):
                        w.writerow([c.dataset, c.label, seed, r, int(n), f"{c.acc[i, r]:.6f}"])


def _write_rounds_csv(path: Path, round_rows: list[tuple[RunRecord, dict[str, Any]]]) -> None:
    """``rounds.csv``: every stored ``(run, round)`` with its metrics and timings."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        fields = ["n_labelled", "test_acc", "val_acc", "best_epoch", "train_ce", "train_bt",
                  "t_train", "t_score", "t_select", "n_ood"]
        w.writerow(["run", "dataset", "strategy", "seed", "round", *fields, "n_queried"])
        for run, rec in round_rows:
            w.writerow([run.id, run.dataset, run.strategy, run.seed, rec["round"],
                        *("" if rec[k] is None else rec[k] for k in fields),
                        len(rec["queried"])])


def _write_ood_csv(path: Path, ood_curves: list[Curve]) -> None:
    """``ood.csv``: the mean out-of-distribution fraction of the queries per curve and round."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "strategy", "round", "mean_ood_fraction", "seeds"])
        for c in ood_curves:
            for r in range(c.ood.shape[1]):
                col = c.ood[:, r]
                if not np.isnan(col).all():
                    w.writerow([c.dataset, c.label, r, f"{np.nanmean(col):.4f}",
                                int((~np.isnan(col)).sum())])


def _write_summary_csv(path: Path, records: list[dict[str, object]]) -> None:
    """``summary.csv``: the :data:`SUMMARY_FIELDS` of every summary record."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUMMARY_FIELDS)
        for rec in records:
            w.writerow([_csv_value(rec[k]) for k in SUMMARY_FIELDS])


def write_report(directory: str | Path, out: str | Path | None = None,
                 only: list[str] | None = None,
                 seeds: list[int] | None = None) -> dict[str, Path | str]:
    """Write the report of a directory.

    Files: ``learning_curve.png`` / ``.svg`` (mean and 95 % interval), ``results.csv``,
    ``results.md``, ``rounds.csv`` (every stored round with its timings and
    out-of-distribution count), ``ood.csv`` (mixed pools), ``summary.md`` (AUBC, final accuracy,
    labels to reach 90 / 95 % of the full-data accuracy, seconds per round, pairwise
    comparison matrix) and ``summary.csv``.

    Args:
        directory: Experiment directory holding the store.
        out: Where the files go (default: the experiment directory).
        only: Shell-style patterns of curve labels to keep (e.g. ``weibull*``); default all.
        seeds: Keep only the runs of these seeds; default all.

    Returns:
        Paths of the files (``png``, ``svg``, ``csv``, ``md``, ``rounds``, ``summary``,
        ``summary_csv``) and the plain-text tables under ``"table"``.
    """
    directory = Path(directory)
    names = bench_labels(directory)
    with Store(directory, create=False) as store:
        curves = load_curves(store, names)
        ceilings = load_ceilings(store)
        round_rows = [(run, rec) for run in store.runs() for rec in store.rounds(run.id)]
    if not curves:
        raise DalbtError(f"no finished rounds in {directory}; run 'dalbt run --out "
                         f"{directory}' first")
    curves = select_seeds(select_curves(curves, only), seeds)
    out_dir = Path(out) if out else directory
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(curves)
    png, svg = out_dir / "learning_curve.png", out_dir / "learning_curve.svg"
    plot_curves(curves, png, ceilings, svg)
    csv_path = out_dir / "results.csv"
    _write_results_csv(csv_path, curves)
    rounds_csv = out_dir / "rounds.csv"
    _write_rounds_csv(rounds_csv, round_rows)
    ood_curves = [c for c in curves if c.ood is not None]
    if ood_curves:
        _write_ood_csv(out_dir / "ood.csv", ood_curves)
    md = out_dir / "results.md"
    md.write_text(_md_table(header, rows))
    records = summary_records(curves, ceilings)
    matrices = pairwise_matrices(curves)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(records, ceilings, matrices))
    summary_csv = out_dir / "summary.csv"
    _write_summary_csv(summary_csv, records)
    s_header, s_rows = summary_table(records, ceilings)
    return {"png": png, "svg": svg, "csv": csv_path, "md": md, "rounds": rounds_csv,
            "summary": summary, "summary_csv": summary_csv,
            "table": format_table(header, rows) + "\n\n" + format_table(s_header, s_rows)}


def _csv_value(v: object) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return f"{v:.6f}" if isinstance(v, float) else str(v)
