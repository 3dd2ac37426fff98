"""`image_folder`: the torchvision ImageFolder layout, decoded with Pillow one record at a time.

`path/train/<class>/*.{png,jpg,jpeg}` and `path/val/<class>/...`; classes are the sorted folder names of
`train`. Training examples get a random resized crop and a horizontal flip, drawn from a seed per
(epoch batch, global row), so a resumed or multi-process run sees the same pixels; eval examples are
resized (shorter side to size / 0.875) and center-cropped. Images stay uint8 on the host and are
normalised on the device (`input_transform`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np

from dlfx.data.sources import Dataset
from dlfx.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg")
NORMALIZE = {"imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},  # torchvision's
             "none": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}  # pixels scaled to [0, 1] only


def _scan(folder: str, classes: list[str] | None) -> tuple[list[str], np.ndarray, list[str]]:
    if not os.path.isdir(folder):
        raise DataError(f"config.data.path: {folder} does not exist (expected <path>/train/<class>/*.png and "
                        "<path>/val/<class>/...)")
    found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    classes = found if classes is None else classes
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise DataError(f"{folder} has class folder {unknown[0]!r} that the train split does not have")
    paths, labels = [], []
    for label, name in enumerate(classes):
        directory = os.path.join(folder, name)
        if not os.path.isdir(directory):
            continue
        for file in sorted(os.listdir(directory)):
            if file.lower().endswith(EXTENSIONS):
                paths.append(os.path.join(directory, file))
                labels.append(label)
    if not paths:
        raise DataError(f"{folder} holds no {'/'.join(EXTENSIONS)} images in class folders")
    return paths, np.asarray(labels, np.int32), classes


def _decode(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


def _center(image, size: int) -> np.ndarray:
    from PIL import Image

    scale = size / 0.875 / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def _random_resized(image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Inception-style crop: 8-100 % of the area, aspect ratio 3/4-4/3 (10 tries, else the center), then a
    coin-flip horizontal mirror."""
    from PIL import Image

    area = image.width * image.height
    box = None
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= image.width and 0 < h <= image.height:
            left, top = int(rng.integers(0, image.width - w + 1)), int(rng.integers(0, image.height - h + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR, box=box), np.uint8)
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


class ImageFiles:
    """Random-access source of decoded images: {'x': (size, size, 3) uint8, 'y': int32}. `gather` gives the
    eval view; `gather_augmented(indices, keys)` the training view, one seed key per example."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: int, name: str):
        self.paths, self.labels, self.size, self.name = paths, labels, size, name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"x": _center(_decode(self.paths[index]), self.size), "y": self.labels[index]}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Resized, center-cropped images at `indices`."""
        return {"x": np.stack([_center(_decode(self.paths[i]), self.size) for i in indices]),
                "y": self.labels[np.asarray(indices)]}

    def gather_augmented(self, indices: np.ndarray, keys: list[list[int]]) -> dict[str, np.ndarray]:
        """Random-resized-cropped, randomly mirrored images; example j draws from `default_rng(keys[j])`."""
        images = [_random_resized(_decode(self.paths[i]), self.size, np.random.default_rng(key))
                  for i, key in zip(indices, keys)]
        return {"x": np.stack(images), "y": self.labels[np.asarray(indices)]}

    def __repr__(self) -> str:
        return f"ImageFiles({self.name}, {len(self.paths)} images, size={self.size})"


def image_folder(path: str = "", image_size: int = 224, normalize: str = "imagenet") -> Dataset:
    """ImageFolder-layout data set: `train/` for training, `val/` for evaluation (see module docstring)."""
    if not path:
        raise DataError("config.data.path must name a folder with train/<class>/ and val/<class>/ images")
    if normalize not in NORMALIZE:
        raise DataError(f"config.data.normalize={normalize!r} is not one of {', '.join(NORMALIZE)}")
    if image_size < 1:
        raise DataError(f"config.data.image_size must be >= 1, got {image_size}")
    train_paths, train_labels, classes = _scan(os.path.join(path, "train"), None)
    val_paths, val_labels, _ = _scan(os.path.join(path, "val"), classes)
    _decode(train_paths[0])  # a folder of undecodable files fails here, before a run starts
    return Dataset(train=ImageFiles(train_paths, train_labels, image_size, "train"),
                   test=ImageFiles(val_paths, val_labels, image_size, "val"), name="image_folder",
                   num_classes=len(classes),
                   metadata={"classes": classes, "normalize": NORMALIZE[normalize], "kind": "images"})


def input_transform(metadata: dict) -> Callable[[Any], Any] | None:
    """On-device input normalisation a data set asks for (`metadata['normalize']`: per-channel mean and std of
    pixels in [0, 1]); uint8 inputs are scaled to [0, 1] first. None when it asks for none."""
    spec = metadata.get("normalize")
    if not spec:
        return None
    import jax.numpy as jnp

    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)

    def transform(x):
        x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        return (x - mean) / std

    return transform
