"""TrainState and the per-device train and eval steps (pure functions, collectives over `axis_name`)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from dlfx import optim, tasks
from dlfx.inspection import path_str

DATA_AXIS = "data"
Batch = dict[str, jnp.ndarray]
Metrics = dict[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; all leaves are arrays so Orbax saves it directly."""

    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jnp.ndarray  # base key; each step folds in the step number and the device index


def init_variables(model: nn.Module, example_x: jnp.ndarray, rng: jnp.ndarray) -> dict:
    """Fresh model variables ('params' and, for batch-norm models, 'batch_stats')."""
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, example_x, train=False)
    return dict(variables)


def create_train_state(variables: dict, tx: optax.GradientTransformation, rng: jnp.ndarray) -> TrainState:
    """A step-0 TrainState from model variables and an optimizer."""
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), rng=rng)


def param_groups(params: Any) -> list[str]:
    """Top-level parameter groups (e.g. `conv1`, `head`), the unit non-finite gradients are reported in."""
    return list(params.keys())


def _squared_norm(tree: Any) -> jnp.ndarray:
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def _variables(state: TrainState, params: Any) -> dict:
    if state.batch_stats:
        return {"params": params, "batch_stats": state.batch_stats}
    return {"params": params}


STEP_METRICS = ("grad_norm", "learning_rate", "nonfinite", "first_nonfinite_group")  # the step's own, after the task's


def train_metric_names(task: Any) -> list[str]:
    """Names of a train step's metrics, in the order `pack_metrics` stacks them: the task's, then the step's."""
    return list(task.train_metrics) + list(STEP_METRICS)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    task: Any = None, axis_name: str | None = DATA_AXIS, freeze: Sequence[str] = (),
                    grad_accum_steps: int = 1, guard_nonfinite: bool = True,
                    preprocess: Callable | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """One per-device SGD step: the task's loss, local grads, `pmean` over `axis_name`, optax update,
    synced BN stats. `task` defaults to classification (see `dlfx.tasks`).

    `axis_name=None` makes it a global step (no collectives) for `jax.jit` on sharded arrays (fsdp mode).
    With `grad_accum_steps=k` the batch is split into k microbatches run by `lax.scan` (memory of one
    microbatch) and their gradients averaged: one optimizer update per k microbatches. Batch-norm
    statistics of layers matching a `freeze` regex keep their values (the optimizer freezes the
    parameters themselves). With `guard_nonfinite` a step whose loss or gradient is not finite returns
    the old state (flagged in the metrics); without it the caller must discard that state itself.
    `preprocess` maps the batch's `x` on the device first (e.g. uint8 images -> normalised floats).
    """

    def mean(tree):  # over the devices of the data axis
        return lax.pmean(tree, axis_name) if axis_name else tree

    task = tasks.Classification() if task is None else task

    def loss_fn(params, batch_stats, batch, rng):
        variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
        if preprocess is not None:
            batch = {**batch, "x": preprocess(batch["x"])}
        loss, metrics, updates = task.loss(model, variables, batch, rng, True)
        return loss, (dict(metrics), updates.get("batch_stats", batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulated(state, batch, rng):
        k = grad_accum_steps
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

        def body(carry, inputs):
            grad_sum, batch_stats = carry
            microbatch, i = inputs
            (_, (metrics, batch_stats)), grads = grad_fn(state.params, batch_stats, microbatch,
                                                         jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grad_sum, grads), batch_stats), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grad_sum, batch_stats), metrics = lax.scan(body, (zeros, state.batch_stats), (micro, jnp.arange(k)))
        return jax.tree.map(lambda g: g / k, grad_sum), jax.tree.map(lambda m: m.mean(0), metrics), batch_stats

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        device = lax.axis_index(axis_name) if axis_name else 0
        dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device)
        if grad_accum_steps > 1:
            grads, metrics, batch_stats = accumulated(state, batch, dropout_rng)
        else:
            (_, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, dropout_rng)
        grads, metrics, batch_stats = mean(grads), mean(metrics), mean(batch_stats)
        if freeze:
            batch_stats = jax.tree_util.tree_map_with_path(
                lambda p, new, old: old if optim.is_frozen(path_str(p), freeze) else new,
                batch_stats, state.batch_stats)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, param_updates)
        # One pass over the gradients gives both the norm and the finiteness of each parameter group
        # (a squared norm that overflows float32 counts as non-finite too).
        group_sq = jnp.stack([_squared_norm(grads[name]) for name in param_groups(grads)])
        group_finite = jnp.isfinite(group_sq)
        metrics["grad_norm"] = jnp.sqrt(jnp.sum(group_sq))
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        finite = jnp.isfinite(metrics["loss"]) & jnp.all(group_finite)
        metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
        metrics["first_nonfinite_group"] = jnp.where(jnp.all(group_finite), -1, jnp.argmin(group_finite))
        if guard_nonfinite:  # a non-finite update never reaches the state; the runner reports it
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        else:  # the caller stops before this state is saved or evaluated (nan_policy='error')
            keep = lambda new, old: new  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  batch_stats=keep(batch_stats, state.batch_stats),
                                  opt_state=keep(opt_state, state.opt_state))
        return new_state, metrics

    return train_step


def pack_metrics(step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]],
                 names: Sequence[str]) -> Callable:
    """`step_fn` returning its scalar metrics `names` as one float32 vector in that order (one output
    buffer, not one per metric)."""

    def packed(state: TrainState, batch: Batch, *rest: Any) -> tuple[TrainState, jnp.ndarray]:
        state, metrics = step_fn(state, batch, *rest)
        return state, jnp.stack([jnp.asarray(metrics[name], jnp.float32) for name in names])

    return packed


def gathering(step_fn: Callable[[TrainState, Batch], Any], gather: Callable[[Any, Batch], Batch]) -> Callable:
    """`step_fn` as `(state, batch, tables)`: the batch it trains on is `gather(tables, batch)`, read inside
    the compiled call (e.g. rows of a device-resident split picked by the batch's indices)."""

    def step(state: TrainState, batch: Batch, tables: Any) -> Any:
        return step_fn(state, gather(tables, batch))

    return step


def scan_steps(step_fn: Callable[[TrainState, Batch], tuple[TrainState, Any]]) -> Callable:
    """Several steps in one call: `lax.scan` of `step_fn` over a stack of batches (steps, batch, ...).

    Returns the last state and the per-step outputs stacked; equal to calling `step_fn` once per batch.
    Arguments after the batches (e.g. device-resident data) reach every step unchanged.
    """

    def steps(state: TrainState, batches: Batch, *rest: Any) -> tuple[TrainState, Any]:
        return lax.scan(lambda s, b: step_fn(s, b, *rest), state, batches)

    return steps


def steps_in_call(position: int, steps_per_call: int, total_steps: int, every: Sequence[int]) -> int:
    """How many steps the call starting after `position` steps runs: `steps_per_call`, or 1 where a
    full call would pass a multiple of one of `every` (log, eval, checkpoint points) or the last step."""
    end = position + steps_per_call
    if steps_per_call == 1 or end > total_steps:
        return 1
    crosses = any(n and (position // n) != ((end - 1) // n) for n in every)
    return 1 if crosses else steps_per_call


def make_eval_step(model: nn.Module, axis_name: str | None = DATA_AXIS,
                   task: Any = None, preprocess: Callable | None = None) -> Callable[[TrainState, Batch], Metrics]:
    """Per-device eval: the task's masked sums (with their count), `psum`-ed over `axis_name` (None: global
    step); `task.finalize` turns the split's totals into metrics."""
    task = tasks.Classification() if task is None else task

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        if preprocess is not None:
            batch = {**batch, "x": preprocess(batch["x"])}
        sums = task.eval_sums(model, _variables(state, state.params), batch)
        return lax.psum(sums, axis_name) if axis_name else sums

    return eval_step
