"""A labelling project: a folder of the user's images, labels given by people, AL rounds.

All state lives in ``DIR/project.sqlite`` (WAL mode): the images by relative path and SHA-256,
every label ever given (append-only, with who and when; the latest one per image counts), the
rounds (one per query, with the model's validation accuracy and a checkpoint) and the queue of
images waiting for a label. Every label is its own transaction, so a crash or a killed server
loses nothing that was acknowledged; a query writes its round and queue in one transaction at
the end, so a killed query leaves no half-written batch and can simply be run again.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import numbers
import os
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dalbt.clock import utc_now
from dalbt.data.formats import IMAGE_EXTENSIONS
from dalbt.errors import DalbtError
from dalbt.labelling.config import ProjectConfig, project_recipe, validate_config
from dalbt.labelling.images import (
    decode_image,
    file_stat,
    is_inside,
    probe_images,
    scan_images,
    sha256_bytes,
)
from dalbt.labelling.lock import QueryLock, lock_held
from dalbt.progress import ProgressCallback, ProgressEvent

DB_NAME = "project.sqlite"
SCHEMA_VERSION = 3  # 2: images.file_stat; 3: queue.confidence, label kind 'none'
OOD = "ood"  # label kind of "none of these classes"
CLASS = "class"
NONE = "none"  # label kind of "no label": an undo back to unlabelled (a correction row)
UNDO_SOURCE = "web-undo"
# Columns added after the first schema: (table, column, type); added by Project._ensure_schema.
LATER_COLUMNS = (("images", "file_stat", "TEXT"), ("queue", "confidence", "REAL"))
STAMP = "milliseconds"  # precision of the timestamps of labels, queue entries and rounds

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,          -- relative to the image root, POSIX separators
    sha256 TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'ok',  -- ok | unreadable | changed | missing
    note TEXT,
    added TEXT NOT NULL,
    file_stat TEXT  -- size:mtime:ctime:inode of the file when it was marked unusable
);
CREATE TABLE IF NOT EXISTS labels (    -- append-only history; the latest row per image counts
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    label TEXT,                          -- class name; NULL when kind is 'ood' or 'none'
    kind TEXT NOT NULL,                  -- class | ood | none (undone: no label)
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    source TEXT NOT NULL                 -- web | web-undo | init | import:<file> | api
);
CREATE INDEX IF NOT EXISTS labels_by_image ON labels(image_id, id);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    method TEXT NOT NULL,                -- the strategy, or 'cold-start'
    n_labelled INTEGER NOT NULL,         -- class labels the model was trained on (incl. val)
    n_val INTEGER NOT NULL,
    val_acc REAL,                        -- NULL without a validation split
    checkpoint TEXT,
    t_train REAL,
    t_select REAL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS queue (
    round INTEGER NOT NULL REFERENCES rounds(round),
    position INTEGER NOT NULL,
    image_id INTEGER NOT NULL REFERENCES images(id),
    predicted TEXT,                      -- the querying model's guess (NULL: cold start)
    status TEXT NOT NULL DEFAULT 'pending',  -- pending | done | skipped | unreadable
    updated TEXT,
    confidence REAL,                     -- its softmax probability (NULL: none, or older)
    PRIMARY KEY (round, image_id)
);
"""
# The latest label row of each image, leaving out images whose latest row is an undo back to
# "no label" (kind 'none'): those are unlabelled.
LATEST_LABELS = (f"SELECT l.* FROM labels l JOIN (SELECT MAX(id) AS id FROM labels "
                 f"GROUP BY image_id) m ON l.id = m.id WHERE l.kind != '{NONE}'")



def default_user() -> str:
    """The OS user name, used as ``who`` when none is given."""
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers)
        return "unknown"


@dataclass(frozen=True)
class QueueItem:
    """One image waiting for (or given) a label in a round's batch."""

    round: int
    position: int
    image_id: int
    path: str
    status: str
    predicted: str | None = None  # the querying model's guess (None: cold start)
    confidence: float | None = None  # its softmax probability (None: no guess, older project)


class UndoRefused(DalbtError):
    """An undo that would overwrite something done since (another label, a new queue)."""


@dataclass(frozen=True)
class Undone:
    """What :meth:`Project.undo_label` did.

    Attributes:
        image_id: The image.
        label_id: The correction row appended to the label history.
        label: The label restored (None: out of distribution or no label).
        kind: ``class``, ``ood`` or ``none`` (unlabelled again).
        round: The round whose queue entry is pending again (None: the image was not queued).
    """

    image_id: int
    label_id: int
    label: str | None
    kind: str
    round: int | None

@dataclass(frozen=True)
class Predictions:
    """A trained round's model on the project's images (:meth:`Project.predictions`).

    Attributes:
        round: The round whose checkpoint gave them.
        image_ids: Image ids, (N,) int64.
        probs: Class probabilities in the project's class order, (N, K) float32.
    """

    round: int
    image_ids: np.ndarray
    probs: np.ndarray


@dataclass(frozen=True)
class QueryResult:
    """What one ``query`` did."""

    round: int
    method: str
    queued: list[int]
    n_labelled: int
    val_acc: float | None
    skipped_images: list[tuple[str, str]]  # (path, reason) of images left out as unusable
    restored_images: list[str] = field(default_factory=list)  # marked unusable, now usable


def parse_classes(classes: str | None, classes_file: str | os.PathLike | None) -> list[str]:
    """Class names from ``a,b,c`` or a file with one name per line (blank lines ignored)."""
    if classes and classes_file:
        raise DalbtError("give the classes either with --classes or with --classes-file, not both")
    if classes_file:
        try:
            names = Path(classes_file).read_text().splitlines()
        except OSError as exc:
            raise DalbtError(f"cannot read the classes file {classes_file}: {exc}") from exc
    elif classes:
        names = classes.split(",")
    else:
        return []
    names = [n.strip() for n in names if n.strip()]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise DalbtError(f"class names must be unique; repeated: {', '.join(dup)}")
    return names


class Project:
    """An open labelling project (see the module docstring).

    Args:
        directory: The project directory (made by :meth:`init`).

    Raises:
        DalbtError: If the directory holds no project.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        db = self.directory / DB_NAME
        if not db.is_file():
            raise DalbtError(f"{self.directory} is not a dalbt labelling project (no {DB_NAME}); "
                             f"create one with 'dalbt init {self.directory} --images PATH "
                             "--classes a,b,c'")
        self.db = self._connect(db)
        self.config = ProjectConfig.from_dict(json.loads(self._meta("config")))
        self.root = Path(self.config.image_root)
        self.root_real = Path(os.path.realpath(self.root))
        self._schema_ready = False  # LATER_COLUMNS known to exist (older projects lack them)

    # -- database --------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it is committed or none."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise DalbtError(f"{self.directory / DB_NAME} is damaged: no '{key}' entry")
        return row[0]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def init(cls, directory: str | os.PathLike, images: str | os.PathLike, classes: list[str],
             labels_csv: str | os.PathLike | None = None, image_size: int | None = None,
             channels: int | None = None, who: str | None = None,
             log: Callable[[str], None] = print, **settings: Any) -> Project:
        """Create a project on a folder of images.

        Images in a sub-folder named like a class (``images/cat/x.png``) start labelled with
        that class; ``labels_csv`` (columns ``path,label``, path relative to ``images``) labels
        more. With no ``classes`` the class sub-folders' names are used.

        Args:
            directory: Where the project lives (created; must not hold a project yet).
            images: The image folder.
            classes: Class names (button order).
            labels_csv: Optional CSV of labels given beforehand.
            image_size: Model input side (default: the most common image size, at most 64).
            channels: 1 or 3 (default: 1 if every image is grayscale).
            who: Recorded as the author of the initial labels.
            log: Where warnings go.
            **settings: Other :class:`ProjectConfig` fields (``strategy``, ``seed``, ...) and
                ``train`` (a :class:`TrainConfig`, or a dict of changes to
                :func:`~dalbt.labelling.config.project_recipe`).

        Returns:
            The open project.
        """
        directory = Path(directory)
        root = Path(images).expanduser()
        paths = _scan_new_project(directory, root, log)
        classes, initial = _initial_labels(paths, classes, labels_csv)
        cfg = _new_config(root, paths, classes, image_size, channels, settings, log)
        cls._create(directory, cfg, root, paths, initial, who or default_user())
        log(f"project {directory}: {len(paths)} images, {len(initial)} labelled, classes "
            f"{', '.join(classes)}; images resized to {cfg.image_size}x{cfg.image_size}, "
            f"{cfg.channels} channel(s)")
        return cls(directory)

    @classmethod
    def _create(cls, directory: Path, cfg: ProjectConfig, root: Path, paths: Sequence[str],
                initial: dict[str, str], who: str) -> None:
        """Write the project database in ``directory`` (made if missing) all or nothing: on
        any failure no database and no folder this call made is left behind."""
        made = [d for d in (directory, *directory.parents) if not d.exists()]
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (DB_NAME + ".init")
        try:
            cls._write_new(tmp, cfg, root, paths, initial, who)
            os.replace(tmp, directory / DB_NAME)
        except BaseException:  # leave nothing behind: no database, no folder made here
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(str(tmp) + suffix).unlink(missing_ok=True)
            for d in made:  # innermost first; only the (empty) folders this call made
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        for suffix in ("-wal", "-shm"):
            Path(str(tmp) + suffix).unlink(missing_ok=True)

    @classmethod
    def _write_new(cls, path: Path, cfg: ProjectConfig, root: Path, paths: Sequence[str],
                   initial: dict[str, str], who: str) -> None:
        """Write a new project database at ``path``: config, image hashes, initial labels."""
        from tqdm import tqdm

        Path(path).unlink(missing_ok=True)
        db = cls._connect(path)
        try:
            db.executescript(SCHEMA)
            now = utc_now(STAMP)
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO meta VALUES (?, ?)",
                           [("config", json.dumps(cfg.to_dict(), allow_nan=False)),
                            ("schema_version", str(SCHEMA_VERSION)), ("created", now)])
            for rel in tqdm(paths, desc="hashing images", unit="img",
                            disable=len(paths) < 2000):
                try:
                    digest = sha256_bytes((root / rel).read_bytes())
                except OSError as exc:
                    raise DalbtError(f"cannot read image {rel} under {root}: "
                                     f"{exc.strerror or exc}; make it readable or move it out "
                                     "of the image folder") from exc
                cur = db.execute("INSERT INTO images (path, sha256, added) VALUES (?, ?, ?)",
                                 (rel, digest, now))
                if rel in initial:
                    db.execute("INSERT INTO labels (image_id, label, kind, who, at, source) "
                               "VALUES (?, ?, ?, ?, ?, 'init')",
                               (cur.lastrowid, initial[rel], CLASS, who, now))
            db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()

    # -- images ----------------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        return list(self.config.classes)

    def image_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def image(self, image_id: int) -> tuple[str, str, str]:
        """``(relative path, sha256, status)`` of an image.

        Raises:
            DalbtError: If there is no such image.
        """
        row = self.db.execute("SELECT path, sha256, status FROM images WHERE id = ?",
                              (int(image_id),)).fetchone()
        if row is None:
            raise DalbtError(f"no image with id {image_id} in this project")
        return row

    def image_ids(self) -> dict[str, int]:
        """Relative path -> image id of every image."""
        return dict(self.db.execute("SELECT path, id FROM images"))

    def safe_path(self, rel: str) -> Path:
        """The file of a relative image path, refusing anything outside the image root.

        Raises:
            DalbtError: If the path (after resolving ``..`` and symbolic links) leaves the root.
        """
        if not rel or Path(rel).is_absolute() or "\\" in rel or "\x00" in rel:
            raise DalbtError(f"image path {rel!r} is not a relative path inside the image folder")
        full = self.root / rel
        if not is_inside(self.root_real, full):
            raise DalbtError(f"image path {rel!r} leads outside the image folder")
        return full

    def read_image(self, image_id: int) -> bytes:
        """The bytes of an image, checked against its stored hash.

        An image that changed, vanished or leads outside the root is marked (so later queries
        leave it out until :meth:`recheck_images` finds it as it was) and reported.

        Raises:
            DalbtError: Naming the image and what is wrong with it.
        """
        return self._read_image(image_id)[0]

    def _read_image(self, image_id: int) -> tuple[bytes, str | None]:
        """:meth:`read_image`, also giving the file's :func:`file_stat` taken before reading."""
        rel, digest, _ = self.image(image_id)
        try:
            full = self.safe_path(rel)
        except DalbtError as exc:
            self.mark_image(image_id, "unreadable", str(exc))
            raise
        # The signature is taken first: a file replaced while it is read is re-hashed later.
        stat = file_stat(full)
        try:
            data = full.read_bytes()
        except OSError as exc:
            self.mark_image(image_id, "missing", f"cannot read: {exc.strerror or exc}", stat)
            raise DalbtError(f"image {rel} cannot be read: {exc.strerror or exc}") from exc
        if sha256_bytes(data) != digest:
            self.mark_image(image_id, "changed", "the file changed on disk since it was added",
                            stat)
            raise DalbtError(f"image {rel} changed on disk since it was added to the project; "
                             "it is skipped")
        return data, stat

    def _has_column(self, table: str, column: str) -> bool:
        return column in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}

    def _ensure_schema(self) -> None:
        """Add the :data:`LATER_COLUMNS` a project made by an older version lacks
        (``images.file_stat``: schema 1; ``queue.confidence``: schema 2), before writing them.
        Reading needs no migration: readers of a missing column see NULL."""
        if self._schema_ready:
            return

        def missing() -> list[tuple[str, str, str]]:
            return [c for c in LATER_COLUMNS if not self._has_column(c[0], c[1])]

        if missing():
            with self.transaction() as db:
                for table, column, kind in missing():  # checked again under the write lock
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                           (str(SCHEMA_VERSION),))
        self._schema_ready = True

    def mark_image(self, image_id: int, status: str, note: str,
                   stat: str | None = None) -> None:
        """Record that an image is unusable (``unreadable``, ``changed`` or ``missing``); its
        pending queue entries are closed as ``unreadable``.

        Args:
            image_id: The image.
            status: ``unreadable``, ``changed`` or ``missing``.
            note: Why, for people.
            stat: The file's :func:`file_stat` when it was found so (lets
                :meth:`recheck_images` skip re-reading a file nobody touched since).
        """
        self._ensure_schema()
        with self.transaction() as db:
            db.execute("UPDATE images SET status = ?, note = ?, file_stat = ? WHERE id = ?",
                       (status, note, stat, int(image_id)))
            db.execute("UPDATE queue SET status = 'unreadable', updated = ? "
                       "WHERE image_id = ? AND status = 'pending'", (utc_now(STAMP), int(image_id)))

    def recheck_images(self) -> list[tuple[str, str, str]]:
        """Look again at every image marked unusable; one whose file is back as it was added
        (same hash, decodable) is usable again.

        Cheap first: a file whose size, modification time, change time and inode are those seen
        when it was marked is still what it was, without reading it; any other file is read and
        hashed (and, when its hash matches, decoded once).

        Returns:
            ``(path, status before, status now)`` of every marked image, by path; ``ok`` means
            restored, else ``missing``, ``changed`` or ``unreadable``.
        """
        self._ensure_schema()
        cfg = self.config
        rows = self.db.execute("SELECT id, path, sha256, status, note, file_stat FROM images "
                               "WHERE status != 'ok' ORDER BY path").fetchall()
        out = []
        for image_id, rel, digest, status, note, old_stat in rows:
            stat: str | None = None
            try:
                full = self.safe_path(rel)
            except DalbtError as exc:
                new, why = "unreadable", str(exc)
            else:
                stat = file_stat(full)
                if stat is None:
                    new, why = "missing", (note if status == "missing" else "the file is gone")
                elif stat == old_stat:  # untouched since it was marked
                    new, why = status, note
                else:
                    new, why = self._check_content(full, rel, digest, cfg)
            out.append((rel, status, new))
            if (new, why, stat) == (status, note, old_stat):
                continue
            with self.transaction() as db:
                db.execute("UPDATE images SET status = ?, note = ?, file_stat = ? WHERE id = ?",
                           (new, None if new == "ok" else why,
                            None if new == "ok" else stat, image_id))
        return out

    @staticmethod
    def _check_content(full: Path, rel: str, digest: str,
                       cfg: ProjectConfig) -> tuple[str, str | None]:
        """``(status, note)`` of a marked image's file read again."""
        try:
            data = full.read_bytes()
        except OSError as exc:
            return "missing", f"cannot read: {exc.strerror or exc}"
        if sha256_bytes(data) != digest:
            return "changed", "the file changed on disk since it was added"
        try:
            decode_image(data, cfg.image_size, cfg.channels, rel, log=lambda m: None)
        except DalbtError as exc:
            return "unreadable", str(exc)
        return "ok", None

    def problems(self) -> list[tuple[str, str, str]]:
        """``(path, status, note)`` of every image marked unusable."""
        return self.db.execute("SELECT path, status, COALESCE(note, '') FROM images "
                               "WHERE status != 'ok' ORDER BY path").fetchall()

    # -- labels ----------------------------------------------------------------------------

    def add_label(self, image_id: int, label: str | None, who: str | None = None,
                  source: str = "api") -> int:
        """Record a label (committed before returning); ``label=None`` means "none of these
        classes" (out of distribution). Closes the image's pending queue entries.

        Returns:
            The id of the label row (what :meth:`undo_label` takes).

        Raises:
            DalbtError: Unknown class or image.
        """
        return self._add_labels([(image_id, label, who)], source, False)[0][0]

    def add_labels(self, items: Iterable[tuple[int, str | None, str | None]], source: str,
                   skip_unchanged: bool = False) -> tuple[int, int]:
        """Record many labels in one transaction (all or none), with one timestamp.

        Args:
            items: ``(image_id, label or None for out of distribution, who or None)``.
            source: Where they come from (``web``, ``import:<file>``, ...).
            skip_unchanged: Do not add a label equal to the image's current one.

        Returns:
            ``(added, unchanged)`` counts.

        Raises:
            DalbtError: Unknown class or image (nothing is written).
        """
        ids, unchanged = self._add_labels(items, source, skip_unchanged)
        return len(ids), unchanged

    def _add_labels(self, items: Iterable[tuple[int, str | None, str | None]], source: str,
                    skip_unchanged: bool) -> tuple[list[int], int]:
        """:meth:`add_labels`, returning the new label rows' ids and the unchanged count."""
        items = [(int(i), label, who) for i, label, who in items]
        for image_id, label, _ in items:
            if label is not None and label not in self.config.classes:
                raise DalbtError(f"unknown class {label!r}; the classes are "
                                 f"{', '.join(self.config.classes)}")
            self.image(image_id)
        now = utc_now(STAMP)
        ids: list[int] = []
        unchanged = 0
        default = default_user()
        with self.transaction() as db:
            current = self.current_labels() if skip_unchanged else {}
            for image_id, label, who in items:
                if skip_unchanged and image_id in current and current[image_id] == label:
                    unchanged += 1
                    continue
                cur = db.execute("INSERT INTO labels (image_id, label, kind, who, at, source) "
                                 "VALUES (?, ?, ?, ?, ?, ?)",
                                 (image_id, label, CLASS if label is not None else OOD,
                                  who or default, now, source))
                ids.append(int(cur.lastrowid))
                db.execute("UPDATE queue SET status = 'done', updated = ? "
                           "WHERE image_id = ? AND status IN ('pending', 'skipped')",
                           (now, image_id))
        return ids, unchanged

    def skip(self, image_id: int) -> int | None:
        """Leave a queued image unlabelled for now (it goes back to the pool).

        Returns:
            The round of the queue entry skipped (what :meth:`unskip` takes); None when the
            image waited in no queue (labelled or skipped elsewhere meanwhile).
        """
        with self.transaction() as db:
            row = db.execute("SELECT MAX(round) FROM queue WHERE image_id = ? AND "
                             "status = 'pending'", (int(image_id),)).fetchone()
            db.execute("UPDATE queue SET status = 'skipped', updated = ? "
                       "WHERE image_id = ? AND status = 'pending'", (utc_now(STAMP), int(image_id)))
        return row[0]

    def unskip(self, image_id: int, round_: int) -> None:
        """Undo a :meth:`skip`: the image's queue entry of ``round_`` waits for a label again.

        Raises:
            UndoRefused: If that entry is no longer skipped (labelled since, or queued again
                in a later round) or the image has a label now.
            DalbtError: If the image was never queued in that round.
        """
        image_id, round_ = int(image_id), int(round_)
        with self.transaction() as db:
            row = db.execute("SELECT status FROM queue WHERE image_id = ? AND round = ?",
                             (image_id, round_)).fetchone()
            if row is None:
                raise DalbtError(f"image {image_id} was not queued in round {round_}; "
                                 "nothing to undo")
            if row[0] != "skipped":
                raise UndoRefused(f"image {image_id} is no longer skipped (now {row[0]}): it "
                                  "was labelled or handled elsewhere since; nothing undone")
            later = db.execute("SELECT 1 FROM queue WHERE image_id = ? AND round > ?",
                               (image_id, round_)).fetchone()
            if later is not None or image_id in self.current_labels():
                raise UndoRefused(f"image {image_id} was queued again or labelled since it "
                                  "was skipped; nothing undone")
            db.execute("UPDATE queue SET status = 'pending', updated = ? WHERE image_id = ? "
                       "AND round = ?", (utc_now(STAMP), image_id, round_))

    def undo_label(self, label_id: int, who: str | None = None,
                   source: str = UNDO_SOURCE) -> Undone:
        """Undo a label: append a correction that restores the image's state before it.

        Nothing is deleted: the correction is a new row of the label history, with the label
        the image had before (or kind ``none``: no label), ``who`` and ``source``. Back to no
        label, the image's latest queue entry closed by a label waits again (the page shows the
        image again); back to an earlier label, the image stays labelled and out of the queue.

        Args:
            label_id: The label row to undo (from :meth:`add_label`).
            who: Who undoes it (default: the OS user).
            source: Recorded as the correction's source.

        Returns:
            What was restored.

        Raises:
            UndoRefused: If that label is no longer the image's latest (labelled again since,
                by another tab or person); nothing is written.
            DalbtError: If there is no such label.
        """
        label_id = int(label_id)
        self._ensure_schema()  # kind 'none' rows: the schema version that knows them
        with self.transaction() as db:
            row = db.execute("SELECT image_id, kind FROM labels WHERE id = ?",
                             (label_id,)).fetchone()
            if row is None:
                raise DalbtError(f"no label with id {label_id} in this project; nothing undone")
            image_id = int(row[0])
            latest = db.execute("SELECT MAX(id) FROM labels WHERE image_id = ?",
                                (image_id,)).fetchone()[0]
            if latest != label_id:
                raise UndoRefused(f"image {image_id} was labelled again since (by another tab "
                                  "or person); that later label stays, nothing undone")
            before = db.execute("SELECT label, kind FROM labels WHERE image_id = ? AND id < ? "
                                "ORDER BY id DESC LIMIT 1", (image_id, label_id)).fetchone()
            label, kind = before if before is not None else (None, NONE)
            now = utc_now(STAMP)
            cur = db.execute("INSERT INTO labels (image_id, label, kind, who, at, source) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (image_id, label, kind, who or default_user(), now, source))
            entry = None
            if kind == NONE:  # back to no label: it waits in its batch again
                entry = db.execute("SELECT MAX(round) FROM queue WHERE image_id = ? AND "
                                   "status = 'done'", (image_id,)).fetchone()[0]
            if entry is not None:
                db.execute("UPDATE queue SET status = 'pending', updated = ? WHERE image_id = ? "
                           "AND round = ?", (now, image_id, entry))
        return Undone(image_id=image_id, label_id=int(cur.lastrowid), label=label, kind=kind,
                      round=entry)

    def current_labels(self) -> dict[int, str | None]:
        """Image id -> its latest label (``None`` for out of distribution); an image whose
        latest row is an undo back to "no label" is unlabelled, so not in it."""
        rows = self.db.execute(f"SELECT image_id, label FROM ({LATEST_LABELS})")
        return dict(rows.fetchall())

    def label_history(self, current_only: bool = False) -> list[dict[str, Any]]:
        """Every label ever given, oldest first, corrections included (an undo back to no
        label has kind ``none``); with ``current_only`` only the latest label of each labelled
        image, sorted by path (images undone to no label are left out)."""
        if current_only:
            sql = ("SELECT l.id, i.path, i.sha256, l.label, l.kind, l.who, l.at, l.source "
                   f"FROM ({LATEST_LABELS}) l JOIN images i ON i.id = l.image_id "
                   "ORDER BY i.path")
        else:
            sql = ("SELECT l.id, i.path, i.sha256, l.label, l.kind, l.who, l.at, l.source "
                   "FROM labels l JOIN images i ON i.id = l.image_id ORDER BY l.id")
        keys = ("id", "path", "sha256", "label", "kind", "who", "at", "source")
        return [dict(zip(keys, r, strict=True)) for r in self.db.execute(sql)]

    # -- queue and rounds ------------------------------------------------------------------

    def _queue_columns(self) -> str:
        """The SELECT list of a :class:`QueueItem` (``queue q`` joined with ``images i``)."""
        confidence = "q.confidence" if self._has_column("queue", "confidence") else "NULL"
        return f"q.round, q.position, q.image_id, i.path, q.status, q.predicted, {confidence}"

    def pending(self) -> list[QueueItem]:
        """Queued images still waiting for a label, oldest round first, in query order."""
        rows = self.db.execute(
            f"SELECT {self._queue_columns()} FROM queue q "
            "JOIN images i ON i.id = q.image_id WHERE q.status = 'pending' "
            "ORDER BY q.round, q.position")
        return [QueueItem(*r) for r in rows]

    def queue(self, round_: int | None = None) -> list[QueueItem]:
        """Every queue entry (of one round, or all), in query order."""
        sql = (f"SELECT {self._queue_columns()} FROM queue q "
               "JOIN images i ON i.id = q.image_id")
        args: tuple = ()
        if round_ is not None:
            sql += " WHERE q.round = ?"
            args = (int(round_),)
        return [QueueItem(*r) for r in self.db.execute(sql + " ORDER BY q.round, q.position",
                                                       args)]

    def rounds(self) -> list[dict[str, Any]]:
        """Every round with its validation accuracy and ``batch_acc``: how often the model that
        queried the batch predicted the label the person then gave (None until one is given)."""
        rows = self.db.execute(
            "SELECT round, method, n_labelled, n_val, val_acc, t_train, t_select, created "
            "FROM rounds ORDER BY round").fetchall()
        labels = self.current_labels()
        out = []
        for r in rows:
            rec = dict(zip(("round", "method", "n_labelled", "n_val", "val_acc", "t_train",
                            "t_select", "created"), r, strict=True))
            q = self.db.execute("SELECT image_id, predicted, status FROM queue WHERE round = ?",
                                (rec["round"],)).fetchall()
            judged = [(p, labels.get(i)) for i, p, _ in q if p is not None
                      and i in labels and labels[i] is not None]
            rec["batch_size"] = len(q)
            rec["batch_labelled"] = sum(1 for _, _, s in q if s == "done")
            rec["batch_acc"] = (sum(p == y for p, y in judged) / len(judged)) if judged else None
            out.append(rec)
        return out

    def progress(self) -> dict[str, Any]:
        """Counts for the page: images, labels per class, pending, out-of-distribution."""
        labels = self.current_labels()
        per_class = Counter(v for v in labels.values() if v is not None)
        return {"images": self.image_count(),
                "labelled": sum(per_class.values()),
                "ood": sum(1 for v in labels.values() if v is None),
                "per_class": {c: per_class.get(c, 0) for c in self.config.classes},
                "pending": len(self.pending()),
                "problems": len(self.problems()),
                "rounds": len(self.rounds())}

    # -- querying --------------------------------------------------------------------------

    def acquire_query_lock(self) -> QueryLock:
        """Take the project's query lock (one query at a time, across processes).

        Raises:
            DalbtError: If another query holds it.
        """
        return QueryLock(self.directory / "query.lock")

    def query_running(self) -> bool:
        """Whether some process holds the query lock right now."""
        return lock_held(self.directory / "query.lock")

    def _load_pixels(self, progress: bool, log: Callable[[str], None] = print
                     ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """Decode every usable image (through a cache keyed by content hash); PIL's warnings
        about an image go to ``log`` with its path.

        Returns:
            ``(ids, x, problems)``: image ids (N,), uint8 pixels (N, C, S, S) and
            ``(path, reason)`` of the images found unusable now (also marked in the database).
        """
        from tqdm import tqdm

        cfg = self.config
        rows = self.db.execute("SELECT id, path, sha256 FROM images WHERE status = 'ok' "
                               "ORDER BY id").fetchall()
        cache_path = self.directory / "cache" / f"pixels_{cfg.image_size}_{cfg.channels}.npz"
        cached: dict[str, np.ndarray] = {}
        if cache_path.exists():
            try:
                with np.load(cache_path) as z:
                    cached = dict(zip(z["sha"].tolist(), z["x"], strict=True))
            except Exception:  # a damaged cache is rebuilt
                cached = {}
        ids, xs, shas, problems = [], [], [], []
        for image_id, rel, digest in tqdm(rows, desc="reading images", unit="img",
                                          disable=not progress or len(rows) < 2000):
            try:
                data, stat = self._read_image(image_id)  # checks the hash, marks problems
                x = cached.get(digest)
                if x is None:
                    try:
                        x = decode_image(data, cfg.image_size, cfg.channels, rel, log)
                    except DalbtError as exc:
                        self.mark_image(image_id, "unreadable", str(exc), stat)
                        raise
            except DalbtError as exc:
                problems.append((rel, str(exc)))
                continue
            ids.append(image_id)
            xs.append(x)
            shas.append(digest)
        x = (np.stack(xs) if xs else
             np.empty((0, cfg.channels, cfg.image_size, cfg.image_size), np.uint8))
        if set(shas) != set(cached):
            cache_path.parent.mkdir(exist_ok=True)
            # a file of its own: the ML backend may read the images while a query does
            fd, name = tempfile.mkstemp(suffix=".tmp.npz", dir=cache_path.parent)
            os.close(fd)
            try:
                np.savez(name, sha=np.array(shas), x=x)
                os.replace(name, cache_path)
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
        return np.array(ids, dtype=np.int64), x, problems

    def _is_validation(self, sha: str) -> bool:
        """Stable role of a labelled image: held out when its seeded hash falls in the
        ``val_fraction`` share."""
        h = hashlib.sha256(f"{self.config.seed}:{sha}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < self.config.val_fraction

    def query(self, budget: int, progress: bool = True, log: Callable[[str], None] = print,
              lock: QueryLock | None = None, on_progress: ProgressCallback | None = None
              ) -> QueryResult:
        """Train on the labels so far and queue the next ``budget`` images.

        With no class label yet this is a cold start: Barlow Twins features of all images
        (``cold_start_epochs``), then the cold-start strategy on them (default ``dalbt``, which
        is TypiClust before any label). Otherwise the project's strategy runs on a model
        trained with the project's recipe; labelled images whose hash puts them in the
        validation share select the epoch and give the round's accuracy.

        Args:
            budget: Images to queue (> 0; fewer if the pool is smaller).
            progress: Show progress bars.
            log: Where one-line summaries go.
            lock: A query lock the caller already holds (from :meth:`acquire_query_lock`) and
                releases itself; by default the query takes and releases one.
            on_progress: Called with a :class:`~dalbt.progress.ProgressEvent` as the query
                pre-trains or trains, scores and selects (a few a second at most, from this
                thread); its ``query_eta_s`` adds what the previous query took after training.

        Returns:
            What was queued.

        Raises:
            DalbtError: Bad budget, another query running, or nothing left to label.
        """
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
            raise DalbtError(f"--budget must be a positive number of images, got {budget!r}")
        try:
            validate_config(self.config)
        except DalbtError as exc:
            raise DalbtError(f"{self.directory / DB_NAME} holds a setting this version cannot "
                             f"train with: {exc}; export its labels ('dalbt export'), "
                             "create the project again ('dalbt init') and import them") from None
        if lock is not None:
            if not lock.held:
                raise DalbtError("the query lock passed to query() was already released")
            return self._query(budget, progress, log, on_progress)
        with self.acquire_query_lock():
            return self._query(budget, progress, log, on_progress)

    def _round_split(self, ids: np.ndarray, log: Callable[[str], None]
                     ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """The round's labels and roles of the usable images (positions in ``ids``).

        Returns:
            ``(y, labelled, validation, pool)``: labels (N,) int64 tensor (-1: none), the
            positions that train, those held out for validation (each image's role is fixed by
            its hash; none when fewer than ``min_val``), and the unlabelled, unqueued pool.

        Raises:
            DalbtError: Nothing left to query.
        """
        import torch

        cfg = self.config
        labels = self.current_labels()
        pending = {q.image_id for q in self.pending()}
        sha = dict(self.db.execute("SELECT id, sha256 FROM images"))
        index = {int(i): k for k, i in enumerate(ids)}
        cls_index = {c: k for k, c in enumerate(cfg.classes)}
        y = torch.full((len(ids),), -1, dtype=torch.int64)
        lab_pos, val_pos = [], []
        for image_id, label in labels.items():
            if image_id in index and label is not None:
                k = index[image_id]
                y[k] = cls_index[label]
                (val_pos if self._is_validation(sha[image_id]) else lab_pos).append(k)
        if len(val_pos) < cfg.min_val:  # too few to select on: every label trains
            lab_pos, val_pos = sorted(lab_pos + val_pos), []
        taken = np.fromiter([*labels, *pending], dtype=np.int64)
        cand = np.flatnonzero(~np.isin(ids, taken)).astype(np.int64)
        if len(cand) == 0:
            raise DalbtError("every usable image is labelled or already queued; nothing left "
                             "to query")
        if pending:
            log(f"note: {len(pending)} queued images still wait for a label; they stay queued")
        return (y, np.array(sorted(lab_pos), np.int64), np.array(sorted(val_pos), np.int64),
                cand)

    def _query(self, budget: int, progress: bool, log: Callable[[str], None],
               on_progress: ProgressCallback | None = None) -> QueryResult:
        import torch

        from dalbt.al_round import RoundData, run_round
        from dalbt.strategies import build_strategy
        from dalbt.train import with_min_steps

        cfg = self.config
        round_ = self.db.execute("SELECT COALESCE(MAX(round), -1) + 1 FROM rounds").fetchone()[0]
        restored = self._recheck(log)
        ids, x_np, problems = self._load_pixels(progress, log)
        for rel, why in problems:
            log(f"warning: skipped {rel}: {why}")
        y, lab_pos, val_pos, cand = self._round_split(ids, log)
        cold = len(lab_pos) == 0
        strategy = (build_strategy(cfg.cold_start_strategy) if cold
                    else build_strategy(cfg.strategy, **cfg.strategy_options))
        device = torch.device(cfg.train.device)

        def new_model(seed: int) -> torch.nn.Module:
            return self._model(strategy.train_dropout, seed).to(device)

        train_cfg = cfg.train if cold else with_min_steps(cfg.train, len(lab_pos), cfg.min_steps)
        if train_cfg.finetune == "head":  # the frozen encoder's embeddings, kept on disk
            train_cfg = replace(train_cfg, embedding_cache=str(self.directory))
        data = RoundData(images=torch.from_numpy(x_np), targets=y,
                         num_classes=len(cfg.classes), labelled=lab_pos, validation=val_pos,
                         unlabelled=cand, known=np.sort(np.concatenate([lab_pos, val_pos])))
        after = [r["t_select"] for r in self.rounds() if r["method"] != "cold-start"]
        res = run_round(strategy, data, train_cfg, seed=cfg.seed, round_=round_, budget=budget,
                        new_model=new_model,
                        total_rounds=max(cfg.planned_rounds, round_ + 1),
                        cold_start_epochs=cfg.cold_start_epochs, progress=progress,
                        on_progress=(None if on_progress is None else _QueryEta(
                            on_progress, after[-1] if after and not cold else None)),
                        guesses=True)
        model, chosen, method = res.model, res.queried, "cold-start" if cold else cfg.strategy
        val_acc = float(res.train.val_acc) if res.train is not None and len(val_pos) else None
        predicted: list[str | None] = [None] * len(chosen)
        confidence: list[float | None] = [None] * len(chosen)
        if res.guesses is not None:
            probs = torch.softmax(res.guesses.logits.float(), dim=1).max(dim=1)
            predicted = [cfg.classes[int(p)] for p in probs.indices.numpy()]
            confidence = [float(c) for c in probs.values.numpy()]
        t_train, t_select = res.t_train, res.t_score + res.t_select
        ckpt_dir = self.directory / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        ckpt = ckpt_dir / f"round_{round_:03d}.pt"
        tmp = ckpt.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, ckpt)
        queued = [int(ids[k]) for k in chosen]
        now = utc_now(STAMP)
        n_labelled = int(len(lab_pos) + len(val_pos))
        self._ensure_schema()
        with self.transaction() as db:
            db.execute("INSERT INTO rounds (round, method, n_labelled, n_val, val_acc, checkpoint,"
                       " t_train, t_select, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (round_, method, n_labelled, int(len(val_pos)), val_acc,
                        ckpt.relative_to(self.directory).as_posix(), t_train, t_select, now))
            db.executemany("INSERT INTO queue (round, position, image_id, predicted, "
                           "confidence, status, updated) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                           [(round_, p, i, predicted[p], confidence[p], now)
                            for p, i in enumerate(queued)])
        acc = "" if val_acc is None else f", validation accuracy {100 * val_acc:.1f} %"
        log(f"round {round_} ({method}): trained on {n_labelled} labels{acc}; queued "
            f"{len(queued)} images (train {t_train:.1f}s, select {t_select:.1f}s)")
        return QueryResult(round=round_, method=method, queued=queued, n_labelled=n_labelled,
                           val_acc=val_acc, skipped_images=problems, restored_images=restored)

    def _model(self, dropout: float, seed: int) -> Any:
        """A new model of the project's architecture (a DALBTNet on the CPU)."""
        from dalbt.models import build_model

        cfg = self.config
        return build_model(cfg.model, cfg.channels, cfg.image_size, len(cfg.classes),
                           dropout=dropout, seed=seed, weights=cfg.weights,
                           input_size=cfg.input_size)

    def predictions(self, log: Callable[[str], None] = print) -> Predictions | None:
        """The latest trained round's class probabilities for every usable image.

        The model is the round's checkpoint (a cold-start round trains no classifier, so it
        gives none), run in one batched pass over the images (decoded through the pixel cache).

        Args:
            log: Where warnings about unreadable images go.

        Returns:
            The round, image ids (N,) and probabilities (N, K) in class order, or None before
            any round has trained a classifier.
        """
        import torch

        from dalbt.strategies import build_strategy
        from dalbt.train import infer

        row = self.db.execute("SELECT round, method, checkpoint FROM rounds WHERE method != "
                              "'cold-start' AND checkpoint IS NOT NULL ORDER BY round DESC "
                              "LIMIT 1").fetchone()
        if row is None:
            return None
        round_, method, ckpt = row
        path = self.directory / ckpt
        if not path.is_file():
            raise DalbtError(f"the checkpoint of round {round_} ({path}) is missing; run "
                             f"'dalbt query {self.directory}' to train a new one")
        cfg = self.config
        ids, x, _ = self._load_pixels(progress=False, log=log)
        options = cfg.strategy_options if method == cfg.strategy else {}
        model = self._model(build_strategy(method, **options).train_dropout, cfg.seed)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        logits = infer(model, torch.from_numpy(x), np.arange(len(ids))).logits
        return Predictions(round=int(round_), image_ids=ids,
                           probs=torch.softmax(logits, dim=1).numpy())

    def _recheck(self, log: Callable[[str], None]) -> list[str]:
        """:meth:`recheck_images`, saying what changed; returns the restored paths."""
        restored, still = [], defaultdict(list)
        for rel, before, now in self.recheck_images():
            if now == "ok":
                restored.append(rel)
                log(f"restored: {rel} (marked {before}) is back as it was added; it is usable "
                    "again")
            elif now != before:
                log(f"warning: {rel} was marked {before} and is now {now}")
            else:
                still[now].append(rel)
        for status, rels in sorted(still.items()):
            shown = ", ".join(rels[:5]) + (f" and {len(rels) - 5} more" if len(rels) > 5 else "")
            log(f"still {status}: {len(rels)} image{'s' if len(rels) > 1 else ''} left out "
                f"({shown}); restore the original files to bring them back")
        return restored


class _QueryEta:
    """A progress callback that adds ``query_eta_s`` to the events of a query and passes them
    on: the phase's time left plus, while training, ``after`` (what the previous query spent
    scoring and selecting); after training, what is left of ``after`` (or of the phase, if
    more). Without ``after`` (the first query after the cold start) it stays None."""

    def __init__(self, on_progress: ProgressCallback, after: float | None) -> None:
        self.on_progress, self.after = on_progress, after
        self.t_trained: float | None = None  # when scoring started

    def __call__(self, event: ProgressEvent) -> None:
        left: float | None = None
        if self.after is not None:
            if event.phase in ("training", "pre-training"):
                left = None if event.eta_s is None else event.eta_s + self.after
            elif event.phase == "selecting" and event.done >= event.total:
                left = 0.0
            else:
                now = time.perf_counter()
                if self.t_trained is None:
                    self.t_trained = now
                left = max(event.eta_s or 0.0, self.after - (now - self.t_trained))
        self.on_progress(replace(event, query_eta_s=left))


def _read_labels_csv(path: Path, paths: set[str], classes: list[str]) -> dict[str, str]:
    """``path,label`` rows of a CSV (header optional) checked against the images and classes."""
    import csv

    if not path.is_file():
        raise DalbtError(f"labels file {path} does not exist")
    out: dict[str, str] = {}
    with path.open(newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise DalbtError(f"{path}:{n}: expected 'path,label', got {','.join(row)!r}")
            rel, label = row[0].strip().replace("\\", "/"), row[1].strip()
            if rel not in paths:
                raise DalbtError(f"{path}:{n}: no image {rel!r} in the image folder")
            if label not in classes:
                raise DalbtError(f"{path}:{n}: unknown class {label!r}; the classes are "
                                 f"{', '.join(classes)}")
            out[rel] = label
    return out


def _scan_new_project(directory: Path, root: Path, log: Callable[[str], None]) -> list[str]:
    """The images under ``root`` for a new project in ``directory`` (which must hold none)."""
    if not root.is_dir():
        raise DalbtError(f"image folder {root} does not exist or is not a directory")
    if (directory / DB_NAME).exists():
        raise DalbtError(f"{directory} already holds a labelling project; open it with "
                         f"'dalbt query {directory}' or 'dalbt serve {directory}'")
    paths, warnings = scan_images(root)
    for w in warnings:
        log(f"warning: {w}")
    if not paths:
        raise DalbtError(f"no images found under {root} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))} files)")
    return paths


def _initial_labels(
    paths: list[str], classes: list[str], labels_csv: str | os.PathLike | None
) -> tuple[list[str], dict[str, str]]:
    """The classes (default: the class sub-folders' names) and the labels given beforehand:
    class sub-folders, then ``labels_csv``."""
    folder_label = {p: p.split("/")[0] for p in paths if "/" in p}
    if not classes:
        classes = sorted(set(folder_label.values()))
        if not classes:
            raise DalbtError("name the classes with --classes a,b,c or --classes-file FILE")
    if len(classes) < 2:
        raise DalbtError(f"a project needs at least 2 classes, got {classes}")
    initial: dict[str, str] = {p: c for p, c in folder_label.items() if c in classes}
    if labels_csv is not None:
        initial.update(_read_labels_csv(Path(labels_csv), set(paths), classes))
    return classes, initial


def _new_config(root: Path, paths: list[str], classes: list[str], image_size: int | None,
                channels: int | None, settings: dict[str, Any],
                log: Callable[[str], None]) -> ProjectConfig:
    """A new project's checked config; image size and channels probed unless given."""
    probed_size, probed_channels = probe_images(root, paths, log=log)
    train = settings.pop("train", None)
    if isinstance(train, dict):  # changes to the project's default recipe
        train = replace(project_recipe(), **train)
    settings["train"] = train or project_recipe()
    cfg = ProjectConfig(classes=list(classes), image_root=str(root.resolve()),
                        image_size=image_size or probed_size,
                        channels=channels or probed_channels, **settings)
    validate_config(cfg)  # before anything is written
    return replace(cfg, image_size=int(cfg.image_size), channels=int(cfg.channels))


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["CLASS", "NONE", "OOD", "Predictions", "Project", "ProjectConfig", "QueryResult",
           "QueueItem", "UndoRefused", "Undone", "default_user", "is_loopback", "parse_classes"]
