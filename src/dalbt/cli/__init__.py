"""The ``dalbt`` command line: ``run``, ``bench``, ``report`` and the listings here, the
labelling sub-commands in :mod:`dalbt.cli.label`, every argument type in :mod:`dalbt.cli.types`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from dalbt import catalogue
from dalbt.cli.embed import add_embed_parser, cmd_embed
from dalbt.cli.label import COMMANDS, add_parsers, dispatch
from dalbt.cli.types import (
    add_backbone_options,
    batch_size,
    dims,
    finite_float,
    name_list,
    non_negative_float,
    non_negative_int,
    option,
    positive_float,
    positive_int,
    seed,
    seed_list,
    threads,
    width,
)
from dalbt.errors import DalbtError, RankZeroFailed
from dalbt.recipe import (
    AMP_MODES,
    FINETUNE_MODES,
    OOD_POLICIES,
    SCHEDULES,
    SELECTIONS,
    RunConfig,
    TrainConfig,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the default says nothing (None, False,
    an empty list) or the help already explains it."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        default = action.default
        return (bool(action.option_strings) and default is not argparse.SUPPRESS
                and default is not None and default is not False and default != []
                and "default" not in (action.help or "")
                and not isinstance(action, argparse._VersionAction | argparse._HelpAction))

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if self._shows_default(action) else action.help

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):  # no help text: show the default
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input on one ``dalbt: error:`` line, without the usage block,
    and shows defaults in ``--help`` (sub-parsers, the labelling ones of :mod:`.label` too, are
    of this class).

    A bare ``type=float`` is replaced by :func:`dalbt.cli.types.finite_float`, so that no
    option takes nan or inf; options with a range give their own type from :mod:`.types`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        if kwargs.get("type") is float:
            kwargs["type"] = finite_float()
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"dalbt: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``dalbt`` parser with every sub-command (the labelling ones from :mod:`.label`)."""
    p = _Parser(prog="dalbt", description="Deep active learning with Barlow Twins.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_run_parser(sub)
    _add_report_parser(sub)
    _add_bench_parser(sub)
    sub.add_parser("datasets", help="list the datasets", description="List the datasets.")
    st = sub.add_parser("strategies", help="list the query strategies",
                        description="List the query strategies; with --options, also each "
                                    "one's options (-O KEY=VALUE), their types and defaults.")
    st.add_argument("--options", action="store_true", help="list each strategy's options")
    sub.add_parser("models", help="list the models", description="List the models.")
    add_parsers(sub)
    add_embed_parser(sub)
    return p


def _add_run_parser(sub: Any) -> None:
    """``dalbt run``; its defaults are :class:`RunConfig`'s and its recipe's."""
    run = RunConfig()
    r = sub.add_parser("run", help="run active learning with a simulated oracle",
                       description="Run AL rounds (train, evaluate, query) and store each round.")
    r.add_argument("--dataset", default=run.dataset, help="dataset name (see 'dalbt datasets')")
    r.add_argument("--data-root", default=run.data_root,
                   help="directory with the dataset files (else $DALBT_DATA, "
                        "/usr/share/datasets/<name>)")
    r.add_argument("--download", action="store_true",
                   help="fetch missing dataset files with torchvision (needs internet)")
    r.add_argument("--model", default=run.model,
                   help="model name (see 'dalbt models'), or a pretrained backbone: "
                        "timm:NAME or torchvision:NAME")
    add_backbone_options(r)
    r.add_argument("--strategy", default=run.strategy, help="strategy (see 'dalbt strategies')")
    r.add_argument("--strategy-option", "-O", action="append", type=option, default=[],
                   metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. -O distance=cosine); a bad or "
                        "unknown one is reported with the strategy's valid options")
    r.add_argument("--initial", type=positive_int, default=run.initial,
                   help="initial labelled images")
    r.add_argument("--initial-strategy", default=run.initial_strategy, metavar="NAME",
                   help="who chooses the initial set: random (the seed's split, default), a "
                        "label-free strategy (typiclust, probcover, coreset, ...) on the "
                        "pre-trained encoder's features (needs --pretrain-epochs), or 'same' "
                        "(the run's strategy): a cold start")
    r.add_argument("--budget", type=positive_int, default=run.budget,
                   help="images queried per round")
    r.add_argument("--rounds", type=non_negative_int, default=run.rounds, help="query rounds")
    r.add_argument("--val-size", type=non_negative_int, default=run.val_size,
                   help="validation images held out for model selection "
                        "(default: min(5000, 10%% of train))")
    _add_recipe_options(r, run.train)
    r.add_argument("--unknown-classes", type=name_list, default=run.unknown_classes,
                   metavar="A,B,...",
                   help="open-set pool: these classes (names or indices) stay in the pool "
                        "unlabelled, as out-of-distribution images")
    r.add_argument("--mix", default=run.mix, metavar="NAME:COUNT,...",
                   help="cross-dataset pool: add COUNT images of dataset NAME as "
                        "out-of-distribution, e.g. svhn:5000,kmnist:5000")
    r.add_argument("--ood-policy", choices=OOD_POLICIES, default=run.ood_policy,
                   help="a queried out-of-distribution image costs budget, gets no label and "
                        "goes back to the pool (return, the paper) or is set aside (discard)")
    r.add_argument("--latent-dim", type=width, default=run.latent_dim,
                   help="dimension of the latent z (default: the model's, see 'dalbt models')")
    r.add_argument("--projector", type=dims, default=run.projector_dims,
                   help="projector widths (default: "
                        f"{'-'.join(str(d) for d in run.projector_dims)})")
    r.add_argument("--seed", type=seed, nargs="+", default=[run.seed],
                   help=f"one or more seeds, one run each (default: {run.seed})")
    r.add_argument("--out", default="runs/default", help="experiment directory")
    r.add_argument("--pretrain-cache", default=run.pretrain_cache, metavar="DIR",
                   help="directory of the shared pre-trained encoders (DIR/encoders), which "
                        "several --out directories can share (default: --out)")
    r.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun, cuda is GPU LOCAL_RANK)")
    r.add_argument("--threads", type=threads, default=None,
                   help="CPU threads for torch (default: all cores, shared among the "
                        "processes torchrun starts on the machine)")
    r.add_argument("--resume", action="store_true",
                   help="continue unfinished runs of the same config in --out; skip finished")
    r.add_argument("--save-scores", action="store_true",
                   help="save what the strategy scored each round (pool outputs, MC-dropout "
                        "probabilities) and its selection to OUT/scores/run-ID-round-R.pt")
    r.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (they are shown only on a terminal anyway)")


def _add_recipe_options(r: argparse.ArgumentParser, train: TrainConfig) -> None:
    """The training recipe's options of ``dalbt run``, with ``train``'s values as defaults."""
    r.add_argument("--epochs", type=positive_int, default=train.epochs, help="epochs per round")
    r.add_argument("--batch-size", type=batch_size, default=train.batch_size,
                   help="training batch size")
    r.add_argument("--lr", type=positive_float, default=train.lr,
                   help="Adam learning rate (> 0)")
    r.add_argument("--weight-decay", type=non_negative_float, default=train.weight_decay,
                   help="Adam weight decay (>= 0)")
    r.add_argument("--gamma", type=non_negative_float, default=train.gamma,
                   help="weight of the Barlow Twins loss (>= 0; 0: cross-entropy only)")
    r.add_argument("--lambd", type=non_negative_float, default=train.lambd,
                   help="Barlow Twins off-diagonal weight (>= 0)")
    r.add_argument("--warm-start", action="store_true",
                   help="continue from the previous round's model (default: re-initialise)")
    r.add_argument("--ssl-pool", action="store_true",
                   help="semi-supervised: Barlow Twins loss also on unlabelled pool images")
    r.add_argument("--pretrain-epochs", type=non_negative_int, default=train.pretrain_epochs,
                   help="Barlow Twins pre-training epochs on the whole pool before round 0; "
                        "each round fine-tunes from it")
    r.add_argument("--pretrain-batch", type=batch_size, default=train.pretrain_batch,
                   help="batch size of the pre-training")
    r.add_argument("--eval-every", type=positive_int, default=train.eval_every,
                   help="validate every N epochs")
    r.add_argument("--amp", nargs="?", const=AMP_MODES[0], choices=AMP_MODES, default=train.amp,
                   help=f"mixed-precision training on CUDA: {AMP_MODES[0]} (the default of "
                        f"--amp) or {AMP_MODES[1]} (with gradient scaling); ignored with a "
                        "warning on the CPU")
    _add_step_options(r, train)


def _add_step_options(r: argparse.ArgumentParser, train: TrainConfig) -> None:
    """The step-based recipe's options of ``dalbt run``."""
    r.add_argument("--steps", type=positive_int, default=train.steps,
                   help="step-based recipe: exactly N optimiser steps per round, whatever the "
                        "labelled-set size (default: --epochs epochs, the paper's recipe)")
    r.add_argument("--schedule", choices=SCHEDULES, default=train.schedule,
                   help="learning-rate schedule over a round's steps")
    r.add_argument("--warmup-steps", type=non_negative_int, default=train.warmup_steps,
                   help="linear learning-rate warm-up over the first N steps")
    r.add_argument("--balanced", action="store_true",
                   help="class-balanced labelled batches (each class drawn equally often)")
    r.add_argument("--ce-augment", action="store_true",
                   help="the cross-entropy sees an augmented view, not only the clean image")
    r.add_argument("--eval-every-steps", type=positive_int, default=train.eval_every_steps,
                   help="with --steps: validate every N steps (default: once per pass over "
                        "the labelled set)")
    r.add_argument("--select", choices=SELECTIONS, default=train.select,
                   help="keep the weights best on validation, or the last ones")
    r.add_argument("--finetune", choices=FINETUNE_MODES, default=train.finetune,
                   help="train the whole network, or only the linear head on the frozen "
                        "(pre-trained) encoder's features")


def _add_report_parser(sub: Any) -> None:
    """``dalbt report``."""
    rep = sub.add_parser("report", help="learning-curve plot and tables from a directory",
                         description="Write the learning-curve plot (PNG and SVG), the "
                                     "per-round and summary tables (Markdown and CSV) and the "
                                     "pairwise comparisons of the runs stored in DIRECTORY.")
    rep.add_argument("directory", help="experiment directory (the --out of 'dalbt run')")
    rep.add_argument("--out", default=None, help="where to write (default: the directory)")
    rep.add_argument("--only", action="append", default=None, metavar="PATTERN",
                     help="keep only the strategies whose label matches this shell-style "
                          "pattern (repeatable), e.g. --only 'weibull*' --only random")
    rep.add_argument("--seeds", type=seed_list, default=None, metavar="LIST",
                     help="only the runs of these seeds, e.g. 0,1,2 (compare strategies on "
                          "the same seeds)")


def _add_bench_parser(sub: Any) -> None:
    """``dalbt bench``."""
    b = sub.add_parser("bench", help="run a benchmark grid (strategies x seeds x settings)",
                       description="Run every unfinished run of a bench config or preset into "
                                   "one experiment directory (resumable).")
    b.add_argument("config", nargs="?", default=None, help="bench config file (YAML)")
    b.add_argument("--preset", default=None, help="a shipped preset instead of CONFIG")
    b.add_argument("--list-presets", action="store_true", help="list the shipped presets")
    b.add_argument("--out", default=None,
                   help="experiment directory (default: runs/<bench name>)")
    b.add_argument("--jobs", type=positive_int, default=1,
                   help="parallel worker processes (each gets --threads torch threads)")
    b.add_argument("--threads", type=threads, default=None,
                   help="torch CPU threads of each worker (default: cores / jobs)")
    b.add_argument("--full-data", action="store_true",
                   help="also train the full-data reference run (the accuracy ceiling)")
    b.add_argument("--dry-run", action="store_true",
                   help="print the runs and their status; run nothing")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--data-root", default=None, help="directory with the dataset files")
    b.add_argument("--pretrain-cache", default=None, metavar="DIR",
                   help="directory of the shared pre-trained encoders (default: the bench's "
                        "pretrain_cache setting, else --out)")
    b.add_argument("--no-progress", action="store_true",
                   help="hide the progress: the bars of rounds done and ETA on a terminal, "
                        "else one line per run start and round")


def resolve_device(name: str) -> str:
    """'auto' -> cuda when available else cpu; a CUDA device that is absent is an error."""
    from dalbt.distributed import resolve_device as resolve

    return resolve(name)


def resolve_amp(amp: str | None, device: str, warn: bool = True) -> str | None:
    """The ``--amp`` a run uses on ``device``: None on the CPU (with a warning on stderr)."""
    if amp is None or device.startswith("cuda"):
        return amp
    if warn:
        print(f"dalbt: warning: --amp {amp} needs CUDA; training in float32 on {device}",
              file=sys.stderr)
    return None


def _listing(items: list[tuple[str, str]]) -> str:
    width = max(len(n) for n, _ in items)
    return "\n".join(f"{n.ljust(width)}  {d}" for n, d in items)


def _strategies(with_options: bool) -> str:
    """The ``dalbt strategies`` listing; with options, one indented line per option."""
    if not with_options:
        return _listing(catalogue.list_strategies())
    infos = catalogue.strategies()
    width = max(len(n) for n in infos)
    lines = []
    for name, info in sorted(infos.items()):
        lines.append(f"{name.ljust(width)}  {info.description}")
        for spec in info.options.values():
            lines.append(f"    -O {spec.name}={spec.default}: {spec.expects()}")
    return "\n".join(lines)


def _database_message(args: argparse.Namespace, exc: sqlite3.Error) -> str:
    """One line for an SQLite error: a busy database, a damaged file (named), or another."""
    text = str(exc)
    if args.command in COMMANDS:
        where = Path(args.directory) / "project.sqlite"
    elif args.command == "report":
        where = Path(args.directory) / "dalbt.sqlite"
    elif getattr(args, "out", None):
        where = Path(args.out) / "dalbt.sqlite"
    else:  # bench without --out
        where = Path("runs", "<bench name>", "dalbt.sqlite")
    if "locked" in text or "busy" in text:
        return (f"database {where} is locked: {text} (is another dalbt process using it? wait "
                "for it or use another directory)")
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return (f"database {where} is damaged ({text}): restore it (and its -wal file) from a "
                "backup, or use another directory")
    return f"database {where}: {text}"


def _check_run(args: argparse.Namespace) -> None:
    """Validate the names and strategy options of a run against the catalogue (no torch)."""
    catalogue.check_dataset(args.dataset)
    catalogue.check_model(args.model, args.weights, args.input_size)
    args.strategy_option = catalogue.check_strategy(args.strategy, dict(args.strategy_option))
    for item in (args.mix or "").split(","):
        name = item.partition(":")[0].strip()
        if name and catalogue.dataset_key(name) not in catalogue.DATASETS:
            raise DalbtError(f"unknown dataset {name!r} in --mix {args.mix!r}; known datasets: "
                             f"{', '.join(catalogue.DATASETS)}")


def cmd_run(args: argparse.Namespace) -> int:
    _check_run(args)
    from dalbt import distributed

    dist, device = distributed.init_from_env(args.device)
    try:
        return _run(args, dist, device)
    finally:
        distributed.shutdown(dist)


def _run(args: argparse.Namespace, dist: Any, device: str) -> int:
    import torch

    from dalbt.data import load_dataset
    from dalbt.loop import run_experiment
    from dalbt.report import write_report
    from dalbt.store import Store

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    options = args.strategy_option  # checked by _check_run
    amp = resolve_amp(args.amp, device, warn=dist.is_main)
    # Under torchrun, rank 0 loads (and with --download fetches) first; the others then read
    # the files, or stop with rank 0's error.
    loaded = {}
    dist.from_main(lambda: loaded.setdefault(
        "data", load_dataset(args.dataset, args.data_root, download=args.download)) and None)
    data = loaded["data"] if "data" in loaded else load_dataset(args.dataset, args.data_root,
                                                                download=args.download)
    store = Store(args.out) if dist.is_main else None  # the store is rank 0's alone
    try:
        for seed in args.seed:
            cfg = RunConfig(
                dataset=args.dataset, model=args.model, strategy=args.strategy,
                strategy_options=options, initial=args.initial, budget=args.budget,
                rounds=args.rounds, seed=seed, val_size=args.val_size,
                latent_dim=args.latent_dim, projector_dims=args.projector,
                data_root=args.data_root, unknown_classes=args.unknown_classes, mix=args.mix,
                ood_policy=args.ood_policy, pretrain_cache=args.pretrain_cache,
                initial_strategy=args.initial_strategy, weights=args.weights,
                input_size=args.input_size,
                train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, gamma=args.gamma,
                                  lambd=args.lambd, warm_start=args.warm_start,
                                  eval_every=args.eval_every, device=device,
                                  ssl_unlabelled=args.ssl_pool,
                                  pretrain_epochs=args.pretrain_epochs,
                                  pretrain_batch=args.pretrain_batch, amp=amp,
                                  steps=args.steps, schedule=args.schedule,
                                  warmup_steps=args.warmup_steps, balanced=args.balanced,
                                  ce_augment=args.ce_augment,
                                  eval_every_steps=args.eval_every_steps, select=args.select,
                                  finetune=args.finetune))
            run_experiment(cfg, store, resume=args.resume, data=data,
                           progress=not args.no_progress and sys.stderr.isatty(), dist=dist,
                           save_scores=args.save_scores)
    finally:
        if store is not None:
            store.close()
    if not dist.is_main:
        return 0
    rep = write_report(args.out)
    print()
    print(rep["table"])
    print(f"\nplot: {rep['png']} (and {rep['svg'].name})\ntables: {rep['md']}, {rep['csv']}, "
          f"{rep['rounds']}\nsummary: {rep['summary']}, {rep['summary_csv']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.list_presets:
        if args.config or args.preset:
            raise DalbtError("--list-presets takes no CONFIG or --preset")
        print(_listing(catalogue.list_presets()))
        return 0
    if (args.config is None) == (args.preset is None):
        raise DalbtError("give a bench CONFIG file or --preset NAME (one of them; see "
                         "'dalbt bench --list-presets')")
    if args.preset:
        catalogue.check_preset(args.preset)
    elif not Path(args.config).is_file():
        why = "it is a directory" if Path(args.config).is_dir() else "no such file"
        raise DalbtError(f"cannot read bench config {args.config}: {why}")
    from dalbt import bench

    cfg = bench.load_preset(args.preset) if args.preset else bench.load_config(args.config)
    out = args.out or os.path.join("runs", cfg.name)
    device = resolve_device(args.device)
    tty = sys.stderr.isatty()
    bench.run_bench(cfg, out, jobs=args.jobs, full_data=args.full_data, dry_run=args.dry_run,
                    device=device, data_root=args.data_root, pretrain_cache=args.pretrain_cache,
                    progress=not args.no_progress and tty, threads=args.threads,
                    round_log=not args.no_progress and not tty)
    if not args.dry_run:
        print(f"results in {out}; write the report with 'dalbt report {out}'")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dalbt.report import write_report

    rep = write_report(args.directory, args.out, args.only, args.seeds)
    print(rep["table"])
    print(f"\nplot: {rep['png']} (and {rep['svg'].name})\ntables: {rep['md']}, {rep['csv']}, "
          f"{rep['rounds']}\nsummary: {rep['summary']}, {rep['summary_csv']}")
    return 0


class _StderrNow(logging.StreamHandler):
    """A handler that writes to the ``sys.stderr`` of the moment (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _warnings_to_stderr() -> None:
    """Library warnings (``logging.getLogger("dalbt...")``) as ``dalbt: warning: ...`` lines."""
    logger = logging.getLogger("dalbt")
    if not any(isinstance(h, _StderrNow) for h in logger.handlers):
        handler = _StderrNow()
        handler.setFormatter(logging.Formatter("dalbt: warning: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def _run_command(args: argparse.Namespace, launched: bool) -> int:
    """Run the parsed command; ``launched``: this is one of torchrun's processes."""
    if launched and args.command != "run":
        raise DalbtError(f"only 'dalbt run' runs under torchrun, not 'dalbt {args.command}'")
    if args.command == "run":
        return cmd_run(args)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "report":
        return cmd_report(args)
    if args.command == "embed":
        return cmd_embed(args)
    if args.command in COMMANDS:
        return dispatch(args)
    # The listings read the torch-free catalogue.
    if args.command == "datasets":
        print(_listing(catalogue.list_datasets()))
    elif args.command == "strategies":
        print(_strategies(args.options))
    elif args.command == "models":
        print(_listing(catalogue.list_models()))
    return 0


def _silence_stdout() -> None:
    """Point stdout at the null device (its reader went away), quietly if that fails."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dalbt`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _warnings_to_stderr()
    launched = os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # one of torchrun's processes
    rank = os.environ.get("RANK", "0") if launched else "0"
    try:
        return _run_command(args, launched)
    except RankZeroFailed:
        return 2  # rank 0 reports it
    except DalbtError as exc:
        where = f" (rank {rank})" if rank != "0" else ""
        print(f"dalbt: error{where}: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"dalbt: error: {_database_message(args, exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dalbt: interrupted; finished rounds are saved: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away ('dalbt strategies | head')
        _silence_stdout()
        return 1
    except OSError as exc:
        name = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"dalbt: error: cannot access{name}: {exc.strerror or exc}", file=sys.stderr)
        return 2
