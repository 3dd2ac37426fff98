"""Model zoo: pure flax.linen Modules and the `build(name, **kwargs)` registry."""

import dataclasses
from typing import Any

import flax.linen as nn

from dlfx import imports
from dlfx.errors import ConfigError
from dlfx.models.autoencoder import Autoencoder
from dlfx.models.cnn import CNN, CNN1D
from dlfx.models.dropout import Dropout
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
    "resnet10": (ResNet, {"depth": 10}),
    "resnet18": (ResNet, {"depth": 18}),
    "resnet34": (ResNet, {"depth": 34}),
    "resnet50": (ResNet, {"depth": 50}),
    "lstm": (RNN, {"cell": "lstm"}),
    "gru": (RNN, {"cell": "gru"}),
    "transformer": (TransformerEncoder, {}),
    "gpt": (GPT, {}),
    "vit": (ViT, {}),
    "autoencoder": (Autoencoder, {}),
}

__all__ = ["Autoencoder", "Block", "CNN", "CNN1D", "Dropout", "GPT", "MLP", "REGISTRY", "RNN", "ResNet", "TransformerEncoder", "ViT",
           "build", "fields", "names", "resolve"]


def names() -> list[str]:
    """Registered model names."""
    return sorted(REGISTRY)


def resolve(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """(class, preset arguments) of a registered name or a `package.module:Class` flax Module."""
    target = imports.resolve(name, REGISTRY, "config.model.name", "a flax.linen.Module class",
                             lambda t: isinstance(t, type) and issubclass(t, nn.Module))
    return target if name in REGISTRY else (target, {})

def fields(name: str) -> list[str]:
    """Constructor arguments a model accepts (its presets excluded)."""
    cls, presets = resolve(name)
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.name not in ("parent", "name") and f.name not in presets]


def build(name: str, **kwargs) -> nn.Module:
    """Build a registered model or a `package.module:Class` Module; unknown arguments raise ConfigError."""
    cls, presets = resolve(name)
    valid = fields(name)
    for key in kwargs:
        if key not in valid:
            raise ConfigError(f"config.model.{key}: model {name!r} takes no argument {key!r} "
                              f"(valid: {', '.join(valid)})")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")
               and f.name not in presets and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config.model.{missing[0]}: model {name!r} needs this argument")
    return cls(**presets, **kwargs)
