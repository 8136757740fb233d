"""Experiment store: one SQLite database per experiment directory.

Each finished round is written in one transaction together with its queried indices, so a
killed run loses at most the round in progress and can be resumed from the database alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dalbt.errors import DalbtError

DB_NAME = "dalbt.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    dataset TEXT NOT NULL,
    strategy TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    env TEXT NOT NULL,
    initial TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished')),
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    round INTEGER NOT NULL,
    n_labelled INTEGER NOT NULL,
    test_acc REAL,
    val_acc REAL,
    best_epoch INTEGER,
    train_ce REAL,
    train_bt REAL,
    t_train REAL,
    t_score REAL,
    t_select REAL,
    n_ood INTEGER,
    queried TEXT NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (run_id, round)
);
"""

ROUND_FIELDS = ("n_labelled", "test_acc", "val_acc", "best_epoch", "train_ce", "train_bt",
                "t_train", "t_score", "t_select", "n_ood")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def config_key(config: dict[str, Any]) -> str:
    """Stable hash of a run's canonical config (what makes two runs the same run)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def environment() -> dict[str, Any]:
    """The software and machine a run used."""
    import torch

    from dalbt import __version__

    return {
        "dalbt": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "processes": int(os.environ.get("WORLD_SIZE", "1") or 1),  # torchrun's world size
    }


@dataclass(frozen=True)
class RunRecord:
    """A run row."""

    id: int
    key: str
    dataset: str
    strategy: str
    seed: int
    config: dict[str, Any]
    env: dict[str, Any]
    initial: np.ndarray
    status: str


class Store:
    """The SQLite database of one experiment directory.

    Args:
        directory: Experiment directory (created if missing).
        create: Create the database if it does not exist; otherwise a missing one is an error.
    """

    def __init__(self, directory: str | Path, create: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        if not self.path.exists():
            if not create:
                raise DalbtError(f"no dalbt results in {self.directory} (expected {self.path}); "
                                 "run 'dalbt run --out DIR' first")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DalbtError(f"cannot create experiment directory {self.directory}: "
                                 f"{exc.strerror}") from None
        try:
            self.conn = sqlite3.connect(self.path, timeout=30)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            with self.conn:
                self.conn.executescript(_SCHEMA)
                columns = {r[1] for r in self.conn.execute("PRAGMA table_info(rounds)")}
                if "n_ood" not in columns:  # databases written before the mixed-pool scenario
                    self.conn.execute("ALTER TABLE rounds ADD COLUMN n_ood INTEGER")
                self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                                  (str(SCHEMA_VERSION),))
        except sqlite3.DatabaseError as exc:
            raise DalbtError(f"{self.path} is not a readable dalbt database ({exc}); "
                             "use another --out directory") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, row: tuple) -> RunRecord:
        return RunRecord(id=row[0], key=row[1], dataset=row[2], strategy=row[3], seed=row[4],
                         config=json.loads(row[5]), env=json.loads(row[6]),
                         initial=np.asarray(json.loads(row[7]), dtype=np.int64), status=row[8])

    def find_run(self, key: str) -> RunRecord | None:
        """The run with this config key, if any."""
        row = self.conn.execute("SELECT id, key, dataset, strategy, seed, config, env, initial, "
                                "status FROM runs WHERE key = ?", (key,)).fetchone()
        return self._run(row) if row else None

    def runs(self) -> list[RunRecord]:
        """All runs, by id."""
        rows = self.conn.execute("SELECT id, key, dataset, strategy, seed, config, env, initial, "
                                 "status FROM runs ORDER BY id").fetchall()
        return [self._run(r) for r in rows]

    def create_run(self, config: dict[str, Any], initial: np.ndarray, key: str | None = None
                   ) -> RunRecord:
        """Insert a new run (status 'running').

        Args:
            config: The full config to keep (needs dataset, strategy, seed).
            initial: The initial labelled dataset indices.
            key: Identity of the run (default: hash of ``config``).
        """
        key = key or config_key(config)
        with self.conn:
            self.conn.execute(
                "INSERT INTO runs (key, dataset, strategy, seed, config, env, initial, status, "
                "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (key, config["dataset"], config["strategy"], int(config["seed"]),
                 json.dumps(config, sort_keys=True), json.dumps(environment()),
                 json.dumps([int(i) for i in initial]), _now(), _now()))
        run = self.find_run(key)
        assert run is not None
        return run

    def record_round(self, run_id: int, round_: int, metrics: dict[str, Any],
                     queried: np.ndarray, finished: bool = False) -> None:
        """Write one finished round atomically (and mark the run finished if it was the last).

        Args:
            run_id: The run.
            round_: Round number (0 = trained on the initial set).
            metrics: Values of ``ROUND_FIELDS``.
            queried: Dataset indices queried after this round (labelled in round + 1).
            finished: Also mark the run finished, in the same transaction.
        """
        values = [metrics.get(f) for f in ROUND_FIELDS]
        values = [None if isinstance(v, float) and np.isnan(v) else v for v in values]
        with self.conn:
            self.conn.execute(
                f"INSERT INTO rounds (run_id, round, {', '.join(ROUND_FIELDS)}, queried, created) "
                f"VALUES (?, ?, {', '.join('?' * len(ROUND_FIELDS))}, ?, ?)",
                (run_id, round_, *values, json.dumps([int(i) for i in queried]), _now()))
            self.conn.execute("UPDATE runs SET updated = ?, status = ? WHERE id = ?",
                              (_now(), "finished" if finished else "running", run_id))

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """All recorded rounds of a run, in order, with ``queried`` as an int64 array."""
        cur = self.conn.execute(
            f"SELECT round, {', '.join(ROUND_FIELDS)}, queried FROM rounds WHERE run_id = ? "
            "ORDER BY round", (run_id,))
        out = []
        for row in cur.fetchall():
            rec = {"round": row[0], **dict(zip(ROUND_FIELDS, row[1:-1], strict=True))}
            rec["queried"] = np.asarray(json.loads(row[-1]), dtype=np.int64)
            out.append(rec)
        return out
