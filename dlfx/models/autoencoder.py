"""MLP autoencoder; with `variational` its encoder returns a Gaussian's mean and log-variance (a VAE)."""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class Autoencoder(nn.Module):
    """Flattened input -> Dense-ReLU layers -> `latent_dim` code -> mirrored layers -> `output_shape`.

    `encode(x)` returns the code, or (mean, log-variance) when `variational`; `decode(z)` returns the
    reconstruction (logits for the `bce` objective); calling the module decodes the (mean) code.
    """

    output_shape: Sequence[int] = (8, 8, 1)  # filled from the data by the autoencoder task
    latent_dim: int = 16
    hidden_dims: Sequence[int] = (256, 128)
    variational: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)  # noqa: E731
        self.encoder = [dense(w, f"enc{i + 1}") for i, w in enumerate(self.hidden_dims)]
        self.code = dense(self.latent_dim, "code")
        self.log_variance = dense(self.latent_dim, "log_variance") if self.variational else None
        self.decoder = [dense(w, f"dec{i + 1}") for i, w in enumerate(reversed(self.hidden_dims))]
        self.reconstruction = dense(math.prod(self.output_shape), "reconstruction")

    def encode(self, x: jnp.ndarray, train: bool = False) -> Any:
        """The code of `x` (batch, latent_dim), or its (mean, log-variance) when variational."""
        h = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for layer in self.encoder:
            h = nn.relu(layer(h))
        mean = self.code(h).astype(jnp.float32)
        if self.variational:
            return mean, self.log_variance(h).astype(jnp.float32)
        return mean

    def decode(self, z: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """The reconstruction of code `z`, shaped (batch, *output_shape)."""
        h = z.astype(self.dtype)
        for layer in self.decoder:
            h = nn.relu(layer(h))
        return self.reconstruction(h).astype(jnp.float32).reshape((z.shape[0], *self.output_shape))

    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        code = self.encode(x, train)
        return self.decode(code[0] if self.variational else code, train)
