"""The hand-written loop dlfx is measured against: one plain `jax.jit` step, data already on the device.

Written the way a careful user would on an accelerator: the rng is split inside the compiled step and
carried with the state, and the state buffers are donated, so a step is one dispatch and no copies."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def make_baseline_step(model: Any, tx: optax.GradientTransformation) -> Callable:
    """A minimal jitted train step: forward, cross-entropy, grad, optax update; batch norm if the model has it."""

    def loss_fn(params, batch_stats, x, y, rng):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        logits, updates = model.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", batch_stats)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2, 5))
    def step(params, batch_stats, opt_state, x, y, rng):
        rng, dropout_rng = jax.random.split(rng)
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y,
                                                                               dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, rng, loss

    return step


def run(step: Callable, params: Any, batch_stats: Any, opt_state: Any, batches: list[dict],
        num_steps: int, rng: jnp.ndarray) -> tuple[Any, Any, Any]:
    """`num_steps` steps cycling over device-resident batches; blocks until done (the inputs are donated)."""
    loss, rng = None, jnp.array(rng, copy=True)  # the caller's key survives the donation
    for i in range(num_steps):
        batch = batches[i % len(batches)]
        params, batch_stats, opt_state, rng, loss = step(params, batch_stats, opt_state, batch["x"], batch["y"],
                                                         rng)
    jax.block_until_ready(loss)
    return params, batch_stats, opt_state
