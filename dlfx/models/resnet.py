"""ResNet-18/34/50 (v1.5: stride on the 3x3 conv), for images (NHWC) and 1-D sequences (NWC).

Layer names follow torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_conv`, ...)
so a torchvision state dict maps onto them one-to-one; the classifier is named `head` (torchvision `fc`).
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dlfx.models.dropout import Dropout

STAGES = {10: ((1, 1, 1, 1), "basic"), 18: ((2, 2, 2, 2), "basic"), 34: ((3, 4, 6, 3), "basic"), 50: ((3, 4, 6, 3), "bottleneck")}


class ResidualBlock(nn.Module):
    """Basic (two 3x3 convs) or bottleneck (1x1-3x3-1x1, 4x expansion) block with optional drop-path."""

    features: int
    strides: int
    bottleneck: bool
    norm: Any
    conv: Any
    ndim: int
    drop_path_rate: float = 0.0
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        k1, k3, s = (1,) * self.ndim, (3,) * self.ndim, (self.strides,) * self.ndim
        pad1, pad3 = [(0, 0)] * self.ndim, [(1, 1)] * self.ndim  # torchvision's symmetric padding
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        if self.bottleneck:
            y = nn.relu(self.norm(name="bn1")(self.conv(self.features, k1, padding=pad1, name="conv1")(x)))
            y = nn.relu(self.norm(name="bn2")(self.conv(self.features, k3, strides=s, padding=pad3, name="conv2")(y)))
            out_features = self.features * 4
            y = self.norm(name="bn3", scale_init=last_scale)(self.conv(out_features, k1, padding=pad1, name="conv3")(y))
        else:
            y = nn.relu(self.norm(name="bn1")(self.conv(self.features, k3, strides=s, padding=pad3, name="conv1")(x)))
            out_features = self.features
            y = self.norm(name="bn2", scale_init=last_scale)(self.conv(out_features, k3, padding=pad3, name="conv2")(y))
        if x.shape[-1] != out_features or self.strides != 1:
            x = self.conv(out_features, k1, strides=s, padding=pad1, name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        # stochastic depth: drop the whole residual branch per example
        y = Dropout(self.drop_path_rate, broadcast_dims=tuple(range(1, y.ndim)), deterministic=not train)(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet over 2-D images (N, H, W, C) or 1-D sequences (N, T, C); depth 10, 18, 34 or 50.

    stem='imagenet': 7x7/2 conv + 3x3/2 max-pool; stem='cifar': one 3x3/1 conv, no pool (tiny inputs).
    """

    depth: int = 18
    num_classes: int = 1000
    width: int = 64  # channels of the first stage; doubled at each later stage
    stem: str = "imagenet"
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this over the blocks
    zero_init_last_bn: bool = False
    bn_momentum: float = 0.9
    freeze_bn: bool = False  # batch norm always uses its running statistics (e.g. a frozen backbone)
    axis_name: str | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.depth not in STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGES)}, got {self.depth}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if x.ndim == 2:
            x = x[..., None]
        ndim = x.ndim - 2
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train or self.freeze_bn, momentum=self.bn_momentum, epsilon=1e-5,
                       axis_name=self.axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.width, (7,) * ndim, strides=(2,) * ndim, padding=[(3, 3)] * ndim, name="conv1")(x)
        else:
            x = conv(self.width, (3,) * ndim, padding=[(1, 1)] * ndim, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3,) * ndim, strides=(2,) * ndim, padding=[(1, 1)] * ndim)
        stage_sizes, kind = STAGES[self.depth]
        total_blocks, index = sum(stage_sizes), 0
        for stage, num_blocks in enumerate(stage_sizes):
            for block in range(num_blocks):
                rate = self.drop_path_rate * index / max(total_blocks - 1, 1)
                x = ResidualBlock(self.width * 2**stage, strides=2 if stage > 0 and block == 0 else 1,
                                  bottleneck=kind == "bottleneck", norm=norm, conv=conv, ndim=ndim,
                                  drop_path_rate=rate, zero_init_last_bn=self.zero_init_last_bn,
                                  name=f"layer{stage + 1}_{block}")(x, train)
                index += 1
        x = jnp.mean(x, axis=tuple(range(1, 1 + ndim)))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return x.astype(jnp.float32)


ResNet18 = partial(ResNet, depth=18)
ResNet34 = partial(ResNet, depth=34)
ResNet50 = partial(ResNet, depth=50)
