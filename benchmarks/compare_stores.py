"""Compare the rounds of the same runs in two experiment stores, round by round.

For every run (strategy, options, seed) present in both stores, prints per round whether the
labelled set (the queries of all earlier rounds) is the same, whether the test accuracy is
bit-identical, and the accuracy difference. Used to check that a change leaves the rounds it
should not affect unchanged (e.g. after the small-last-batch fix of issue 11).

Usage: python benchmarks/compare_stores.py OLD_DIR NEW_DIR [--strategy random weibull]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path


def _runs(directory: str) -> dict[tuple, list[tuple]]:
    path = Path(directory) / "dalbt.sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = {}
    for rid, key, strategy, seed, config in conn.execute(
            "SELECT id, key, strategy, seed, config FROM runs ORDER BY id"):
        cfg = json.loads(config)
        if cfg.get("strategy") is None:  # the full-data reference
            continue
        rows = conn.execute("SELECT round, n_labelled, test_acc, queried FROM rounds "
                            "WHERE run_id = ? ORDER BY round", (rid,)).fetchall()
        out[(key, strategy, seed)] = rows
    conn.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--strategy", nargs="*", default=None)
    args = p.parse_args()
    old, new = _runs(args.old), _runs(args.new)
    print("| strategy | seed | round | labelled | same labelled set | same test acc | "
          "old % | new % | diff |")
    print("|---|---:|---:|---:|:-:|:-:|---:|---:|---:|")
    for (key, strategy, seed), rows_new in sorted(new.items(), key=lambda kv: kv[0][1:]):
        if args.strategy and strategy not in args.strategy or (key, strategy, seed) not in old:
            continue
        rows_old = old[(key, strategy, seed)]
        same_set = True
        for ro, rn in zip(rows_old, rows_new, strict=False):
            same_acc = ro[2] == rn[2]
            print(f"| {strategy} | {seed} | {rn[0]} | {rn[1]} | {'yes' if same_set else 'no'} | "
                  f"{'yes' if same_acc else 'no'} | {100 * ro[2]:.2f} | {100 * rn[2]:.2f} | "
                  f"{100 * (rn[2] - ro[2]):+.2f} |")
            same_set = same_set and json.loads(ro[3]) == json.loads(rn[3])


if __name__ == "__main__":
    main()
