"""How a run's writers close and what it keeps when a run file cannot be written (a full disk).

The runner calls these from its loop (`dlfx.runner`): every writer closes even when one fails, the first
error is the one reported, and a step whose metric records the run files could not take is saved with them.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from dlfx import log, remote
from dlfx.checkpoint import BestCheckpoint, Checkpointer
from dlfx.errors import CheckpointError, DlfxError, WorkdirError


def close_writers(checkpointer: Checkpointer, best: BestCheckpoint | None, logger: log.RunLogger,
                  failing: BaseException | None, workdir: str = "") -> None:
    """Wait for the saves in flight (the last good checkpoint is then complete) and close every writer, each
    even when another fails. The first error is raised, unless one is already ending the run (`failing`):
    that one stays the error reported, and a different one from here is a warning."""
    first = None
    for close in (checkpointer.close, best.close if best else None):
        try:
            if close is not None:
                close()
        except CheckpointError as e:
            if failing is None and first is None:
                first = e
            elif not isinstance(failing, CheckpointError):
                print(f"dlfx: warning: {e}", file=sys.stderr)
    try:
        logger.close()
    except OSError as e:  # a full disk: never hide the error that stopped the run; else this one stops it
        if failing is None and first is None:
            first = WorkdirError(f"could not flush the run logs (TensorBoard events) to {remote.shown(workdir)}: "
                                 f"{e.strerror or e}")
        elif not isinstance(failing, WorkdirError):  # a run-file error already says the logs failed
            print(f"dlfx: warning: could not flush the run logs: {e}", file=sys.stderr)
    if first is not None:
        raise first


def process_zero_failed(logger: log.RunLogger) -> bool:
    """Whether process 0 (it writes the run files) has a run-file error, on every process (a collective)."""
    failed = logger.failure is not None
    if jax.process_count() > 1:
        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    return failed


def on_process_zero(check: Callable[[], None]) -> None:
    """Run `check` (it reads files only process 0 is sure to have) on process 0 and share its outcome, a
    collective: when it raises, every process raises, so none is left waiting for a process that stopped."""
    error = None
    if jax.process_index() == 0:
        try:
            check()
        except BaseException as e:  # any error: the others must still hear of it
            error = e
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(error is not None)) \
            and error is None:
        raise DlfxError(f"process 0 stopped the run (its error line says why); this is process {jax.process_index()}")
    if error is not None:
        raise error


def save_before_failing(checkpointer: Checkpointer, step: int, state, train_iter, logs: list[dict]) -> None:
    """Try to keep the steps since the last checkpoint, and the metric records the run files could not take,
    before a run-file error ends the run (every process calls it: a save takes them all; only process 0 holds
    records). A gs:// run's logs go to a local mirror but its checkpoints to the bucket."""
    if step <= max(checkpointer.steps(), default=0):
        return
    is_main = jax.process_index() == 0
    try:
        checkpointer.save(step, state, train_iter, logs=logs)
        checkpointer.wait()
    except CheckpointError as e:
        if is_main:
            print(f"dlfx: could not save step {step} either: {e}", file=sys.stderr)
        return
    if is_main:
        print(f"dlfx: saved step {step} and the {len(logs)} metric records the run files could not take to "
              f"{checkpointer.directory} before stopping", file=sys.stderr)


def keep_before_stopping(checkpointer: Checkpointer, window: Any, logger: log.RunLogger, step: int, state: Any,
                         train_iter: Any, before_save: Callable[[], None]) -> None:
    """Before a run stops between steps (SIGTERM while a stalled reader held the next batch, a lost data worker):
    write the window read one call late and the partial one, then save the steps since the last checkpoint (one
    process: a save takes every process); a run-file error keeps the records with the step and is raised."""
    window.read_deferred()
    if window.pending:
        window.close(step, read_now=True)
    if jax.process_count() > 1:
        return
    logger.flush()
    if logger.failure is not None:
        save_before_failing(checkpointer, step, state, train_iter, logger.unwritten)
        raise logger.failure
    if step > max(checkpointer.steps(), default=0):
        before_save()  # a remote workdir gets the logs up to this checkpoint first
        checkpointer.save(step, state, train_iter)


def replay_unwritten(checkpointer: Checkpointer, logger: log.RunLogger, workdir: str, step: int) -> None:
    """Write the metric records an earlier attempt saved with checkpoint `step` (its run files were full), each
    once: an attempt that wrote them and died before its next checkpoint resumes from `step` again. Every
    process reads them (a restore may be a collective); process 0 writes them."""
    kept = checkpointer.unwritten_logs(step)

    def replay() -> None:
        written = {(r["step"], r["split"]) for r in log.read_metrics(workdir)}
        logger.replay([r for r in kept if (r.get("step"), r.get("split")) not in written])

    if kept:  # every process holds the same `kept` (read from the checkpoint), so all take this branch
        on_process_zero(replay)
