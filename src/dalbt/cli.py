"""The ``dalbt`` command line."""

from __future__ import annotations

import argparse
import ast
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from dalbt.cli_label import COMMANDS, add_parsers, dispatch
from dalbt.errors import DalbtError, RankZeroFailed


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input on one line, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed: Any = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip().replace("-", "_"), parsed


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(t) for t in text.replace(",", "-").split("-") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 256-256-256, got {text!r}"
                                         ) from None
    if not dims or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive widths, got {text!r}")
    return dims


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dalbt", description="Deep active learning with Barlow Twins.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run active learning with a simulated oracle",
                       description="Run AL rounds (train, evaluate, query) and store each round.")
    r.add_argument("--dataset", default="digits", help="dataset name (see 'dalbt datasets')")
    r.add_argument("--data-root", default=None,
                   help="directory with the dataset files (else $DALBT_DATA, "
                        "/usr/share/datasets/<name>)")
    r.add_argument("--download", action="store_true",
                   help="fetch missing dataset files with torchvision (needs internet)")
    r.add_argument("--model", default="lenet", help="model name (see 'dalbt models')")
    r.add_argument("--strategy", default="weibull", help="strategy (see 'dalbt strategies')")
    r.add_argument("--strategy-option", "-O", action="append", type=_option, default=[],
                   metavar="KEY=VALUE",
                   help="strategy option, repeatable (e.g. -O distance=cosine)")
    r.add_argument("--initial", type=_positive, default=100, help="initial labelled images")
    r.add_argument("--budget", type=_positive, default=100, help="images queried per round")
    r.add_argument("--rounds", type=_non_negative, default=10, help="query rounds")
    r.add_argument("--epochs", type=_positive, default=20, help="epochs per round")
    r.add_argument("--batch-size", type=_positive, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--weight-decay", type=float, default=1e-5)
    r.add_argument("--gamma", type=float, default=0.001,
                   help="weight of the Barlow Twins loss (0: cross-entropy only)")
    r.add_argument("--lambd", type=float, default=0.0051, help="Barlow Twins off-diagonal weight")
    r.add_argument("--warm-start", action="store_true",
                   help="continue from the previous round's model (default: re-initialise)")
    r.add_argument("--val-size", type=_non_negative, default=None,
                   help="validation images held out for model selection "
                        "(default: min(5000, 10%% of train))")
    r.add_argument("--ssl-pool", action="store_true",
                   help="semi-supervised: Barlow Twins loss also on unlabelled pool images")
    r.add_argument("--pretrain-epochs", type=_non_negative, default=0,
                   help="Barlow Twins pre-training epochs on the whole pool before round 0; "
                        "each round fine-tunes from it")
    r.add_argument("--pretrain-batch", type=_positive, default=256)
    r.add_argument("--unknown-classes", type=lambda t: [c for c in t.split(",") if c],
                   default=[], metavar="A,B,...",
                   help="open-set pool: these classes (names or indices) stay in the pool "
                        "unlabelled, as out-of-distribution images")
    r.add_argument("--mix", default=None, metavar="NAME:COUNT,...",
                   help="cross-dataset pool: add COUNT images of dataset NAME as "
                        "out-of-distribution, e.g. svhn:5000,kmnist:5000")
    r.add_argument("--ood-policy", choices=["return", "discard"], default="return",
                   help="a queried out-of-distribution image costs budget, gets no label and "
                        "goes back to the pool (return, the paper) or is set aside (discard)")
    r.add_argument("--eval-every", type=_positive, default=1,
                   help="validate every N epochs")
    r.add_argument("--latent-dim", type=_positive, default=None)
    r.add_argument("--projector", type=_dims, default=(256, 256, 256),
                   help="projector widths, e.g. 256-256-256")
    r.add_argument("--seed", type=_non_negative, nargs="+", default=[0],
                   help="one or more seeds (one run each)")
    r.add_argument("--out", default="runs/default", help="experiment directory")
    r.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun, cuda is GPU LOCAL_RANK)")
    r.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                   help="mixed-precision training on CUDA: bf16 (the default of --amp) or fp16 "
                        "(with gradient scaling); ignored with a warning on the CPU")
    r.add_argument("--threads", type=_positive, default=None,
                   help="CPU threads for torch (default: all cores, shared among the "
                        "processes torchrun starts on the machine)")
    r.add_argument("--resume", action="store_true",
                   help="continue unfinished runs of the same config in --out; skip finished")
    r.add_argument("--save-scores", action="store_true",
                   help="save what the strategy scored each round (pool outputs, MC-dropout "
                        "probabilities) and its selection to OUT/scores/run-ID-round-R.pt")
    r.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (they are shown only on a terminal anyway)")

    rep = sub.add_parser("report", help="learning-curve plot and tables from a directory")
    rep.add_argument("directory", help="experiment directory (the --out of 'dalbt run')")
    rep.add_argument("--out", default=None, help="where to write (default: the directory)")
    rep.add_argument("--only", action="append", default=None, metavar="PATTERN",
                     help="keep only the strategies whose label matches this shell-style "
                          "pattern (repeatable), e.g. --only 'weibull*' --only random")
    rep.add_argument("--seeds", default=None, metavar="LIST",
                     help="only the runs of these seeds, e.g. 0,1,2 (compare strategies on "
                          "the same seeds)")

    b = sub.add_parser("bench", help="run a benchmark grid (strategies x seeds x settings)",
                       description="Run every unfinished run of a bench config or preset into "
                                   "one experiment directory (resumable).")
    b.add_argument("config", nargs="?", default=None, help="bench config file (YAML)")
    b.add_argument("--preset", default=None, help="a shipped preset instead of CONFIG")
    b.add_argument("--list-presets", action="store_true", help="list the shipped presets")
    b.add_argument("--out", default=None,
                   help="experiment directory (default: runs/<bench name>)")
    b.add_argument("--jobs", type=_positive, default=1,
                   help="parallel worker processes (each gets cores / jobs torch threads)")
    b.add_argument("--full-data", action="store_true",
                   help="also train the full-data reference run (the accuracy ceiling)")
    b.add_argument("--dry-run", action="store_true",
                   help="print the runs and their status; run nothing")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--data-root", default=None, help="directory with the dataset files")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    sub.add_parser("datasets", help="list the datasets")
    sub.add_parser("strategies", help="list the query strategies")
    sub.add_parser("models", help="list the models")
    add_parsers(sub, _option, _positive, _non_negative)
    return p


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


def cmd_run(args: argparse.Namespace) -> int:
    from dalbt import distributed

    dist, device = distributed.init_from_env(args.device)
    try:
        return _run(args, dist, device)
    finally:
        distributed.shutdown(dist)


def _run(args: argparse.Namespace, dist: Any, device: str) -> int:
    import torch

    from dalbt.data import load_dataset
    from dalbt.loop import RunConfig, run_experiment
    from dalbt.models import MODELS
    from dalbt.report import write_report
    from dalbt.store import Store
    from dalbt.strategies import build_strategy
    from dalbt.train import TrainConfig

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // dist.local_world_size))
    if args.model not in MODELS:
        raise DalbtError(f"unknown model {args.model!r}; known models: "
                         f"{', '.join(sorted(MODELS))}")
    options = dict(args.strategy_option)
    build_strategy(args.strategy, **options)
    for flag, value in (("--gamma", args.gamma), ("--lambd", args.lambd),
                        ("--weight-decay", args.weight_decay)):
        if value < 0:
            raise DalbtError(f"{flag} must be >= 0, got {value}")
    if args.lr <= 0:
        raise DalbtError(f"--lr must be positive, got {args.lr}")
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
                ood_policy=args.ood_policy,
                train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, gamma=args.gamma,
                                  lambd=args.lambd, warm_start=args.warm_start,
                                  eval_every=args.eval_every, device=device,
                                  ssl_unlabelled=args.ssl_pool,
                                  pretrain_epochs=args.pretrain_epochs,
                                  pretrain_batch=args.pretrain_batch, amp=amp))
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
    from dalbt import bench

    if args.list_presets:
        if args.config or args.preset:
            raise DalbtError("--list-presets takes no CONFIG or --preset")
        print(_listing(bench.list_presets()))
        return 0
    if (args.config is None) == (args.preset is None):
        raise DalbtError("give a bench CONFIG file or --preset NAME (one of them; see "
                         "'dalbt bench --list-presets')")
    cfg = bench.load_preset(args.preset) if args.preset else bench.load_config(args.config)
    out = args.out or os.path.join("runs", cfg.name)
    device = resolve_device(args.device)
    bench.run_bench(cfg, out, jobs=args.jobs, full_data=args.full_data, dry_run=args.dry_run,
                    device=device, data_root=args.data_root,
                    progress=not args.no_progress and sys.stderr.isatty())
    if not args.dry_run:
        print(f"results in {out}; write the report with 'dalbt report {out}'")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dalbt.report import write_report

    seeds = None
    if args.seeds:
        try:
            seeds = [int(t) for t in args.seeds.split(",") if t.strip()]
        except ValueError:
            raise DalbtError(f"--seeds expects integers like 0,1,2, got {args.seeds!r}"
                             ) from None
    rep = write_report(args.directory, args.out, args.only, seeds)
    print(rep["table"])
    print(f"\nplot: {rep['png']} (and {rep['svg'].name})\ntables: {rep['md']}, {rep['csv']}, "
          f"{rep['rounds']}\nsummary: {rep['summary']}, {rep['summary_csv']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dalbt`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    launched = os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # one of torchrun's processes
    rank = os.environ.get("RANK", "0") if launched else "0"
    try:
        if launched and args.command != "run":
            raise DalbtError(f"only 'dalbt run' runs under torchrun, not 'dalbt {args.command}'")
        if args.command == "run":
            return cmd_run(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command in COMMANDS:
            return dispatch(args)
        if args.command == "datasets":
            from dalbt.data import list_datasets

            print(_listing(list_datasets()))
        elif args.command == "strategies":
            from dalbt.strategies import list_strategies

            print(_listing(list_strategies()))
        elif args.command == "models":
            from dalbt.models import list_models

            print(_listing(list_models()))
        return 0
    except RankZeroFailed:
        return 2  # rank 0 reports it
    except DalbtError as exc:
        where = f" (rank {rank})" if rank != "0" else ""
        print(f"dalbt: error{where}: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"dalbt: error: experiment database: {exc} (is another dalbt process using the "
              "same --out? wait for it or use another directory)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dalbt: interrupted; finished rounds are saved: rerun with --resume to continue",
              file=sys.stderr)
        return 130
    except OSError as exc:
        name = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"dalbt: error: cannot access{name}: {exc.strerror or exc}", file=sys.stderr)
        return 2
