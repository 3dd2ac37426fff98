"""A research data factory kept outside dlfx: noisy waves with their clean versions (keys 'x' and 'clean')."""

import numpy as np

from dlfx.data import Dataset


def noisy_waves(length: int = 64, num_train: int = 2048, num_test: int = 512, noise: float = 0.3,
                seed: int = 0) -> Dataset:
    """Sums of two random sines plus Gaussian noise; the task is to recover the clean wave."""
    rng = np.random.default_rng(seed)
    n = num_train + num_test
    t = np.linspace(0.0, 1.0, length)
    clean = sum(rng.uniform(0.3, 1.0, (n, 1)) * np.sin(2 * np.pi * rng.uniform(1, 6, (n, 1)) * t
                                                       + rng.uniform(0, 2 * np.pi, (n, 1))) for _ in range(2))
    clean = clean[..., None].astype(np.float32)
    x = (clean + noise * rng.standard_normal(clean.shape)).astype(np.float32)
    return Dataset(train={"x": x[:num_train], "clean": clean[:num_train]},
                   test={"x": x[num_train:], "clean": clean[num_train:]}, name="noisy_waves")
