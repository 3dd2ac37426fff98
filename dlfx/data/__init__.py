"""Data: offline sources, the grain pipeline and eval batching."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from dlfx.data import sources
from dlfx.data.pipeline import (ArraySource, augment_images, eval_batches, num_examples, steps_per_epoch,
                                 train_iterator)
from dlfx.data.prefetch import DevicePrefetcher
from dlfx.data.sources import Dataset
from dlfx.errors import ConfigError, DataError

SOURCES: dict[str, Callable[..., Dataset]] = {
    "digits": sources.digits,
    "mnist1d": sources.mnist1d,
    "synthetic": sources.synthetic,
    "sines": sources.sines,
    "text": sources.text,
}

# `config.data` keys used by the pipeline rather than passed to the source
PIPELINE_KEYS = ("name", "batch_size", "crop_padding", "random_flip", "classes", "train_fraction")

__all__ = ["ArraySource", "Dataset", "DevicePrefetcher", "PIPELINE_KEYS", "augment_images", "SOURCES", "eval_batches", "load", "names", "num_examples", "steps_per_epoch",
           "train_iterator"]


def names() -> list[str]:
    """Registered data set names."""
    return sorted(SOURCES)


def load(data_config: Mapping[str, Any]) -> Dataset:
    """Load the data set that `config.data` names, passing its source keys (not the pipeline keys) to it."""
    name = data_config.get("name", "")
    if name not in SOURCES:
        raise ConfigError(f"config.data.name={name!r} is not one of {', '.join(names())}")
    kwargs = {k: v for k, v in data_config.items() if k not in PIPELINE_KEYS}
    params = inspect.signature(SOURCES[name]).parameters
    for key in kwargs:
        if key not in params:
            raise ConfigError(f"config.data.{key}: data set {name!r} takes no argument {key!r} "
                              f"(valid: {', '.join(params)})")
    try:
        dataset = SOURCES[name](**kwargs)
    except (DataError, ConfigError):
        raise
    except ImportError as e:
        raise DataError(f"data set {name!r} needs a package that is not installed: {e}") from None
    classes = tuple(data_config.get("classes", ()))
    fraction = data_config.get("train_fraction", 1.0)
    if classes or fraction != 1.0:
        dataset = sources.subset(dataset, classes, fraction)
    if num_examples(dataset.test) == 0:
        raise DataError(f"data set {name!r}: eval split is empty")
    return dataset
