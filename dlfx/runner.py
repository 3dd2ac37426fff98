"""The experiment loop: resume, train, evaluate, log, checkpoint.

Read `train` top to bottom; `dlfx.experiment.build` makes every piece it uses from the config.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from dlfx import config as config_lib
from dlfx import data, log, parallel, steps
from dlfx.checkpoint import Checkpointer, abstract_like
from dlfx.errors import ConfigError, DlfxError
from dlfx.experiment import build, evaluate

class _Preemption:
    """Remembers a SIGTERM so the loop can save at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _mean(records: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(records)
    return {k: float(np.mean([r[k] for r in fetched])) for k in fetched[0]}


def train(config: ml_collections.ConfigDict, workdir: str, force: bool = False) -> dict[str, Any]:
    """Train `config` in `workdir` (resuming from its newest valid checkpoint); return a summary."""
    start_time = time.time()
    config_lib.check_workdir(config, workdir, force)
    exp = build(config)  # fails on bad input before anything is written
    is_main = jax.process_index() == 0

    # --- Workdir: create it and write the resolved config -------------------------------------
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create workdir {workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK):
        raise ConfigError(f"workdir {workdir} is not writable")
    if is_main:
        config_lib.write_workdir(config, workdir)
        if "vocab" in exp.dataset.metadata:  # lets `dlfx sample` decode tokens
            with open(os.path.join(workdir, "vocab.json"), "w") as f:
                json.dump(exp.dataset.metadata["vocab"], f)

    # --- Input pipeline and resume ----------------------------------------------------------
    train_iter = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed,
                                     jax.process_index(), jax.process_count(),
                                     crop_padding=config.data.crop_padding, random_flip=config.data.random_flip)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep)
    state = exp.state
    restored = checkpointer.restore_latest(abstract_like(state), train_iter)
    if restored is not None:
        state, _ = restored
    step = int(jax.device_get(state.step))
    if is_main:
        log.truncate_metrics(workdir, step)
    logger = log.RunLogger(workdir, exp.total_steps, step, enabled=is_main)
    if restored is not None:
        logger.message(f"resumed from step {step} in {workdir}")

    # --- Compiled steps ---------------------------------------------------------------------
    train_step = parallel.compile_step(
        steps.make_train_step(exp.model, exp.tx, exp.schedule, config.loss.label_smoothing),
        exp.mode, exp.mesh, donate_state=True)
    eval_step = parallel.compile_step(steps.make_eval_step(exp.model), exp.mode, exp.mesh)

    # --- Loop -------------------------------------------------------------------------------
    pending: list[dict] = []
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    status = "finished"
    window_start, window_step = time.time(), step
    first_log: tuple[float, int] | None = None  # steady-state speed excludes compilation and eval
    last_log: tuple[float, int] | None = None
    with _Preemption() as preemption:
        while step < exp.total_steps:
            batch = parallel.shard_batch(next(train_iter), exp.mesh, exp.mode)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append(metrics)  # stays on device until the next log point
            if step % config.train.log_every == 0 or step == exp.total_steps:
                train_metrics = _mean(pending)
                now = time.time()
                train_metrics["steps_per_sec"] = (step - window_step) / (now - window_start)
                first_log = first_log or (now, step)
                last_log = (now, step)
                window_start, window_step, pending = now, step, []
                logger.write(step, "train", train_metrics)
                logger.advance(step)
            if config.train.eval_every and step % config.train.eval_every == 0 and step < exp.total_steps:
                eval_metrics = evaluate(exp, state, eval_step)
                logger.write(step, "eval", eval_metrics)
            if step % config.train.checkpoint_every == 0 and step < exp.total_steps:
                checkpointer.save(step, state, train_iter)
            if preemption.requested:
                checkpointer.save(step, state, train_iter)
                status = "preempted"
                break

    # --- Final eval and checkpoint ------------------------------------------------------------
    if status == "finished":
        eval_metrics = evaluate(exp, state, eval_step)
        logger.write(step, "eval", eval_metrics)
        if step not in checkpointer.steps():
            checkpointer.save(step, state, train_iter)
    checkpointer.close()
    if status == "preempted":
        logger.message(f"preempted: saved step {step} to {workdir}/checkpoints; rerun the same command to resume")
    logger.close()
    end_time = time.time()
    steady = None
    if first_log and last_log[1] > first_log[1]:
        steady = (last_log[1] - first_log[1]) / (last_log[0] - first_log[0])
    return {"status": status, "step": step, "total_steps": exp.total_steps, "train": train_metrics,
            "eval": eval_metrics, "wall_time": end_time - start_time, "steps_per_sec": steady,
            "workdir": workdir, "mode": exp.mode, "devices": exp.mesh.devices.size, "state": state}


def evaluate_workdir(workdir: str, step: int | None = None) -> dict[str, Any]:
    """Restore a run's newest valid (or the given) checkpoint and evaluate it on the test split."""
    config = config_lib.read_workdir_config(workdir)
    config_lib.validate(config)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise DlfxError(f"no checkpoint folder in {workdir}")
    exp = build(config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep)
    try:
        if step is None:
            restored = checkpointer.restore_latest(abstract_like(exp.state))
            if restored is None:
                raise DlfxError(f"no checkpoint in {workdir}/checkpoints to evaluate")
            state, step = restored
        else:
            if step not in checkpointer.steps():
                raise DlfxError(f"no checkpoint at step {step} in {workdir}/checkpoints "
                                f"(saved: {checkpointer.steps()})")
            state = checkpointer.restore(step, abstract_like(exp.state))
    finally:
        checkpointer.close()
    eval_step = parallel.compile_step(steps.make_eval_step(exp.model), exp.mode, exp.mesh)
    return {"step": step, **evaluate(exp, state, eval_step)}
