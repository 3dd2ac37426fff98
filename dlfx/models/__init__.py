"""Model zoo: pure flax.linen Modules and the `build(name, **kwargs)` registry."""

import dataclasses

import flax.linen as nn

from dlfx.errors import ConfigError
from dlfx.models.cnn import CNN, CNN1D
from dlfx.models.mlp import MLP

REGISTRY: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "cnn1d": CNN1D,
}

__all__ = ["CNN", "CNN1D", "MLP", "REGISTRY", "build", "names", "fields"]


def names() -> list[str]:
    """Registered model names."""
    return sorted(REGISTRY)


def fields(name: str) -> list[str]:
    """Constructor arguments a registered model accepts."""
    return [f.name for f in dataclasses.fields(REGISTRY[name]) if f.init and f.name not in ("parent", "name")]


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names or arguments raise ConfigError."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    valid = fields(name)
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"config.model.{key}: model {name!r} takes no argument {key!r} "
                              f"(valid: {', '.join(valid)})")
    return REGISTRY[name](**kwargs)
