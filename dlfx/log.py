"""Run logging: a tqdm progress bar, `metrics.jsonl` and TensorBoard event files (process 0 only)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import tqdm

from dlfx import remote
from dlfx.errors import ConfigError, WorkdirError
from dlfx.workdir import read_jsonl, write_text


_IMPORT_TIME = time.time()
# TensorBoard events queued for tensorboardX's writer thread. Large, so that a thread that died (a full disk)
# cannot block a `put` before `RunLogger.write` notices it: with the library's 10 the run hung for good.
EVENT_QUEUE = 1000


def process_start_time() -> float:
    """Wall-clock time this process started (from Linux /proc; elsewhere, when dlfx.log was imported)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORT_TIME


def read_metrics(workdir: str) -> list[dict]:
    """All records of a run's `metrics.jsonl` (empty if there is none; a cut-off last line is dropped,
    other damage is a ConfigError naming the file and line)."""
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"), required=("step", "split"))
    for record in records:
        if not isinstance(record["step"], int) or record["split"] not in ("train", "eval"):
            raise ConfigError(f"{os.path.join(workdir, 'metrics.jsonl')}: bad record {json.dumps(record)[:80]}")
    return records


def _cannot_write(workdir: str, name: str, error: OSError, what: str = "") -> WorkdirError:
    """The error for a run file `name` that cannot be written; a gs:// run's by its URL, with where its local
    copy was."""
    shown = remote.shown(workdir)
    where = (f" (in the local copy under {os.path.dirname(os.path.abspath(workdir))}: the TMPDIR environment "
             "variable picks its folder)") if remote.is_remote(shown) else ""
    return WorkdirError(f"cannot write {what}{remote.join(shown, name)}: {error.strerror or error}{where}")


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop records after `last_step` so a resumed run does not log the same steps twice."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.lexists(path):
        return
    kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= last_step]
    try:
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    except OSError as e:  # the old file stays whole
        raise _cannot_write(workdir, "metrics.jsonl", e) from None


class RunLogger:
    """Writes metrics to the console, `workdir/metrics.jsonl` and `workdir/events/`; a no-op when disabled."""

    def __init__(self, workdir: str, total_steps: int, initial_step: int, enabled: bool = True):
        self.enabled = enabled
        self.failure: WorkdirError | None = None  # the first run-file write error; records after it are kept
        self.unwritten: list[dict] = []
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported lazily: it is slow to import

        self._workdir = workdir
        try:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        except OSError as e:
            raise _cannot_write(workdir, "metrics.jsonl", e) from None
        try:
            self._events = SummaryWriter(logdir=os.path.join(workdir, "events"), max_queue=EVENT_QUEUE)
        except OSError as e:
            self._jsonl.close()
            raise _cannot_write(workdir, "events", e, "TensorBoard events to ") from None
        self._events_error: OSError | None = None
        self._keep_event_errors()
        self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="train", unit="step",
                              dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """Record one set of scalar metrics for `split` ('train' or 'eval') at `step`.

        A file that cannot be written (a full disk) does not raise here: from then on the records are kept in
        `unwritten` and the error in `failure`, so that the runner ends the step, saves them with a checkpoint
        and stops (`replay` writes them on resume).
        """
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()},
                  "wall_time": time.time()}
        if self.failure is None:
            self.failure = self._record(record)
        if self.failure is not None:
            self.unwritten.append(record)
            return
        if split == "train":
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_per_s=f"{metrics.get('steps_per_sec', 0):.1f}",
                                  refresh=False)
        else:
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            self._bar.write(f"step {step} {split}: {shown}", file=sys.stderr)

    def replay(self, records: list[dict]) -> None:
        """Write records an earlier attempt kept unwritten (saved with its checkpoint) to the run files."""
        for record in records if self.enabled else ():
            self.failure = self.failure or self._record(record)
            if self.failure is not None:
                raise self.failure

    def _record(self, record: dict) -> WorkdirError | None:
        """Append `record` to `metrics.jsonl` and the event files; the error if either cannot be written."""
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as e:
            return _cannot_write(self._workdir, "metrics.jsonl", e)
        if self._events_error is not None or not self._events_writing():
            stopped = self._events_error or OSError("tensorboardX's writer thread stopped (its error is above)")
            return _cannot_write(self._workdir, "events", stopped, "TensorBoard events to ")
        for name, value in record.items():
            if name not in ("step", "split", "wall_time"):
                self._events.add_scalar(f"{record['split']}/{name}", float(value), global_step=record["step"])
        return None

    def flush(self) -> None:
        """Push the buffered TensorBoard events to disk (an fsync: the runner calls it at checkpoints), so that a
        full disk shows as `failure` while the run can still keep its step, not first at `close`."""
        if self.enabled and self.failure is None:
            self._events.flush()
            if self._events_error is not None:
                self.failure = _cannot_write(self._workdir, "events", self._events_error, "TensorBoard events to ")

    def _keep_event_errors(self) -> None:
        """Make tensorboardX's writer thread keep a write error (a full disk) for `write` to raise in the training
        thread, naming its reason, rather than die with a traceback; later events are dropped."""
        records = getattr(getattr(getattr(self._events, "file_writer", None), "event_writer", None), "_ev_writer",
                          None)
        for name in ("write_event", "flush") if records is not None else ():
            setattr(records, name, self._keeping_errors(getattr(records, name)))

    def _keeping_errors(self, method):
        def guarded(*args):
            if self._events_error is None:
                try:
                    return method(*args)
                except OSError as e:
                    self._events_error = e
            return None

        return guarded

    def _events_writing(self) -> bool:
        """False once tensorboardX's event-writer thread has died (it takes its error with it)."""
        writer = getattr(getattr(self._events, "file_writer", None), "event_writer", None)
        worker = getattr(writer, "_worker", None)
        return worker is None or worker.is_alive()

    def advance(self, step: int) -> None:
        """Move the progress bar to `step`."""
        if self.enabled:
            self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        """Print a line above the progress bar."""
        if self.enabled:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        """Flush and close every writer."""
        if self.enabled:
            self._bar.close()
            try:
                self._events.close()  # raises on a full disk; the metrics file is closed all the same
            finally:
                self._jsonl.close()
            if self._events_error is not None:  # kept by the writer's guard: the last events did not reach the disk
                raise self._events_error
