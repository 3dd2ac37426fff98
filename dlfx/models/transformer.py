"""Pre-LN Transformer: blocks with a KV cache, an encoder classifier and a GPT-style decoder LM.

Parameter names (`wte`, `wpe`, `h/<i>/ln1`, `attn/qkv`, `attn/proj`, `mlp/fc1`, `ln_f`) mirror GPT-2's
so Hugging Face weights map onto them directly.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dlfx.models.dense import Dense, DenseGelu
from dlfx.models.dropout import Dropout

ATTENTION = ("auto", "xla", "cudnn", "splash")  # `attention` field: which fused kernel attention runs on
SPLASH_BLOCK = 128  # the splash kernel's default block: sequence lengths must be a multiple of it


def fused_implementation(attention: str, dtype: Any, head_dim: int, length: int, train: bool = True) -> str:
    """Which fused kernel runs attention over sequences of `length` (in training or not): 'cudnn' (flash
    attention on a GPU), 'splash' (Pallas on a TPU) or 'xla'; `auto` picks cuDNN where it applies, else XLA."""
    if attention not in ATTENTION:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTION)}")
    if attention == "cudnn" and jax.default_backend() != "gpu":
        return "xla"  # a run trained with cuDNN, evaluated or sampled off a GPU: the same math
    if attention == "splash":
        return "splash" if jax.default_backend() == "tpu" else "xla"  # likewise off a TPU
    heads_fit = head_dim <= 128 and head_dim % 8 == 0
    even = length % 2 == 0  # JAX's cuDNN attention (0.11) differentiates only even lengths (a ViT's 196 + cls)
    if attention == "cudnn" and not heads_fit:
        raise ValueError(f"attention='cudnn' needs heads of at most 128 channels, a multiple of 8; got {head_dim}")
    if attention == "cudnn" and not even:
        if train:
            raise ValueError(f"attention='cudnn' trains only on an even sequence length; got {length} (use 'auto')")
        return "xla"  # evaluation and sampling (a prompt's first token): the same math
    if attention != "auto":
        return attention
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if jax.default_backend() == "gpu" and half and heads_fit and even else "xla"


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, interpret: bool = False) -> jax.Array:
    """Softmax attention over (batch, length, heads, head_dim) inputs by JAX's Pallas splash-attention kernel
    (TPU); `interpret=True` runs the kernel through the Pallas interpreter on any backend (slow: for tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = q.shape
    if length % SPLASH_BLOCK:
        raise ValueError(f"attention='splash' needs a sequence length that is a multiple of {SPLASH_BLOCK}; "
                         f"got inputs of shape {tuple(q.shape)}")
    mask = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # the kernel takes (heads, length, head_dim)
    out = jax.vmap(kernel)((q * (1.0 / math.sqrt(head_dim))).astype(k.dtype), k, v)
    return out.transpose(0, 2, 1, 3)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                      drop: Any = None, record: Any = None) -> jax.Array:
    """softmax(QK^T / sqrt(head_dim)) V over (batch, length, heads, head_dim) inputs: the `xla` kernel.

    Two einsums with heads ahead of positions, the rows normalised after the second product (one pass less
    over the weights): on XLA:CPU its gradient ran ~1.7x faster than `jax.nn.dot_product_attention`'s XLA
    path (see benchmarks/RESULTS.md). `mask` (broadcast to (batch, heads, q, k)) keeps True; `drop` (dropout)
    gets the unnormalised weights, which it scales like the normalised ones; `record` gets the weights.
    """
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:  # every row keeps a key (its own position), so no row is all -1e30
        scores = scores + jnp.where(mask, 0.0, -1e30)
    exps = jnp.exp(scores - lax.stop_gradient(scores.max(axis=-1, keepdims=True)))  # softmax is shift-invariant
    totals = exps.sum(axis=-1, keepdims=True)
    if record is not None:
        record((exps / totals).astype(v.dtype))
    weights = exps.astype(v.dtype)
    if drop is not None:
        weights = drop(weights)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v, preferred_element_type=jnp.float32) / totals  # f32: unnormalised
    return out.astype(v.dtype).transpose(0, 2, 1, 3)


class SelfAttention(nn.Module):
    """Multi-head self-attention; with `decode=True` keys/values are appended to a 'cache' collection.

    `attention` picks the kernel: auto = cuDNN flash attention (`jax.nn.dot_product_attention`) on a GPU for
    bf16/fp16, else `softmax_attention` compiled by XLA; `splash` = JAX's Pallas splash kernel on a TPU. The
    XLA kernel runs whenever the weights are needed: when 'intermediates' is mutable (they are sown there,
    e.g. for `dlfx interpret --method attention`) or when dropout applies to them (training with
    `dropout_rate > 0`), and for decoding from a filled KV cache (with a position mask).
    """

    num_heads: int
    max_len: int
    causal: bool = False
    decode: bool = False
    dropout_rate: float = 0.0
    attention: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        batch, length, embed = x.shape
        if embed % self.num_heads:
            raise ValueError(f"embed_dim={embed} is not divisible by num_heads={self.num_heads}")
        head_dim = embed // self.num_heads
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * embed, name="qkv")(x).reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q_pos = jnp.arange(length)
        k_pos = jnp.arange(length)
        from_cache = False
        if self.decode:
            initialized = self.has_variable("cache", "key")
            cache_shape = (batch, self.max_len, self.num_heads, head_dim)
            cached_k = self.variable("cache", "key", jnp.zeros, cache_shape, k.dtype)
            cached_v = self.variable("cache", "value", jnp.zeros, cache_shape, v.dtype)
            index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
            if initialized:
                start = index.value
                cached_k.value = lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
                cached_v.value = lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
                index.value = start + length
                k, v = cached_k.value, cached_v.value
                q_pos = start + jnp.arange(length)
                k_pos = jnp.arange(self.max_len)
                from_cache = True
        causal = self.causal or self.decode
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None] if causal else None  # (1, 1, q, k)
        record = functools.partial(self.sow, "intermediates", "attention_weights") \
            if self.is_mutable_collection("intermediates") else None
        drop = Dropout(self.dropout_rate, deterministic=not train) if train and self.dropout_rate > 0 else None
        weights_needed = record is not None or drop is not None
        kernel = "xla" if weights_needed or from_cache else fused_implementation(self.attention, q.dtype, head_dim,
                                                                                    length, train)
        if kernel == "splash" and self.decode:
            kernel = "xla"  # sampling: the cache's first call and prompts of any length
        if kernel == "splash":
            out = splash_attention(q, k, v, causal, interpret=jax.default_backend() != "tpu")
        elif kernel == "cudnn":
            out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        else:
            out = softmax_attention(q, k, v, mask, drop, record)
        out = out.reshape(batch, length, embed)
        return dense(embed, name="proj")(out)


class Block(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + MLP(LN(x)); dropout and drop-path on both branches."""

    num_heads: int
    mlp_dim: int
    max_len: int
    causal: bool = False
    decode: bool = False
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_epsilon: float = 1e-5
    gelu_approximate: bool = True  # tanh GELU (GPT-2); False: exact erf GELU (BERT, ViT)
    attention: str = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                                 param_dtype=self.param_dtype)

        def branch(y):
            y = Dropout(self.dropout_rate, deterministic=not train)(y)
            return Dropout(self.drop_path_rate, broadcast_dims=tuple(range(1, y.ndim)), deterministic=not train)(y)

        y = SelfAttention(self.num_heads, self.max_len, self.causal, self.decode, self.dropout_rate, self.attention,
                          self.dtype, self.param_dtype, name="attn")(norm(name="ln1")(x), train)
        x = x + branch(y)
        y = norm(name="ln2")(x)
        y = DenseGelu(self.mlp_dim, approximate=self.gelu_approximate, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="fc1")(y)
        y = dense(x.shape[-1], name="fc2")(y)
        return x + branch(y)


class _ScannedBlock(nn.Module):
    """A Block in the (carry, x) -> (carry, y) form `nn.scan` needs."""

    block_kwargs: dict
    train: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, _: Any) -> tuple[jnp.ndarray, None]:
        return Block(**self.block_kwargs, name="block")(x, self.train), None


class Stack(nn.Module):
    """`num_layers` Blocks named `h/<i>`; `remat` recomputes activations, `scan_layers` stacks params."""

    num_layers: int
    block_kwargs: dict
    drop_path_rate: float = 0.0
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.scan_layers:  # one compiled block for all layers; drop-path rate is uniform here
            cls = nn.remat(_ScannedBlock) if self.remat else _ScannedBlock
            scanned = nn.scan(cls, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                              split_rngs={"params": True, "dropout": True}, length=self.num_layers)
            x, _ = scanned(dict(self.block_kwargs, drop_path_rate=self.drop_path_rate), train, name="h")(x, None)
            return x
        cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        for i in range(self.num_layers):
            rate = self.drop_path_rate * i / max(self.num_layers - 1, 1)
            x = cls(**self.block_kwargs, drop_path_rate=rate, name=f"h_{i}")(x, train)
        return x


def _block_kwargs(m: nn.Module, causal: bool, decode: bool = False) -> dict:
    return dict(num_heads=m.num_heads, mlp_dim=m.mlp_dim or 4 * m.embed_dim, max_len=m.max_len, causal=causal,
                decode=decode, dropout_rate=m.dropout_rate, layer_norm_epsilon=m.layer_norm_epsilon,
                gelu_approximate=m.gelu_approximate, attention=m.attention, dtype=m.dtype, param_dtype=m.param_dtype)


class TransformerEncoder(nn.Module):
    """Bidirectional encoder classifier over sequences: float (B, T, F) or tokens (B, T) with `vocab_size`."""

    num_classes: int = 10
    vocab_size: int | None = None
    max_len: int = 512
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 128
    mlp_dim: int | None = None
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    scan_layers: bool = False
    layer_norm_epsilon: float = 1e-5
    gelu_approximate: bool = True
    attention: str = "auto"  # auto | xla | cudnn (see SelfAttention)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.vocab_size:
            x = nn.Embed(self.vocab_size, self.embed_dim, param_dtype=self.param_dtype, name="wte")(x)
        else:
            x = x[..., None] if x.ndim == 2 else x
            x = Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(x)
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        wpe = self.param("wpe", nn.initializers.normal(0.02), (self.max_len, self.embed_dim), self.param_dtype)
        x = add_positions(x, wpe, dtype=self.dtype)
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
        x = Stack(self.num_layers, _block_kwargs(self, causal=False), self.drop_path_rate, self.remat,
                  self.scan_layers, name="h")(x, train)
        x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f")(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x.mean(axis=1))
        return x.astype(jnp.float32)


class GPT(nn.Module):
    """Decoder-only LM: token + learned position embeddings, causal blocks, final LN, head tied to `wte`."""

    vocab_size: int = 256
    max_len: int = 256
    num_layers: int = 4
    num_heads: int = 4
    embed_dim: int = 256
    mlp_dim: int | None = None
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    scan_layers: bool = False
    decode: bool = False  # autoregressive decoding with a KV cache (see `generate`)
    layer_norm_epsilon: float = 1e-5
    gelu_approximate: bool = True  # GPT-2's tanh GELU
    attention: str = "auto"  # auto | xla | cudnn (see SelfAttention)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        length = tokens.shape[1]
        start = jnp.zeros((), jnp.int32)
        if self.decode:
            position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            if not self.is_initializing():
                start = position.value
                position.value = start + length
        elif length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        wte = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=nn.initializers.normal(0.02),
                       param_dtype=self.param_dtype, name="wte")
        wpe = self.param("wpe", nn.initializers.normal(0.01), (self.max_len, self.embed_dim), self.param_dtype)
        x = add_positions(wte(tokens), wpe, start, self.decode, self.dtype)
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
        x = Stack(self.num_layers, _block_kwargs(self, causal=True, decode=self.decode), self.drop_path_rate,
                  self.remat, self.scan_layers, name="h")(x, train)
        x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f")(x)
        logits = wte.attend(x.reshape(-1, x.shape[-1]).astype(self.param_dtype))  # 2-D: see dense.flat_dot_general
        return logits.reshape(*x.shape[:-1], self.vocab_size).astype(jnp.float32)


def position_rows(wpe: jnp.ndarray, length: int, start: Any = 0, decode: bool = False) -> jnp.ndarray:
    """The `length` rows of `wpe` from `start` (decoding, a traced position) or from 0."""
    # a start known here (decoding) is checked too; a traced one is its caller's to check (`generate` does)
    first = int(start) if decode and isinstance(start, (int, np.integer)) else 0
    if length < 0 or first < 0 or first + length > wpe.shape[0]:  # slices and gathers would clip or wrap silently
        raise ValueError(f"positions {first}..{first + length - 1} asked of a position table of {wpe.shape[0]} "
                         f"rows (wpe {wpe.shape})")
    if decode:
        return lax.dynamic_slice_in_dim(wpe, start, length)
    if jax.default_backend() == "gpu":
        # Gathered, not sliced. The rows' gradient sums the batch axis; flowing into `wpe` directly (T == max_len)
        # or through a slice's gradient, XLA:GPU laid the whole residual stream out batch-minor and wrapped every dense layer in
        # transposes (H200, gpt124m: 683 transposing fusions; 1.08x without them). Scattered into `wpe` it keeps
        # the batch major (deviceless char-GPT: 75 -> 12 transposing kernels, the 12 are attention's). A matmul
        # with ones as the gradient did not hold: XLA:GPU turns it back into that reduction at HIGHEST precision
        # and at small sizes. On XLA:CPU the slice stays (no layout problem there).
        return jnp.take(wpe, jnp.arange(length), axis=0, mode="clip")
    return wpe[:length]


def add_positions(x: jnp.ndarray, wpe: jnp.ndarray, start: Any = 0, decode: bool = False,
                  dtype: Any = None) -> jnp.ndarray:
    """x (batch, length, dim) plus the position embeddings (rows of `wpe`) from `start` (decoding) or 0, as
    `dtype` (default: the sum's own)."""
    rows = position_rows(wpe, x.shape[1], start, decode)
    return (x + rows).astype(jnp.result_type(x, rows) if dtype is None else dtype)


def sample_logits(logits: jnp.ndarray, rng: jnp.ndarray, temperature: float) -> jnp.ndarray:
    """Greedy (temperature 0) or temperature-scaled categorical sampling of the next token."""
    if temperature <= float(np.finfo(np.float32).tiny):  # 0, or so small that float32 would divide by zero
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature  # the best at 0: never inf - inf
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "length", "temperature"))
def generate(model: GPT, params: Any, prompt: jnp.ndarray, length: int, rng: jnp.ndarray,
             temperature: float = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sample `length` tokens after `prompt` (B, P) with a KV cache; returns (tokens (B, length), their logits)."""
    if prompt.shape[1] + length > model.max_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + length ({length}) exceeds max_len={model.max_len}")
    decoder = model.clone(decode=True, dropout_rate=0.0)
    shapes = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), prompt[:, :1])["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    logits, updated = decoder.apply({"params": params, "cache": cache}, prompt, mutable=["cache"])

    def step(carry, key):
        cache, last_logits = carry
        token = sample_logits(last_logits, key, temperature)
        logits, updated = decoder.apply({"params": params, "cache": cache}, token[:, None], mutable=["cache"])
        return (updated["cache"], logits[:, -1]), (token, last_logits)

    _, (tokens, token_logits) = lax.scan(step, (updated["cache"], logits[:, -1]), jax.random.split(rng, length))
    return tokens.T, jnp.swapaxes(token_logits, 0, 1)
