"""Data: offline sources, the grain pipeline and eval batching."""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from dlfx import imports
from dlfx.data import access, files, hf, images, records, resident, sources, tfds  # noqa: F401  (resident: data.resident)
from dlfx.data.images import input_transform
from dlfx.data.pipeline import (ArraySource, augment_images, eval_batches, num_examples, steps_per_epoch,
                                 train_iterator)
from dlfx.data.prefetch import DevicePrefetcher, Interrupted, WorkerLost
from dlfx.data.sources import Dataset
from dlfx.errors import ConfigError, DataError, one_line

SOURCES: dict[str, Callable[..., Dataset]] = {
    "digits": sources.digits,
    "mnist1d": sources.mnist1d,
    "synthetic": sources.synthetic,
    "sines": sources.sines,
    "text": sources.text,
    "tokens": files.tokens,
    "arrays": files.arrays,
    "image_folder": images.image_folder,
    "array_record": records.array_record,
    "hf": hf.hf,
    "tfds": tfds.tfds,
}

# `config.data` keys used by the pipeline rather than passed to the source
PIPELINE_KEYS = ("name", "batch_size", "crop_padding", "random_flip", "classes", "train_fraction", "workers",
                 "on_device")

__all__ = ["ArraySource", "Dataset", "DevicePrefetcher", "Interrupted", "WorkerLost", "PIPELINE_KEYS", "augment_images", "SOURCES", "describe",
           "eval_batches", "input_transform", "load", "names", "resolve", "num_examples", "stand_in", "steps_per_epoch", "train_iterator"]


def names() -> list[str]:
    """Registered data set names."""
    return sorted(SOURCES)


def resolve(name: str) -> Callable[..., Dataset]:
    """The source a built-in name or a `package.module:factory` path names (a callable returning a Dataset)."""
    return imports.resolve(name, SOURCES, "config.data.name", "callable (a data factory returns a dlfx.data.Dataset)",
                           callable)

def _check_dataset(dataset: Any, name: str) -> None:
    """A factory's result: a Dataset whose splits are non-empty random-access sources (first example a dict
    of arrays) or non-empty dicts of equally long arrays."""
    if not isinstance(dataset, Dataset):
        raise DataError(f"data set {name!r} returned a {type(dataset).__name__}, not a dlfx.data.Dataset")
    for split in ("train", "test"):
        held = getattr(dataset, split)
        if access.is_source(held):  # random access: its first example must be a dict of arrays
            if len(held) == 0:
                raise DataError(f"data set {name!r}: its {split} source is empty")
            try:
                access.element_spec(held)
            except DataError as e:
                raise DataError(f"data set {name!r}: {split} source: {e}") from None
            except Exception as e:
                raise DataError(f"data set {name!r}: reading example 0 of its {split} source failed: "
                                f"{one_line(e)}") from None
            continue
        if not isinstance(held, dict) or not held:
            raise DataError(f"data set {name!r}: its {split} split must be a non-empty dict of arrays or a "
                            "random-access source (__len__, __getitem__)")
        lengths = {key: len(value) for key, value in held.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(f"data set {name!r}: the {split} arrays have unequal lengths {lengths}")
    for split in ("train", "test"):
        spec = access.element_spec(getattr(dataset, split))
        if "x" not in spec:
            raise DataError(f"data set {name!r}: its {split} examples have no 'x' (the model's input); they have "
                            f"{', '.join(repr(k) for k in spec) or 'no keys'}")
        for key, (_, dtype) in spec.items():
            if np.dtype(dtype).kind in "OSUMm":  # ml_dtypes' bfloat16/float8 are kind 'V' and welcome
                raise DataError(f"data set {name!r}: {split} {key!r} has dtype {np.dtype(dtype)}, not numbers "
                                "(convert it to a numeric numpy array)")


def check_labels(dataset: Dataset) -> None:
    """For the built-in classification task: in-memory integer labels lie in 0..num_classes-1 (out of range
    they train on NaN losses). A task of one's own may use other labels (an ignore index)."""
    name = dataset.name
    for split in ("train", "test"):
        held = getattr(dataset, split)
        labels = None if access.is_source(held) or dataset.num_classes is None else held.get("y")
        if labels is None or not np.issubdtype(np.asarray(labels).dtype, np.integer) or not len(labels):
            continue
        low, high = int(np.min(labels)), int(np.max(labels))
        if low < 0 or high >= dataset.num_classes:
            raise DataError(f"data set {name!r}: {split} labels 'y' span {low}..{high}, outside 0.."
                            f"{dataset.num_classes - 1} for its num_classes={dataset.num_classes}")


def _check_splits_agree(dataset: Dataset, name: str) -> None:
    train, test = access.element_spec(dataset.train), access.element_spec(dataset.test)
    for key in sorted(set(train) & set(test)):
        if train[key][0] != test[key][0]:
            raise DataError(f"data set {name!r}: {key!r} examples are {train[key][0]} in the train split but "
                            f"{test[key][0]} in the test split")


def load(data_config: Mapping[str, Any]) -> Dataset:
    """Load the data set that `config.data` names, passing its source keys (not the pipeline keys) to it."""
    name = data_config.get("name", "")
    source = resolve(name)
    kwargs = {k: v for k, v in data_config.items() if k not in PIPELINE_KEYS}
    params = inspect.signature(source).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in params and not takes_any:
            raise ConfigError(f"config.data.{key}: data set {name!r} takes no argument {key!r} "
                              f"(valid: {', '.join(params)})")
    try:
        dataset = source(**kwargs)
    except (DataError, ConfigError):
        raise
    except ImportError as e:
        raise DataError(f"data set {name!r} needs a package that is not installed: {e}") from None
    except Exception as e:
        if name in SOURCES:
            raise
        raise DataError(f"data set {name!r} failed: {one_line(e)}") from None
    _check_dataset(dataset, name)
    _check_splits_agree(dataset, name)
    classes = tuple(data_config.get("classes", ()))
    fraction = data_config.get("train_fraction", 1.0)
    if classes or fraction != 1.0:
        dataset = sources.subset(dataset, classes, fraction)
    if num_examples(dataset.test) == 0:
        raise DataError(f"data set {name!r}: eval split is empty")
    return dataset


def describe(dataset: Dataset) -> dict[str, Any]:
    """What a model needs to know of a data set, as JSON (a run's `data.json`): name, classes (or vocabulary
    size), one example's arrays (shape, dtype) and the JSON-able metadata (e.g. the vocabulary)."""
    metadata = {}
    for key, value in dataset.metadata.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # e.g. arrays: not needed to rebuild the model
        metadata[key] = value
    return {"name": dataset.name, "num_classes": dataset.num_classes, "metadata": metadata,
            "example": {k: {"shape": list(shape), "dtype": str(dtype)}
                        for k, (shape, dtype) in access.element_spec(dataset.train).items()},
            "num_examples": {split: access.length(getattr(dataset, split)) for split in ("train", "test")}}


def check_unchanged(workdir: str, dataset: Dataset) -> None:
    """A resumed run reads the data set it was trained on: the example counts `describe` recorded in the
    `data.json` of `workdir` (a local folder or a gs:// run's mirror) are this data set's (else a ConfigError)."""
    from dlfx import remote
    from dlfx.workdir import DATA_FILE, read_json

    described, shown = os.path.join(workdir, DATA_FILE), remote.shown(workdir)
    try:
        description = read_json(described) if os.path.isfile(described) else {}
    except ConfigError:  # damaged: the runner writes it anew
        description = {}
    where = f"{shown}/{os.path.basename(described)}"
    recorded = description.get("num_examples")
    if not isinstance(recorded, Mapping):
        return  # written by an older dlfx
    for split in ("train", "test"):
        now = access.length(getattr(dataset, split))
        if recorded.get(split) not in (None, now):
            why = ("the saved data order cannot continue on it" if split == "train" else
                   "its eval metrics would not compare with the ones logged")
            raise ConfigError(f"config.data: the {split} split has {now} examples, but the run was trained with "
                              f"{recorded[split]} ({where}): the data set changed and {why}; restore that data, "
                              "use a new --workdir, or pass --force to continue from the checkpoint on this data")


def stand_in(description: Mapping[str, Any]) -> Dataset:
    """A two-example Dataset of zeros shaped like `describe`'s: enough to build a run's model and restore its
    state without the data (e.g. `dlfx sample` on another machine)."""
    try:
        shapes = {k: tuple(int(d) for d in spec["shape"]) for k, spec in description["example"].items()}
        if any(d < 0 for shape in shapes.values() for d in shape) or \
                sum(int(np.prod(shape)) for shape in shapes.values()) > 1 << 28:
            raise ValueError(f"example shapes {shapes} are not those of a data set")
        arrays = {k: np.zeros((2, *shapes[k]), np.dtype(spec["dtype"]))
                  for k, spec in description["example"].items()}
        return Dataset(train=arrays, test=dict(arrays), name=str(description["name"]),
                       num_classes=description.get("num_classes"), metadata=dict(description.get("metadata", {})))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"a data description needs 'name' and 'example' {{key: {{shape, dtype}}}}: {e!r}") from None
