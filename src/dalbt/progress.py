"""Progress of a round: which phase it is in, how far it got, its loss and the time left.

A round (:func:`dalbt.run_round`, and so a labelling query) goes through up to four phases:
``pre-training`` (Barlow Twins epochs of a cold start), ``training`` (epochs, or steps with the
step recipe), ``scoring`` (the images the strategy asked outputs for) and ``selecting`` (the
strategy's choice). Each phase reports through one :class:`ProgressReporter`, which feeds both
the terminal's tqdm bars and a callback (``on_progress``) with the same
:class:`ProgressEvent`; the callback gets at most a few events a second (the first and last of
each phase always), so a slow callback cannot slow training.

Example::

    def show(event: dalbt.ProgressEvent) -> None:
        print(event.describe())   # "training: step 120 / 600, loss 0.412, about 14 s left"

    dalbt.run_round(..., on_progress=show)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

#: The phases of a round, in the order they run (a round runs some of them).
PHASES = ("pre-training", "training", "scoring", "selecting")

Phase = Literal["pre-training", "training", "scoring", "selecting"]
Unit = Literal["epoch", "step", "image"]

#: Fewest seconds between two events a callback receives within a phase (its first and last
#: event always come).
MIN_INTERVAL = 0.25


@dataclass(frozen=True)
class ProgressEvent:
    """Where a round stands.

    Attributes:
        phase: ``"pre-training"``, ``"training"``, ``"scoring"`` or ``"selecting"``.
        done: Units done in this phase.
        total: Units the phase has (0 while not known yet: scoring learns its total from the
            strategy's requests as they come).
        unit: ``"epoch"`` (pre-training, the epoch recipe), ``"step"`` (the step recipe) or
            ``"image"`` (scoring, selecting).
        loss: Latest loss when the phase has one: the mean cross-entropy since the previous
            checkpoint (training), the epoch's Barlow Twins loss (pre-training); else None.
        elapsed_s: Seconds since the phase started.
        eta_s: Estimated seconds left in the phase, at the pace of the units since the first
            one (which also pays one-time costs); None until a second update, 0 once the
            phase is over.
        query_eta_s: Estimated seconds left in the whole query, where the caller can know it
            (a labelling project adds what its previous query spent after training); else None.
        round: The round number, when known.
        finished: The phase is over (its last event; ``done == total``).
    """

    phase: Phase
    done: int
    total: int
    unit: Unit
    loss: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    query_eta_s: float | None = None
    round: int | None = None
    finished: bool = False

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1] (None while the total is not known)."""
        return min(1.0, self.done / self.total) if self.total > 0 else None

    def describe(self) -> str:
        """One line for people, e.g. ``"training: step 120 / 600, loss 0.412, about 14 s
        left"``."""
        parts = [f"{self.phase}: {self.unit} {self.done} / {self.total}" if self.total > 0
                 else f"{self.phase}: {self.done} {self.unit}s" if self.done
                 else f"{self.phase}..."]
        if self.loss is not None and math.isfinite(self.loss):
            parts.append(f"loss {self.loss:.4g}")
        left = self.eta_s if self.query_eta_s is None else self.query_eta_s
        if left is not None and math.isfinite(left) and self.done < self.total:
            whole = " of the query" if self.query_eta_s is not None else ""
            parts.append(f"about {format_seconds(left)} left{whole}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready values, with ``text`` (:meth:`describe`) added."""
        out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
               for k, v in asdict(self).items()}  # JSON has no NaN: a diverged loss is null
        return {**out, "text": self.describe()}


#: ``on_progress(event)``: called from the thread that runs the round.
ProgressCallback = Callable[[ProgressEvent], object]


def format_seconds(seconds: float) -> str:
    """``"14 s"``, ``"2 min 5 s"`` or ``"1 h 3 min"`` (rounded to whole seconds)."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


class ProgressReporter:
    """Turns the progress of a round's phases into :class:`ProgressEvent` for a callback and
    for tqdm bars (one bar per phase, on stderr).

    Args:
        on_progress: Called with the events (throttled: at most one per ``min_interval``
            seconds within a phase, plus its first and last); None for none.
        bars: Show tqdm bars (every event updates them; tqdm redraws at its own pace).
        round_: The round number put in the events and the bars' names.
        min_interval: See ``on_progress``.
        desc: Name of the bars (default ``"round R PHASE"``).
    """

    def __init__(self, on_progress: ProgressCallback | None = None, bars: bool = False,
                 round_: int | None = None, min_interval: float = MIN_INTERVAL,
                 desc: str | None = None) -> None:
        self.on_progress, self.bars, self.round = on_progress, bars, round_
        self.min_interval, self.desc = min_interval, desc

    @property
    def active(self) -> bool:
        """Whether anyone listens (a bar or a callback)."""
        return self.bars or self.on_progress is not None

    def phase(self, phase: Phase, total: int, unit: Unit) -> PhaseProgress:
        """A phase's tracker; use it as a context manager (``with reporter.phase(...) as
        p:``): entering reports the start, leaving normally reports it complete."""
        return PhaseProgress(self, phase, total, unit)


class PhaseProgress:
    """The progress of one phase (from :meth:`ProgressReporter.phase`).

    Updates outside its ``with`` block are ignored, so a scorer called after scoring ended
    (by a strategy that scores lazily while selecting) reports nothing.
    """

    def __init__(self, reporter: ProgressReporter, phase: Phase, total: int, unit: Unit) -> None:
        self.reporter, self.phase, self.unit = reporter, phase, unit
        self.total, self.done = int(total), 0
        self.loss: float | None = None
        self.t0 = self.last_emit = 0.0
        self.first: tuple[float, int] | None = None  # (time, done) of the first unit done
        self.running = self.complete = False
        self.bar: Any = None

    def __enter__(self) -> PhaseProgress:
        self.t0 = time.perf_counter()
        self.running = True
        self._report(force=True)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self.running:
            self.total = max(self.total, self.done)
            self.done, self.complete = self.total, True
            self._report(force=True)
        self.running = False
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def update(self, done: int, loss: float | None = None) -> None:
        """``done`` units are done now (and the latest loss, if any)."""
        if not self.running:
            return
        self.done = int(done)
        if loss is not None:
            self.loss = float(loss)
        self._report()

    def advance(self, n: int) -> None:
        """``n`` more units are done."""
        self.update(self.done + n)

    def grow(self, n: int) -> None:
        """The phase has ``n`` more units to do than it knew of."""
        if self.running:
            self.total += int(n)

    def on_epoch(self, loss_key: str) -> Callable[[int, dict], None]:
        """An ``on_epoch(mark, metrics)`` hook for the training functions: ``mark`` units
        done, the loss read from ``metrics[loss_key]``."""
        return lambda mark, metrics: self.update(mark, metrics.get(loss_key))

    def event(self, now: float | None = None) -> ProgressEvent:
        """The phase's state at ``now`` (``time.perf_counter()``; default: now)."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.t0
        eta: float | None = None
        if self.complete or (self.total > 0 and self.done >= self.total):
            eta = 0.0
        elif self.first is None:
            if self.done > 0:
                self.first = (now, self.done)
        elif self.done > self.first[1] and self.total > 0:
            t1, d1 = self.first
            eta = (now - t1) / (self.done - d1) * (self.total - self.done)
        return ProgressEvent(phase=self.phase, done=self.done, total=self.total,
                             unit=self.unit, loss=self.loss, elapsed_s=elapsed, eta_s=eta,
                             round=self.reporter.round, finished=self.complete)

    def _report(self, force: bool = False) -> None:
        rep = self.reporter
        if not rep.active:
            return
        now = time.perf_counter()
        ev = self.event(now)
        if rep.bars:
            self._draw(ev)
        if rep.on_progress is not None and (force or now - self.last_emit >= rep.min_interval):
            self.last_emit = now
            rep.on_progress(ev)

    def _draw(self, ev: ProgressEvent) -> None:
        if self.bar is None:
            if ev.total <= 0:  # nothing to show yet (a strategy that scores nothing)
                return
            from tqdm.auto import tqdm

            rep = self.reporter
            desc = rep.desc or (f"round {rep.round} {ev.phase}" if rep.round is not None
                                else ev.phase)
            self.bar = tqdm(total=ev.total, desc=desc, unit=ev.unit, leave=False)
        self.bar.total = ev.total
        if ev.loss is not None:
            self.bar.set_postfix(loss=f"{ev.loss:.4g}", refresh=False)
        self.bar.update(ev.done - self.bar.n)


class PhaseLog:
    """A progress callback that writes one line when a phase ends (and the state every
    ``every`` seconds of a long phase): for logs, where bars would be noise.

    Args:
        write: Where the lines go (e.g. a function printing to stderr).
        every: Seconds between two lines of the same phase.
    """

    def __init__(self, write: Callable[[str], object], every: float = 30.0) -> None:
        self.write, self.every = write, every
        self.last = 0.0

    def __call__(self, event: ProgressEvent) -> None:
        now = time.perf_counter()
        if event.finished:
            loss = (f", loss {event.loss:.4g}" if event.loss is not None
                    and math.isfinite(event.loss) else "")
            self.write(f"{event.phase}: {event.done} {event.unit}"
                       f"{'s' if event.done != 1 else ''} in "
                       f"{format_seconds(event.elapsed_s)}{loss}")
        elif event.done == 0:  # a phase starts
            self.last = now
        elif now - self.last >= self.every and event.done < event.total:
            self.write(event.describe())
            self.last = now
