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

from dlfx import data, models, optim, parallel, steps, transfer
from dlfx.errors import ConfigError

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


def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset) -> Any:
    """The model of `config.model`, with sizes from the data, the device axis and dtypes filled in."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    accepted = models.fields(config.model.name)
    num_classes = dataset.num_classes
    if "num_classes" in accepted:
        kwargs.setdefault("num_classes", num_classes)
        if kwargs["num_classes"] < num_classes:
            raise ConfigError(f"config.model.num_classes={kwargs['num_classes']} but the data has {num_classes} classes")
    if "vocab_size" in accepted and "vocab" in dataset.metadata:
        kwargs.setdefault("vocab_size", dataset.num_classes)
        if kwargs["vocab_size"] < dataset.num_classes:
            raise ConfigError(f"config.model.vocab_size={kwargs['vocab_size']} but the text has "
                              f"{dataset.num_classes} distinct characters")
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
    model = build_model(config, dataset)
    tx, schedule = optim.build(config.optimizer, total_steps)
    init_key, state_key = jax.random.split(jax.random.fold_in(root_key, 0))
    example_x = jnp.zeros((1, *dataset.example_shape), dataset.train["x"].dtype)

    def init_state():
        return steps.create_train_state(steps.init_variables(model, example_x, init_key), tx, state_key)

    try:
        state = jax.jit(init_state, out_shardings=parallel.replicated(mesh))()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model ({config.model.name}) does not fit data {config.data.name!r} "
                          f"with example shape {dataset.example_shape}: {str(e).splitlines()[0]}") from None
    optim.check_freeze(state.params, config.optimizer.freeze)
    return Experiment(config, mode, mesh, dataset, model, tx, schedule, total_steps, data_seed, state)


def init_from_pretrained(exp: Experiment) -> steps.TrainState:
    """The fresh state with `config.init_from`'s parameters and batch stats merged in (optimizer state kept)."""
    fresh = jax.device_get({"params": exp.state.params, "batch_stats": exp.state.batch_stats})
    if not fresh["batch_stats"]:
        del fresh["batch_stats"]
    merged = transfer.load_pretrained(fresh, exp.config.init_from)
    placed = jax.device_put(merged, parallel.replicated(exp.mesh))
    return exp.state.replace(params=placed["params"], batch_stats=placed.get("batch_stats", exp.state.batch_stats))


def evaluate(exp: Experiment, state: steps.TrainState, eval_step: Any) -> dict[str, float]:
    """Loss and accuracy over the whole test split (padded batches, masked)."""
    totals = None
    for local in data.eval_batches(exp.dataset.test, exp.config.data.batch_size,
                                   jax.process_index(), jax.process_count()):
        sums = eval_step(state, parallel.shard_batch(local, exp.mesh, exp.mode))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    metrics = {k: float(v) / count for k, v in totals.items()}
    if "vocab" in exp.dataset.metadata:  # character LM: report bits per character too
        metrics["bits_per_char"] = metrics["loss"] / np.log(2)
    return metrics
