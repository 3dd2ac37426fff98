"""Small convolutional classifiers: a LeNet-style 2-D CNN for images and a 1-D CNN for sequences."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dlfx.models.dropout import Dropout


def _norm(use_batch_norm: bool, train: bool, axis_name: str | None, momentum: float, dtype: Any,
          param_dtype: Any, name: str) -> nn.Module:
    """Batch norm whose statistics are averaged over `axis_name` (the device axis) when set."""
    if not use_batch_norm:
        return lambda x: x
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, axis_name=axis_name,
                        dtype=dtype, param_dtype=param_dtype, name=name)


class CNN(nn.Module):
    """LeNet-style CNN on NHWC images: [conv-BN-ReLU-maxpool] blocks, a hidden Dense layer, a `head`."""

    num_classes: int = 10
    features: Sequence[int] = (32, 64)
    kernel_size: int = 3
    hidden_dim: int = 128
    dropout_rate: float = 0.0
    use_batch_norm: bool = True
    bn_momentum: float = 0.9
    freeze_bn: bool = False  # batch norm always uses its running statistics (e.g. a frozen backbone)
    axis_name: str | None = None  # device axis for synced batch-norm statistics
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.ndim != 4:
            raise ValueError(f"CNN expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (self.kernel_size, self.kernel_size), use_bias=not self.use_batch_norm,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
            x = _norm(self.use_batch_norm, train and not self.freeze_bn, self.axis_name, self.bn_momentum, self.dtype,
                      self.param_dtype, f"bn{i + 1}")(x)
            x = nn.relu(x)
            if min(x.shape[1:3]) >= 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")(x)
        x = nn.relu(x)
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return x.astype(jnp.float32)


class CNN1D(nn.Module):
    """1-D CNN on (batch, time, features) sequences: strided [conv-BN-ReLU] blocks, flatten, `head`."""

    num_classes: int = 10
    features: Sequence[int] = (32, 32, 32)
    kernel_size: int = 5
    stride: int = 2
    dropout_rate: float = 0.0
    use_batch_norm: bool = True
    bn_momentum: float = 0.9
    freeze_bn: bool = False
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if x.ndim == 2:  # (batch, time) -> one feature per step
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"CNN1D expects (batch, time, features), got shape {x.shape}")
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (self.kernel_size,), strides=(self.stride,), use_bias=not self.use_batch_norm,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i + 1}")(x)
            x = _norm(self.use_batch_norm, train and not self.freeze_bn, self.axis_name, self.bn_momentum, self.dtype,
                      self.param_dtype, f"bn{i + 1}")(x)
            x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return x.astype(jnp.float32)
