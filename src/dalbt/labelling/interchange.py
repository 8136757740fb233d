"""Export and import of a labelling project's labels: CSV and Label Studio JSON.

Export (``dalbt export DIR [--format csv|labelstudio] [--queue | --all]``)
---------------------------------------------------------------------------
* CSV, labels: one row per labelled image with its current label,
  ``path,sha256,label,kind,who,at,source`` (``label`` empty and ``kind`` ``ood`` for "none of
  these classes"), sorted by path.
* CSV, ``--queue``: the images waiting for a label in query order,
  ``round,position,path,sha256,label``; the ``label`` column is empty, to be filled in and
  imported back.
* CSV cells are safe to open in a spreadsheet: a text that starts with ``=``, ``+``, ``-``,
  ``@``, a tab or a carriage return (a formula to Excel, LibreOffice and Google Sheets: a
  labeller named ``=HYPERLINK(...)``), or with quotes followed by one of those, gets a ``'``
  in front (OWASP's rule against CSV injection). Import takes that ``'`` off again, so a
  file exported by dalbt reads back exactly.
* Label Studio: a list of tasks in Label Studio's import format. Each task's ``data`` holds
  ``image`` (``/data/local-files/?d=<path relative to the image folder>``), ``dalbt_path`` and
  ``dalbt_sha256``. A labelled image carries one annotation whose ``result`` is a ``choices``
  result (from ``choice`` to ``image``; "none of these classes" for out of distribution) and
  whose ``created_at`` is the label's time. Label Studio credits imported annotations to the
  importing user and ignores their ``created_at``; ``completed_by`` is left out because Label
  Studio refuses the whole import when it names someone who is not a member, so the dalbt
  author, time and source stay in the task's ``meta`` (``dalbt_who``, ``dalbt_at``,
  ``dalbt_source``). With ``--queue``: the pending images as tasks without annotations (the
  model's guess is not sent, so labellers are not anchored by it), ``meta`` giving
  ``dalbt_round`` and ``dalbt_position``. With ``--all``: every usable image, sorted by path,
  the labelled ones with their annotation (the tasks for ``dalbt serve-ml``, which ranks and
  guesses them inside Label Studio: :mod:`~dalbt.labelling.mlbackend`).

Label Studio setup: start it with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<the image folder>``; in the project's settings add a
"Local files" source storage whose absolute path is the image folder (do not sync it: the tasks
come from the import), and paste this labelling config (:func:`labelstudio_config` writes it
with the project's classes; ``export_project(project, "labelstudio-config")`` too)::

    <View>
      <Image name="image" value="$image"/>
      <Choices name="choice" toName="image" choice="single-radio" showInline="true"
               required="true">
        <Choice value="cat"/>
        <Choice value="dog"/>
        <Choice value="none of these classes"/>
      </Choices>
    </View>

Import (``dalbt import DIR FILE``)
----------------------------------
Files ending in ``.json`` (or whose text starts with ``[`` or ``{``) are Label Studio exports,
others CSV (UTF-8; comma, semicolon or tab separated).

* CSV: the header names a ``path`` and a ``label`` column (Label Studio's CSV export names
  them ``image`` and ``choice``, also accepted), optionally ``kind`` (``class`` or ``ood``),
  ``who``, ``sha256`` and a time (``updated_at``, ``at`` or ``created_at``). A cell made of
  ``'`` and then text that starts with ``'`` or one of ``= + - @``, tab, carriage return
  loses its first ``'`` (the export's protection against formulas, above). A row is out of
  distribution when its ``kind`` is ``ood`` (``label`` then empty or an ood marker), or, with
  no kind, when its label is an ood marker: ``ood`` or ``none of these classes`` (any case;
  a class of that exact name wins). A row with an empty label and no kind is "without a
  label" and skipped (the queue export's unfilled rows).
* Label Studio JSON: each task's most recent (``updated_at``, else ``created_at``, else the
  last) annotation that was not cancelled counts; its ``choices`` result from ``choice`` (or
  the only choices result) gives the class, "none of these classes" meaning out of
  distribution. Tasks without such an annotation are "without a label". The author is the
  annotation's ``completed_by`` (an email, or ``labelstudio:<id>``), else the task's
  ``meta.dalbt_who``. JSON-MIN exports (flat records, the choice under the ``choice`` key,
  the author under ``annotator``) are read the same way.
* Images are matched by ``dalbt_path``, else by the path after ``?d=`` in the image URL (or
  the CSV path), else by the unique image whose path and the given one end alike (the longest
  common tail of path components; files uploaded to Label Studio lose their 8-hex prefix).
  A ``dalbt_sha256``/``sha256`` that differs from the project's hash is a conflict: that label
  is not imported. An image given different labels by several rows or tasks takes the newest
  one; without times to tell, that is a conflict too.
* A label equal to the image's current one is counted as unchanged and not added again; the
  others are appended to the label history with ``source`` ``import:<file name>`` and close
  the image's pending queue entries, all in one transaction. Unknown images, unknown classes
  and conflicts are reported and skipped; when nothing at all can be imported because of
  them, or a file is malformed (reported with its line or task number), the import fails and
  the project is left untouched.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit
from xml.sax.saxutils import quoteattr

from dalbt.errors import DalbtError
from dalbt.labelling.config import EXPORT_FORMATS as FORMATS
from dalbt.labelling.project import CLASS, OOD, Project, default_user

OOD_CHOICE = "none of these classes"
OOD_MARKERS = ("ood", OOD_CHOICE)
FROM_NAME = "choice"
TO_NAME = "image"
LOCAL_FILES_PREFIX = "/data/local-files/?d="
LABEL_COLUMNS = ("path", "sha256", "label", "kind", "who", "at", "source")
QUEUE_COLUMNS = ("round", "position", "path", "sha256", "label")

_PATH_COLUMNS = ("path", "dalbt_path", "image")
_LABEL_COLUMNS = ("label", "choice")
_SHA_COLUMNS = ("sha256", "dalbt_sha256")
_WHO_COLUMNS = ("who", "annotator")
_TIME_COLUMNS = ("updated_at", "at", "created_at")
_UPLOADED = re.compile(r"/data/upload/\d+/[0-9a-f]{8}-(.+)")
_SHOWN = 3  # examples of each problem in messages
# A text a spreadsheet would run as a formula (after any quotes): =, +, -, @, tab, CR.
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def csv_safe(value: Any) -> Any:
    """A CSV cell that spreadsheets show as text: ``'`` in front of a string that starts with
    ``= + - @``, tab or carriage return, or with quotes and then one of those (so that
    :func:`csv_unsafe` can tell the added ``'`` from one that was there). Plain numbers such
    as ``-1`` are no formula and stay as they are, and so do other values."""
    if isinstance(value, str) and _FORMULA.match(value) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_unsafe(cell: str) -> str:
    """The value :func:`csv_safe` protected: its added ``'`` taken off."""
    return cell[1:] if cell[:1] == "'" and _FORMULA.match(cell, 1) else cell


# -- export ------------------------------------------------------------------------------------


def image_url(path: str) -> str:
    """Label Studio's local-files URL of an image path relative to the image folder."""
    return LOCAL_FILES_PREFIX + quote(path, safe="/")


def labelstudio_config(project: Project) -> str:
    """The Label Studio labelling config that goes with the export (see the module docstring).

    Args:
        project: The open project (its classes become the choices).

    Returns:
        The XML text.

    Raises:
        DalbtError: If a class is named like the out-of-distribution choice.
    """
    classes = project.classes
    if OOD_CHOICE in classes:
        raise DalbtError(f"a class is named {OOD_CHOICE!r}, the Label Studio choice of 'out of "
                         "distribution'; rename that class to export to Label Studio")
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in [*classes, OOD_CHOICE])
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
            f'showInline="true" required="true">\n{choices}\n  </Choices>\n</View>\n')


def current_label_rows(project: Project) -> list[dict[str, Any]]:
    """The current label of every labelled image with its provenance, sorted by path.

    Returns:
        Dicts with ``path, sha256, label, kind, who, at, source`` (``label`` None for ood).
    """
    return project.label_history(current_only=True)


def _pending_rows(project: Project) -> list[tuple[int, int, str, str]]:
    """``(round, position, path, sha256)`` of the pending queue, in query order."""
    return [(q.round, q.position, q.path, project.image(q.image_id)[1])
            for q in project.pending()]


def _task(path: str, sha: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"data": {TO_NAME: image_url(path), "dalbt_path": path, "dalbt_sha256": sha},
            "meta": meta}


def labelstudio_tasks(project: Project, queue: bool = False,
                      every: bool = False) -> list[dict[str, Any]]:
    """Label Studio tasks: the labelled images with their label, the pending queue, or every
    usable image.

    Args:
        project: The open project.
        queue: Export the pending images (no annotations) instead of the labels.
        every: Export every usable image, by path: the labelled ones with their label, the
            others without (the tasks of :mod:`~dalbt.labelling.mlbackend`, which ranks them).

    Returns:
        The tasks, ready for ``json.dumps`` (see the module docstring for their fields).
    """
    labelstudio_config(project)  # refuses a class named like the ood choice
    if queue:
        return [_task(path, sha, {"dalbt_round": r, "dalbt_position": p})
                for r, p, path, sha in _pending_rows(project)]
    if every:
        labelled = {t["data"]["dalbt_path"]: t for t in labelstudio_tasks(project)}
        rows = project.db.execute("SELECT path, sha256 FROM images WHERE status = 'ok' "
                                  "ORDER BY path")
        return [labelled.get(path) or _task(path, sha, {}) for path, sha in rows]
    tasks = []
    for rec in current_label_rows(project):
        task = _task(rec["path"], rec["sha256"], {"dalbt_who": rec["who"], "dalbt_at": rec["at"],
                                                  "dalbt_source": rec["source"]})
        choice = rec["label"] if rec["label"] is not None else OOD_CHOICE
        task["annotations"] = [{
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": [choice]}}],
            "was_cancelled": False, "created_at": rec["at"]}]
        tasks.append(task)
    return tasks


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text, every cell made safe for spreadsheets (:func:`csv_safe`)."""
    cells = [[csv_safe(v) for v in row] for row in rows]
    # The writer quotes a field holding "\n" (the line terminator) but not a lone "\r", which
    # readers take for a line end: with one of those anywhere, every field is quoted.
    cr = any(isinstance(v, str) and "\r" in v for row in cells for v in row)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n",
                        quoting=csv.QUOTE_ALL if cr else csv.QUOTE_MINIMAL)
    writer.writerow(header)
    writer.writerows(cells)
    return out.getvalue()


def export_project(project: Project, fmt: str = "csv", queue: bool = False,
                   every: bool = False) -> str:
    """The project's labels (or pending queue) as CSV or Label Studio JSON text.

    Args:
        project: The open project.
        fmt: ``csv``, ``labelstudio`` (tasks) or ``labelstudio-config`` (the labelling XML).
        queue: Export the images waiting for a label instead of the labels.
        every: Label Studio tasks of every usable image (for ``dalbt serve-ml``).

    Returns:
        The file's text.

    Raises:
        DalbtError: Unknown format, or ``every`` with another format than ``labelstudio``.
    """
    if every and (fmt != "labelstudio" or queue):
        raise DalbtError("--all exports Label Studio tasks of every image: use it with "
                         "--format labelstudio and without --queue")
    if fmt == "csv":
        if queue:
            return _csv_text(QUEUE_COLUMNS, ((*row, "") for row in _pending_rows(project)))
        return _csv_text(LABEL_COLUMNS, (
            (r["path"], r["sha256"], r["label"] or "", r["kind"], r["who"], r["at"], r["source"])
            for r in current_label_rows(project)))
    if fmt == "labelstudio":
        tasks = labelstudio_tasks(project, queue, every)
        return json.dumps(tasks, indent=2, ensure_ascii=False) + "\n"
    if fmt == "labelstudio-config":
        return labelstudio_config(project)
    raise DalbtError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


# -- import ------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What one :func:`import_file` did; ``str()`` gives a one-paragraph report.

    Attributes:
        file: The file's name.
        imported: Labels added to the history.
        imported_ood: How many of them are "none of these classes".
        unchanged: Labels equal to the image's current one (not added again).
        without_label: Rows or tasks that give no label (skipped).
        unknown_images: ``"<where>: <path>"`` of labels for images not in the project.
        unknown_classes: ``"<where>: <label>"`` of labels that are no class of the project.
        conflicts: Why each conflicting label was not imported.
        classes: The project's classes (for the report).
    """

    file: str
    imported: int = 0
    imported_ood: int = 0
    unchanged: int = 0
    without_label: int = 0
    unknown_images: list[str] = field(default_factory=list)
    unknown_classes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list, repr=False)

    @property
    def problems(self) -> list[str]:
        """Every unknown image, unknown class and conflict, in that order."""
        return [*self.unknown_images, *self.unknown_classes, *self.conflicts]

    def __str__(self) -> str:
        ood = f" ({self.imported_ood} of them {OOD_CHOICE!r})" if self.imported_ood else ""
        parts = [f"{self.file}: imported {_count(self.imported, 'label')}{ood}, "
                 f"{self.unchanged} unchanged (already the current label), "
                 f"{self.without_label} without a label"]
        if self.unknown_images:
            parts.append(f"{_count(len(self.unknown_images), 'unknown image')} skipped "
                         f"({_examples(self.unknown_images)}; paths must be relative to the "
                         "image folder, or end like such a path)")
        if self.unknown_classes:
            parts.append(f"{_count(len(self.unknown_classes), 'unknown class', 'es')} skipped "
                         f"({_examples(self.unknown_classes)}; the classes are "
                         f"{', '.join(self.classes)}, or {OOD_CHOICE!r})")
        if self.conflicts:
            parts.append(f"{_count(len(self.conflicts), 'conflict')} skipped "
                         f"({_examples(self.conflicts)})")
        if len(parts) == 1:
            parts.append("no problems")
        return "; ".join(parts) + "."


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{'' if n == 1 else plural}"


def _examples(items: Sequence[str]) -> str:
    more = f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


@dataclass
class _Record:
    """One label as a file gives it, before matching it to an image."""

    where: str  # "line 4", "task 3 (id 17)"
    paths: list[str]  # path candidates, most trusted first
    sha: str | None
    status: str  # label | blank | unknown | several
    label: str | None  # the class (None: ood) for "label"; the raw text(s) otherwise
    who: str | None = None
    time: datetime | None = None


def _interpret(text: str, kind: str, classes: set[str]) -> tuple[str, str | None]:
    """``(status, label)`` of a label text and kind (see the module docstring's rule).

    Raises:
        ValueError: If kind and label contradict each other.
    """
    t = text.strip()
    marker = t.lower() in OOD_MARKERS and t not in classes
    if kind == OOD:
        if t and not marker:
            raise ValueError(f"kind 'ood' (none of these classes) but label {t!r}; leave the "
                             "label empty or set the kind to 'class'")
        return "label", None
    if not t:
        if kind == CLASS:
            raise ValueError("kind 'class' but no label")
        return "blank", None
    if t in classes:
        return "label", t
    if marker and kind != CLASS:
        return "label", None
    return "unknown", t


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _path_candidates(value: str) -> list[str]:
    """The image paths a CSV path or Label Studio image URL may stand for, best first."""
    v = value.strip()
    if not v:
        return []
    if "?d=" in v:  # Label Studio local files: the path after ?d=, URL-encoded
        raw = v.split("?d=", 1)[1].split("&", 1)[0]
        return list(dict.fromkeys([unquote(raw), unquote_plus(raw)]))
    if "://" in v or v.startswith("/data/"):
        path = unquote(urlsplit(v).path)
        uploaded = _UPLOADED.fullmatch(path)  # uploads are stored as <8 hex>-<file name>
        return [path, uploaded.group(1)] if uploaded else [path]
    return [v]


def _normalise(path: str) -> str:
    path = path.strip().replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


class _Matcher:
    """Finds the project image a path given by a file stands for."""

    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids
        self.by_name: dict[str, list[str]] = defaultdict(list)
        for path in ids:
            self.by_name[path.rsplit("/", 1)[-1]].append(path)

    def _tail_matches(self, path: str) -> list[str]:
        """Images whose path and ``path`` end alike, the longest common tail only."""
        parts = path.split("/")
        best, hits = 0, []
        for cand in self.by_name.get(parts[-1], []):
            cparts = cand.split("/")
            n = 0
            while n < min(len(parts), len(cparts)) and parts[-1 - n] == cparts[-1 - n]:
                n += 1
            if n not in (len(parts), len(cparts)):  # neither path is a tail of the other
                continue
            if n > best:
                best, hits = n, [cand]
            elif n == best:
                hits.append(cand)
        return hits

    def match(self, candidates: Sequence[str]) -> tuple[int | None, str]:
        """``(image id, its path)``, or ``(None, why not)``."""
        cands = [c for c in dict.fromkeys(_normalise(c) for c in candidates) if c]
        for c in cands:
            if c in self.ids:
                return self.ids[c], c
        for c in cands:
            hits = self._tail_matches(c)
            if len(hits) == 1:
                return self.ids[hits[0]], hits[0]
            if hits:
                shown = ", ".join(sorted(hits)[:_SHOWN])
                return None, f"{c!r} could be any of {len(hits)} images ({shown}, ...)"
        return None, f"{cands[0]!r} is not in the project" if cands else "no image path"


# -- reading files -----------------------------------------------------------------------------


def _read_csv(name: str, text: str, classes: set[str]) -> list[_Record]:
    first = text.split("\n", 1)[0]
    for delimiter in (",", ";", "\t"):
        header = [h.strip().lower() for h in next(csv.reader([first], delimiter=delimiter), [])]
        if any(c in header for c in _PATH_COLUMNS) and any(c in header for c in _LABEL_COLUMNS):
            break
    else:
        raise DalbtError(f"{name}:1: the header must name a 'path' and a 'label' column "
                         f"(found {first.strip()[:80]!r}); see 'dalbt export --help'")

    def col(names: Sequence[str]) -> list[int]:
        return [header.index(c) for c in names if c in header]

    path_cols, label_col = col(_PATH_COLUMNS), col(_LABEL_COLUMNS)[0]
    sha_cols, who_cols, time_cols = col(_SHA_COLUMNS), col(_WHO_COLUMNS), col(_TIME_COLUMNS)
    kind_cols = col(("kind",))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        next(reader)
        for raw_row in reader:
            row = [csv_unsafe(cell) for cell in raw_row]
            where = f"line {reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DalbtError(f"{name}:{reader.line_num}: {len(row)} fields where the header "
                                 f"has {len(header)} (a comma inside a value must be quoted)")
            kind = row[kind_cols[0]].strip().lower() if kind_cols else ""
            if kind not in ("", CLASS, OOD):
                raise DalbtError(f"{name}:{reader.line_num}: kind {kind!r} is neither "
                                 f"'{CLASS}' nor '{OOD}'")
            try:
                status, label = _interpret(row[label_col], kind, classes)
            except ValueError as exc:
                raise DalbtError(f"{name}:{reader.line_num}: {exc}") from None
            paths = [p for c in path_cols for p in _path_candidates(row[c])]
            sha = next((row[c].strip().lower() for c in sha_cols if row[c].strip()), None)
            who = next((row[c].strip() for c in who_cols if row[c].strip()), None)
            time = next((t for c in time_cols if (t := _parse_time(row[c])) is not None), None)
            records.append(_Record(where, paths, sha, status, label, who, time))
    except csv.Error as exc:
        raise DalbtError(f"{name}:{reader.line_num}: not valid CSV: {exc}") from None
    return records


def _who(value: Any) -> str | None:
    """The labeller a Label Studio ``completed_by``/``annotator`` value names."""
    if isinstance(value, dict):
        value = value.get("email") or value.get("id")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return f"labelstudio:{value}"
    return str(value).strip() or None


def _choice_record(texts: list[str], classes: set[str]) -> tuple[str, str | None]:
    distinct = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    if not distinct:
        return "blank", None
    if len(distinct) > 1:
        return "several", ", ".join(distinct)
    return _interpret(distinct[0], "", classes)


def _choices(result: Any, where: str) -> list[str]:
    """The chosen texts of an annotation's ``result`` (the ``choice`` one, else all)."""
    if result is None:
        return []
    if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
        raise ValueError(f"{where}: 'result' must be a list of objects")
    found = [r for r in result if r.get("type") == "choices"]
    named = [r for r in found if r.get("from_name") == FROM_NAME]
    texts = []
    for r in named or found:
        value = r.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: a choices result needs 'value': {{'choices': [...]}}")
        texts += choices
    return texts


def _task_paths(data: dict[str, Any]) -> tuple[list[str], str | None]:
    paths = [data["dalbt_path"]] if isinstance(data.get("dalbt_path"), str) else []
    image = data.get(TO_NAME)
    if not isinstance(image, str):  # a config with another name: the first text field
        image = next((v for k, v in data.items() if isinstance(v, str)
                      and not k.startswith("dalbt_")), None)
    if isinstance(image, str):
        paths += _path_candidates(image)
    sha = data.get("dalbt_sha256")
    return paths, sha.strip().lower() if isinstance(sha, str) and sha.strip() else None


def _ls_task(task: dict[str, Any], where: str, classes: set[str]) -> _Record:
    data = task["data"]
    if not isinstance(data, dict):
        raise ValueError(f"{where}: 'data' must be an object")
    paths, sha = _task_paths(data)
    annotations = task.get("annotations", task.get("completions")) or []
    if not isinstance(annotations, list):
        raise ValueError(f"{where}: 'annotations' must be a list")
    latest: tuple[Any, ...] | None = None
    for j, ann in enumerate(annotations, 1):
        if not isinstance(ann, dict):
            raise ValueError(f"{where}, annotation {j}: not an object")
        if ann.get("was_cancelled") or ann.get("skipped"):
            continue
        t = _parse_time(ann.get("updated_at")) or _parse_time(ann.get("created_at"))
        key = (t or datetime.min.replace(tzinfo=UTC), j)
        if latest is None or key >= latest[0]:
            latest = (key, j, ann, t)
    if latest is None:
        return _Record(where, paths, sha, "blank", None)
    _, j, ann, t = latest
    status, label = _choice_record(_choices(ann.get("result"), f"{where}, annotation {j}"),
                                   classes)
    meta = task.get("meta") if isinstance(task.get("meta"), dict) else {}
    who = _who(ann.get("completed_by")) or _who(meta.get("dalbt_who"))
    return _Record(where, paths, sha, status, label, who, t)


def _ls_min(rec: dict[str, Any], where: str, classes: set[str]) -> _Record:
    paths, sha = _task_paths(rec)
    value = rec.get(FROM_NAME)
    if value is None:
        texts = []
    elif isinstance(value, str):
        texts = [value]
    elif isinstance(value, dict):
        texts = _choices([{"type": "choices", "value": value}], where)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        texts = value
    else:
        raise ValueError(f"{where}: {FROM_NAME!r} must be a choice or a list of choices")
    status, label = _choice_record(texts, classes)
    t = _parse_time(rec.get("updated_at")) or _parse_time(rec.get("created_at"))
    return _Record(where, paths, sha, status, label, _who(rec.get("annotator")), t)


def _load_labelstudio_json(name: str, text: str) -> list[Any]:
    """The tasks of a Label Studio export (a single task object counts as a list of one)."""
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DalbtError(f"{name}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise DalbtError(f"{name}: JSON nested too deeply to read (a Label Studio export is "
                         "a list of tasks a few levels deep); is it the right file?") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        why = str(exc).split(";")[0]
        raise DalbtError(f"{name}: not a JSON file dalbt can read ({why})") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise DalbtError(f"{name}: expected a list of Label Studio tasks, got a JSON "
                         f"{type(tasks).__name__}")
    return tasks


def _ls_record(task: Any, k: int, classes: set[str]) -> _Record:
    """Task number ``k`` (from 1): a full Label Studio task or a JSON-MIN record.

    Raises:
        ValueError: Neither, or malformed, naming the task.
    """
    where = f"task {k}"
    if not isinstance(task, dict):
        raise ValueError(f"{where}: not an object")
    if isinstance(task.get("id"), int | str) and len(str(task["id"])) <= 40:
        where += f" (id {task['id']})"
    if "data" in task:
        return _ls_task(task, where, classes)
    if TO_NAME in task or "dalbt_path" in task:
        return _ls_min(task, where, classes)
    raise ValueError(f"{where}: neither a Label Studio task (no 'data') nor a "
                     f"JSON-MIN record (no {TO_NAME!r})")


def _read_labelstudio(name: str, text: str, classes: set[str]) -> list[_Record]:
    tasks = _load_labelstudio_json(name, text)
    records = []
    for k, task in enumerate(tasks, 1):
        try:
            records.append(_ls_record(task, k, classes))
        except ValueError as exc:
            raise DalbtError(f"{name}: {exc}") from None
    return records


def _read_records(path: Path, classes: Sequence[str]) -> list[_Record]:
    """Parse a CSV or Label Studio file into labels (no project access).

    Raises:
        DalbtError: Unreadable or malformed file, naming the line or task.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DalbtError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DalbtError(f"{path.name}: not UTF-8 text (byte {exc.start}); save it as "
                         "UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".json" or (suffix not in (".csv", ".tsv", ".txt")
                             and text.lstrip()[:1] in ("[", "{")):
        return _read_labelstudio(path.name, text, set(classes))
    return _read_csv(path.name, text, set(classes))


def _match_records(
    records: list[_Record], project: Project, summary: ImportSummary
) -> tuple[dict[int, list[_Record]], dict[int, str]]:
    """Match records to images; note blanks, unknown images and classes, hash conflicts.

    Returns:
        The importable records grouped by image id (in file order), and each image's path.
    """
    matcher = _Matcher(project.image_ids())
    shas = dict(project.db.execute("SELECT id, sha256 FROM images"))
    groups: dict[int, list[_Record]] = {}
    paths: dict[int, str] = {}
    for rec in records:
        if rec.status == "blank":
            summary.without_label += 1
            continue
        image_id, found = matcher.match(rec.paths)
        if image_id is None:
            summary.unknown_images.append(f"{rec.where}: {found}")
        elif rec.status == "unknown":
            summary.unknown_classes.append(f"{rec.where}: {rec.label!r}")
        elif rec.status == "several":
            summary.conflicts.append(f"{rec.where}: several choices ({rec.label}) where one "
                                     "is needed")
        elif rec.sha is not None and rec.sha != shas[image_id]:
            summary.conflicts.append(
                f"{rec.where}: {found} has sha256 {rec.sha[:12]}... in the file but "
                f"{shas[image_id][:12]}... in the project (a different image under that path)")
        else:
            groups.setdefault(image_id, []).append(rec)
            paths[image_id] = found
    return groups, paths


def _winner(recs: list[_Record], path: str, summary: ImportSummary) -> _Record | None:
    """The record of one image that counts: the newest, else the last in the file when all
    agree; None (a conflict noted in ``summary``) when labels differ and times cannot tell."""
    winner = recs[-1]
    if len({r.label for r in recs}) > 1:
        times = [r.time for r in recs]
        newest = max((t for t in times if t is not None), default=None)
        top = [r for r in recs if r.time == newest]
        if None in times or len({r.label for r in top}) > 1:
            summary.conflicts.append(
                f"{path}: different labels ({', '.join(r.where for r in recs)}) "
                "and no times to tell the newest")
            return None
        winner = top[-1]
    elif any(r.time is not None for r in recs):
        winner = max((r for r in recs if r.time is not None), key=lambda r: r.time)
    return winner


def _resolve(records: list[_Record], project: Project, summary: ImportSummary,
             who: str | None) -> list[tuple[int, str | None, str]]:
    """Match records to images, check hashes and duplicates.

    Returns:
        ``(image id, label, who)`` of every importable label, in file order.
    """
    groups, paths = _match_records(records, project, summary)
    accepted = []
    for image_id, recs in groups.items():
        winner = _winner(recs, paths[image_id], summary)
        if winner is not None:
            accepted.append((image_id, winner.label, winner.who or who or default_user()))
    return accepted


def import_file(project: Project, path: str | Path, who: str | None = None) -> ImportSummary:
    """Import labels from a CSV or Label Studio export (rules in the module docstring).

    Args:
        project: The open project.
        path: The file.
        who: Labeller recorded for labels whose file names none (default: the OS user).

    Returns:
        What was imported, unchanged and skipped.

    Raises:
        DalbtError: Malformed file, or nothing importable in it (the project is untouched).
    """
    path = Path(path)
    summary = ImportSummary(file=path.name, classes=project.classes)
    records = _read_records(path, project.classes)
    if not records:
        raise DalbtError(f"{path.name} holds no labels")
    accepted = _resolve(records, project, summary, who)
    current = project.current_labels()
    if not accepted and summary.problems:
        hints = []
        if summary.unknown_images:
            hints.append(f"image paths must be relative to the image folder {project.root}")
        if summary.unknown_classes:
            hints.append(f"labels must be one of {', '.join(project.classes)} or "
                         f"{OOD_CHOICE!r}")
        raise DalbtError(f"nothing in {path.name} can be imported: "
                         f"{_examples(summary.problems)}" + "".join(f"; {h}" for h in hints))
    added, unchanged = project.add_labels(accepted, f"import:{path.name}",
                                          skip_unchanged=True)
    summary.imported += added
    summary.unchanged += unchanged
    ood_already = sum(1 for i, label, _ in accepted
                      if label is None and i in current and current[i] is None)
    summary.imported_ood += sum(label is None for _, label, _ in accepted) - ood_already
    return summary


__all__ = ["FORMATS", "OOD_CHOICE", "ImportSummary", "csv_safe", "csv_unsafe",
           "current_label_rows", "export_project", "image_url", "import_file",
           "labelstudio_config", "labelstudio_tasks"]
