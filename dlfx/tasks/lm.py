"""Language modelling: next-token cross-entropy of per-token logits against the shifted tokens `y`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp

from dlfx import losses
from dlfx.tasks.common import Batch, apply_model, cross_entropy, means


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    """Token-weighted next-token cross-entropy; reports loss, accuracy, perplexity and bits per token
    (per character for character-level text)."""

    label_smoothing: float = 0.0
    vocab_size: int = 0  # filled from the data set
    char_level: bool = True  # bits per token are bits per character

    train_metrics: ClassVar[tuple[str, ...]] = ("loss", "accuracy")

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """Names `finalize` returns."""
        return ("loss", "accuracy", "perplexity", "bits_per_char" if self.char_level else "bits_per_token")

    def model_defaults(self, dataset: Any) -> dict[str, Any]:
        """Model arguments the data decides: the vocabulary size."""
        return {"vocab_size": dataset.num_classes}

    def loss(self, model: Any, variables: dict, batch: Batch, rng: jnp.ndarray, train: bool = True):
        """(mean loss over every token, train metrics, updated mutable collections) of one batch."""
        return cross_entropy(model, variables, batch, rng, train, self.label_smoothing)

    def eval_sums(self, model: Any, variables: dict, batch: Batch) -> dict[str, jnp.ndarray]:
        """Sums of per-sequence mean loss/accuracy over real sequences (all have the same length, so this
        is token-weighted), and their count."""
        logits, _ = apply_model(model, variables, batch["x"], None, train=False)
        return losses.masked_sums(logits, batch["y"], batch["mask"])

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        """Means over the split, perplexity and bits per token."""
        metrics = means(totals)
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
        metrics["bits_per_char" if self.char_level else "bits_per_token"] = metrics["loss"] / math.log(2)
        return metrics
