"""Vision Transformer: patch embedding, cls token or mean pooling, learned position embeddings."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dlfx.models.dropout import Dropout
from dlfx.models.transformer import Stack, add_positions


class ViT(nn.Module):
    """ViT over NHWC images, reusing the pre-LN Transformer blocks (`h/h_<i>`)."""

    num_classes: int = 10
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    embed_dim: int = 768
    mlp_dim: int | None = None
    pool: str = "cls"  # 'cls' token or 'mean' over patches
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    scan_layers: bool = False
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = False  # ViT uses the exact erf GELU
    attention: str = "auto"  # auto | xla | cudnn (see transformer.SelfAttention)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.ndim != 4:
            raise ValueError(f"ViT expects NHWC images, got shape {x.shape}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"ViT pool must be 'cls' or 'mean', got {self.pool!r}")
        height, width = x.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image {height}x{width} is not divisible into {self.patch_size}-pixel patches")
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="patch_embed")(x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.embed_dim)
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.embed_dim), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.embed_dim)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.embed_dim), self.param_dtype)
        x = add_positions(x, pos[0].astype(self.dtype), dtype=self.dtype)
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.embed_dim,
                            max_len=x.shape[1], dropout_rate=self.dropout_rate,
                            layer_norm_epsilon=self.layer_norm_epsilon, gelu_approximate=self.gelu_approximate,
                            attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype)
        x = Stack(self.num_layers, block_kwargs, self.drop_path_rate, self.remat, self.scan_layers, name="h")(x, train)
        x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_f")(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x).astype(jnp.float32)
