"""LSTM / GRU networks (flax `nn.RNN` over cells): a sequence classifier, or a character LM with `generate`."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dlfx.models.dense import Dense
from dlfx.models.dropout import Dropout
from dlfx.models.transformer import sample_logits

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class RNN(nn.Module):
    """Stacked (optionally bidirectional) LSTM/GRU.

    Without `vocab_size`: classifier over float sequences (B, T, F), mean-pooled over time -> `head`.
    With `vocab_size`: language model over tokens (B, T) -> next-token logits (B, T, vocab_size).
    """

    cell: str = "lstm"
    hidden_dim: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout_rate: float = 0.0
    num_classes: int = 10
    vocab_size: int | None = None
    embed_dim: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, carries: tuple | None = None,
                 return_carries: bool = False):
        if self.cell not in CELLS:
            raise ValueError(f"RNN cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.vocab_size and self.bidirectional:
            raise ValueError("a language model (vocab_size set) cannot be bidirectional")
        if self.vocab_size:
            x = nn.Embed(self.vocab_size, self.embed_dim, param_dtype=self.param_dtype, name="embed")(x)
        elif x.ndim == 2:
            x = x[..., None]
        x = x.astype(self.dtype)
        cell = functools.partial(CELLS[self.cell], self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        new_carries = []
        for i in range(self.num_layers):
            if self.bidirectional:
                layer = nn.Bidirectional(nn.RNN(cell(name=f"cell{i}_forward")),
                                         nn.RNN(cell(name=f"cell{i}_backward")))
                x = layer(x)
            else:
                initial = None if carries is None else carries[i]
                carry, x = nn.RNN(cell(name=f"cell{i}"), return_carry=True)(x, initial_carry=initial)
                new_carries.append(carry)
            x = Dropout(self.dropout_rate, deterministic=not train)(x)
        if self.vocab_size:
            logits = Dense(self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        else:
            logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x.mean(1))
        logits = logits.astype(jnp.float32)
        return (logits, tuple(new_carries)) if return_carries else logits


@functools.partial(jax.jit, static_argnames=("model", "length", "temperature"))
def generate(model: RNN, params: Any, prompt: jnp.ndarray, length: int, rng: jnp.ndarray,
             temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sample `length` tokens after `prompt` (B, P), carrying the recurrent state; returns (tokens, logits)."""
    if not model.vocab_size:
        raise ValueError("generate needs a language model (vocab_size set)")
    variables = {"params": params}
    logits, carries = model.apply(variables, prompt, return_carries=True)

    def step(carry, key):
        carries, last_logits = carry
        token = sample_logits(last_logits, key, temperature)
        logits, carries = model.apply(variables, token[:, None], carries=carries, return_carries=True)
        return (carries, logits[:, -1]), (token, last_logits)

    _, (tokens, token_logits) = lax.scan(step, (carries, logits[:, -1]), jax.random.split(rng, length))
    return tokens.T, jnp.swapaxes(token_logits, 0, 1)
