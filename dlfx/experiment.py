"""An experiment built from its config: mesh, data, model, optimizer, fresh state; and its evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from dlfx import data, models, optim, parallel, sharding, steps, tasks, transfer
from dlfx.errors import ConfigError, one_line

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Experiment:
    """Everything `build` makes from a config. It holds the train state's shapes and layout, not the state:
    `init()` makes the fresh one, a checkpoint restores into `abstract_state`, and the runner owns the one
    live copy (so a resumed run never holds a fresh state beside the restored one)."""

    config: ml_collections.ConfigDict
    mode: str
    mesh: Mesh
    dataset: data.Dataset
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    total_steps: int
    data_seed: int
    abstract_state: steps.TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings: a restore target
    state_sharding: Any  # NamedShardings of the state (replicated, or split over `fsdp` in fsdp mode)
    task: Any = dataclasses.field(default_factory=tasks.Classification)  # objective and metrics (dlfx.tasks)
    init_fn: Any = None  # () -> the fresh state at step 0, placed with `state_sharding`
    resident: bool = False  # the runner keeps the train split on the devices (`dlfx.data.resident`)

    def init(self) -> steps.TrainState:
        """The fresh train state at step 0 (seeded by `config.seed`), on this experiment's devices."""
        return self.init_fn()

    @property
    def metric_names(self) -> list[str]:
        """Names of the packed train-metric vector's entries (the task's, then the step's)."""
        return steps.train_metric_names(self.task)

    def compile(self, step_fn: Any, donate_state: bool = False, stacked: bool = False, tables: bool = False) -> Any:
        """`parallel.compile_step` for this experiment's mode, mesh and state layout."""
        return parallel.compile_step(step_fn, self.mode, self.mesh, donate_state, self.state_sharding, stacked,
                                     tables)

    def train_step(self, num_steps: int = 1, tables: Any = None) -> Any:
        """The compiled train step of this config (state donated), metrics packed in one vector.

        `num_steps > 1`: one call runs that many steps over a stack of batches (steps, batch, ...) and
        returns their metric vectors stacked (`steps.scan_steps`).
        `self.metric_names` names the vector's entries (see `steps.pack_metrics`).
        Under `train.nan_policy='error'` the step does not guard the state against a non-finite update:
        the runner stops at the next metrics fetch, before that state is evaluated or saved.
        With `tables` (the device-resident train split, `dlfx.data.resident.place`) the batches are row
        indices (`{'index': ...}`) and the step gathers its examples on the device.
        """
        c = self.config
        step_fn = steps.make_train_step(
            self.model, self.tx, self.schedule, self.task, parallel.step_axis(self.mode),
            c.optimizer.freeze, c.optimizer.grad_accum_steps, guard_nonfinite=c.train.nan_policy == "skip",
            preprocess=self.preprocess)
        if tables is not None:  # each step gathers its own rows: memory of one batch at any steps per call
            step_fn = steps.gathering(step_fn, data.resident.gather)
        packed = steps.pack_metrics(step_fn, self.metric_names)
        if num_steps == 1:
            call_fn = packed
        elif tables is None:
            call_fn = steps.scan_steps(packed)
        else:
            scanned = steps.scan_steps(packed)

            def call_fn(state, batch, tables):  # several calls' row indices and a slot: this call's come first
                return scanned(state, data.resident.call_rows(batch), tables)
        compiled = self.compile(call_fn, donate_state=True, stacked=num_steps > 1, tables=tables is not None)
        if tables is None:
            return compiled

        def call(state, batch):
            return compiled(state, batch, tables)

        call.traces, call.lower = compiled.traces, compiled.lower
        return call

    def train_iterator(self) -> Any:
        """This process's endless host iterator of training batches (grain): examples, or row indices when
        the split is device-resident (`resident`)."""
        c = self.config.data
        return data.train_iterator(self.dataset.train, c.batch_size, self.data_seed, jax.process_index(),
                                   jax.process_count(), crop_padding=c.crop_padding, random_flip=c.random_flip,
                                   workers=c.workers, indices_only=self.resident)

    def eval_step(self) -> Any:
        """The compiled eval step (the task's sums over the whole batch)."""
        return self.compile(steps.make_eval_step(self.model, parallel.step_axis(self.mode), self.task, self.preprocess))

    @property
    def preprocess(self) -> Any:
        """On-device input transform the data asks for (`dlfx.data.input_transform`), or None."""
        return data.input_transform(self.dataset.metadata)


SIZE_WORDS = {"num_classes": "classes", "vocab_size": "distinct tokens"}


def build_task(config: ml_collections.ConfigDict, dataset: data.Dataset) -> Any:
    """The task of `config.task` (default: classification, or lm for text) for `dataset`."""
    return tasks.build(config.task, dataset, config.loss.label_smoothing)


def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset, mode: str = "shard_map",
                task: Any = None) -> Any:
    """The model of `config.model`, with the sizes the task takes from the data (number of logits,
    vocabulary), the device axis and dtypes filled in."""
    task = build_task(config, dataset) if task is None else task
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    accepted = models.fields(config.model.name)
    defaults = task.model_defaults(dataset) if hasattr(task, "model_defaults") else {}
    for key, needed in defaults.items():
        if key not in accepted:
            continue
        if needed is None and key not in kwargs:
            raise ConfigError(f"config.model.{key}: the data set {dataset.name!r} does not say how many "
                              f"{SIZE_WORDS.get(key, key)} it has (e.g. float labels); set it, or pick the task "
                              "that fits the data (config.task.name)")
        kwargs.setdefault(key, needed)
        if key in SIZE_WORDS and needed is not None and kwargs[key] < needed:
            raise ConfigError(f"config.model.{key}={kwargs[key]} but the data has {needed} {SIZE_WORDS[key]}")
    if "axis_name" in accepted:  # batch-norm statistics synced over the device axis (fsdp: global view)
        kwargs.setdefault("axis_name", parallel.step_axis(mode))
    if "dtype" in accepted:
        kwargs.setdefault("dtype", DTYPES[config.precision.compute_dtype])
    if "param_dtype" in accepted:
        kwargs.setdefault("param_dtype", DTYPES[config.precision.param_dtype])
    return models.build(config.model.name, **kwargs)


def build(config: ml_collections.ConfigDict, dataset: data.Dataset | None = None,
          devices: list | None = None) -> Experiment:
    """Make mesh, data (unless `dataset` is given), model, optimizer and the train state's layout; touches no
    files and allocates no state (`Experiment.init` does). `devices`: lay the run out on these (default
    `jax.devices()`), e.g. an ahead-of-time topology's, to compile its steps for hardware not present; the
    models still pick platform code paths (cuDNN attention, ...) by `jax.default_backend()` when traced."""
    # --- Devices ---------------------------------------------------------------------------
    devices = jax.devices() if devices is None else list(devices)
    if config.parallel.num_devices:
        if not 0 < config.parallel.num_devices <= len(devices) or jax.process_count() > 1:
            raise ConfigError(f"config.parallel.num_devices={config.parallel.num_devices}: this host has "
                              f"{len(devices)} devices (and the option needs a single process)")
        devices = devices[:config.parallel.num_devices]
    mode = parallel.resolve_mode(config.parallel.mode, len(devices))
    mesh = parallel.make_mesh(devices, mode=mode, data=config.parallel.data, fsdp=config.parallel.fsdp)
    parallel.check_batch_size(config.data.batch_size, mesh)
    accum = config.optimizer.grad_accum_steps
    if config.data.batch_size % (mesh.devices.size * accum):
        raise ConfigError(f"config.data.batch_size={config.data.batch_size} does not split into "
                          f"{mesh.devices.size} devices x {accum} microbatches (config.optimizer.grad_accum_steps)")

    # --- Data ------------------------------------------------------------------------------
    dataset = data.load(config.data) if dataset is None else dataset
    augment = [f"data.{k}" for k in ("crop_padding", "random_flip") if config.data[k]]
    if augment and len(dataset.example_shape) != 3:  # checked here, before a run folder exists
        raise ConfigError(f"config.{' and config.'.join(augment)} {'augment' if len(augment) > 1 else 'augments'} images "
                          f"(height, width, channels), but "
                          f"{dataset.name!r} examples have shape {tuple(dataset.example_shape)}")
    task = build_task(config, dataset)
    if isinstance(task, tasks.Classification):
        data.check_labels(dataset)
    if config.train.keep_best:
        tasks.best_mode(config.train.keep_best, task, config.train.best_mode)
    per_epoch = data.steps_per_epoch(data.num_examples(dataset.train), config.data.batch_size)
    total_steps = config.train.steps or config.train.epochs * per_epoch
    root_key = jax.random.PRNGKey(config.seed)
    data_seed = int(jax.random.randint(jax.random.fold_in(root_key, 1), (), 0, 2**31 - 1))

    # --- Model, optimizer, fresh state -----------------------------------------------------
    model = build_model(config, dataset, mode, task)
    tx, schedule = optim.build(config.optimizer, total_steps)
    init_key, state_key = jax.random.split(jax.random.fold_in(root_key, 0))
    transform = data.input_transform(dataset.metadata)  # e.g. uint8 images -> normalised float32, on the device
    x_dtype = jnp.float32 if transform else data.access.element_spec(dataset.train)["x"][1]
    example_x = jnp.zeros((1, *dataset.example_shape), x_dtype)

    def init_state():
        return steps.create_train_state(steps.init_variables(model, example_x, init_key), tx, state_key)

    try:
        shapes = jax.eval_shape(init_state)  # traces the model on the data's example: no memory, no compute
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model ({config.model.name}) does not fit data {config.data.name!r} "
                          f"with example shape {dataset.example_shape}: {one_line(e)}") from None
    except ConfigError:
        raise
    except Exception as e:  # a user's model that raises while it is traced
        raise ConfigError(f"config.model ({config.model.name}) failed when initialized on an example of data "
                          f"{config.data.name!r} (shape {dataset.example_shape}): {one_line(e)}") from None
    if mode == "fsdp":
        state_sharding = sharding.state_shardings(shapes, mesh, config.parallel.fsdp_rules,
                                                  config.parallel.fsdp_min_size)
        shardings = state_sharding
    else:
        state_sharding = parallel.replicated(mesh)
        shardings = jax.tree.map(lambda _: state_sharding, shapes)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    optim.check_freeze(abstract_state.params, config.optimizer.freeze)
    head = data.access.read(dataset.train, range(min(2, data.num_examples(dataset.train))))
    if transform:
        head = {**head, "x": np.asarray(transform(head["x"]))}
    tasks.check(task, model, abstract_state, head, config.task.get("name", ""))
    return Experiment(config, mode, mesh, dataset, model, tx, schedule, total_steps, data_seed, abstract_state,
                      state_sharding, task, jax.jit(init_state, out_shardings=state_sharding),
                      data.resident.decide(config, dataset.train, mesh))


def init_from_pretrained(exp: Experiment, state: steps.TrainState) -> steps.TrainState:
    """The fresh `state` with `config.init_from`'s parameters and batch stats merged in (optimizer state kept)."""
    fresh = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    if not fresh["batch_stats"]:
        del fresh["batch_stats"]
    merged = transfer.load_pretrained(fresh, exp.config.init_from)
    layout = {"params": state.params, "batch_stats": state.batch_stats}
    placed = jax.device_put(merged, {k: jax.tree.map(lambda a: a.sharding, layout[k]) for k in merged})
    return state.replace(params=placed["params"], batch_stats=placed.get("batch_stats", state.batch_stats))


def evaluate(exp: Experiment, state: steps.TrainState, eval_step: Any) -> dict[str, float]:
    """The task's metrics over the whole test split (padded batches, masked)."""
    totals, dispatch = None, parallel.DispatchLimit()
    for local in data.eval_batches(exp.dataset.test, exp.config.data.batch_size,
                                   jax.process_index(), jax.process_count()):
        sums = eval_step(state, parallel.shard_batch(local, exp.mesh, exp.mode))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        dispatch.add(totals)
    try:
        return {k: float(v) for k, v in exp.task.finalize(jax.device_get(totals)).items()}
    except Exception as e:  # a user's task: one line (the newest checkpoint is saved before the final eval)
        raise ConfigError(f"config.task ({exp.config.task.get('name', '') or type(exp.task).__name__}): finalize "
                          f"failed on the eval totals: {one_line(e)}") from None
