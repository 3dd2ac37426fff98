"""A research model kept outside dlfx: a 1-D convolutional denoiser (input and output shaped (length, 1))."""

import flax.linen as nn
import jax.numpy as jnp


class Denoiser(nn.Module):
    """Residual 1-D conv net predicting the clean signal from a noisy one."""

    features: int = 32
    num_layers: int = 3
    kernel_size: int = 5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        h = x.astype(self.dtype)
        for _ in range(self.num_layers):
            h = nn.gelu(nn.Conv(self.features, (self.kernel_size,), dtype=self.dtype,
                                param_dtype=self.param_dtype)(h))
        return x + nn.Conv(x.shape[-1], (self.kernel_size,), dtype=self.dtype, param_dtype=self.param_dtype)(h)
