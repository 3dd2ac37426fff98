"""Inverted dropout that draws 16 random bits per element: a quarter of the threefry blocks of `nn.Dropout`."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax

KEEP_BITS = 16  # keep probabilities are rounded to a multiple of 2**-16; outputs are scaled by the rounded one


def keep_mask(key: jax.Array, keep_prob: float, shape: Sequence[int]) -> tuple[jax.Array, float]:
    """A boolean mask of `shape`, each entry True with probability `keep_prob` rounded to 2**-16, and that
    rounded probability.

    JAX's partitionable threefry (`jax.random.bits`) hashes one block per element and keeps 32 bits of its 64,
    and `nn.Dropout` compares a float32 uniform per element; here each block's two 32-bit words give four
    elements their 16 bits: a quarter of the blocks. The counts are laid out over the mask's own leading axes,
    so a mask sharded on its batch axis is drawn in parts, as `jax.random.bits` is.
    """
    threshold = round(keep_prob * (1 << KEEP_BITS))
    shape = tuple(shape)
    lead, last = shape[:-1], (shape[-1] if shape else 1)
    blocks = (*lead, (last + 3) // 4)
    first, second = _block_words(key, blocks)
    values = jnp.stack([first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16], axis=-1)
    values = values.reshape(*lead, blocks[-1] * 4)[..., :last].reshape(shape)
    return values < threshold, threshold / (1 << KEEP_BITS)


def _block_words(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Both 32-bit words of one threefry block per entry of `shape` (block i of the flat layout hashes count
    i); `jax.random.bits` for a key of another generator."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    if (typed and "threefry" not in str(jax.random.key_impl(key))) or data.shape != (2,):
        words = jax.random.bits(key, (*shape, 2), jnp.uint32)
        return words[..., 0], words[..., 1]
    count, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        count = count + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % (1 << 32))
        stride *= shape[axis]
    first, second = jax.extend.random.threefry2x32_p.bind(data[0], data[1], jnp.zeros(shape, jnp.uint32), count)
    return first, second


class Dropout(nn.Module):
    """`nn.Dropout`'s interface (`rate`, `broadcast_dims`, `deterministic`, the `dropout` rng or an `rng`
    argument) with 16-bit draws (`keep_mask`); the mean of the output equals the input's exactly."""

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate >= 1.0:
            return jnp.zeros_like(inputs)
        broadcast = {d % inputs.ndim for d in self.broadcast_dims}  # negative dims count from the end
        shape = tuple(1 if d in broadcast else n for d, n in enumerate(inputs.shape))
        key = self.make_rng(self.rng_collection) if rng is None else rng
        mask, keep = keep_mask(key, 1.0 - self.rate, shape)
        if keep == 0.0:
            return jnp.zeros_like(inputs)
        return lax.select(jnp.broadcast_to(mask, inputs.shape), inputs / keep,
                          jnp.zeros_like(inputs))
