"""Where a trial's time goes: seconds per phase, cumulative since the worker entered.

A trial reports them with its metrics as `time_<phase>`, plus `time_trial` (wall time
since the trial driver started, when it passed its start in). The phases never
overlap, so their sum is at most `time_trial`; the rest is Ray's own (Tune, Train,
reports) and what no phase covers. Tune adds keys of its own that start with
`time_` (`time_total_s`, `time_this_iter_s`, ...): read the phases by `PHASE_KEYS`,
never by the prefix. `trial_started_at` (the driver's `time.time()`) places the trial
in the sweep.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PHASES = ("worker_start", "model_load", "data_prep", "validation_build", "train_steps", "validation",
          "checkpoint")
PHASE_KEYS = tuple(f"time_{name}" for name in PHASES)
TRIAL_KEY = "time_trial"
STARTED_KEY = "trial_started_at"  # the driver's time.time() at its start: where the trial lies in the sweep


class PhaseClock:
    """Seconds spent in each phase, and how many times each ran (the training steps' count gives
    steps/s). `started_at` is the trial driver's `time.time()` at its start, or None when the worker
    was not started by one (then neither `time_worker_start` nor `time_trial` is reported)."""

    def __init__(self, started_at: float | None = None, clock: Callable[[], float] = time.perf_counter,
                 wall: Callable[[], float] = time.time) -> None:
        self.started_at, self._clock = started_at, clock
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.counts = dict.fromkeys(PHASES, 0)
        self._open: dict[str, float] = {}
        self._entered = clock()
        if started_at is not None:  # from the driver's start to now, when the worker function enters
            self.seconds["worker_start"] = max(0.0, wall() - started_at)
            self.counts["worker_start"] = 1

    def start(self, name: str) -> None:
        if name not in self.seconds:
            raise KeyError(f"unknown phase {name!r}; phases: {PHASES}")
        if self._open:
            raise RuntimeError(f"phase {name!r} started inside {next(iter(self._open))!r}: phases do not nest")
        self._open[name] = self._clock()

    def stop(self, name: str) -> float:
        """End the running phase `name`; returns its seconds this time."""
        if name not in self._open:
            raise RuntimeError(f"phase {name!r} stopped but not running")
        elapsed = self._clock() - self._open.pop(name)
        self.seconds[name] += elapsed
        self.counts[name] += 1
        return elapsed

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def summary(self) -> dict[str, float]:
        """The phases so far as report metrics, and the training steps' throughput (`train_seconds`
        is `time_train_steps` under the name reports had before the phases)."""
        out = {f"time_{name}": seconds for name, seconds in self.seconds.items()}
        if self.started_at is None:
            del out["time_worker_start"]
        else:
            # on the phases' clock after the worker entered: the phases cannot add up to more
            out[TRIAL_KEY] = self.seconds["worker_start"] + self._clock() - self._entered
            out[STARTED_KEY] = self.started_at
        steps = self.seconds["train_steps"]
        return {**out, "train_seconds": steps, "steps_per_second": self.counts["train_steps"] / max(steps, 1e-9)}
