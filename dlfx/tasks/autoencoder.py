"""Autoencoding: reconstruct the input `x`; with `kl_weight > 0` a VAE whose ELBO terms are reported."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dlfx.errors import ConfigError
from dlfx.tasks.common import Batch, means

RECONSTRUCTIONS = ("mse", "bce")


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """Reconstruction error summed over each example's values (`mse`, or `bce` on logits for inputs in
    [0, 1]); with `kl_weight` > 0 the model's encoder gives a Gaussian's mean and log-variance, the task
    samples the code with the step's rng and adds `kl_weight` x KL(q(z|x) || N(0, I))."""

    kl_weight: float = 0.0
    reconstruction: str = "bce"

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"config.task.reconstruction={self.reconstruction!r} is not one of "
                              f"{', '.join(RECONSTRUCTIONS)}")
        if self.kl_weight < 0:
            raise ConfigError(f"config.task.kl_weight must be >= 0, got {self.kl_weight}")

    @property
    def variational(self) -> bool:
        """True for a VAE."""
        return self.kl_weight > 0

    @property
    def train_metrics(self) -> tuple[str, ...]:
        """Names the loss reports."""
        return ("loss", "reconstruction") + (("kl",) if self.variational else ())

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """Names `finalize` returns (`elbo` in nats per example, for a VAE)."""
        return ("loss", "reconstruction") + (("kl", "elbo") if self.variational else ())

    def model_defaults(self, dataset: Any) -> dict[str, Any]:
        """The model reconstructs the data's example shape, and is variational for a VAE."""
        return {"output_shape": tuple(dataset.example_shape), "variational": self.variational}

    def _reconstruction(self, out: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(jnp.float32).reshape(out.shape)
        error = optax.sigmoid_binary_cross_entropy(out, x) if self.reconstruction == "bce" else jnp.square(out - x)
        return error.reshape(error.shape[0], -1).sum(axis=1)

    def _terms(self, model: Any, variables: dict, x: jnp.ndarray, rng: jnp.ndarray | None):
        """Per-example reconstruction error and KL (zero for a plain autoencoder); `rng` None: the mean code."""
        if not self.variational:
            return self._reconstruction(model.apply(variables, x), x), jnp.zeros(x.shape[0])
        mean, log_variance = model.apply(variables, x, method="encode")
        z = mean if rng is None else mean + jnp.exp(0.5 * log_variance) * jax.random.normal(rng, mean.shape)
        kl = 0.5 * jnp.sum(jnp.exp(log_variance) + jnp.square(mean) - 1.0 - log_variance, axis=1)
        return self._reconstruction(model.apply(variables, z, method="decode"), x), kl

    def loss(self, model: Any, variables: dict, batch: Batch, rng: jnp.ndarray, train: bool = True):
        """(mean of reconstruction + kl_weight x KL, train metrics, no mutable updates)."""
        reconstruction, kl = self._terms(model, variables, batch["x"], rng)
        loss = jnp.mean(reconstruction + self.kl_weight * kl)
        metrics = {"loss": loss, "reconstruction": reconstruction.mean()}
        if self.variational:
            metrics["kl"] = kl.mean()
        return loss, metrics, {}

    def eval_sums(self, model: Any, variables: dict, batch: Batch) -> dict[str, jnp.ndarray]:
        """Sums over real examples; a VAE is scored with one sampled code per example (fixed key)."""
        mask = batch["mask"]
        rng = jax.random.PRNGKey(0) if self.variational else None
        reconstruction, kl = self._terms(model, variables, batch["x"], rng)
        sums = {"loss": jnp.sum((reconstruction + self.kl_weight * kl) * mask),
                "reconstruction": jnp.sum(reconstruction * mask), "count": jnp.sum(mask)}
        if self.variational:
            sums["kl"] = jnp.sum(kl * mask)
        return sums

    def finalize(self, totals: dict[str, float]) -> dict[str, float]:
        """Means over the split; for a VAE the ELBO = -(reconstruction + KL)."""
        metrics = means(totals)
        if self.variational:
            metrics["elbo"] = -(metrics["reconstruction"] + metrics["kl"])
        return metrics
