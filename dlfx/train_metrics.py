"""Train metrics between log points: stacked on the device, read as one array, checked for NaN/Inf."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from dlfx.errors import NonFiniteError

# The metric vectors of the steps since the last log, stacked on the device and fetched as a few arrays:
# a transfer per `STACK_CHUNK` calls instead of one per metric and step (~4.6 ms -> ~0.5 ms per 50 steps on CPU).
stack = jax.jit(lambda records: jax.numpy.concatenate([r.reshape(-1, r.shape[-1]) for r in records]))
# `stack` compiles once per list it is given: a window of thousands of calls (a long log_every, or the window a
# SIGTERM closes at any length) took XLA ~100 s to compile as one concatenation, so at most this many at once
STACK_CHUNK = 64


def stack_records(records: list) -> list:
    """A window's metric records (device arrays (n,) or (steps, n)) as a few (rows, n) device arrays."""
    return [stack(records[i:i + STACK_CHUNK]) for i in range(0, len(records), STACK_CHUNK)]


def check_finite(records: list[dict], first_step: int, config: ml_collections.ConfigDict, in_row: int,
                 groups: list[str]) -> tuple[int, int]:
    """Apply `train.nan_policy` to fetched step metrics; return (skipped in these records, skipped in a row)."""
    skipped = 0
    for offset, record in enumerate(records):
        if not record["nonfinite"]:
            in_row = 0
            continue
        skipped, in_row = skipped + 1, in_row + 1
        step = first_step + offset
        group = int(record["first_nonfinite_group"])
        loss_finite = math.isfinite(float(record.get("loss", 0.0)))  # a NaN loss makes every gradient NaN
        what = "gradient of " + groups[group] if group >= 0 and loss_finite else "loss"
        if config.train.nan_policy == "error":
            raise NonFiniteError(f"non-finite {what} at step {step} (train.nan_policy='error'); the run stopped "
                                 f"before any checkpoint or evaluation held that update")
        if in_row >= config.train.max_skipped:
            raise NonFiniteError(f"{in_row} non-finite steps in a row up to step {step}, last one in the {what} "
                                 f"(train.max_skipped={config.train.max_skipped})")
    return skipped, in_row


def read_window(window: tuple, names: list[str], config: ml_collections.ConfigDict, in_row: int,
                groups: list[str]) -> tuple[dict[str, float], int]:
    """Train metrics of a closed log window (stacked metric vectors, first/last step, start/end time),
    after `train.nan_policy`; and the non-finite steps in a row so far."""
    stacked, first, last, start, end = window
    fetched = [dict(zip(names, row.tolist())) for row in np.concatenate([np.asarray(s) for s in stacked])]
    skipped, in_row = check_finite(fetched, first + 1, config, in_row, groups)
    return mean(fetched) | {"skipped_steps": float(skipped), "steps_per_sec": (last - first) / (end - start)}, in_row


def mean(records: list[dict]) -> dict[str, float]:
    """Mean of each metric over the steps whose update was applied."""
    finite = [r for r in records if not r["nonfinite"]] or records
    return {k: float(np.mean([r[k] for r in finite])) for k in records[0]
            if k not in ("nonfinite", "first_nonfinite_group")}


@dataclasses.dataclass(frozen=True)
class Due:
    """What the loop does after the call that reached a step."""

    log: bool  # close the metrics window
    read: bool  # ... and read it now (before an eval or save, and at the end), not one call later
    eval: bool
    save: bool


def due(step: int, total_steps: int, train: ml_collections.ConfigDict, preempted: bool) -> Due:
    """The loop's schedule at `step`: log every `log_every`, eval every `eval_every`, save every
    `checkpoint_every` (the final eval and save are the runner's), and on preemption save and read."""
    def every(n: int) -> bool:
        return bool(n) and step % n == 0 and step < total_steps

    eval_now, save_now = every(train.eval_every), every(train.checkpoint_every)
    read = step == total_steps or save_now or preempted or eval_now  # a non-finite step is caught first
    return Due(log=step % train.log_every == 0 or read, read=read, eval=eval_now, save=save_now)


class Window:
    """Train metrics since the last log point: kept on the device, closed at a log point and read on the
    host either at once or one call later (so logging never makes the device wait), under `nan_policy`."""

    def __init__(self, names: list[str], config: ml_collections.ConfigDict, groups: list[str], step: int,
                 on_read: Callable[[int, dict[str, float]], None]):
        self.names, self.config, self.groups, self.on_read = names, config, groups, on_read
        self.pending: list = []
        self.start_time, self.start_step = time.time(), step
        self.deferred: tuple | None = None  # a closed window whose metrics are on their way to the host
        self.skipped_in_row = 0
        self.latest: dict[str, float] = {}  # the train metrics of the newest window read
        self.first_log: tuple[float, int] | None = None  # steady-state speed excludes compilation and eval
        self.last_log: tuple[float, int] | None = None

    def add(self, metrics: Any) -> None:
        """One call's metric vector(s), left on the device."""
        self.pending.append(metrics)

    def close(self, step: int, read_now: bool) -> None:
        """End the window at `step`: read it now, or start its copy to the host and read it next call."""
        now = time.time()
        window = (stack_records(self.pending), self.start_step, step, self.start_time, now)
        self.first_log, self.last_log = self.first_log or (now, step), (now, step)
        self.start_time, self.start_step, self.pending = now, step, []
        if read_now:
            self._read(window)
        else:
            for part in window[0]:
                part.copy_to_host_async()
            self.deferred = window

    def read_deferred(self) -> None:
        """Read the window closed one call ago (call this once the next call is queued)."""
        if self.deferred:
            window, self.deferred = self.deferred, None
            self._read(window)

    def steady_rate(self) -> float | None:
        """Steps per second between the first and the last log point (None with fewer than two)."""
        if self.first_log and self.last_log[1] > self.first_log[1]:
            return (self.last_log[1] - self.first_log[1]) / (self.last_log[0] - self.first_log[0])
        return None

    def _read(self, window: tuple) -> None:
        self.latest, self.skipped_in_row = read_window(window, self.names, self.config, self.skipped_in_row,
                                                       self.groups)
        self.on_read(window[2], self.latest)
