"""Model zoo: pure flax.linen Modules and the `build(name, **kwargs)` registry."""

import dataclasses
from typing import Any

import flax.linen as nn

from dlfx.errors import ConfigError
from dlfx.models.cnn import CNN, CNN1D
from dlfx.models.mlp import MLP
from dlfx.models.resnet import ResNet
from dlfx.models.rnn import RNN
from dlfx.models.transformer import GPT, Block, TransformerEncoder
from dlfx.models.vit import ViT

# name -> (class, preset arguments)
REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "cnn": (CNN, {}),
    "cnn1d": (CNN1D, {}),
    "resnet18": (ResNet, {"depth": 18}),
    "resnet34": (ResNet, {"depth": 34}),
    "resnet50": (ResNet, {"depth": 50}),
    "lstm": (RNN, {"cell": "lstm"}),
    "gru": (RNN, {"cell": "gru"}),
    "transformer": (TransformerEncoder, {}),
    "gpt": (GPT, {}),
    "vit": (ViT, {}),
}

__all__ = ["Block", "CNN", "CNN1D", "GPT", "MLP", "REGISTRY", "RNN", "ResNet", "TransformerEncoder", "ViT",
           "build", "fields", "names"]


def names() -> list[str]:
    """Registered model names."""
    return sorted(REGISTRY)


def fields(name: str) -> list[str]:
    """Constructor arguments a registered model accepts (its presets excluded)."""
    cls, presets = REGISTRY[name]
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name") and f.name not in presets]


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names or arguments raise ConfigError."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(names())}")
    valid = fields(name)
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"config.model.{key}: model {name!r} takes no argument {key!r} "
                              f"(valid: {', '.join(valid)})")
    cls, presets = REGISTRY[name]
    return cls(**presets, **kwargs)
