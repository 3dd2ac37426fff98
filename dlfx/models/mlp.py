"""Multi-layer perceptron classifier."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dlfx.models.dropout import Dropout


class MLP(nn.Module):
    """Flattens its input, then Dense-ReLU-Dropout layers and a linear `head`."""

    num_classes: int = 10
    hidden_dims: Sequence[int] = (256, 256)
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense{i + 1}")(x)
            x = nn.relu(x)
            x = Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return x.astype(jnp.float32)
