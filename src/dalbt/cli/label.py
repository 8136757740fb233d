"""Labelling sub-commands: ``init``, ``query``, ``serve``, ``export`` and ``import``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalbt.cli.types import (
    add_backbone_options,
    batch_size,
    field_defaults,
    fraction,
    image_size,
    non_negative_float,
    non_negative_int,
    option,
    port,
    positive_int,
    query_budget,
    threads,
)
from dalbt.errors import DalbtError
from dalbt.labelling.config import (
    CHANNELS,
    DEFAULT_BUDGET,
    DEFAULT_HOST,
    DEFAULT_ML_PORT,
    DEFAULT_PORT,
    EXPORT_FORMATS,
    ProjectConfig,
)
from dalbt.recipe import FINETUNE_MODES

COMMANDS = ("init", "query", "serve", "serve-ml", "export", "import")
# What the extra 'label' installs for 'dalbt serve' (with what they need themselves).
SERVER_PACKAGES = ("fastapi", "uvicorn", "starlette", "pydantic")


def add_parsers(sub: Any) -> None:
    """Add the labelling sub-commands to the ``dalbt`` parser's sub-parsers."""
    _add_init_parser(sub)
    _add_query_parser(sub)
    _add_serve_parser(sub)
    _add_serve_ml_parser(sub)
    _add_interchange_parsers(sub)


def _add_init_parser(sub: Any) -> None:
    """``dalbt init``; its defaults are :class:`ProjectConfig`'s and its recipe's."""
    project = field_defaults(ProjectConfig)
    train = project["train"]
    p = sub.add_parser("init", help="create a labelling project on a folder of images",
                       description="Create a labelling project in DIR on the images under "
                                   "--images. Images in a sub-folder named like a class start "
                                   "labelled with it; --labels CSV (path,label) adds more.")
    p.add_argument("directory", help="project directory (created)")
    p.add_argument("--images", required=True, help="folder of the images (searched recursively)")
    p.add_argument("--classes", default=None, help="class names, comma-separated: a,b,c")
    p.add_argument("--classes-file", default=None, help="file with one class name per line")
    p.add_argument("--labels", default=None, help="CSV of labels given beforehand: path,label")
    p.add_argument("--strategy", default=project["strategy"],
                   help=f"query strategy (see 'dalbt strategies'; default {project['strategy']}:"
                        " typical picks while classes are thin, then margin, both among the "
                        "Weibull inliers; weibull is the paper's exact rule)")
    p.add_argument("-O", "--strategy-option", type=option, action="append", default=[],
                   metavar="KEY=VALUE", help="strategy option (repeatable)")
    p.add_argument("--model", default=project["model"],
                   help="encoder (see 'dalbt models'), or a pretrained backbone: timm:NAME or "
                        "torchvision:NAME")
    add_backbone_options(p)
    p.add_argument("--finetune", choices=FINETUNE_MODES, default=None,
                   help="train the whole network each query (all) or only a linear head on "
                        "the frozen encoder, whose embeddings are computed once (head); "
                        "default: head for a backbone, else all")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="side the images are resized to (default: most common size, max 64)")
    p.add_argument("--channels", type=int, choices=CHANNELS, default=None,
                   help="1 (grayscale) or 3 (colour); default: 1 if every image is grayscale")
    p.add_argument("--epochs", type=positive_int, default=train.epochs,
                   help="training epochs per query")
    p.add_argument("--batch-size", type=batch_size, default=train.batch_size)
    p.add_argument("--gamma", type=non_negative_float, default=train.gamma,
                   help="Barlow Twins weight (>= 0)")
    p.add_argument("--val-fraction", type=fraction, default=project["val_fraction"],
                   help="share of labels held out to select the epoch and measure accuracy")
    p.add_argument("--cold-start-epochs", type=non_negative_int, default=None,
                   help="Barlow Twins epochs before the first query when nothing is labelled "
                        f"(default: {project['cold_start_epochs']}; 0 for a backbone, whose "
                        "pretrained features choose the first batch)")
    p.add_argument("--seed", type=non_negative_int, default=project["seed"])
    p.add_argument("--who", default=None, help="author recorded for the initial labels")


def _add_query_parser(sub: Any) -> None:
    """``dalbt query``."""
    q = sub.add_parser(
        "query", help="train on the labels so far and queue the next images",
        description="Train the project's model on the labels so far (labelled images whose hash "
                    "puts them in the validation share select the epoch and give the accuracy) "
                    "and queue the next --budget images chosen by the project's strategy; with "
                    "no label yet, a cold start (Barlow Twins features, then the cold-start "
                    "strategy, by default TypiClust's choice). Label "
                    "them with 'dalbt serve DIR'.")
    q.add_argument("directory", help="project directory")
    q.add_argument("--budget", type=query_budget, required=True, help="images to queue")
    q.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
    q.add_argument("--no-progress", action="store_true",
                   help="hide the progress (bars on a terminal, else one line per phase: "
                        "pre-training or training, scoring, selecting)")


def _add_serve_parser(sub: Any) -> None:
    """``dalbt serve``."""
    s = sub.add_parser("serve", help="label the queued images in a browser",
                       description="Serve the labelling page of a project. Only loopback "
                                   "addresses are open without a token; any other --host "
                                   "needs --token (or DALBT_TOKEN), or one is generated. "
                                   "Needs the web server: pip install 'dalbt[label]'.")
    _add_server_options(s, DEFAULT_PORT, "the page")
    s.add_argument("--user", default=None, help="labeller name recorded with each label")
    s.add_argument("--budget", type=query_budget, default=None,
                   help="batch size of the page's 'train and queue' button (default: the "
                        f"size of the last batch, else {DEFAULT_BUDGET})")
    s.add_argument("--threads", type=threads, default=None, help="torch CPU threads")


def _add_server_options(s: Any, default_port: int, client: str) -> None:
    """The project directory, ``--host``, ``--port`` and ``--token`` of a server command."""
    s.add_argument("directory", help="project directory")
    s.add_argument("--host", default=DEFAULT_HOST, help="bind address")
    s.add_argument("--port", type=port, default=default_port,
                   help="TCP port, 0 to 65535 (0: any free port)")
    s.add_argument("--token", default=os.environ.get("DALBT_TOKEN"),
                   help=f"access token {client} must present (default: $DALBT_TOKEN)")


def _add_serve_ml_parser(sub: Any) -> None:
    """``dalbt serve-ml``."""
    s = sub.add_parser(
        "serve-ml", help="serve the project as a Label Studio ML backend",
        description="Serve the project to Label Studio as an ML backend: predictions are the "
                    "model's guess with its probability, scored so that Label Studio's "
                    "uncertainty sampling (lowest prediction score first) follows the "
                    "project's strategy; annotations go to the project's labels (source "
                    "label-studio) and train the next batch when the queued one is done. "
                    "Import the tasks of 'dalbt export DIR --format labelstudio --all'. Only "
                    "loopback addresses are open without a token (Label Studio sends it as "
                    "the basic-auth password). Needs pip install 'dalbt[labelstudio]'.")
    _add_server_options(s, DEFAULT_ML_PORT, "Label Studio")
    s.add_argument("--budget", type=query_budget, default=None,
                   help="images each training queues (default: the size of the last batch, "
                        f"else {DEFAULT_BUDGET})")
    s.add_argument("--no-auto-train", dest="auto_train", action="store_false",
                   help="train only on Label Studio's 'Start Training', not when the queued "
                        "batch is done")
    s.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="Label Studio's address, to update its projects after each round "
                        "(default: $LABEL_STUDIO_URL, else what Label Studio tells on connecting)")
    s.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="Label Studio API token (personal access or legacy token; default: "
                        "$LABEL_STUDIO_API_KEY, else the one Label Studio sends on connecting)")
    s.add_argument("--no-sync", dest="sync", action="store_false",
                   help="do not retrieve predictions and set the model version in Label Studio "
                        "after each round")
    s.add_argument("--threads", type=threads, default=None, help="torch CPU threads")


def _add_interchange_parsers(sub: Any) -> None:
    """``dalbt export`` and ``dalbt import``."""
    e = sub.add_parser("export", help="write labels (or the queue) as CSV or Label Studio JSON")
    e.add_argument("directory", help="project directory")
    e.add_argument("--format", choices=EXPORT_FORMATS, default=EXPORT_FORMATS[0],
                   help="csv, Label Studio tasks (JSON), or the Label Studio labelling config "
                        "(XML) that goes with them")
    e.add_argument("--queue", action="store_true",
                   help="export the pending queue (tasks to annotate) instead of the labels")
    e.add_argument("--all", dest="every", action="store_true",
                   help="Label Studio tasks of every usable image, labelled ones with their "
                        "label (the tasks for 'dalbt serve-ml')")
    e.add_argument("--out", default=None, help="file to write (default: standard output)")

    i = sub.add_parser("import", help="read labels from CSV or Label Studio JSON")
    i.add_argument("directory", help="project directory")
    i.add_argument("file", help="a .csv with path and label columns (optional kind, who), or a "
                                "Label Studio JSON / JSON-MIN export")
    i.add_argument("--who", default=None, help="labeller recorded when the file names none")


def _server(command: str = "serve") -> Callable[..., None]:
    """:func:`dalbt.labelling.server.serve` (``serve-ml``: :func:`~dalbt.labelling.mlbackend.
    serve_ml`), or, if the web server is not installed, a :class:`DalbtError` naming the extra
    that installs it."""
    try:
        import uvicorn  # noqa: F401 - serve() imports it late; missing, it should fail now

        if command == "serve-ml":
            from dalbt.labelling.mlbackend import serve_ml as serve
        else:
            from dalbt.labelling.server import serve
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in SERVER_PACKAGES:
            raise
        extra = "labelstudio" if command == "serve-ml" else "label"
        raise DalbtError(f"'dalbt {command}' needs {missing}, which is not installed: "
                         f"pip install 'dalbt[{extra}]'") from None
    return serve


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or os.cpu_count() or 1)


def dispatch(args: argparse.Namespace) -> int:
    """Run one labelling sub-command; returns the exit code."""
    from dalbt.labelling.project import Project, parse_classes

    if args.command == "init":
        from dalbt.catalogue import is_backbone

        classes = parse_classes(args.classes, args.classes_file)
        backbone = is_backbone(args.model)
        cold_epochs = args.cold_start_epochs
        if cold_epochs is None:
            cold_epochs = 0 if backbone else field_defaults(ProjectConfig)["cold_start_epochs"]
        weights = args.weights
        if weights is not None and Path(weights).expanduser().exists():
            # absolute: read from wherever the project is used
            weights = str(Path(weights).expanduser().resolve())
        Project.init(args.directory, args.images, classes, labels_csv=args.labels,
                     image_size=args.image_size, channels=args.channels, who=args.who,
                     strategy=args.strategy, strategy_options=dict(args.strategy_option),
                     model=args.model, seed=args.seed, val_fraction=args.val_fraction,
                     cold_start_epochs=cold_epochs, weights=weights,
                     input_size=args.input_size,
                     train={"epochs": args.epochs, "batch_size": args.batch_size,
                            "gamma": args.gamma,
                            "finetune": args.finetune or ("head" if backbone else "all")}
                     ).close()
        print(f"next: 'dalbt query {args.directory} --budget {DEFAULT_BUDGET}', then "
              f"'dalbt serve {args.directory}'")
        return 0
    if args.command == "query":
        from dalbt.progress import PhaseLog

        _threads(args.threads)
        bars = not args.no_progress and sys.stderr.isatty()
        # not on a terminal: one line per phase instead of bars
        phase_log = None if bars or args.no_progress else PhaseLog(
            lambda line: print(line, file=sys.stderr, flush=True))
        with Project(args.directory) as project:
            res = project.query(args.budget, progress=bars, on_progress=phase_log)
        print(f"queued {len(res.queued)} images in round {res.round}; label them with "
              f"'dalbt serve {args.directory}'")
        return 0
    if args.command == "serve":
        serve = _server()
        _threads(args.threads)
        serve(Path(args.directory), host=args.host, port=args.port, token=args.token,
              user=args.user, budget=args.budget)
        return 0
    if args.command == "serve-ml":
        serve_ml = _server("serve-ml")
        _threads(args.threads)
        serve_ml(Path(args.directory), host=args.host, port=args.port, token=args.token,
                 budget=args.budget, auto_train=args.auto_train,
                 label_studio_url=args.label_studio_url,
                 label_studio_token=args.label_studio_token, sync=args.sync)
        return 0
    if args.command == "export":
        from dalbt.labelling.interchange import export_project

        with Project(args.directory) as project:
            text = export_project(project, args.format, queue=args.queue, every=args.every)
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "import":
        from dalbt.labelling.interchange import import_file

        with Project(args.directory) as project:
            summary = import_file(project, Path(args.file), who=args.who)
        print(summary)
        return 0
    raise DalbtError(f"unknown command {args.command}")
