"""Experiment store: one SQLite database per experiment directory.

Each finished round is written in one transaction together with its queried indices, so a
killed run loses at most the round in progress and can be resumed from the database alone.
After each round the write-ahead log is checkpointed into the database file, so the file alone
(without ``dalbt.sqlite-wal``) holds every finished round and is a complete backup. A small
manifest next to it (``dalbt.sqlite.manifest.json``, replaced atomically after each round)
records how many rounds each run had: a database that lost rounds it once held (a deleted or
damaged WAL file, an older copy) is reported instead of silently starting again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dalbt.clock import utc_now
from dalbt.errors import DalbtError

DB_NAME = "dalbt.sqlite"
MANIFEST_NAME = DB_NAME + ".manifest.json"
BUSY_TIMEOUT = 30.0  # seconds a write waits for another process's transaction
CHECKPOINT_WAIT = 1.0  # seconds a checkpoint waits for other readers before giving up
SCHEMA_VERSION = 1
FULL_DATA = "full-data"  # strategy name of the full-data reference run (the ceiling)

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


def _json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at character {exc.pos}"
    return str(exc)


def _int_list(text: Any) -> list[int]:
    """A stored JSON list of integers (ValueError / TypeError naming what is wrong)."""
    value = json.loads(text)
    if not isinstance(value, list):
        raise ValueError(f"expected a JSON list of integers, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"expected a JSON list of integers, found {bad[0]!r}")
    return value


def _object(text: Any) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _id_order(run_id: Any) -> tuple[int, int]:
    return (0, run_id) if isinstance(run_id, int) else (1, 0)


class Store:
    """The SQLite database of one experiment directory.

    Args:
        directory: Experiment directory (created if missing).
        create: Open for writing: create the database if it does not exist, and refuse one
            that lost rounds its manifest records. With False (reading, e.g. a report) a
            missing database is an error and lost rounds are a warning on stderr.

    Raises:
        DalbtError: The database is missing (``create=False``), empty, damaged, locked by
            another process, or lost rounds it once held.
    """

    def __init__(self, directory: str | Path, create: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.manifest_path = self.directory / MANIFEST_NAME
        self.writing = create
        recorded = self._read_manifest()
        if not self.path.exists():
            if recorded and any(v["rounds"] for v in recorded.values()):
                raise DalbtError(
                    f"{self.path} is missing, but {self.manifest_path.name} records "
                    f"{sum(v['rounds'] for v in recorded.values())} finished rounds of "
                    f"{len(recorded)} runs there: "
                    f"restore {DB_NAME} from a backup, or delete {self.manifest_path} to start "
                    "again, or use another --out directory")
            if not create:
                raise DalbtError(f"no dalbt results in {self.directory} (expected {self.path}); "
                                 "run 'dalbt run --out DIR' first")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DalbtError(f"cannot create experiment directory {self.directory}: "
                                 f"{exc.strerror}") from None
            self._create_database()
        elif self.path.is_file() and self.path.stat().st_size == 0:
            raise DalbtError(
                f"{self.path} is empty (0 bytes): the database was truncated or overwritten; "
                f"restore it from a backup, or delete it{self._and_manifest()} to start again, "
                "or use another --out directory")
        self.conn: sqlite3.Connection | None = None
        try:
            with self._db():
                self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA foreign_keys=ON")
                problem = self.conn.execute("PRAGMA quick_check").fetchone()[0]
                if problem != "ok":
                    raise sqlite3.DatabaseError(f"integrity check: {problem}")
                self._init_schema(self.conn)
            self._check_manifest(recorded)
            if create and recorded is None:  # first open of a store written before manifests
                self._write_manifest()
        except BaseException:
            if self.conn is not None:
                self.conn.close()
            raise

    # -- opening, errors, durability ----------------------------------------------------------

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        with conn:
            conn.executescript(_SCHEMA)
            columns = {r[1] for r in conn.execute("PRAGMA table_info(rounds)")}
            if "n_ood" not in columns:  # databases written before the mixed-pool scenario
                conn.execute("ALTER TABLE rounds ADD COLUMN n_ood INTEGER")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                         (str(SCHEMA_VERSION),))

    def _create_database(self) -> None:
        """Create the database under a temporary name and link it into place, so that no
        process ever sees a half-created (e.g. 0-byte) ``dalbt.sqlite``."""
        tmp = self.path.with_name(f"{DB_NAME}.{os.getpid()}.new")
        for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            stale.unlink(missing_ok=True)
        try:
            with self._db():
                conn = sqlite3.connect(tmp)
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    self._init_schema(conn)
                finally:
                    conn.close()  # checkpoints: the file alone is the whole database
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass  # another process created it first: use theirs
            except OSError:  # no hard links on this file system
                if not self.path.exists():
                    os.replace(tmp, self.path)
        except OSError as exc:
            raise DalbtError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _and_manifest(self) -> str:
        return f" and {self.manifest_path.name}" if self.manifest_path.exists() else ""

    def _error(self, exc: sqlite3.Error) -> DalbtError:
        """The one-line error for a failed database operation."""
        msg = " ".join(str(exc).split())
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in msg:
            return DalbtError(f"{self.path} is locked ({msg}): is another dalbt process using "
                              "the same --out? wait for it or use another directory")
        if name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_IOERR",
                            "SQLITE_FULL", "SQLITE_PERM")):
            return DalbtError(f"cannot use {self.path} ({msg}): check that the directory is "
                              "writable and the disk has space, or use another --out directory")
        return DalbtError(f"{self.path} is not a readable dalbt database, it is damaged "
                          f"({msg}): restore it from a backup, or use another --out directory "
                          f"(or delete it{self._and_manifest()} to start again)")

    @contextmanager
    def _db(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database file and empty it, so that the file
        alone is complete. Waits at most ``CHECKPOINT_WAIT`` s for readers in other processes.

        Returns:
            Whether the log was emptied (False: another process was reading; the log is kept,
            which is safe).
        """
        assert self.conn is not None
        with self._db():
            self.conn.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT * 1000)}")
            try:
                busy = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        return busy == 0

    def close(self) -> None:
        """Checkpoint the write-ahead log into the database file and close."""
        if self.conn is None:
            return
        try:
            self.checkpoint()
        except DalbtError:
            pass  # closing must not hide the error being handled
        finally:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the manifest: rounds the database once held ------------------------------------------

    def _read_manifest(self) -> dict[str, dict[str, Any]] | None:
        """Run key -> ``{"id", "strategy", "seed", "rounds"}`` from the manifest (None if
        there is none)."""
        try:
            text = self.manifest_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise DalbtError(f"cannot read {self.manifest_path}: {exc.strerror or exc}") from None
        try:
            runs = _object(text)["runs"]
            return {str(k): {**v, "rounds": int(v["rounds"])} for k, v in runs.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DalbtError(f"{self.manifest_path} is damaged ({_json_error(exc)}); delete it "
                             f"if {self.path} is complete (it is written again from the "
                             "database)") from None

    def _counts(self) -> dict[str, tuple[int, str, int, int]]:
        """Run key -> (id, strategy, seed, rounds recorded)."""
        assert self.conn is not None
        with self._db():
            rows = self.conn.execute(
                "SELECT runs.key, runs.id, runs.strategy, runs.seed, COUNT(rounds.round) "
                "FROM runs LEFT JOIN rounds ON rounds.run_id = runs.id GROUP BY runs.id"
            ).fetchall()
        return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}

    def _check_manifest(self, recorded: dict[str, dict[str, Any]] | None) -> None:
        """Raise (writing) or warn (reading) when the database holds fewer rounds of a run
        than the manifest recorded."""
        if not recorded:
            return
        have = self._counts()
        lost = []
        for key, was in sorted(recorded.items(), key=lambda kv: _id_order(kv[1].get("id"))):
            n, got = was["rounds"], have.get(key, (was.get("id"), "", 0, 0))[3]
            if got < n:
                lost.append(f"run {was.get('id')} ({was.get('strategy')}, seed "
                            f"{was.get('seed')}): {got} of {n} rounds")
        if not lost:
            return
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        msg = (f"{self.path} lost finished rounds that {self.manifest_path.name} records "
               f"({'; '.join(lost[:3])}{more}): was {DB_NAME}-wal deleted or damaged, or "
               f"{DB_NAME} replaced by an older copy? Restore both from a backup, or use "
               f"another --out directory; to accept the loss (the rounds are run again on "
               f"--resume) or if you deleted them on purpose, delete {self.manifest_path}")
        if self.writing:
            raise DalbtError(msg)
        print(f"dalbt: warning: {msg}", file=sys.stderr)

    def _write_manifest(self) -> None:
        """Record every run's round count, atomically (a snapshot of the database: with
        concurrent writers the last one may be older, which only under-counts)."""
        runs = {key: {"id": v[0], "strategy": v[1], "seed": v[2], "rounds": v[3]}
                for key, v in self._counts().items()}
        tmp = self.manifest_path.with_name(f"{MANIFEST_NAME}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"database": DB_NAME, "updated": utc_now(), "runs": runs},
                                      indent=1, sort_keys=True))
            os.replace(tmp, self.manifest_path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DalbtError(f"cannot write {self.manifest_path}: {exc.strerror or exc}"
                             ) from None

    # -- runs and rounds ----------------------------------------------------------------------

    def damaged(self, run_id: int, what: str, why: str) -> DalbtError:
        """The error for a run whose stored data cannot be used, naming the ways out."""
        return DalbtError(
            f"{self.path}: run {run_id} has a damaged {what} ({why}); restore {DB_NAME} from a "
            f"backup, or delete the run with 'python -m dalbt.store {self.directory} "
            f"--delete-run {run_id}' and run it again, or rerun without --resume into another "
            "--out directory")

    def _run(self, row: tuple) -> RunRecord:
        values: dict[str, Any] = {}
        for column, text, parse in (("config", row[5], _object), ("env", row[6], _object),
                                    ("initial", row[7], _int_list)):
            try:
                values[column] = parse(text)
            except (ValueError, TypeError) as exc:
                raise self.damaged(row[0], f"runs.{column}", _json_error(exc)) from None
        return RunRecord(id=row[0], key=row[1], dataset=row[2], strategy=row[3], seed=row[4],
                         config=values["config"], env=values["env"],
                         initial=np.asarray(values["initial"], dtype=np.int64), status=row[8])

    def find_run(self, key: str) -> RunRecord | None:
        """The run with this config key, if any."""
        assert self.conn is not None
        with self._db():
            row = self.conn.execute("SELECT id, key, dataset, strategy, seed, config, env, "
                                    "initial, status FROM runs WHERE key = ?", (key,)).fetchone()
        return self._run(row) if row else None

    def runs(self) -> list[RunRecord]:
        """All runs, by id."""
        assert self.conn is not None
        with self._db():
            rows = self.conn.execute("SELECT id, key, dataset, strategy, seed, config, env, "
                                     "initial, status FROM runs ORDER BY id").fetchall()
        return [self._run(r) for r in rows]

    def create_run(self, config: dict[str, Any], initial: np.ndarray, key: str | None = None
                   ) -> RunRecord:
        """Insert a new run (status 'running').

        Args:
            config: The full config to keep (needs dataset, strategy, seed).
            initial: The initial labelled dataset indices.
            key: Identity of the run (default: hash of ``config``).
        """
        assert self.conn is not None
        key = key or config_key(config)
        with self._db(), self.conn:
            self.conn.execute(
                "INSERT INTO runs (key, dataset, strategy, seed, config, env, initial, status, "
                "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
                (key, config["dataset"], config["strategy"], int(config["seed"]),
                 json.dumps(config, sort_keys=True), json.dumps(environment()),
                 json.dumps([int(i) for i in initial]), utc_now(), utc_now()))
        run = self.find_run(key)
        assert run is not None
        return run

    def delete_run(self, run_id: int) -> None:
        """Delete a run and its rounds (e.g. a damaged one, to run it again), and update the
        manifest."""
        assert self.conn is not None
        with self._db(), self.conn:
            self.conn.execute("DELETE FROM rounds WHERE run_id = ?", (run_id,))
            if self.conn.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount == 0:
                raise DalbtError(f"{self.path} has no run {run_id}")
        self.checkpoint()
        self._write_manifest()

    def delete_rounds(self, run_id: int, first: int) -> None:
        """Delete a run's rounds from ``first`` on and mark it running (so that ``--resume``
        runs them again), and update the manifest."""
        assert self.conn is not None
        with self._db(), self.conn:
            self.conn.execute("DELETE FROM rounds WHERE run_id = ? AND round >= ?",
                              (run_id, first))
            self.conn.execute("UPDATE runs SET status = 'running', updated = ? WHERE id = ?",
                              (utc_now(), run_id))
        self.checkpoint()
        self._write_manifest()

    def record_round(self, run_id: int, round_: int, metrics: dict[str, Any],
                     queried: np.ndarray, finished: bool = False) -> None:
        """Write one finished round atomically (and mark the run finished if it was the last),
        then checkpoint it into the database file and update the manifest.

        Args:
            run_id: The run.
            round_: Round number (0 = trained on the initial set).
            metrics: Values of ``ROUND_FIELDS``.
            queried: Dataset indices queried after this round (labelled in round + 1).
            finished: Also mark the run finished, in the same transaction.
        """
        assert self.conn is not None
        values = [metrics.get(f) for f in ROUND_FIELDS]
        values = [None if isinstance(v, float) and np.isnan(v) else v for v in values]
        with self._db(), self.conn:
            self.conn.execute(
                f"INSERT INTO rounds (run_id, round, {', '.join(ROUND_FIELDS)}, queried, created) "
                f"VALUES (?, ?, {', '.join('?' * len(ROUND_FIELDS))}, ?, ?)",
                (run_id, round_, *values, json.dumps([int(i) for i in queried]), utc_now()))
            self.conn.execute("UPDATE runs SET updated = ?, status = ? WHERE id = ?",
                              (utc_now(), "finished" if finished else "running", run_id))
        self.checkpoint()  # the database file alone now holds this round
        self._write_manifest()

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """All recorded rounds of a run, in order, with ``queried`` as an int64 array.

        Raises:
            DalbtError: A round's stored values are damaged (not JSON, not numbers).
        """
        assert self.conn is not None
        with self._db():
            rows = self.conn.execute(
                f"SELECT round, {', '.join(ROUND_FIELDS)}, queried FROM rounds WHERE run_id = ? "
                "ORDER BY round", (run_id,)).fetchall()
        out = []
        for row in rows:
            rec = {"round": row[0], **dict(zip(ROUND_FIELDS, row[1:-1], strict=True))}
            bad = [k for k, v in rec.items()
                   if v is not None and (not isinstance(v, int | float) or isinstance(v, bool))]
            if bad:
                raise self.damaged(run_id, f"round {row[0]}",
                                   f"rounds.{bad[0]} is {rec[bad[0]]!r}, not a number")
            try:
                rec["queried"] = np.asarray(_int_list(row[-1]), dtype=np.int64)
            except (ValueError, TypeError, OverflowError) as exc:
                raise self.damaged(run_id, f"round {row[0]}",
                                   f"rounds.queried: {_json_error(exc)}") from None
            out.append(rec)
        return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dalbt.store DIR --delete-run ID``: delete a damaged run so that it can be
    run again (its checkpoints in DIR/checkpoints too)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dalbt.store",
                                description="Maintenance of an experiment store.")
    p.add_argument("directory", help="experiment directory (holds dalbt.sqlite)")
    p.add_argument("--delete-run", type=int, required=True, metavar="ID",
                   help="delete this run, its rounds and its checkpoints")
    args = p.parse_args(argv)
    try:
        with Store(args.directory, create=False) as store:
            store.delete_run(args.delete_run)
        for sub in ("checkpoints", "scores"):
            for path in sorted((Path(args.directory) / sub).glob(f"run-{args.delete_run}-*")):
                path.unlink()
    except DalbtError as exc:
        print(f"dalbt: error: {exc}", file=sys.stderr)
        return 2
    print(f"deleted run {args.delete_run} from {Path(args.directory) / DB_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
