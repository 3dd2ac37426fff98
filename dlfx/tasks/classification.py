"""Classification: softmax cross-entropy of the model's logits against integer labels `y`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from dlfx import losses
from dlfx.tasks.common import Batch, apply_model, cross_entropy, means, per_example


@dataclasses.dataclass(frozen=True)
class Classification:
    """Cross-entropy (optionally label-smoothed) for training; loss, accuracy and top-5 accuracy (with
    at least 5 classes) over the eval split."""

    label_smoothing: float = 0.0
    num_classes: int = 0  # filled from the data set

    train_metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy")

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """Names `finalize` returns."""
        return ("loss", "accuracy") + (("top5_accuracy",) if self.num_classes >= 5 else ())

    def model_defaults(self, dataset: Any) -> dict[str, Any]:
        """Model arguments the data decides: the number of output logits."""
        return {"num_classes": dataset.num_classes}

    def loss(self, model: Any, variables: dict, batch: Batch, rng: jnp.ndarray, train: bool = True):
        """(mean loss, train metrics, updated mutable collections) of one batch."""
        return cross_entropy(model, variables, batch, rng, train, self.label_smoothing)

    def eval_sums(self, model: Any, variables: dict, batch: Batch) -> dict[str, jnp.ndarray]:
        """Sums over the real (mask = 1) examples of a batch, and their count."""
        logits, _ = apply_model(model, variables, batch["x"], None, train=False)
        mask = batch["mask"]
        sums = losses.masked_sums(logits, batch["y"], mask)
        if self.num_classes >= 5:
            top5 = jnp.argsort(logits.astype(jnp.float32), axis=-1)[..., -5:]
            hit = jnp.any(top5 == batch["y"][..., None], axis=-1).astype(jnp.float32)
            sums["top5_accuracy"] = jnp.sum(per_example(hit) * mask)
        return sums

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        """Means over the split."""
        return means(totals)
