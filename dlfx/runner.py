"""The experiment loop: build from the config, resume, train, evaluate, log, checkpoint.

Read it top to bottom: `build` makes every piece from the config; `train` runs the loop.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dlfx import config as config_lib
from dlfx import data, log, models, optim, parallel, steps
from dlfx.checkpoint import Checkpointer, abstract_like
from dlfx.errors import ConfigError, DlfxError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Experiment:
    """Everything `build` makes from a config; the state is at step 0 until restored."""

    config: ml_collections.ConfigDict
    mode: str
    mesh: Mesh
    dataset: data.Dataset
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    data_seed: int
    state: steps.TrainState


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
    """The model of `config.model`, with num_classes, the device axis and dtypes filled in where it takes them."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    accepted = models.fields(config.model.name)
    if "num_classes" in accepted:
        kwargs.setdefault("num_classes", num_classes)
        if kwargs["num_classes"] < num_classes:
            raise ConfigError(f"config.model.num_classes={kwargs['num_classes']} but the data has {num_classes} classes")
    if "axis_name" in accepted:
        kwargs.setdefault("axis_name", steps.DATA_AXIS)
    if "dtype" in accepted:
        kwargs.setdefault("dtype", DTYPES[config.precision.compute_dtype])
    if "param_dtype" in accepted:
        kwargs.setdefault("param_dtype", DTYPES[config.precision.param_dtype])
    return models.build(config.model.name, **kwargs)


def build(config: ml_collections.ConfigDict) -> Experiment:
    """Make mesh, data, model, optimizer and a fresh replicated train state; touches no files."""
    # --- Devices ---------------------------------------------------------------------------
    mode = parallel.resolve_mode(config.parallel.mode)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.data.batch_size, mesh)

    # --- Data ------------------------------------------------------------------------------
    dataset = data.load(config.data)
    per_epoch = data.steps_per_epoch(len(dataset.train["y"]), config.data.batch_size)
    total_steps = config.train.steps or config.train.epochs * per_epoch
    root_key = jax.random.PRNGKey(config.seed)
    data_seed = int(jax.random.randint(jax.random.fold_in(root_key, 1), (), 0, 2**31 - 1))

    # --- Model, optimizer, fresh state -----------------------------------------------------
    model = build_model(config, dataset.num_classes)
    tx, schedule = optim.build(config.optimizer, total_steps)
    init_key, state_key = jax.random.split(jax.random.fold_in(root_key, 0))
    example_x = jnp.zeros((1, *dataset.example_shape), jnp.float32)

    def init_state():
        return steps.create_train_state(steps.init_variables(model, example_x, init_key), tx, state_key)

    try:
        state = jax.jit(init_state, out_shardings=parallel.replicated(mesh))()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model ({config.model.name}) does not fit data {config.data.name!r} "
                          f"with example shape {dataset.example_shape}: {str(e).splitlines()[0]}") from None
    return Experiment(config, mode, mesh, dataset, model, tx, schedule, total_steps, data_seed, state)


def evaluate(exp: Experiment, state: steps.TrainState, eval_step: Any) -> dict[str, float]:
    """Loss and accuracy over the whole test split (padded batches, masked)."""
    totals = None
    for local in data.eval_batches(exp.dataset.test, exp.config.data.batch_size,
                                   jax.process_index(), jax.process_count()):
        sums = eval_step(state, parallel.shard_batch(local, exp.mesh, exp.mode))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    return {k: float(v) / count for k, v in totals.items()}


class _Preemption:
    """Remembers a SIGTERM so the loop can save at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and _in_main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


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

    # --- Input pipeline and resume ----------------------------------------------------------
    train_iter = data.train_iterator(exp.dataset.train, config.data.batch_size, exp.data_seed,
                                     jax.process_index(), jax.process_count())
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
    first_log: tuple[float, int] | None = None
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
    if first_log and step > first_log[1]:
        steady = (step - first_log[1]) / (end_time - first_log[0])
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
