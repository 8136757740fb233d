"""dalbt as a Label Studio ML backend (``dalbt serve-ml DIR``).

Label Studio talks to an ML backend over a small JSON protocol; this module speaks it for a
labelling project, so that the project's model and strategy work inside Label Studio:

* ``GET /health``: ``{"status": "UP", "model_class": "dalbt", "model_version": ...}``.
* ``POST /setup`` (Label Studio sends the project's labelling config as ``schema``): checks
  that the config has a ``Choices`` control whose choices include every class of the project
  and answers ``{"model_version": ...}``; a config that cannot hold dalbt's labels is refused
  with the reason.
* ``POST /predict`` (``{"tasks": [...], "label_config": ...}``): one prediction per task,
  ``{"result": [the guess as a choices result, with its probability as "score"], "score":
  priority, "model_version": "dalbt-round-N"}``. The **priority** follows the project's
  strategy: the images dalbt queued (its latest batches, in query order) get 0 to 0.5, every
  other image 0.5 + 0.5 x the model's confidence. Label Studio's "Uncertainty sampling" (or
  ``--sampling prediction-score-min``) labels the lowest score first, and the Data Manager
  sorts by "Prediction score": both follow dalbt's choice. Before any round has trained a
  classifier a task gets no guess (an empty result), only its priority.
* ``POST /webhook`` (Label Studio creates this webhook when the backend is connected):
  ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` record the annotation's choice through the
  same label store as the page (:meth:`Project.add_labels`, ``source`` ``label-studio``, the
  annotator as ``labelstudio:<user id>``); a cancelled (skipped) annotation skips the image.
  When the last queued image has its label, the backend trains and queues the next batch in
  the background, as the page's button does. ``START_TRAINING`` (the "Start Training" button)
  starts that query at once. Other events are acknowledged and ignored; deleting an annotation
  in Label Studio does not remove the label (the history is append-only: give another label).
* ``POST /train``: the older training call, the same as ``START_TRAINING``.

Tasks are matched to the project's images as :mod:`~dalbt.labelling.interchange` matches
imported files (``dalbt_path``, else the image URL's path; a differing ``dalbt_sha256`` is
refused), so tasks made with ``dalbt export DIR --format labelstudio --all`` match exactly.

Security: loopback addresses only by default; any other address needs a token, which Label
Studio sends as the password of the connection's basic authentication (any user name).
"""

from __future__ import annotations

import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dalbt.errors import DalbtError
from dalbt.labelling.config import DEFAULT_HOST, DEFAULT_ML_PORT
from dalbt.labelling.interchange import (
    FROM_NAME,
    OOD_CHOICE,
    TO_NAME,
    _ls_task,
    _Matcher,
    _task_paths,
)
from dalbt.labelling.project import Project
from dalbt.labelling.server import (
    SECURITY_HEADERS,
    _Site,
    guarded_app,
    page_url,
    run_app,
    start_query,
    token_for,
)

ML_MAX_BODY = 64 * 1024 * 1024  # a predict request carries a page of tasks
SOURCE = "label-studio"
UNTRAINED = "dalbt-untrained"
QUEUED_SPAN = 0.5  # priorities of queued images lie in [0, QUEUED_SPAN)
ML_TOKEN_MESSAGE = ("this ML backend needs its token: in Label Studio's model connection, turn "
                    "on basic authentication with the token as the password")


def model_version(round_: int | None) -> str:
    """The model version Label Studio shows: the latest round, or ``dalbt-untrained``."""
    return UNTRAINED if round_ is None else f"dalbt-round-{round_}"


def choices_control(config: str, classes: Sequence[str]) -> tuple[str, str]:
    """The ``(from_name, to_name)`` of the labelling config's control for dalbt's labels.

    Args:
        config: Label Studio's labelling config (XML).
        classes: The project's classes: every one must be a choice of the control.

    Returns:
        The ``Choices`` control's name and the object it labels.

    Raises:
        DalbtError: Not XML, no ``Choices`` control, or classes missing from its choices.
    """
    try:
        root = ET.fromstring(config)  # noqa: S314 - the config comes from Label Studio itself
    except ET.ParseError as exc:
        raise DalbtError(f"the labelling config is not XML: {exc}") from None
    controls = [c for c in root.iter("Choices") if c.get("name") and c.get("toName")]
    if not controls:
        raise DalbtError("the labelling config has no <Choices name=... toName=...> control; "
                         "use the config of 'dalbt export DIR --format labelstudio-config'")
    control = next((c for c in controls if c.get("name") == FROM_NAME), controls[0])
    values = {c.get("value") for c in control.iter("Choice")}
    missing = [c for c in classes if c not in values]
    if missing:
        raise DalbtError(f"the labelling config's choices lack the project's classes "
                         f"{', '.join(missing)}; use the config of 'dalbt export DIR --format "
                         "labelstudio-config'")
    return str(control.get("name")), str(control.get("toName"))


def priorities(pending: Sequence[int], image_ids: Sequence[int],
               confidence: dict[int, float]) -> list[float]:
    """Label Studio prediction scores that order tasks by dalbt's choice (lowest first).

    Args:
        pending: Queued image ids, in query order (oldest round first).
        image_ids: The images to score.
        confidence: Image id -> the model's probability of its guess (missing: unknown).

    Returns:
        One score per image: ``QUEUED_SPAN * k / len(pending)`` for the k-th queued image,
        else ``QUEUED_SPAN + (1 - QUEUED_SPAN) * confidence`` (1.0 without a guess).
    """
    rank = {i: k for k, i in enumerate(pending)}
    out = []
    for i in image_ids:
        if i in rank:
            out.append(QUEUED_SPAN * rank[i] / len(pending))
        else:
            out.append(QUEUED_SPAN + (1 - QUEUED_SPAN) * confidence.get(i, 1.0))
    return out


class LabelStudioLink:
    """Keeps the Label Studio projects connected to this backend on dalbt's latest round.

    After each round (and when a project first connects) it asks Label Studio, through its
    REST API, to retrieve predictions for every task (``retrieve_tasks_predictions``: Label
    Studio then calls ``/predict`` for the tasks without a prediction of the new version) and
    sets the project's model version to the round, so that uncertainty sampling follows the new
    ranking at once. Runs in a background thread; failures are printed, never raised.

    Args:
        url: Label Studio's address (None: the ``hostname`` that ``/setup`` gives).
        token: An API token: a personal access token (a JWT refresh token) or a legacy token
            (None: the ``access_token`` that ``/setup`` gives).
        delay: Seconds to wait before syncing (Label Studio finishes the connection first).
    """

    def __init__(self, url: str | None = None, token: str | None = None,
                 delay: float = 1.0) -> None:
        if token and not url:  # never send the user's token where a /setup call points
            raise DalbtError("a Label Studio token needs Label Studio's address too: give "
                             "--label-studio-url (or LABEL_STUDIO_URL) with the token")
        self.url = url.rstrip("/") if url else None
        self.token = token
        self.delay = delay
        self.projects: dict[int, tuple[str | None, str | None]] = {}  # id -> setup's url, token
        self._lock = threading.Lock()
        self._wanted: str | None = None  # a version still to sync
        self._thread: threading.Thread | None = None
        self.synced: list[tuple[int, str]] = []  # (project, version) done, for tests and logs

    def note_setup(self, body: dict[str, Any]) -> bool:
        """Remember the project of a ``/setup`` call; whether it is new."""
        uid = str(body.get("project", ""))
        if not uid.partition(".")[0].isdigit():
            return False
        pid = int(uid.partition(".")[0])
        url, token = body.get("hostname"), body.get("access_token")
        with self._lock:
            new = pid not in self.projects
            self.projects[pid] = (url if isinstance(url, str) else None,
                                  token if isinstance(token, str) else None)
        return new

    def schedule(self, version: str) -> None:
        """Sync every known project to ``version`` in the background (coalesced)."""
        with self._lock:
            self._wanted = version
            if self._thread is not None:  # the running sync takes it up before it ends
                return
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="dalbt-label-studio-sync")
            self._thread.start()

    def wait(self, timeout: float = 60.0) -> None:
        """Wait for a running sync to end (tests)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        time.sleep(self.delay)
        while True:
            with self._lock:
                version, self._wanted = self._wanted, None
                projects = dict(self.projects)
                if version is None:
                    self._thread = None  # under the lock: a new schedule() starts a thread
                    return
            for pid, (setup_url, setup_token) in projects.items():
                # the address and the token go together: the user's pair, else Label Studio's
                url, token = ((self.url, self.token or setup_token) if self.url
                              else (setup_url, setup_token))
                if not url or not token:
                    print(f"dalbt serve-ml: cannot update Label Studio project {pid}: no URL or "
                          "token (give --label-studio-url and --label-studio-token)", flush=True)
                    continue
                try:
                    self._sync(url, token, pid, version)
                    self.synced.append((pid, version))
                except Exception as exc:  # a background thread: said, never raised
                    print(f"dalbt serve-ml: could not update Label Studio project {pid} to "
                          f"{version}: {type(exc).__name__}: {exc}; retrieve the predictions "
                          "and choose the model version in Label Studio", flush=True)

    def _sync(self, url: str, token: str, pid: int, version: str) -> None:
        auth = _auth_header(url, token)
        _call(url + f"/api/dm/actions?id=retrieve_tasks_predictions&project={pid}", auth,
              "POST", {"selectedItems": {"all": True, "excluded": []}})
        _call(url + f"/api/projects/{pid}", auth, "PATCH", {"model_version": version})
        print(f"dalbt serve-ml: Label Studio project {pid} now ranks by {version}", flush=True)


def _call(url: str, auth: str, method: str = "GET", body: Any = None,
          timeout: float = 300.0) -> Any:
    """One JSON request to Label Studio's API; its decoded answer."""
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": auth,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - the user's server
        text = r.read()
    return json.loads(text) if text else None


def _auth_header(url: str, token: str) -> str:
    """``Authorization`` for a Label Studio token: a personal access token (a JWT, exchanged
    for an access token) or a legacy token."""
    if token.count(".") == 2:
        answer = _call(url + "/api/token/refresh/", "", "POST", {"refresh": token}, timeout=30)
        return f"Bearer {answer['access']}"
    return f"Token {token}"


class _Backend:
    """The backend's state: the site (project, query job) and the latest round's guesses."""

    def __init__(self, site: _Site, auto_train: bool, link: LabelStudioLink | None) -> None:
        self.site = site
        self.auto_train = auto_train
        self.link = link
        if link is not None:
            site.after_query = lambda round_: link.schedule(model_version(round_))
        self._lock = threading.Lock()
        # (latest round, the round of the guesses or None, image id -> (class, probability))
        self._cached: tuple[int, int | None, dict[int, tuple[int, float]]] | None = None

    def latest_round(self, p: Project) -> int | None:
        row = p.db.execute("SELECT MAX(round) FROM rounds").fetchone()
        return None if row[0] is None else int(row[0])

    def guesses(self, p: Project) -> tuple[int | None, dict[int, tuple[int, float]]]:
        """The latest trained round and, per image id, its model's guess (class index) and
        probability; computed once per round, in one pass over the images."""
        latest = self.latest_round(p)
        with self._lock:
            if latest is None:
                return None, {}
            if self._cached is None or self._cached[0] != latest:
                pred = p.predictions(log=lambda m: print(m, flush=True))
                guess: dict[int, tuple[int, float]] = {}
                if pred is not None:
                    k, conf = pred.probs.argmax(1), pred.probs.max(1)
                    guess = dict(zip(pred.image_ids.tolist(),
                                     zip(k.tolist(), conf.tolist(), strict=True), strict=True))
                self._cached = (latest, None if pred is None else pred.round, guess)
            return self._cached[1], self._cached[2]

    def setup(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check Label Studio's labelling config; the model version."""
        with self.site.project() as p:
            if isinstance(body.get("schema"), str):
                choices_control(body["schema"], p.classes)
            version = model_version(self.latest_round(p))
        if self.link is not None and self.link.note_setup(body):
            self.link.schedule(version)  # a newly connected project: rank it now
        return {"model_version": version}

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise DalbtError("'tasks' must be a list of Label Studio tasks")
        with self.site.project() as p:
            from_name, to_name = FROM_NAME, TO_NAME
            if isinstance(body.get("label_config"), str):
                from_name, to_name = choices_control(body["label_config"], p.classes)
            latest = self.latest_round(p)
            trained, guess = self.guesses(p)  # read after latest: its round is latest or newer
            if trained is not None and (latest is None or trained > latest):
                latest = trained
            version = model_version(latest)
            pending = [q.image_id for q in p.pending()]
            image_of = _TaskImages(p)
            classes = p.classes
        ids = [image_of(t) for t in tasks]
        found = [None if i is None else guess.get(i) for i in ids]
        scores = priorities(pending, [-1 if i is None else i for i in ids],
                            {i: g[1] for i, g in zip(ids, found, strict=True) if g is not None})
        results = []
        for g, score in zip(found, scores, strict=True):
            result = [] if g is None else [
                {"from_name": from_name, "to_name": to_name, "type": "choices",
                 "value": {"choices": [classes[g[0]]]}, "score": g[1]}]
            results.append({"result": result, "score": float(score),
                            "model_version": version})
        return {"results": results, "model_version": version}

    def record(self, body: dict[str, Any]) -> dict[str, Any]:
        """An annotation from the webhook: recorded as the image's label (or a skip)."""
        task, annotation = body.get("task"), body.get("annotation")
        if not isinstance(task, dict) or not isinstance(annotation, dict):
            raise DalbtError("an annotation event needs 'task' and 'annotation' objects")
        with self.site.project() as p:
            classes = set(p.classes)
            try:
                rec = _ls_task({"data": task.get("data"), "annotations": [annotation]},
                               f"task {task.get('id')}", classes)
            except ValueError as exc:
                raise DalbtError(str(exc)) from None
            image_id = _TaskImages(p)(task)
            if image_id is None:
                return {"status": "ignored", "reason": f"task {task.get('id')} is no image of "
                                                       "this project"}
            path = p.image(image_id)[0]
            if annotation.get("was_cancelled"):
                p.skip(image_id)
                outcome: dict[str, Any] = {"status": "skipped", "image": path}
            elif rec.status != "label":
                raise DalbtError(f"task {task.get('id')}: the annotation gives no single class "
                                 f"of the project ({rec.status}: {rec.label!r})")
            else:
                added, _ = p.add_labels([(image_id, rec.label, rec.who)], SOURCE,
                                        skip_unchanged=True)
                outcome = {"status": "labelled", "image": path,
                           "label": OOD_CHOICE if rec.label is None else rec.label,
                           "added": added}
            batch_done = not p.pending() and bool(p.rounds())
        if self.auto_train and batch_done:
            outcome["training"] = self.train()
        return outcome

    def train(self) -> bool:
        """Start the background query unless one runs; whether this call started it."""
        try:
            start_query(self.site)
        except DalbtError as exc:
            print(f"dalbt serve-ml: not training now: {exc}", flush=True)
            return False
        return True


class _TaskImages:
    """Finds the project image a Label Studio task shows, as imported files are matched."""

    def __init__(self, p: Project) -> None:
        self.matcher = _Matcher(p.image_ids())
        self.shas = dict(p.db.execute("SELECT id, sha256 FROM images"))

    def __call__(self, task: Any) -> int | None:
        """The image id (None: no image of the project, or its hash differs)."""
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            return None
        paths, sha = _task_paths(data)
        image_id, _ = self.matcher.match(paths)
        if image_id is None or (sha is not None and self.shas.get(image_id) != sha):
            return None
        return image_id


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "detail": message}, status_code=status,
                        headers=SECURITY_HEADERS)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise DalbtError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise DalbtError("the request body must be a JSON object")
    return body


def create_ml_app(directory: Path, token: str | None = None, budget: int | None = None,
                  auto_train: bool = True, link: LabelStudioLink | None = None,
                  host: str = DEFAULT_HOST) -> FastAPI:
    """The Label Studio ML backend of a project.

    Args:
        directory: The project directory.
        token: Token every request must present (basic-auth password or bearer); None: none.
        budget: Images each training queues (default: the last batch's size, else 20).
        auto_train: Train and queue the next batch when the last queued image is labelled.
        link: Keeps connected Label Studio projects on the latest round (None: they are not
            told; retrieving predictions and choosing the version is then up to the user).
        host: The address the server is bound to; on a loopback address only loopback Host
            headers are accepted.

    Returns:
        The FastAPI application.

    Raises:
        DalbtError: If the directory holds no project.
    """
    backend = _Backend(_Site(directory, None, budget), auto_train, link)
    app = guarded_app("dalbt ML backend", token, host, ML_MAX_BODY, ML_TOKEN_MESSAGE)

    @app.exception_handler(DalbtError)
    async def refused(request: Request, exc: DalbtError) -> JSONResponse:
        return _error(400, str(exc))

    _add_ml_routes(app, backend)
    app.state.query_job = backend.site.job
    app.state.link = link
    return app


def _add_ml_routes(app: FastAPI, backend: _Backend) -> None:
    """The protocol's routes (see the module docstring)."""

    @app.get("/")
    @app.get("/health")
    def health() -> dict[str, Any]:
        with backend.site.project() as p:
            version = model_version(backend.latest_round(p))
        return {"status": "UP", "model_class": "dalbt", "model_version": version}

    @app.post("/setup")
    async def setup(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(backend.setup, await _json(request))

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        return await run_in_threadpool(backend.predict, await _json(request))

    @app.post("/webhook", status_code=201)
    async def webhook(request: Request) -> dict[str, Any]:
        body = await _json(request)
        action = body.get("action")
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            return {"action": action, **await run_in_threadpool(backend.record, body)}
        if action == "START_TRAINING":
            return {"action": action, "training": await run_in_threadpool(backend.train)}
        return {"action": action, "status": "ignored"}

    @app.post("/train", status_code=201)
    def train() -> dict[str, Any]:
        return {"training": backend.train()}

    @app.get("/versions")
    def versions() -> dict[str, Any]:
        with backend.site.project() as p:
            rounds = [r[0] for r in p.db.execute("SELECT round FROM rounds ORDER BY round")]
        return {"versions": [model_version(r) for r in rounds]}


def serve_ml(directory: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_ML_PORT,
             token: str | None = None, budget: int | None = None, auto_train: bool = True,
             label_studio_url: str | None = None, label_studio_token: str | None = None,
             sync: bool = True) -> None:
    """Serve a project as a Label Studio ML backend until interrupted (Ctrl-C).

    A non-loopback ``host`` never runs without a token: one is generated when none is given.

    Args:
        directory: The project directory.
        host: Bind address (loopback by default).
        port: TCP port.
        token: Token (None: none on loopback, a generated one elsewhere).
        budget: Images each training queues.
        auto_train: Train when the last queued image is labelled.
        label_studio_url: Label Studio's address, for :class:`LabelStudioLink` (default: what
            Label Studio's ``/setup`` call gives).
        label_studio_token: Label Studio API token (default: the one ``/setup`` gives).
        sync: Keep connected Label Studio projects on the latest round.

    Raises:
        DalbtError: No project, or the address cannot be used.
    """
    token = token_for(host, token, "the ML backend")
    link = LabelStudioLink(label_studio_url, label_studio_token) if sync else None
    app = create_ml_app(Path(directory), token=token, budget=budget, auto_train=auto_train,
                        link=link, host=host)
    run_app(app, host, port, lambda port_: f"dalbt ML backend of {directory}: "
            f"{page_url(host, port_).rstrip('/')}\n(in Label Studio: the project's settings > "
            "Model > Connect model, with this URL" + (", basic authentication with the token as "
            "the password" if token else "") + "; Ctrl-C stops it)")


__all__ = ["DEFAULT_ML_PORT", "LabelStudioLink", "choices_control", "create_ml_app",
           "model_version", "priorities", "serve_ml"]
