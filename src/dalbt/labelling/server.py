"""The labelling web page of a project (``dalbt serve``): a small JSON API and one static page.

Every request opens its own :class:`~dalbt.labelling.project.Project` (its own SQLite
connection), so labels from several tabs or people are independent transactions; each label is
committed before its response, so killing the server loses no acknowledged label. Images are
served by database id only (never by a path from the client) through
:meth:`Project.read_image`, which checks the file's hash and refuses anything outside the image
folder.

Security: with a token every request must present it (``?token=`` on the first page load
sets an HttpOnly, SameSite=Strict cookie; or ``Authorization: Bearer``). POST bodies must be
JSON, so plain cross-site form posts fail, and on a loopback address the Host header must name
the loopback (against DNS rebinding). A non-loopback address never runs without a token.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import secrets
import socket
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from dalbt.clock import utc_now
from dalbt.data.formats import image_error
from dalbt.errors import DalbtError
from dalbt.labelling.config import DEFAULT_BUDGET, DEFAULT_HOST, DEFAULT_PORT, MAX_BUDGET
from dalbt.labelling.lock import QueryLock
from dalbt.labelling.project import Project, UndoRefused, default_user, is_loopback
from dalbt.progress import ProgressEvent

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "[::1]"]

# Formats every browser shows; any other image format is converted to PNG on the way out.
BROWSER_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
                 ".gif": "image/gif", ".bmp": "image/bmp", ".webp": "image/webp"}
STATIC_TYPES = {"label.js": "text/javascript; charset=utf-8",
                "label.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                               "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
}


_CallNext = Callable[[Request], Awaitable[Response]]
_Middleware = Callable[[Request, _CallNext], Awaitable[Response]]

MAX_ID = 2**63 - 1  # SQLite's largest integer
MAX_BODY = 64 * 1024  # bytes of a request body; every API body is a few dozen
PAGE_TOKEN_MESSAGE = ("this server needs its access token: open the URL that 'dalbt serve' "
                      "printed (it ends in ?token=...)")


class _Body(BaseModel):
    """A JSON request body: an object with exactly typed fields (no true for 1, no "1")."""

    model_config = ConfigDict(strict=True)


class LabelIn(_Body):
    """Body of ``POST /api/label``; ``label`` null means "none of these classes"."""

    image_id: int = Field(ge=0, le=MAX_ID)
    label: str | None
    who: str | None = Field(default=None, max_length=200)


class SkipIn(_Body):
    """Body of ``POST /api/skip``."""

    image_id: int = Field(ge=0, le=MAX_ID)


class UndoIn(_Body):
    """Body of ``POST /api/undo``: a label (``label_id`` from ``/api/label``) or a skip
    (``image_id`` and ``round`` from ``/api/skip``) of this tab to undo."""

    label_id: int | None = Field(default=None, ge=0, le=MAX_ID)
    image_id: int | None = Field(default=None, ge=0, le=MAX_ID)
    round: int | None = Field(default=None, ge=0, le=MAX_ID)
    who: str | None = Field(default=None, max_length=200)


class QueryIn(_Body):
    """Body of ``POST /api/query``; no budget: the server's default."""

    budget: int | None = Field(default=None, gt=0, le=MAX_BUDGET)


def _shown(value: str, limit: int = 40) -> str:
    """``repr`` of a client's string, cut to ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """One line saying what is wrong with a request body (never echoing its values, which
    may be huge or not even JSON: NaN).

    Args:
        errors: ``RequestValidationError.errors()``.

    Returns:
        E.g. ``"bad request body: image_id: Input should be a valid integer"``.
    """
    if any(e.get("type") == "json_invalid" for e in errors):
        return "the request body is not valid JSON"
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc + ': ' if loc else ''}{e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "bad request body: " + "; ".join(parts) + more


class _QueryJob:
    """The background query of this server: one at a time, its outcome kept for the page, and
    while it runs its latest progress (:meth:`ProgressEvent.to_dict`: phase, done, total, unit,
    loss, elapsed_s, eta_s, query_eta_s, text)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held while this server's query runs
        self.error: str | None = None
        self.last: dict[str, Any] | None = None
        self.started: str | None = None
        self.finished: str | None = None
        self.progress: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None

    def state(self) -> dict[str, Any]:
        return {"error": self.error, "last": self.last, "started": self.started,
                "finished": self.finished, "progress": self.progress}

    def report(self, event: ProgressEvent) -> None:
        """The query's progress callback: keep the latest event (replaced whole, so a reader
        never sees half of one)."""
        self.progress = event.to_dict()



def _static(name: str) -> bytes:
    return (resources.files("dalbt.labelling") / "static" / name).read_bytes()


def cookie_name(token: str) -> str:
    """Name of the token cookie: specific to the token, so that two servers on different ports
    of one host (cookies ignore ports) do not overwrite each other's cookie."""
    return "dalbt_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class _Site:
    """What the routes of one app share: the project directory, the page's defaults and the
    background query."""

    def __init__(self, directory: str | Path, user: str | None, budget: int | None) -> None:
        """Raises: DalbtError: If the directory holds no project (with the fix)."""
        directory = Path(directory)
        Project(directory).close()
        self.directory = directory
        self.default_who = user or default_user()
        self.budget = budget
        self.job = _QueryJob()
        self.after_query: Callable[[int], None] | None = None  # called with each new round

    def project(self) -> Project:
        """The project, opened anew: one connection per request or thread."""
        return Project(self.directory)

    def default_budget(self, p: Project) -> int:
        """The query button's batch size: the server's, else the last batch's, else
        :data:`~dalbt.labelling.config.DEFAULT_BUDGET`."""
        if self.budget:
            return self.budget
        rounds = p.rounds()
        return (rounds[-1]["batch_size"] if rounds else 0) or DEFAULT_BUDGET


def create_app(directory: Path, token: str | None = None, user: str | None = None,
               budget: int | None = None, host: str = DEFAULT_HOST) -> FastAPI:
    """The labelling app of a project.

    Args:
        directory: The project directory.
        token: Access token every request must present (None: none needed).
        user: Default labeller name shown on the page (default: the OS user).
        budget: Default batch size of the page's query button (default: the last batch's
            size, else 20).
        host: The address the server is bound to; on a loopback address only loopback Host
            headers are accepted.

    Returns:
        The FastAPI application.

    Raises:
        DalbtError: If the directory holds no project.
    """
    site = _Site(directory, user, budget)
    app = guarded_app("dalbt labelling", token, host)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    _add_page_routes(app)
    _add_label_routes(app, site)
    _add_undo_route(app, site)
    _add_query_routes(app, site)
    app.state.query_job = site.job
    return app


def guarded_app(title: str, token: str | None, host: str, max_body: int = MAX_BODY,
                refused: str = PAGE_TOKEN_MESSAGE) -> FastAPI:
    """A FastAPI app behind dalbt's guard (:func:`_guard`): the token, JSON bodies of at most
    ``max_body`` bytes, the security headers and, on a loopback ``host``, loopback Host
    headers only (against DNS rebinding).

    Args:
        title: The app's title.
        token: Token every request must present (None: none).
        host: The address the server is bound to.
        max_body: Largest request body, in bytes.
        refused: What a request without the token is told.

    Returns:
        The app, without routes.
    """
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(_guard(token, max_body, refused))
    if is_loopback(host):
        allowed = LOOPBACK_HOSTS + ([host] if host not in LOOPBACK_HOSTS else [])
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed, www_redirect=False)
    return app


def _presented(request: Request) -> list[str | None]:
    """The tokens a request presents: ``Authorization: Bearer``, the password of
    ``Authorization: Basic`` (how Label Studio sends an ML backend's credentials), ``?token=``."""
    kind, _, value = request.headers.get("authorization", "").partition(" ")
    given: list[str | None] = [request.query_params.get("token")]
    if kind.lower() == "bearer":
        given.append(value.strip())
    elif kind.lower() == "basic":
        try:
            given.append(base64.b64decode(value.strip(), validate=True).decode()
                         .partition(":")[2])
        except (binascii.Error, UnicodeDecodeError):
            pass
    return given


def _token_refusal(request: Request, token: str,
                   msg: str = PAGE_TOKEN_MESSAGE) -> Response | None:
    """The 401 answer to a request without the token (None if it presents it)."""
    if (any(_token_matches(g, token) for g in _presented(request))
            or _token_matches(request.cookies.get(cookie_name(token)), token)):
        return None
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": msg}, status_code=401, headers=SECURITY_HEADERS)
    return Response(f"401 Unauthorized: {msg}\n", status_code=401, media_type="text/plain",
                    headers=SECURITY_HEADERS)


def _body_refusal(request: Request, max_body: int = MAX_BODY) -> Response | None:
    """The answer to a request body that is not JSON of a declared, small size (None if it
    is, or if the method has no body)."""
    if request.method in ("GET", "HEAD"):
        return None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return JSONResponse({"detail": "send the request body as application/json"},
                            status_code=415, headers=SECURITY_HEADERS)
    length = request.headers.get("content-length")
    if length is None:  # a chunked body would escape the size limit
        return JSONResponse({"detail": "send the request body with a Content-Length"},
                            status_code=411, headers=SECURITY_HEADERS)
    if not (length.isascii() and length.isdigit() and len(length) < 12
            and int(length) <= max_body):
        return JSONResponse({"detail": f"request body too large (at most {max_body} bytes)"},
                            status_code=413, headers=SECURITY_HEADERS)
    return None


def _guard(token: str | None, max_body: int = MAX_BODY,
           refused: str = PAGE_TOKEN_MESSAGE) -> _Middleware:
    """The HTTP middleware: the access token (``refused`` is the answer's message), the request
    body's form and size (at most ``max_body`` bytes), the security headers, and the token
    cookie after a first ``?token=`` load."""

    async def guard(request: Request, call_next: _CallNext) -> Response:
        from_query = False
        if token is not None:
            refusal = _token_refusal(request, token, refused)
            if refusal is not None:
                return refusal
            from_query = _token_matches(request.query_params.get("token"), token)
        refusal = _body_refusal(request, max_body)
        if refusal is not None:
            return refusal
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if from_query:
            response.set_cookie(cookie_name(token), token, httponly=True, samesite="strict",
                                path="/")
        return response

    return guard


def _add_page_routes(app: FastAPI) -> None:
    """``/`` (the page) and ``/static/{name}`` (its script and style sheet)."""

    @app.get("/", response_class=HTMLResponse)
    def page() -> Response:
        return Response(_static("label.html"), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_TYPES:  # a fixed list: no file name from the client is opened
            raise HTTPException(404, f"no static file {_shown(name)}")
        return Response(_static(name), media_type=STATIC_TYPES[name],
                        headers={"Cache-Control": "no-cache"})


def _image_response(site: _Site, image_id: str) -> Response:
    """``GET /api/image/{image_id}``: the image's bytes, checked against its hash; formats
    browsers do not show are converted to PNG."""
    if not (image_id.isascii() and image_id.isdigit() and len(image_id) <= 19
            and int(image_id) <= MAX_ID):
        raise HTTPException(404, f"no image with id {_shown(image_id)}")
    with site.project() as p:
        try:
            rel = p.image(int(image_id))[0]
        except DalbtError as exc:
            raise HTTPException(404, str(exc)) from exc
        try:
            data = p.read_image(int(image_id))
        except DalbtError as exc:  # changed, missing, unreadable or outside the root
            raise HTTPException(409, str(exc)) from exc
    suffix = PurePosixPath(rel).suffix.lower()
    media = BROWSER_TYPES.get(suffix)
    if media is None:
        try:
            data, media = _to_png(data), "image/png"
        except Exception as exc:
            raise HTTPException(409, f"image {rel} cannot be decoded: "
                                     f"{image_error(exc, rel)}") from exc
    return Response(data, media_type=media, headers={"Cache-Control": "no-store"})


def _add_label_routes(app: FastAPI, site: _Site) -> None:
    """``/api/state``, ``/api/image/{id}``, ``/api/label``, ``/api/skip`` and
    ``/api/history.png``."""
    job = site.job

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        with site.project() as p:
            pending = p.pending()
            rounds = p.rounds()
            return {
                "classes": p.classes,
                "progress": p.progress(),
                "pending": [{"image_id": q.image_id, "round": q.round, "position": q.position,
                             "path": q.path, "predicted": q.predicted,
                             "confidence": q.confidence} for q in pending],
                "rounds": [{k: r[k] for k in ("round", "method", "n_labelled", "val_acc",
                                              "batch_acc", "batch_size", "batch_labelled")}
                           for r in rounds],
                "batches": {str(r["round"]): {"size": r["batch_size"],
                                              "pending": sum(q.round == r["round"]
                                                             for q in pending)}
                            for r in rounds},
                "user": site.default_who,
                "budget": site.default_budget(p),
                "query": {"running": job.lock.locked() or p.query_running(), **job.state()},
            }

    @app.get("/api/image/{image_id}")
    def image(image_id: str) -> Response:
        return _image_response(site, image_id)

    @app.post("/api/label")
    def label(body: LabelIn) -> dict[str, Any]:
        who = (body.who or "").strip() or site.default_who
        with site.project() as p:
            try:
                p.image(body.image_id)
            except DalbtError as exc:
                raise HTTPException(404, str(exc)) from exc
            try:
                label_id = p.add_label(body.image_id, body.label, who=who, source="web")
            except DalbtError as exc:
                raise HTTPException(400, str(exc)) from exc
            return {"ok": True, "image_id": body.image_id, "label": body.label, "who": who,
                    "label_id": label_id}

    @app.post("/api/skip")
    def skip(body: SkipIn) -> dict[str, Any]:
        with site.project() as p:
            try:
                p.image(body.image_id)
            except DalbtError as exc:
                raise HTTPException(404, str(exc)) from exc
            round_ = p.skip(body.image_id)
        return {"ok": True, "image_id": body.image_id, "round": round_}

    @app.get("/api/history.png")
    def history() -> Response:
        with site.project() as p:
            rounds = p.rounds()
        return Response(history_png(rounds), media_type="image/png",
                        headers={"Cache-Control": "no-store"})


def _add_undo_route(app: FastAPI, site: _Site) -> None:
    """``POST /api/undo`` (:func:`_undo`)."""

    @app.post("/api/undo")
    def undo(body: UndoIn) -> dict[str, Any]:
        return _undo(site, body)


def _undo(site: _Site, body: UndoIn) -> dict[str, Any]:
    """``POST /api/undo``: undo a label of this tab (a correction appended to the history) or
    a skip; the image waits in the queue again. 409 when something happened to it since."""
    who = (body.who or "").strip() or site.default_who
    if (body.label_id is None) == (body.image_id is None or body.round is None):
        raise HTTPException(422, "give either label_id (a label to undo) or image_id and round "
                                 "(a skip to undo)")
    with site.project() as p:
        try:
            if body.label_id is not None:
                done = p.undo_label(body.label_id, who=who)
                return {"ok": True, "image_id": done.image_id, "round": done.round,
                        "label_id": done.label_id, "restored": done.label, "kind": done.kind}
            p.unskip(body.image_id, body.round)
            return {"ok": True, "image_id": body.image_id, "round": body.round}
        except UndoRefused as exc:
            raise HTTPException(409, str(exc)) from exc
        except DalbtError as exc:
            raise HTTPException(404, str(exc)) from exc


def _add_query_routes(app: FastAPI, site: _Site) -> None:
    """``POST /api/query``: start the background query (one at a time, across processes)."""

    @app.post("/api/query", status_code=202)
    def query(body: QueryIn) -> Any:
        try:
            n = start_query(site, body.budget)
        except DalbtError as exc:
            raise HTTPException(409, str(exc)) from exc
        return {"started": True, "budget": n}


def start_query(site: _Site, budget: int | None = None) -> int:
    """Start the background query of a site (the page's button, Label Studio's training).

    Args:
        site: The app's shared state.
        budget: Images to queue (None: the site's default batch size).

    Returns:
        The batch size the query runs with.

    Raises:
        DalbtError: A query of this server or of another process is running.
    """
    job = site.job
    if not job.lock.acquire(blocking=False):
        raise DalbtError("a query is already running; wait for it to finish")
    qlock = None
    try:
        with site.project() as p:
            try:
                qlock = p.acquire_query_lock()  # held by the thread until it finishes
            except DalbtError as exc:
                raise DalbtError("another process is running a query on this project; wait "
                                 "for it to finish") from exc
            n = budget or site.default_budget(p)
        job.error, job.started, job.finished, job.progress = None, utc_now(), None, None
        job.thread = threading.Thread(target=_run_query, args=(site, n, qlock), daemon=True,
                                      name="dalbt-query")
        job.thread.start()
    except BaseException:
        if qlock is not None:
            qlock.release()
        job.lock.release()
        raise
    return n


def _run_query(site: _Site, n: int, qlock: QueryLock) -> None:
    """The background query's thread: runs it, keeps its outcome and log for the page, and
    releases both locks."""
    job = site.job
    log: list[str] = []

    def note(line: str) -> None:  # kept for the page and shown on the server's console
        log.append(line)
        print(line, flush=True)

    try:
        with site.project() as p:
            res = p.query(n, progress=False, log=note, lock=qlock, on_progress=job.report)
        job.last = {"round": res.round, "method": res.method, "queued": len(res.queued),
                    "n_labelled": res.n_labelled, "val_acc": res.val_acc,
                    "skipped_images": len(res.skipped_images),
                    "restored_images": len(res.restored_images), "log": log}
        if site.after_query is not None:
            site.after_query(res.round)
    except DalbtError as exc:
        job.error = str(exc)
    except Exception as exc:  # shown on the page; the server keeps running
        traceback.print_exc()
        job.error = f"the query failed: {type(exc).__name__}: {exc}"
    finally:
        job.finished, job.progress = utc_now(), None
        qlock.release()
        job.lock.release()


def _to_png(data: bytes) -> bytes:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode.startswith("I;16"):  # 16-bit grey: its top 8 bits
            img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
        elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "P"):
            img = img.convert("RGB")
        out = io.BytesIO()
        img.save(out, format="PNG")
    return out.getvalue()


def history_png(rounds: list[dict[str, Any]]) -> bytes:
    """PNG of the accuracy history (:func:`history_figure`).

    Args:
        rounds: :meth:`Project.rounds` records.

    Returns:
        The PNG bytes (a placeholder text when no round has an accuracy yet).
    """
    out = io.BytesIO()
    history_figure(rounds).savefig(out, format="png")
    return out.getvalue()


def history_figure(rounds: list[dict[str, Any]]) -> Figure:
    """The accuracy history: validation and batch accuracy against labels trained on, with
    whole-number ticks on the labels axis (a single round: one tick each side of it).

    Args:
        rounds: :meth:`Project.rounds` records.

    Returns:
        The matplotlib figure (Agg canvas; a placeholder text when no round has an accuracy
        yet).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5.2, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    val = [(r["n_labelled"], 100 * r["val_acc"]) for r in rounds if r["val_acc"] is not None]
    batch = [(r["n_labelled"], 100 * r["batch_acc"]) for r in rounds
             if r["batch_acc"] is not None]
    if not val and not batch:
        ax.axis("off")
        text = ("No accuracy yet.\nLabel the queued images, then train:\nthe history of "
                "validation and batch accuracy appears here." if rounds else
                "No rounds yet.\nPress 'Train and queue next batch' to start.")
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#555")
    else:
        if val:
            ax.plot(*zip(*val, strict=True), "o-", color="#1f77b4", label="validation accuracy")
        if batch:
            ax.plot(*zip(*batch, strict=True), "s--", color="#ff7f0e",
                    label="accuracy on the queried batch")
        xs = [x for x, _ in val + batch]
        if min(xs) == max(xs):  # one point: a labels axis of whole numbers around it
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("labels the model was trained on")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise DalbtError(f"cannot use the address {host!r}: {exc}; give another --host") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise DalbtError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose "
                         "another --port (or stop the program using it)") from exc
    sock.set_inheritable(True)
    return sock


def page_url(host: str, port: int, token: str | None = None) -> str:
    """The URL to open: the bind address (the machine's name for a wildcard address)."""
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def serve(directory: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          token: str | None = None, user: str | None = None, budget: int | None = None) -> None:
    """Serve the labelling page until interrupted (Ctrl-C).

    A non-loopback ``host`` never runs without a token: one is generated when none is given.

    Args:
        directory: The project directory.
        host: Bind address (loopback by default).
        port: TCP port.
        token: Access token (None: none on loopback, a generated one elsewhere).
        user: Default labeller name.
        budget: Default batch size of the page's query button.

    Raises:
        DalbtError: No project, or the address cannot be used.
    """
    token = token_for(host, token, "the page")
    app = create_app(Path(directory), token=token, user=user, budget=budget, host=host)
    run_app(app, host, port, lambda port_: f"labelling page of {directory}: "
            f"{page_url(host, port_, token)}\n(Ctrl-C stops the server; every label is saved "
            "when it is given)")


def token_for(host: str, token: str | None, what: str) -> str | None:
    """The token a server on ``host`` runs with: the given one, none on a loopback address,
    else a generated one (said on the console)."""
    if token or is_loopback(host):
        return token or None
    token = secrets.token_urlsafe(24)
    print(f"note: {host} is not a loopback address, so {what} needs an access token; "
          f"generated one: {token} (set your own with --token or DALBT_TOKEN)", flush=True)
    return token


def run_app(app: FastAPI, host: str, port: int, banner: Callable[[int], str]) -> None:
    """Bind ``host:port`` (port 0: a free one), print ``banner(port)`` and serve ``app`` until
    interrupted.

    Raises:
        DalbtError: If the address cannot be used.
    """
    import uvicorn

    sock = _bind(host, port)
    print(banner(sock.getsockname()[1]), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(
        sockets=[sock])


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = DEFAULT_HOST, port: int = 0,
                      timeout: float = 20.0) -> Iterator[str]:
    """Run an app with uvicorn in a background thread (tests, screenshots).

    Args:
        app: The application (from :func:`create_app`).
        host: Bind address.
        port: TCP port (0: a free one).
        timeout: Seconds to wait for the server to start.

    Yields:
        The server's base URL, e.g. ``http://127.0.0.1:40123``; the server stops on exit.
    """
    import time

    import uvicorn

    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="dalbt-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise DalbtError(f"the test server on {host} did not start")
            time.sleep(0.02)
        yield page_url(host, sock.getsockname()[1], None).rstrip("/")
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
