"""A research objective kept outside dlfx: denoising, scored against the noise level of the input."""

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from dlfx.tasks import apply_model, means


@dataclasses.dataclass(frozen=True)
class Denoising:
    """Mean squared error to the clean signal; eval also reports the input's own error and the gain in dB."""

    train_metrics: ClassVar[tuple[str, ...]] = ("loss",)
    eval_metrics: ClassVar[tuple[str, ...]] = ("loss", "input_mse", "gain_db")

    def loss(self, model, variables, batch, rng, train=True):
        """(mse, {'loss': mse}, updated mutable collections)."""
        out, updates = apply_model(model, variables, batch["x"], rng, train)
        mse = jnp.mean(jnp.square(out - batch["clean"]))
        return mse, {"loss": mse}, updates

    def eval_sums(self, model, variables, batch):
        """Per-example errors of the output and of the noisy input, summed over real examples."""
        out, _ = apply_model(model, variables, batch["x"], None, train=False)
        mask = batch["mask"]
        per_example = lambda a: jnp.mean(jnp.square(a - batch["clean"]).reshape(len(mask), -1), axis=1)  # noqa: E731
        return {"loss": jnp.sum(per_example(out) * mask), "input_mse": jnp.sum(per_example(batch["x"]) * mask),
                "count": jnp.sum(mask)}

    def finalize(self, totals):
        """Means, and how many dB the model lowered the error below the input's."""
        metrics = means(totals)
        metrics["gain_db"] = 10 * math.log10(metrics["input_mse"] / max(metrics["loss"], 1e-12))
        return metrics
