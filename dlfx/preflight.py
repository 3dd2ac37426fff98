"""Range checks on config values, run before a workdir is made: a bad value fails in one line, not mid-run."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from dlfx.errors import ConfigError

# key: (low, high, low_inclusive, high_inclusive); None = unbounded on that side
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "seed": (0, 2**32 - 1, True, True),  # jax.random.PRNGKey keeps 32 bits: larger seeds collide with small ones
    "data.crop_padding": (0, None, True, False),
    "data.train_fraction": (0, 1, False, True),
    "data.workers": (0, 64, True, True),
    "loss.label_smoothing": (0, 1, True, False),
    "optimizer.learning_rate": (0, None, True, False),
    "optimizer.end_learning_rate": (0, None, True, False),
    "optimizer.decay_factor": (0, None, False, False),
    "optimizer.weight_decay": (0, None, True, False),
    "optimizer.clip_norm": (0, None, True, False),
    "optimizer.momentum": (0, 1, True, False),
    "optimizer.b1": (0, 1, True, False),
    "optimizer.b2": (0, 1, True, False),
    "optimizer.eps": (0, None, False, False),
    "init_from.step": (-1, None, True, False),
    "parallel.num_devices": (0, None, True, False),
    "parallel.fsdp_min_size": (0, None, True, False),
}
# built-in model arguments, by name: rates and momenta are fractions, every other int is a size
MODEL_FRACTIONS = ("dropout_rate", "drop_path_rate", "bn_momentum")
MODEL_POSITIVE_FLOATS = ("layer_norm_epsilon",)


def _describe(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _in_range(value: float, low: float | None, high: float | None, low_in: bool, high_in: bool) -> bool:
    if low is not None and (value < low or (value == low and not low_in)):
        return False
    return high is None or value < high or (value == high and high_in)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _check_finite(key: str, value: Any) -> None:
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config.{key}={value!r} must be a finite number")


def _check_attention(config: ml_collections.ConfigDict, value: Any) -> None:
    """`model.attention`: a known kernel; cuDNN with bfloat16, splash per device on lengths it tiles (where they
    can run: `check_training_devices`)."""
    from dlfx.models.transformer import ATTENTION

    if value not in ATTENTION:
        raise ConfigError(f"config.model.attention={value!r} is not one of {', '.join(ATTENTION)}")
    if value == "cudnn" and config.precision.compute_dtype != "bfloat16":
        raise ConfigError(f"config.model.attention='cudnn' needs config.precision.compute_dtype='bfloat16', "
                          f"got {config.precision.compute_dtype!r}")
    if value == "splash":
        from dlfx.models.transformer import SPLASH_BLOCK

        if config.parallel.mode == "fsdp":  # a Pallas call is not split by the partitioner: it runs per device
            raise ConfigError("config.model.attention='splash' runs the kernel on each device's part of the batch: "
                              "use config.parallel.mode=auto, shard_map or pmap, not 'fsdp'")
        length = config.data.get("seq_len")
        if config.model.name == "gpt" and isinstance(length, int) and length % SPLASH_BLOCK:
            raise ConfigError(f"config.model.attention='splash' needs config.data.seq_len to be a multiple of "
                              f"{SPLASH_BLOCK}, got {length}")


def check_training_devices(config: ml_collections.ConfigDict) -> None:
    """What only training refuses (evaluating or sampling the run elsewhere is fine): cuDNN attention off a GPU,
    splash attention off a TPU."""
    import jax

    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"config.model.attention='cudnn' needs a CUDA GPU, but this run's backend is "
                          f"{jax.default_backend()}; use 'auto' (cuDNN on a GPU, XLA elsewhere)")
    if config.model.get("attention") == "splash" and jax.default_backend() != "tpu":
        raise ConfigError(f"config.model.attention='splash' needs a TPU, but this run's backend is "
                          f"{jax.default_backend()}; use 'auto' (XLA's attention there)")


def _check_model(config: ml_collections.ConfigDict) -> None:
    """Arguments of a built-in model: fractions in [0, 1), sizes >= 1 (a user's model checks its own)."""
    from dlfx import models

    if config.model.name not in models.REGISTRY:
        return
    for name in models.fields(config.model.name):
        if name not in config.model:
            continue
        value = config.model[name]
        if name == "attention":
            _check_attention(config, value)
            continue
        if name in MODEL_FRACTIONS and not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ConfigError(f"config.model.{name}={value!r} must be in [0, 1)")
        if name in MODEL_POSITIVE_FLOATS and not (isinstance(value, (int, float)) and value > 0):
            raise ConfigError(f"config.model.{name}={value!r} must be > 0")
        sizes = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in sizes):
            raise ConfigError(f"config.model.{name}={value!r}: sizes must be >= 1")


def check(config: ml_collections.ConfigDict, keys: list[str]) -> None:
    """Every float finite, every ranged key in its range, built-in model arguments sane; raise ConfigError."""
    for key in keys:
        _check_finite(key, _get(config, key))
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = _get(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config.{key} must be a number, got {value!r}")
        if not _in_range(value, low, high, low_in, high_in):
            raise ConfigError(f"config.{key}={value!r} must be {_describe(low, high, low_in, high_in)}")
    boundaries = list(config.optimizer.boundaries)
    if any(not 0 < b < 1 for b in boundaries) or boundaries != sorted(boundaries):
        raise ConfigError(f"config.optimizer.boundaries={tuple(boundaries)!r} must be increasing fractions "
                          "of the run, each in (0, 1)")
    for key in ("parallel.data", "parallel.fsdp"):
        if _get(config, key) == 0 or _get(config, key) < -1:
            raise ConfigError(f"config.{key}={_get(config, key)!r} must be -1 (the devices left) or >= 1")
    _check_model(config)
