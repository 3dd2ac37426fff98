"""Inverted dropout whose random bits are JAX's threefry, written out so XLA fuses them into the select."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KEEP_BITS = 32  # keep probabilities are rounded to a multiple of 2**-32; outputs are scaled by the rounded one
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32, 20 rounds, as jax.random uses it


def random_bits(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`jax.random.bits(key, shape, jnp.uint32)` for a threefry key (under the default partitionable threefry),
    as plain integer ops that XLA fuses into their consumer.

    `jax.random.bits` goes through the `threefry2x32` primitive, which XLA:CPU runs as a rolled loop over
    whole arrays and the GPU as a kernel of its own, so every draw is written to memory and read back. Here
    the 20 rounds are spelled out and each element hashes its own count, so a mask is computed where it is
    used. Counts come from an iota per axis, so a sharded mask is drawn in parts. A key of another generator,
    or a shape of 2**32 elements or more, goes through `jax.random.bits`.
    """
    shape = tuple(shape)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    if (typed and "threefry" not in str(jax.random.key_impl(key))) or data.shape != (2,) \
            or math.prod(shape) >= 1 << 32 or not jax.config.jax_threefry_partitionable:
        return jax.random.bits(key, shape, jnp.uint32)
    count, stride = jnp.zeros(shape, jnp.uint32), 1
    for axis in reversed(range(len(shape))):
        count = count + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % (1 << 32))
        stride *= shape[axis]  # past 2**32 only beside an empty axis, where no count is used
    first, second = _threefry2x32(data[0], data[1], jnp.zeros(shape, jnp.uint32), count)
    return first ^ second


def _threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 block function (Salmon et al., 2011), unrolled."""
    keys = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r)))
        x0, x1 = x0 + keys[(i + 1) % 3], x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def keep_mask(key: jax.Array, keep_prob: float, shape: Sequence[int]) -> tuple[jax.Array, float]:
    """A boolean mask of `shape`, each entry True with probability `keep_prob` rounded to 2**-32 (and below 1),
    and that rounded probability; the bits are `random_bits(key, shape)`."""
    threshold = min(round(keep_prob * (1 << KEEP_BITS)), (1 << KEEP_BITS) - 1)
    return random_bits(key, shape) < np.uint32(threshold), threshold / (1 << KEEP_BITS)


class Dropout(nn.Module):
    """`nn.Dropout`'s interface (`rate`, `broadcast_dims`, `deterministic`, the `dropout` rng or an `rng`
    argument) with fused threefry bits (`keep_mask`); kept values are scaled by 1 / the rounded keep probability,
    so the expected output equals the input (up to rounding that scale to the input's dtype, e.g. bfloat16)."""

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
