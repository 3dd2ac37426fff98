"""Built-in offline data sets, each returning train and test arrays held in host memory."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from typing import Any

import numpy as np

from dlfx.data import access
from dlfx.errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits, each a dict of equally long numpy arrays or a random-access source
    (`__len__`, `__getitem__(i) -> dict of arrays`; see dlfx.data.access), with any keys (the built-in tasks
    read 'x' and 'y'); built by the data sources and by users' data factories alike."""

    train: Any
    test: Any
    name: str = "data"
    num_classes: int | None = None  # classes, or the vocabulary size for language modelling; None otherwise
    metadata: dict = dataclasses.field(default_factory=dict)  # e.g. {'vocab': [...]} for text

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one input example (no batch dimension)."""
        return access.element_spec(self.train)["x"][0]


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, split_seed: int) -> tuple[dict, dict]:
    if not 0 < test_fraction < 1:
        raise DataError(f"config.data.test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(split_seed).permutation(len(x))
    num_test = int(round(len(x) * test_fraction))
    test, train = order[:num_test], order[num_test:]
    return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def subset(dataset: Dataset, classes: tuple[int, ...] = (), train_fraction: float = 1.0) -> Dataset:
    """Keep only `classes` (relabelled 0..k-1 in the given order) and a stratified fraction of the train split."""
    if "vocab" in dataset.metadata:
        raise DataError("config.data.classes / train_fraction apply to classification data, not text")
    if access.is_source(dataset.train) or access.is_source(dataset.test):
        raise DataError("config.data.classes / train_fraction need a data set held in memory (dicts of arrays); "
                        f"{dataset.name!r} streams from a source")
    if not 0 < train_fraction <= 1:
        raise DataError(f"config.data.train_fraction must be in (0, 1], got {train_fraction}")
    bad = [c for c in classes if not 0 <= c < dataset.num_classes]
    if bad or len(set(classes)) != len(classes):
        raise DataError(f"config.data.classes={tuple(classes)}: labels must be distinct and in "
                        f"[0, {dataset.num_classes})")
    relabel = np.full(dataset.num_classes, -1, np.int32)
    relabel[list(classes) or slice(None)] = np.arange(len(classes) or dataset.num_classes)

    def pick(split: dict, fraction: float) -> dict:
        keep = []
        for label in (classes or range(dataset.num_classes)):
            idx = np.flatnonzero(split["y"] == label)  # the split order is already a seeded shuffle
            keep.append(idx[:max(1, int(round(len(idx) * fraction)))] if len(idx) else idx)
        order = np.sort(np.concatenate(keep))
        return {"x": split["x"][order], "y": relabel[split["y"][order]]}

    return dataclasses.replace(dataset, train=pick(dataset.train, train_fraction), test=pick(dataset.test, 1.0),
                               num_classes=len(classes) or dataset.num_classes)


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8), labels) from the CSV sklearn ships, read without importing sklearn (~0.8 s)."""
    spec = importlib.util.find_spec("sklearn")
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    path = os.path.join(folder, "datasets", "data", "digits.csv.gz") if folder else ""
    if not os.path.isfile(path):  # another sklearn layout: let sklearn read it
        from sklearn.datasets import load_digits

        raw = load_digits()
        return raw.images, raw.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with sklearn), NHWC in [0, 1]."""
    images, target = _sklearn_digits()
    x = (images.astype(np.float32) / 16.0)[..., None]
    y = target.astype(np.int32)
    train, test = _split(x, y, test_fraction, split_seed)
    return Dataset(train=train, test=test, num_classes=10, name="digits")


def mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42) -> Dataset:
    """MNIST-1D generated locally by `mnist1d.data.make_dataset` (never downloaded), shape (N, 40, 1)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    saved_state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(saved_state)
    train = {"x": raw["x"].astype(np.float32)[..., None], "y": raw["y"].astype(np.int32)}
    test = {"x": raw["x_test"].astype(np.float32)[..., None], "y": raw["y_test"].astype(np.int32)}
    return Dataset(train=train, test=test, num_classes=10, name="mnist1d")


def synthetic(shape: tuple = (8, 8, 1), num_classes: int = 10, num_train: int = 1024,
              num_test: int = 256, seed: int = 0) -> Dataset:
    """Gaussian inputs labelled by a fixed random linear map, so a model can learn them (benchmarks, tests)."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    x = rng.standard_normal((num_train + num_test, *shape), dtype=np.float32)
    projection = rng.standard_normal((int(np.prod(shape)), num_classes)).astype(np.float32)
    y = np.argmax(x.reshape(len(x), -1) @ projection, axis=-1).astype(np.int32)
    train = {"x": x[:num_train], "y": y[:num_train]}
    test = {"x": x[num_train:], "y": y[num_train:]}
    return Dataset(train=train, test=test, num_classes=num_classes, name="synthetic")


def sines(length: int = 64, num_train: int = 4096, num_test: int = 1024, noise: float = 0.1,
          seed: int = 0) -> Dataset:
    """Regression: noisy sine waves (length, 1); targets are each wave's amplitude, frequency and offset."""
    if length < 8 or num_train < 1 or num_test < 1 or noise < 0:
        raise DataError("config.data: sines needs length >= 8, num_train and num_test >= 1, noise >= 0")
    rng = np.random.default_rng(seed)
    n = num_train + num_test
    amplitude, frequency = rng.uniform(0.5, 2.0, n), rng.uniform(1.0, 4.0, n)
    offset, phase = rng.uniform(-1.0, 1.0, n), rng.uniform(0.0, 2 * np.pi, n)
    t = np.linspace(0.0, 1.0, length)
    waves = amplitude[:, None] * np.sin(2 * np.pi * frequency[:, None] * t + phase[:, None]) + offset[:, None]
    x = (waves + noise * rng.standard_normal(waves.shape))[..., None].astype(np.float32)
    y = np.stack([amplitude, frequency, offset], axis=1).astype(np.float32)
    return Dataset(train={"x": x[:num_train], "y": y[:num_train]}, test={"x": x[num_train:], "y": y[num_train:]},
                   name="sines", metadata={"targets": ["amplitude", "frequency", "offset"]})


def _default_corpus() -> str:
    """English prose that ships with CPython (`pydoc_data.topics`), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def text(path: str = "", seq_len: int = 128, val_fraction: float = 0.1) -> Dataset:
    """Character-level LM data from a UTF-8 file (default: CPython's pydoc topics), split by position.

    Examples are non-overlapping windows: x = chars[i:i+seq_len], y = chars[i+1:i+seq_len+1].
    The last `val_fraction` of the text is the validation split.
    """
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                corpus = f.read()
        except FileNotFoundError:
            raise DataError(f"config.data.path: text file not found: {path}") from None
        except UnicodeDecodeError as e:
            raise DataError(f"config.data.path: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        corpus = _default_corpus()
    if not 0 < val_fraction < 1:
        raise DataError(f"config.data.val_fraction must be in (0, 1), got {val_fraction}")
    vocab, ids = np.unique(np.array(list(corpus)), return_inverse=True)
    ids = ids.astype(np.int32)
    split = int(len(ids) * (1 - val_fraction))

    def windows(part: np.ndarray, name: str) -> dict[str, np.ndarray]:
        count = (len(part) - 1) // seq_len
        if count < 1:
            raise DataError(f"text {path or 'pydoc topics'}: the {name} split ({len(part)} chars) is shorter "
                            f"than one window of config.data.seq_len={seq_len} + 1")
        return {"x": part[:count * seq_len].reshape(count, seq_len),
                "y": part[1:count * seq_len + 1].reshape(count, seq_len)}

    return Dataset(train=windows(ids[:split], "train"), test=windows(ids[split:], "validation"),
                   num_classes=len(vocab), name="text",
                   metadata={"kind": "tokens", "encoding": "chars", "vocab": [str(c) for c in vocab]})
