"""`Dense`: flax's `nn.Dense` whose matmul merges the input's leading axes into one, so XLA sees a 2-D product."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
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
