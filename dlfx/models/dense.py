"""`Dense`: flax's `nn.Dense` whose matmul merges the input's leading axes into one, so XLA sees a 2-D product;
`DenseGelu`: the same layer followed by a GELU whose gradient recomputes it (on a GPU)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def flat_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, **kwargs: Any) -> jax.Array:
    """`lax.dot_general` for a dense layer, (..., in) x (in, out), with the leading axes of `lhs` merged first:
    the same numbers, but the weight gradient is then a plain 2-D product of (rows, in) and (rows, out), which
    XLA:CPU runs faster than the contraction over two axes that differentiating the 3-D product gives. Any
    other contraction goes to `lax.dot_general` as it is; keyword arguments (`precision`, ...) pass through.
    Merging the axes keeps a sharding of the leading (batch) axis, as dlfx shards activations; an activation
    sharded on a later leading axis would be gathered first."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if lhs.ndim <= 2 or rhs.ndim != 2 or any(batch) or tuple(lhs_contract) != (lhs.ndim - 1,) \
            or tuple(rhs_contract) != (0,):
        return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)
    out = lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), **kwargs)
    return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


def Dense(features: int, **kwargs: Any) -> nn.Dense:  # noqa: N802 (used as the module class it returns)
    """`nn.Dense(features, **kwargs)` computing through `flat_dot_general`: the same parameters and outputs."""
    return nn.Dense(features, dot_general=flat_dot_general, **kwargs)


def biased_gelu(z: jax.Array, bias: jax.Array, approximate: bool) -> jax.Array:
    """`gelu(z + bias)`: the GELU of a matmul output `z` and its bias."""
    return nn.gelu(z + bias, approximate=approximate)


def recomputed_gelu(z: jax.Array, bias: jax.Array, approximate: bool) -> jax.Array:
    """`biased_gelu`, checkpointed: the reverse pass recomputes the sum and the GELU from `z` and `bias`
    (behind an optimization barrier), so the forward stores nothing but its output; XLA:GPU otherwise wrote
    the biased sum out beside the output and read both back."""
    return jax.checkpoint(biased_gelu, static_argnums=(2,))(z, bias, approximate)


class DenseGelu(nn.Module):
    """`gelu(Dense(features)(x))` with `Dense`'s parameters (`kernel`, `bias`) and numbers. On a GPU the GELU's
    gradient is recomputed from the matmul's output (`recomputed_gelu`): a deviceless XLA:GPU compile of the
    gpt124m step moved 4.8 GB less a step (42.6 -> 37.7 GB through its memory-bound kernels); elsewhere the plain
    GELU."""

    features: int
    approximate: bool = True  # tanh GELU (GPT-2); False: the exact erf GELU
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """The GELU of the layer's output for `x` (..., in) -> (..., features)."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        z = flat_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        gelu = recomputed_gelu if jax.default_backend() == "gpu" else biased_gelu
        return gelu(z, bias, self.approximate)
