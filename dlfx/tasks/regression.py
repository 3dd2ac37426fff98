"""Regression: float targets `y` of any shape, predicted by a model with that many outputs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp
import optax

from dlfx.errors import ConfigError
from dlfx.tasks.common import Batch, apply_model, means

LOSSES = ("mse", "mae", "huber")


@dataclasses.dataclass(frozen=True)
class Regression:
    """`mse`, `mae` or `huber` (with `huber_delta`) between the model output, reshaped to the target's
    shape, and `y`; reports that loss, MSE, MAE and R^2 (over every target value of the split)."""

    loss_name: str = "mse"
    huber_delta: float = 1.0

    train_metrics: ClassVar[tuple[str, ...]] = ("loss", "mse", "mae")
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss", "mse", "mae", "r2")

    def __post_init__(self):
        if self.loss_name not in LOSSES:
            raise ConfigError(f"config.task.loss_name={self.loss_name!r} is not one of {', '.join(LOSSES)}")
        if not self.huber_delta > 0:
            raise ConfigError(f"config.task.huber_delta must be > 0, got {self.huber_delta}")

    def model_defaults(self, dataset: Any) -> dict[str, Any]:
        """Model arguments the data decides: one output per target value."""
        from dlfx.data import access

        return {"num_classes": math.prod(access.element_spec(dataset.train)["y"][0])}

    def _errors(self, out: jnp.ndarray, y: jnp.ndarray) -> dict[str, jnp.ndarray]:
        diff = out.astype(jnp.float32).reshape(y.shape) - y.astype(jnp.float32)
        per = {"mse": jnp.square(diff), "mae": jnp.abs(diff),
               "huber": optax.huber_loss(diff, delta=self.huber_delta)}
        return {k: v.reshape(v.shape[0], -1) for k, v in per.items()}

    def loss(self, model: Any, variables: dict, batch: Batch, rng: jnp.ndarray, train: bool = True):
        """(mean loss, train metrics, updated mutable collections) of one batch."""
        out, updates = apply_model(model, variables, batch["x"], rng, train)
        errors = self._errors(out, batch["y"])
        loss = errors[self.loss_name].mean()
        return loss, {"loss": loss, "mse": errors["mse"].mean(), "mae": errors["mae"].mean()}, updates

    def eval_sums(self, model: Any, variables: dict, batch: Batch) -> dict[str, jnp.ndarray]:
        """Per-example mean errors summed over real examples; target sums for R^2."""
        out, _ = apply_model(model, variables, batch["x"], None, train=False)
        mask = batch["mask"]
        errors = self._errors(out, batch["y"])
        y = batch["y"].astype(jnp.float32).reshape(mask.shape[0], -1)
        per_value = mask[:, None] * jnp.ones_like(y)
        return {"loss": jnp.sum(errors[self.loss_name].mean(1) * mask),
                "mse": jnp.sum(errors["mse"].mean(1) * mask), "mae": jnp.sum(errors["mae"].mean(1) * mask),
                "sse": jnp.sum(errors["mse"] * per_value), "sum_y": jnp.sum(y * per_value),
                "sum_y2": jnp.sum(jnp.square(y) * per_value), "values": jnp.sum(per_value), "count": jnp.sum(mask)}

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        """Means over the split and R^2 = 1 - SSE / total sum of squares about the split's mean."""
        sse, sum_y, sum_y2, values = (float(totals.pop(k)) for k in ("sse", "sum_y", "sum_y2", "values"))
        metrics = means(totals)
        total = sum_y2 - sum_y * sum_y / values
        metrics["r2"] = 1.0 - sse / total if total > 0 else float("nan")
        return metrics
