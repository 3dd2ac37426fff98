"""What every task needs: running the model in train or eval mode, and turning eval sums into means."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from dlfx import losses
from dlfx.losses import per_example  # noqa: F401  (re-exported for tasks)

Batch = dict[str, jnp.ndarray]


def apply_model(model: Any, variables: dict, x: Any, rng: jnp.ndarray | None, train: bool) -> tuple[Any, dict]:
    """The model's output and, in training, its updated mutable collections (e.g. `batch_stats`).

    Training draws dropout (and any other stochastic layer) from the `dropout` stream of `rng`.
    """
    if not train:
        return model.apply(variables, x, train=False), {}
    mutable = [name for name in variables if name != "params"]
    if not mutable:
        return model.apply(variables, x, train=True, rngs={"dropout": rng}), {}
    out, updates = model.apply(variables, x, train=True, rngs={"dropout": rng}, mutable=mutable)
    return out, dict(updates)


def cross_entropy(model: Any, variables: dict, batch: Batch, rng: jnp.ndarray, train: bool,
                  label_smoothing: float) -> tuple[jnp.ndarray, dict, dict]:
    """(mean softmax cross-entropy of `y` under the logits of `x`, {loss, accuracy}, updated collections)."""
    logits, updates = apply_model(model, variables, batch["x"], rng, train)
    loss, metrics = losses.classification_loss(logits, batch["y"], label_smoothing)
    return loss, metrics, updates


def means(totals: dict[str, float]) -> dict[str, float]:
    """Eval sums divided by their `count` (the number of real, unpadded examples)."""
    count = float(totals["count"])
    return {k: float(v) / count for k, v in totals.items() if k != "count"}
