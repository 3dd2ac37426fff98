"""Built-in offline data sets, each returning train and test arrays held in host memory."""

from __future__ import annotations

import dataclasses

import numpy as np

from dlfx.errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits as dicts of equally long numpy arrays ('x' inputs, 'y' int32 labels)."""

    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int
    name: str

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one input example (no batch dimension)."""
        return tuple(self.train["x"].shape[1:])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, split_seed: int) -> tuple[dict, dict]:
    if not 0 < test_fraction < 1:
        raise DataError(f"config.data.test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(split_seed).permutation(len(x))
    num_test = int(round(len(x) * test_fraction))
    test, train = order[:num_test], order[num_test:]
    return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with sklearn), NHWC in [0, 1]."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = (raw.images.astype(np.float32) / 16.0)[..., None]
    y = raw.target.astype(np.int32)
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
