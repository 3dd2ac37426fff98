"""Inverted dropout that draws 16 random bits per element: half the random-number work of `nn.Dropout`."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

KEEP_BITS = 16  # keep probabilities are rounded to a multiple of 2**-16; outputs are scaled by the rounded one


def keep_mask(key: jax.Array, keep_prob: float, shape: Sequence[int]) -> tuple[jax.Array, float]:
    """A boolean mask of `shape`, each entry True with probability `keep_prob` rounded to 2**-16, and that
    rounded probability.

    JAX's partitionable threefry spends one 64-bit block per element whatever the width asked for, and
    `nn.Dropout` compares a float32 uniform per element; here each 32-bit draw gives two elements their
    16 bits, so a step with dropout hashes half as many blocks.
    """
    threshold = round(keep_prob * (1 << KEEP_BITS))
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = jnp.stack([words & 0xFFFF, words >> 16], axis=-1).reshape(-1)[:size]
    return (halves < threshold).reshape(shape), threshold / (1 << KEEP_BITS)


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
