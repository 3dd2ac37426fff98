"""The hand-written loop dlfx is measured against: one plain `jax.jit` step, data already on the device."""

from __future__ import annotations

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

    @jax.jit
    def step(params, batch_stats, opt_state, x, y, rng):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def run(step: Callable, params: Any, batch_stats: Any, opt_state: Any, batches: list[dict],
        num_steps: int, rng: jnp.ndarray) -> tuple[Any, Any, Any]:
    """`num_steps` steps cycling over device-resident batches; blocks until done."""
    loss = None
    for i in range(num_steps):
        batch = batches[i % len(batches)]
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batch["x"], batch["y"],
                                                    jax.random.fold_in(rng, i))
    jax.block_until_ready(loss)
    return params, batch_stats, opt_state
