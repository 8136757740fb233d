"""Export and import of labels: CSV and Label Studio JSON round trips, Label Studio's own export
shapes, conflicts, malformed files and the queue export."""

import csv
import io
import json
import sqlite3
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from dalbt.cli import main
from dalbt.errors import DalbtError
from dalbt.labelling.interchange import (
    LABEL_COLUMNS,
    OOD_CHOICE,
    QUEUE_COLUMNS,
    export_project,
    image_url,
    import_file,
    labelstudio_config,
    labelstudio_tasks,
)
from dalbt.labelling.project import Project

CLASSES = ["cat", "dog", "fish"]
NAMES = ["batch0/img0.png", "batch1/img1.png", "batch0/img2.png", "batch1/img3.png",
         "batch0/img4.png", "batch1/img5.png", "batch0/img6.png", "batch1/img 7+x.png",
         "batch0/same.png", "batch1/same.png"]


@pytest.fixture(scope="module")
def digits():
    return (load_digits().images[:len(NAMES)] * 15.9).astype(np.uint8)


@pytest.fixture
def images(tmp_path, digits):
    root = tmp_path / "images"
    for name, pixels in zip(NAMES, digits, strict=True):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
    return root


@pytest.fixture
def new_project(tmp_path, images):
    opened = []

    def make(name):
        p = Project.init(tmp_path / name, images, CLASSES, who="init", log=lambda _m: None)
        opened.append(p)
        return p

    yield make
    for p in opened:
        p.close()


@pytest.fixture
def project(new_project):
    return new_project("a")


def labels_by_path(project):
    paths = {i: p for p, i in project.image_ids().items()}
    return {paths[i]: label for i, label in project.current_labels().items()}


def label(project, path, value, who="alice"):
    project.add_label(project.image_ids()[path], value, who=who, source="web")


def sha(project, path):
    return project.image(project.image_ids()[path])[1]


def write(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return f


def add_round(project, round_, paths):
    ids = project.image_ids()
    with project.transaction() as db:
        db.execute("INSERT INTO rounds (round, method, n_labelled, n_val, created) "
                   "VALUES (?, 'test', 0, 0, 'now')", (round_,))
        db.executemany("INSERT INTO queue (round, position, image_id, status, updated) "
                       "VALUES (?, ?, ?, 'pending', 'now')",
                       [(round_, k, ids[p]) for k, p in enumerate(paths)])


def choice_task(image, choice, **ann):
    return {"data": {"image": image}, "annotations": [
        {"result": [{"from_name": "choice", "to_name": "image", "type": "choices",
                     "value": {"choices": [choice]}}], "was_cancelled": False, **ann}]}


def test_csv_export_and_round_trip(project, new_project, tmp_path):
    label(project, "batch0/img0.png", "cat")
    label(project, "batch1/img1.png", "dog")
    label(project, "batch1/img1.png", "fish", who="bob")  # relabelled: the latest counts
    label(project, "batch0/img2.png", None)  # none of these classes
    text = export_project(project, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.splitlines()[0] == ",".join(LABEL_COLUMNS)
    assert [(r["path"], r["label"], r["kind"], r["who"], r["source"]) for r in rows] == [
        ("batch0/img0.png", "cat", "class", "alice", "web"),
        ("batch0/img2.png", "", "ood", "alice", "web"),
        ("batch1/img1.png", "fish", "class", "bob", "web")]
    assert all(r["sha256"] == sha(project, r["path"]) and r["at"] for r in rows)

    fresh = new_project("b")
    summary = import_file(fresh, write(tmp_path, "labels.csv", text))
    assert labels_by_path(fresh) == labels_by_path(project)
    assert (summary.imported, summary.imported_ood, summary.unchanged, summary.problems) == \
        (3, 1, 0, [])
    assert "imported 3 labels (1 of them 'none of these classes')" in str(summary)
    history = fresh.label_history()
    assert [(h["path"], h["label"], h["kind"], h["who"], h["source"]) for h in history] == [
        ("batch0/img0.png", "cat", "class", "alice", "import:labels.csv"),
        ("batch0/img2.png", None, "ood", "alice", "import:labels.csv"),
        ("batch1/img1.png", "fish", "class", "bob", "import:labels.csv")]

    again = import_file(fresh, tmp_path / "labels.csv")  # the same labels: nothing added
    assert (again.imported, again.unchanged) == (0, 3)
    assert len(fresh.label_history()) == 3


def test_labelstudio_export_and_round_trip(project, new_project, tmp_path):
    label(project, "batch1/img 7+x.png", "dog", who="carol")
    label(project, "batch0/img2.png", None)
    tasks = json.loads(export_project(project, "labelstudio"))
    assert tasks == labelstudio_tasks(project)
    ood, dog = tasks  # sorted by path
    assert dog["data"] == {"image": "/data/local-files/?d=batch1/img%207%2Bx.png",
                           "dalbt_path": "batch1/img 7+x.png",
                           "dalbt_sha256": sha(project, "batch1/img 7+x.png")}
    result = dog["annotations"][0]["result"]
    assert result == [{"from_name": "choice", "to_name": "image", "type": "choices",
                       "value": {"choices": ["dog"]}}]
    assert dog["meta"]["dalbt_who"] == "carol" and dog["annotations"][0]["created_at"]
    assert ood["annotations"][0]["result"][0]["value"]["choices"] == [OOD_CHOICE]

    fresh = new_project("b")
    summary = import_file(fresh, write(tmp_path, "tasks.json", tasks))
    assert labels_by_path(fresh) == labels_by_path(project)
    assert (summary.imported, summary.imported_ood) == (2, 1)
    assert {h["who"] for h in fresh.label_history()} == {"carol", "alice"}

    # the same tasks with only the image URL left: the path comes from after ?d=
    for t in tasks:
        t["data"] = {"image": t["data"]["image"]}
    third = new_project("c")
    import_file(third, write(tmp_path, "urls.json", tasks))
    assert labels_by_path(third) == labels_by_path(project)


def test_labelstudio_config(project):
    xml = labelstudio_config(project)
    assert xml == export_project(project, "labelstudio-config")
    view = ET.fromstring(xml)
    image = view.find("Image")
    choices = view.find("Choices")
    assert image.get("name") == "image" and image.get("value") == "$image"
    assert choices.get("name") == "choice" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices.findall("Choice")] == [*CLASSES, OOD_CHOICE]
    with pytest.raises(DalbtError, match="unknown export format"):
        export_project(project, "yaml")


def test_labelstudio_hand_written_export(project, tmp_path):
    """The shape Label Studio's JSON export has: ids, several annotations, cancelled ones,
    completed_by as an id or a user object, hosts and upload prefixes in image URLs."""
    base = {"created_at": "2024-05-01T10:00:00.000000Z", "lead_time": 3.2, "ground_truth": False}
    tasks = [
        {"id": 11, "data": {"image": "/data/local-files/?d=batch0/img0.png"}, "meta": {},
         "annotations": [  # the newer annotation first: time decides, not order
             {"id": 2, "completed_by": {"id": 2, "email": "bob@example.org", "first_name": ""},
              "result": [{"id": "r2", "from_name": "choice", "to_name": "image",
                          "type": "choices", "origin": "manual",
                          "value": {"choices": ["dog"]}}],
              "was_cancelled": False, "created_at": "2024-05-02T09:00:00.000000Z",
              "updated_at": "2024-05-02T09:00:00.000000Z", "task": 11},
             {"id": 1, "completed_by": 1,
              "result": [{"id": "r1", "from_name": "choice", "to_name": "image",
                          "type": "choices", "value": {"choices": ["cat"]}}],
              "was_cancelled": False, **base, "updated_at": base["created_at"], "task": 11}],
         "predictions": []},
        {"id": 12, "data": {"image": "http://localhost:8080/data/local-files/?d=photos/batch1/"
                                     "img1.png"},
         "annotations": [
             {**choice_task("", "fish", completed_by=3, **base)["annotations"][0]},
             {**choice_task("", "cat", completed_by=4)["annotations"][0], "was_cancelled": True,
              "created_at": "2024-06-01T00:00:00Z"}]},
        {"id": 13, **choice_task("/data/local-files/?d=batch0/img2.png", OOD_CHOICE,
                                 completed_by=1, **base)},
        {"id": 14, **choice_task("/data/upload/3/1a2b3c4d-img3.png", "cat", completed_by=1)},
        {"id": 15, **choice_task("/data/local-files/?d=batch0/img4.png", "zebra")},
        {"id": 16, **choice_task("/data/local-files/?d=elsewhere/missing.png", "cat")},
        {"id": 17, "data": {"image": "/data/local-files/?d=batch1/img5.png"}, "annotations": [],
         "predictions": [{"result": [{"from_name": "choice", "to_name": "image",
                                      "type": "choices", "value": {"choices": ["cat"]}}]}]},
        {"id": 18, **choice_task("/data/local-files/?d=same.png", "dog")},
    ]
    summary = import_file(project, write(tmp_path, "project-1.json", tasks), who="importer")
    assert labels_by_path(project) == {"batch0/img0.png": "dog", "batch1/img1.png": "fish",
                                       "batch0/img2.png": None, "batch1/img3.png": "cat"}
    assert {h["path"]: h["who"] for h in project.label_history()} == {
        "batch0/img0.png": "bob@example.org", "batch1/img1.png": "labelstudio:3",
        "batch0/img2.png": "labelstudio:1", "batch1/img3.png": "labelstudio:1"}
    assert (summary.imported, summary.imported_ood, summary.without_label) == (4, 1, 1)
    assert summary.unknown_classes == ["task 5 (id 15): 'zebra'"]
    assert summary.unknown_images == [
        "task 6 (id 16): 'elsewhere/missing.png' is not in the project",
        "task 8 (id 18): 'same.png' could be any of 2 images (batch0/same.png, "
        "batch1/same.png, ...)"]
    text = str(summary)
    assert "imported 4 labels" in text and "2 unknown images" in text
    assert "1 unknown class skipped (task 5 (id 15): 'zebra'; the classes are cat, dog" in text


def test_labelstudio_json_min(project, tmp_path):
    records = [  # one record per annotation, Label Studio's JSON-MIN export
        {"image": "/data/local-files/?d=batch0/img0.png", "id": 1, "choice": "dog",
         "annotator": "bob@example.org", "annotation_id": 2,
         "created_at": "2024-05-02T09:00:00Z", "updated_at": "2024-05-02T09:00:00Z"},
        {"image": "/data/local-files/?d=batch0/img0.png", "id": 1, "choice": "cat",
         "annotator": 1, "annotation_id": 1, "created_at": "2024-05-01T09:00:00Z",
         "updated_at": "2024-05-01T09:00:00Z"},
        {"image": "/data/local-files/?d=batch1/img1.png", "id": 2, "choice": OOD_CHOICE,
         "annotator": 1},
        {"image": "/data/local-files/?d=batch0/img2.png", "id": 3, "annotator": 1},
        {"image": "/data/local-files/?d=batch1/img3.png", "dalbt_path": "batch1/img3.png",
         "id": 4, "choice": {"choices": ["fish"]}, "annotator": 1},
    ]
    summary = import_file(project, write(tmp_path, "min.json", records))
    assert labels_by_path(project) == {"batch0/img0.png": "dog", "batch1/img1.png": None,
                                       "batch1/img3.png": "fish"}
    assert (summary.imported, summary.without_label, summary.problems) == (3, 1, [])
    who = {h["path"]: h["who"] for h in project.label_history()}
    assert who["batch0/img0.png"] == "bob@example.org"


def test_changed_hash_is_a_conflict(project, new_project, tmp_path):
    label(project, "batch0/img0.png", "cat")
    label(project, "batch1/img1.png", "dog")
    rows = list(csv.reader(io.StringIO(export_project(project, "csv"))))
    rows[1][1] = "0" * 64  # batch0/img0.png exported from another image
    fresh = new_project("b")
    summary = import_file(fresh, write(tmp_path, "l.csv", "\n".join(map(",".join, rows))))
    assert labels_by_path(fresh) == {"batch1/img1.png": "dog"}
    assert summary.imported == 1 and len(summary.conflicts) == 1
    assert summary.conflicts[0].startswith("line 2: batch0/img0.png has sha256 000000000000...")

    tasks = labelstudio_tasks(project)
    for t in tasks:
        t["data"]["dalbt_sha256"] = "f" * 64
    third = new_project("c")
    with pytest.raises(DalbtError, match="nothing in t.json can be imported: task 1: "
                                         "batch0/img0.png has sha256 ffff"):
        import_file(third, write(tmp_path, "t.json", tasks))
    assert third.label_history() == []


@pytest.mark.parametrize(("name", "content", "where"), [
    ("bad.csv", "path,label,kind\nbatch0/img0.png,cat,class\nbatch0/img4.png,cat,maybe\n",
     "bad.csv:3: kind 'maybe'"),
    ("bad.csv", "path,label\nbatch0/img0.png,cat\nbatch0/img4,3.png,cat\n",
     "bad.csv:3: 3 fields where the header has 2"),
    ("bad.csv", "path,label,kind\nbatch0/img0.png,cat,\nbatch0/img4.png,dog,ood\n",
     "bad.csv:3: kind 'ood' .* but label 'dog'"),
    ("bad.csv", "file,class\nbatch0/img0.png,cat\n", "bad.csv:1: the header must name"),
    ("bad.json", '[\n {"data": {"image": "a.png"}},\n {"data": }\n]', "bad.json:3:11: not valid"),
    ("bad.json", json.dumps([choice_task("batch0/img0.png", "cat"),
                             {"data": {"image": "x"}, "annotations": {"result": []}}]),
     "bad.json: task 2: 'annotations' must be a list"),
    ("bad.json", json.dumps([{"id": 5, "data": {"image": "x"}, "annotations": [
        {"result": [{"type": "choices", "from_name": "choice", "value": {"choices": "cat"}}]}]}]),
     r"bad.json: task 1 \(id 5\), annotation 1: a choices result needs"),
    ("bad.json", json.dumps([choice_task("batch0/img0.png", "cat"), {"label": "cat"}]),
     "bad.json: task 2: neither a Label Studio task"),
])
def test_malformed_file_leaves_the_project_untouched(project, tmp_path, name, content, where):
    label(project, "batch0/img0.png", "dog")
    before = project.label_history()
    with pytest.raises(DalbtError, match=where):
        import_file(project, write(tmp_path, name, content))
    assert project.label_history() == before


def test_import_is_all_or_nothing(project, tmp_path):
    """A failure while writing (here a trigger refusing 'fish') rolls back the labels before."""
    project.db.execute("CREATE TRIGGER no_fish BEFORE INSERT ON labels WHEN NEW.label = 'fish' "
                       "BEGIN SELECT RAISE(ABORT, 'no fish'); END")
    f = write(tmp_path, "l.csv", "path,label\nbatch0/img0.png,cat\nbatch1/img1.png,fish\n")
    with pytest.raises(sqlite3.IntegrityError, match="no fish"):
        import_file(project, f)
    assert project.label_history() == []


def test_nothing_importable_raises(project, tmp_path):
    f = write(tmp_path, "l.csv", "path,label\nnowhere/x.png,cat\nbatch0/img0.png,zebra\n")
    with pytest.raises(DalbtError, match=r"nothing in l.csv can be imported: line 2: "
                                         r"'nowhere/x.png' is not in the project; line 3: "
                                         r"'zebra'; image paths must be relative"):
        import_file(project, f)
    with pytest.raises(DalbtError, match="holds no labels"):
        import_file(project, write(tmp_path, "empty.csv", "path,label\n"))
    with pytest.raises(DalbtError, match="cannot read"):
        import_file(project, tmp_path / "missing.csv")
    assert project.label_history() == []


def test_csv_rules(project, tmp_path):
    """Semicolons and a BOM, ood by kind or marker, blank rows, who from the file or the
    caller, paths matched by their tail, duplicates resolved by time or reported."""
    content = ("\ufeffPath;Label;Kind;Who;At\n"
               "batch0/img0.png;cat;class;carol;\n"
               "img1.png;OOD;;;\n"  # the file name alone is unique
               "/data/batch0/img2.png;;ood;;\n"  # an absolute path ending like an image's
               "batch1/img3.png;;;;\n"  # no label yet
               "batch0/img4.png;ood;class;;\n"  # kind says class: 'ood' is no class
               "batch1/img5.png;dog;;;2024-01-01T10:00:00\n"
               "batch1/img5.png;fish;;;2024-01-02T10:00:00+00:00\n"  # newer: wins
               "batch0/img6.png;cat;;;\n"
               "batch0/img6.png;dog;;;\n"  # disagree, no time: conflict
               "batch0/same.png;none of these classes;;;\n"
               "batch0/same.png;none of these classes;;;\n")  # agree: one label
    summary = import_file(project, write(tmp_path, "l.csv", content), who="dave")
    assert labels_by_path(project) == {"batch0/img0.png": "cat", "batch1/img1.png": None,
                                       "batch0/img2.png": None, "batch1/img5.png": "fish",
                                       "batch0/same.png": None}
    assert {h["path"]: h["who"] for h in project.label_history()}["batch0/img0.png"] == "carol"
    assert {h["who"] for h in project.label_history()} == {"carol", "dave"}
    assert (summary.imported, summary.imported_ood, summary.without_label) == (5, 3, 1)
    assert summary.unknown_classes == ["line 6: 'ood'"]
    assert summary.conflicts == ["batch0/img6.png: different labels (line 9, line 10) and no "
                                 "times to tell the newest"]


def test_queue_export_lists_the_pending_images_in_order(project, tmp_path):
    add_round(project, 0, ["batch1/img5.png", "batch1/img3.png", "batch1/img1.png"])
    add_round(project, 1, ["batch0/img6.png", "batch0/img0.png"])
    label(project, "batch1/img3.png", "cat")  # done
    project.skip(project.image_ids()["batch0/img6.png"])  # skipped
    expected = [("0", "0", "batch1/img5.png"), ("0", "2", "batch1/img1.png"),
                ("1", "1", "batch0/img0.png")]

    text = export_project(project, "csv", queue=True)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(QUEUE_COLUMNS)
    assert rows[1:] == [[r, p, path, sha(project, path), ""] for r, p, path in expected]

    tasks = json.loads(export_project(project, "labelstudio", queue=True))
    assert [(t["meta"]["dalbt_round"], t["meta"]["dalbt_position"], t["data"]["dalbt_path"])
            for t in tasks] == [(int(r), int(p), path) for r, p, path in expected]
    assert all("annotations" not in t and t["data"]["image"] == image_url(t["data"]["dalbt_path"])
               for t in tasks)

    rows[1][-1] = "dog"  # label the first queued image in the CSV, leave the rest
    filled = write(tmp_path, "queue.csv", "\n".join(map(",".join, rows)))
    summary = import_file(project, filled)
    assert (summary.imported, summary.without_label) == (1, 2)
    assert [(q.round, q.position) for q in project.pending()] == [(0, 2), (1, 1)]
    assert [q.status for q in project.queue(0)] == ["done", "done", "pending"]


def test_cli_export_and_import(project, new_project, tmp_path, capsys):
    label(project, "batch0/img0.png", "cat")
    out = tmp_path / "tasks.json"
    assert main(["export", str(project.directory), "--format", "labelstudio",
                 "--out", str(out)]) == 0
    fresh = new_project("b")
    assert main(["import", str(fresh.directory), str(out)]) == 0
    assert "tasks.json: imported 1 label, 0 unchanged" in capsys.readouterr().out
    assert labels_by_path(fresh) == {"batch0/img0.png": "cat"}


WHO = ["=HYPERLINK(\"http://evil.example\",\"click\")", "+1+2", "-2+3", "@SUM(A1)",
       "\tTab", "\rCR", "'=already quoted", "''-twice", "'plain", "a=b"]


def test_csv_export_neutralises_formulas_and_round_trips(tmp_path, digits):
    from dalbt.labelling.interchange import csv_safe, csv_unsafe

    root = tmp_path / "images"
    names = ["=cmd.png", "-x.png", "@y.png", "+z.png", *(f"ok{k}.png" for k in range(6))]
    root.mkdir()
    for name, pixels in zip(names, digits, strict=True):
        Image.fromarray(pixels).save(root / name)
    classes = ["=1+1", "-1", "cat"]
    src = Project.init(tmp_path / "src", root, classes, log=lambda _m: None)
    dst = Project.init(tmp_path / "dst", root, classes, log=lambda _m: None)
    ids = src.image_ids()
    for k, (name, who) in enumerate(zip(names, WHO, strict=True)):
        src.add_label(ids[name], classes[k % 3], who=who, source="web")
    text = export_project(src, "csv")
    cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
    # a plain number such as the class -1 is no formula: left as it is
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")
                and c != "-1"], cells
    assert "'=HYPERLINK(\"http://evil.example\",\"click\")" in cells
    assert "-1" in cells and "'-1" not in cells
    assert {"'=1+1", "'=cmd.png", "'-x.png", "'@y.png", "'+z.png", "'+1+2", "'-2+3",
            "'@SUM(A1)", "'\tTab", "'\rCR", "''=already quoted", "'''-twice"} <= set(cells)
    assert {"'plain", "a=b", "cat"} <= set(cells)  # nothing to protect: as they are
    summary = import_file(dst, write(tmp_path, "labels.csv", text))
    assert summary.imported == 10 and summary.problems == []
    keys = ("path", "sha256", "label", "kind", "who")
    # exactly as exported, but for the white space around a value, which import trims
    assert [tuple(h[k] for k in keys) for h in dst.label_history(current_only=True)] == \
        [tuple(h[k].strip() for k in keys) for h in src.label_history(current_only=True)]
    for value in [*WHO, "", "'", "''", "-", "=", "'-", "x'=y"]:
        assert csv_unsafe(csv_safe(value)) == value
    assert csv_safe(5) == 5 and csv_safe(None) is None
    add_round(src, 0, ["=cmd.png"])  # the queue export is protected too
    queue = next(csv.DictReader(io.StringIO(export_project(src, "csv", queue=True))))
    assert queue["path"] == "'=cmd.png"


@pytest.mark.parametrize("content, says", [
    ("[" * 100_000 + "]" * 100_000, "deep.json: JSON nested too deeply"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "deep.json: JSON nested too deeply"),
    ('[{"data": {"image": "x.png"}, "id": ' + "1" * 5000 + "}]", "deep.json: not a JSON "
     "file dalbt can read (Exceeds the limit (4300 digits)"),
])
def test_hostile_json_is_a_one_line_error_naming_the_file(project, tmp_path, capsys, content,
                                                         says):
    f = write(tmp_path, "deep.json", content)
    with pytest.raises(DalbtError, match=r"^deep\.json: ") as info:
        import_file(project, f)
    assert says in str(info.value)
    assert main(["import", str(project.directory), str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dalbt: error: {says}") and err.count("\n") == 1
    assert project.label_history() == []


def test_csv_safe_leaves_plain_numbers_and_round_trips_everything():
    from dalbt.labelling.interchange import csv_safe, csv_unsafe

    assert [csv_safe(v) for v in ("-1", "+1.5", "-3e2", ".5")] == ["-1", "+1.5", "-3e2", ".5"]
    assert csv_safe("-1+2") == "'-1+2" and csv_safe("=1") == "'=1" and csv_safe("@x") == "'@x"
    for v in ("-1", "=HYPERLINK(\"x\")", "'-1", "''=1", "a", "+", "-", "\tx"):
        assert csv_unsafe(csv_safe(v)) == v
