"""Selection time of every registered strategy against the pool size, from cached inputs.

Builds synthetic model outputs (10 classes, 512-d ReLU latents clustered by class, logits that
mostly predict the class), a labelled set of 1,000 and a cached MC-dropout tensor (T = 20),
puts them in each query context before timing, so that pool scoring is NOT timed, then times
``strategy.select(ctx, budget)``. Strategies that override ``Strategy.prepare`` get their
prepare run untimed first (it is reported apart). Those that train models of their own (their
prepare asks the context for images, a model factory or the training recipe, which a first try
without them reveals; they get the small options of ``SMALL_OPTIONS``) and those whose prepare
takes longer than ``--prepare-limit`` are only run at the first size. A strategy whose time,
extrapolated linearly to its next size, exceeds ``--max-seconds`` is not run at larger sizes.
Peak extra memory is the rise of the process's peak resident set size during ``select`` (freed
heap memory is returned to the OS and the high-water mark reset through /proc/self/clear_refs
just before); memory the allocator still holds from earlier work can hide small allocations.

A strategy that refuses a pool (a DalbtError, e.g. ``probcover`` whose delta-ball graph would
outgrow its ``max_degree`` cap) gets a row saying so and is not run at larger sizes.

Usage: python benchmarks/selection_scaling.py [--sizes 10000 100000 1000000]
    [--strategies weibull coreset ...] [--threads 2] [--quick]
    [--option probcover:delta=0.5 ...]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dalbt.cli.types import option
from dalbt.errors import DalbtError
from dalbt.models import build_model
from dalbt.strategies import STRATEGIES, Outputs, QueryContext, Strategy, build_strategy
from dalbt.train import TrainConfig

NUM_CLASSES = 10
LATENT = 512
LABELLED = 1000
MC_SAMPLES = 20
BUDGET = 1000
# Strategies run at 1M (the others stop at 100k unless --sizes/--large says otherwise).
LARGE = ("coreset", "weibull", "entropy", "badge", "typiclust", "probcover", "dalbt")
# Per-strategy budget where the default one is out of reach.
BUDGETS = {"batchbald": 100}
# --option NAME:KEY=VALUE, per strategy (filled by _parse_args)
USER_OPTIONS: dict[str, dict] = {}
# Small options for strategies that train models of their own (prepare untimed).
SMALL_OPTIONS: dict[str, dict] = {
    "ensemble-varratio": {"members": 2, "epochs": 1},
    "dal-osr": {"epochs": 1},
    "vaal": {"steps": 20, "batch": 32, "width": 4, "disc_hidden": 32},
    "waal": {"steps": 50},
}


@dataclass
class Synthetic:
    """Cached inputs of one pool size (dataset indices: labelled 0..L-1, then the pool)."""

    pool: Outputs
    labelled: Outputs
    labelled_targets: np.ndarray
    mc_probs: Tensor
    images: Tensor


def make_synthetic(pool_size: int, seed: int = 0, chunk: int = 1 << 16) -> Synthetic:
    """Class-clustered ReLU latents, logits correct ~90% of the time, MC probabilities."""
    g = torch.Generator().manual_seed(seed)
    n = LABELLED + pool_size
    means = torch.randn(NUM_CLASSES, LATENT, generator=g) * 1.5
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    latents = torch.empty(n, LATENT)
    logits = torch.empty(n, NUM_CLASSES)
    w = torch.randn(LATENT, NUM_CLASSES, generator=g) * 0.02
    for s in range(0, n, chunk):
        yc = y[s : s + chunk]
        spread = 0.3 + torch.rand(len(yc), 1, generator=g)
        z = latents[s : s + chunk]
        torch.randn(z.shape, generator=g, out=z)
        z.mul_(spread).add_(means[yc]).relu_()
        confidence = torch.rand(len(yc), 1, generator=g) * 8
        logits[s : s + chunk] = (z @ w + torch.randn(len(yc), NUM_CLASSES, generator=g)
                                 + confidence * torch.nn.functional.one_hot(yc, NUM_CLASSES))
    idx = np.arange(n, dtype=np.int64)
    pool = Outputs(idx[LABELLED:], logits[LABELLED:], latents[LABELLED:])
    lab = Outputs(idx[:LABELLED], logits[:LABELLED], latents[:LABELLED])
    return Synthetic(pool, lab, y[:LABELLED].numpy(), _mc(pool.logits, MC_SAMPLES, g),
                     _images(y, g))


def _mc(logits: Tensor, samples: int, g: torch.Generator, chunk: int = 1 << 15) -> Tensor:
    """Synthetic MC-dropout probabilities: softmax of noisy logits, (U, T, K)."""
    out = torch.empty(len(logits), samples, logits.shape[1])
    for s in range(0, len(logits), chunk):
        lg = logits[s : s + chunk, None, :]
        out[s : s + chunk] = torch.softmax(
            lg + torch.randn(len(lg), samples, logits.shape[1], generator=g), dim=2)
    return out


def _images(y: Tensor, g: torch.Generator) -> Tensor:
    """8x8 one-channel uint8 images with a class pattern (for strategies that train)."""
    base = torch.rand(NUM_CLASSES, 1, 8, 8, generator=g) * 200
    out = torch.empty(len(y), 1, 8, 8, dtype=torch.uint8)
    for s in range(0, len(y), 1 << 16):
        yc = y[s : s + (1 << 16)]
        out[s : s + len(yc)] = (base[yc] + torch.rand(len(yc), 1, 8, 8, generator=g) * 55).to(
            torch.uint8)
    return out


def make_context(data: Synthetic, strategy: Strategy, seed: int, training: bool = True
                 ) -> QueryContext:
    """A context whose outputs and MC cache are precomputed (nothing left to score); without
    ``training`` it has no images, model factory nor training recipe."""
    pool, lab = data.pool, data.labelled

    def scorer(idx: np.ndarray) -> Outputs:
        if np.array_equal(idx, pool.indices):
            return pool
        if np.array_equal(idx, lab.indices):
            return lab
        raise RuntimeError("the benchmark only caches the pool and the labelled set")

    def mc_scorer(idx: np.ndarray, samples: int, gen: torch.Generator) -> Tensor:
        return _mc(pool.logits, samples, gen)  # T other than the cached one: untimed below

    dropout = strategy.train_dropout

    def factory(seed_: int):
        return build_model("lenet", 1, 8, NUM_CLASSES, latent_dim=LATENT,
                           projector_dims=(64, 64), dropout=dropout, seed=seed_)

    ctx = QueryContext(unlabelled=pool.indices, labelled=lab.indices,
                       labelled_targets=data.labelled_targets, num_classes=NUM_CLASSES,
                       rng=np.random.default_rng(seed), scorer=scorer, mc_scorer=mc_scorer,
                       device="cpu")
    if training:
        ctx.images, ctx.model_factory = data.images, factory
        ctx.train_config = TrainConfig(epochs=1, batch_size=64)
    ctx._cache[f"mc_probs:{MC_SAMPLES}"] = data.mc_probs
    ctx.prefetch(strategy.requires)
    return ctx


def _reset_peak() -> bool:
    """Reset the peak RSS high-water mark (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _current_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return _peak_kib()


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that reuse of it shows in the RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], object]) -> tuple[float, float, bool]:
    """(seconds, peak extra MiB, exact) of ``fn()``; exact False: maxrss delta (lower bound)."""
    gc.collect()
    _trim_heap()
    exact = _reset_peak()
    before = _current_kib() if exact else _peak_kib()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, max(0, _peak_kib() - before) / 1024, exact


def overrides_prepare(cls: type[Strategy]) -> bool:
    return cls.prepare is not Strategy.prepare


def _parse_args() -> argparse.Namespace:
    """The command line, with ``--quick`` applied and the strategy names checked."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--strategies", nargs="+", default=None,
                   help="default: every registered strategy")
    p.add_argument("--large", nargs="+", default=list(LARGE),
                   help="strategies also run at sizes above 100k")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=int, default=BUDGET)
    p.add_argument("--prepare-limit", type=float, default=5.0,
                   help="prepare slower than this (s): no larger sizes")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="skip larger sizes when the linear extrapolation exceeds this")
    p.add_argument("--quick", action="store_true", help="one small size (5k), budget 100")
    p.add_argument("--option", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="an option of one strategy (repeatable), e.g. probcover:delta=0.5")
    args = p.parse_args()
    for item in args.option:
        name, _, kv = item.partition(":")
        try:
            key, value = option(kv)
        except argparse.ArgumentTypeError:
            key = ""
        if not (name and key):
            p.error(f"--option takes NAME:KEY=VALUE, got {item!r}")
        USER_OPTIONS.setdefault(name, {})[key] = value
    args.sizes = [5_000] if args.quick else sorted(args.sizes)
    args.budget = 100 if args.quick else args.budget
    args.strategies = args.strategies or sorted(STRATEGIES)
    unknown = [n for n in args.strategies if n not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; registered: {sorted(STRATEGIES)}")
    return args




def _build(name: str) -> Strategy:
    opts = SMALL_OPTIONS.get(name, {}) if overrides_prepare(STRATEGIES[name]) else {}
    return build_strategy(name, **{**opts, **USER_OPTIONS.get(name, {})})


def _prepared(name: str, s: Strategy, data: Synthetic, notes: list[str], stop: set[str],
              prepare_limit: float) -> tuple[Strategy, QueryContext]:
    """The strategy and its context on ``data``, prepared (untimed); a strategy that must
    train models gets a training context and this size only, as does a slow ``prepare``."""
    ctx = make_context(data, s, seed=0, training=False)
    if not overrides_prepare(type(s)):
        return s, ctx
    t_prep = time.perf_counter()
    try:
        s.prepare(ctx)
    except RuntimeError as exc:
        if "this context has no" not in str(exc):
            raise
        notes.append("trains models")
        s = _build(name)
        ctx = make_context(data, s, seed=0)
        t_prep = time.perf_counter()
        s.prepare(ctx)
        stop.add(name)
    t_prep = time.perf_counter() - t_prep
    notes.append(f"prepare {t_prep:.1f} s untimed")
    if t_prep > prepare_limit:
        stop.add(name)
    if name in stop:
        notes.append("this size only")
    return s, ctx


def _run_one(name: str, size: int, data: Synthetic, args: argparse.Namespace,
             stop: set[str]) -> tuple[str, int, float, float, bool, str]:
    """Time one strategy's selection on one pool; add it to ``stop`` when larger pools would
    take too long. Returns the table row."""
    s = _build(name)
    n = min(BUDGETS.get(name, args.budget), size)
    notes = []
    if n != args.budget:
        notes.append(f"budget {n}")
    if USER_OPTIONS.get(name):
        notes.append(",".join(f"{k}={v}" for k, v in USER_OPTIONS[name].items()))
    if SMALL_OPTIONS.get(name) and overrides_prepare(type(s)):
        notes.append("small options " + ",".join(
            f"{k}={v}" for k, v in SMALL_OPTIONS[name].items()))
    s, ctx = _prepared(name, s, data, notes, stop, args.prepare_limit)
    refusal: list[str] = []

    def run() -> None:
        try:
            s.select(ctx, n)
        except DalbtError as exc:
            refusal.append(str(exc))

    seconds, mib, exact = measure(run)
    if refusal:
        notes.append(f"refused after {seconds:.1f} s: {refusal[0]}")
        stop.add(name)
    later = [x for x in args.sizes if x > size and (x <= 100_000 or name in args.large)]
    if later and name not in stop and seconds * later[0] / size > args.max_seconds:
        notes.append(f"~{seconds * later[0] / size:.0f} s expected at {later[0]:,}: "
                     "larger sizes skipped")
        stop.add(name)
    print(f"  {name:<18} {size:>9,} {seconds:9.3f} s {mib:8.1f} MiB  "
          f"{'; '.join(notes)}", flush=True)
    return name, size, seconds, mib, exact, "; ".join(notes)


def _print_table(rows: list[tuple[str, int, float, float, bool, str]]) -> None:
    print()
    print("| strategy | pool | select s | peak extra MiB | notes |")
    print("|---|---:|---:|---:|---|")
    for name, size, seconds, mib, exact, notes in rows:
        mem = f"{mib:.0f}" if exact else f">= {mib:.0f}"
        print(f"| {name} | {size:,} | {seconds:.3f} | {mem} | {notes} |")


def main() -> None:
    args = _parse_args()
    torch.set_num_threads(args.threads)
    names = args.strategies

    # warm-up (thread pools, allocator, lazy imports) on a small pool: not reported
    warm = make_synthetic(2000, seed=1)
    for name in names:
        s = _build(name)
        if not overrides_prepare(type(s)):
            s.select(make_context(warm, s, 0), 10)
    del warm

    print(f"{args.threads} threads, {LATENT}-d latents, {NUM_CLASSES} classes, "
          f"{LABELLED} labelled, MC T={MC_SAMPLES} cached; scoring not timed")
    rows = []
    stop: set[str] = set()
    for size in args.sizes:
        t0 = time.perf_counter()
        data = make_synthetic(size)
        print(f"[{size:,} pool: synthetic inputs in {time.perf_counter() - t0:.1f} s]",
              flush=True)
        for name in names:
            if name in stop or (size > 100_000 and name not in args.large):
                continue
            rows.append(_run_one(name, size, data, args, stop))
        del data
        gc.collect()
    _print_table(rows)


if __name__ == "__main__":
    main()
