"""`image_folder`: the torchvision ImageFolder layout, decoded with Pillow one record at a time.

`path/train/<class>/*.{png,jpg,jpeg}` and `path/val/<class>/...`; classes are the sorted folder names of
`train`. Training examples get a random resized crop and a horizontal flip, drawn from a seed per
(epoch batch, global row), so a resumed or multi-process run sees the same pixels; eval examples are
resized (shorter side to size / 0.875) and center-cropped. Images stay uint8 on the host and are
normalised on the device (`input_transform`).
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from typing import Any, Callable

import numpy as np

from dlfx.data.sources import Dataset
from dlfx.errors import DataError

EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_SKIPPED = 16  # data.skip_bad_images: more undecodable images than this in a row is an error

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
        before = len(paths)
        for file in sorted(os.listdir(directory)):
            if file.lower().endswith(EXTENSIONS) and not file.startswith("."):  # e.g. macOS's ._x.png
                paths.append(os.path.join(directory, file))
                labels.append(label)
        if len(paths) == before and classes is found and len(found) > 1:  # the train split defines the classes
            raise DataError(f"class folder {directory} holds no {'/'.join(EXTENSIONS)} images: a class no example "
                            "teaches; remove the folder or add its images")
    if not paths:
        raise DataError(f"{folder} holds no {'/'.join(EXTENSIONS)} images in class folders")
    return paths, np.asarray(labels, np.int32), classes


def decode(image: str | os.PathLike | bytes, what: str = ""):
    """A file path or encoded bytes (PNG, JPEG) as an RGB Pillow image; DataError naming `what` otherwise."""
    from PIL import Image, UnidentifiedImageError

    image = os.fspath(image) if isinstance(image, os.PathLike) else image
    what = what or (image if isinstance(image, str) else f"of {len(image)} bytes")
    try:
        if not isinstance(image, bytes):  # read whole: Pillow parses a JPEG's markers in ~40 small reads
            with open(image, "rb") as file:
                image = file.read()
        with Image.open(io.BytesIO(image)) as opened:
            opened.load()
            if opened.mode.startswith("I"):  # integer pixels: 16-bit scaled to 8 bits, not clipped to white
                opened = Image.fromarray(_eight_bits(np.asarray(opened), opened.mode))
            return opened if opened.mode == "RGB" else opened.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:  # Pillow names bytes by their
        # BytesIO object's address
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)) or type(e).__name__
        raise DataError(f"cannot decode image {what}: {why}") from None


def _eight_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Integer pixels as uint8: 16-bit ones (mode I;16, or 32-bit mode I holding values past 255) divided by 257."""
    if mode.startswith("I;16") or pixels.max(initial=0) > 255:
        pixels = np.rint(pixels.astype(np.float64) / 257.0)
    return pixels.clip(0, 255).astype(np.uint8)


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


class ImageSource:
    """Random-access source of decoded images: {'x': (size, size, 3) uint8, 'y': int32}. `fetch(i)` gives
    example i's encoded image (a path or bytes) and label. `gather` gives the eval view,
    `gather_augmented(indices, keys)` the training view, one seed key per example."""

    def __init__(self, fetch: Callable[[int], tuple[str | bytes, int]], length: int, size: int, name: str,
                 skip_bad: bool = False, origin: str = ""):
        # origin: where encoded records live (a folder), named with the record in decode errors
        self.fetch, self.length, self.size, self.name, self.skip_bad = fetch, length, size, name, skip_bad
        self.origin = origin
        self._reported: set[int] = set()

    def _image(self, index: int):
        """Example `index` decoded; with `skip_bad`, an undecodable one is replaced by the next decodable
        example (deterministic, so resume and every process see the same), warned about once."""
        tries = min(MAX_SKIPPED + 1, self.length)
        for attempt in range(tries):
            at = (int(index) + attempt) % self.length
            image, label = self.fetch(at)
            where = f"#{at} of the {self.name} split" + (f" in {self.origin}" if self.origin else "")
            try:
                return decode(image, where if isinstance(image, bytes) else ""), label
            except DataError as e:
                if not self.skip_bad:
                    raise DataError(f"{e} (config.data.skip_bad_images=True trains past such files)") from None
                if at not in self._reported:
                    self._reported.add(at)
                    print(f"dlfx: warning: {e}; using the next image instead", file=sys.stderr)
        if tries == self.length:
            raise DataError(f"none of the {self.length} images of the {self.name} split"
                            f"{' in ' + self.origin if self.origin else ''} can be decoded")
        raise DataError(f"{tries} images in a row from #{index} of the {self.name} split cannot be decoded")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image, label = self._image(index)
        return {"x": _center(image, self.size), "y": np.int32(label)}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Resized, center-cropped images at `indices`."""
        pairs = [self._image(i) for i in indices]
        return {"x": np.stack([_center(image, self.size) for image, _ in pairs]),
                "y": np.asarray([label for _, label in pairs], np.int32)}

    def gather_augmented(self, indices: np.ndarray, keys: list[list[int]]) -> dict[str, np.ndarray]:
        """Random-resized-cropped, randomly mirrored images; example j draws from `default_rng(keys[j])`."""
        pairs = [self._image(i) for i in indices]
        return {"x": np.stack([_random_resized(image, self.size, np.random.default_rng(key))
                               for (image, _), key in zip(pairs, keys)]),
                "y": np.asarray([label for _, label in pairs], np.int32)}

    def __repr__(self) -> str:
        return f"ImageSource({self.name}, {self.length} images, size={self.size})"


def _files(paths: list[str], labels: np.ndarray, size: int, name: str, skip_bad: bool = False) -> ImageSource:
    return ImageSource(lambda i: (paths[i], int(labels[i])), len(paths), size, name, skip_bad)


def check_normalize(normalize: str, image_size: int) -> None:
    """`data.normalize` and `data.image_size` of the image sources."""
    if normalize not in NORMALIZE:
        raise DataError(f"config.data.normalize={normalize!r} is not one of {', '.join(NORMALIZE)}")
    if image_size < 1:
        raise DataError(f"config.data.image_size must be >= 1, got {image_size}")


def scan_folder(path: str) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray], list[str]]:
    """((train paths, labels), (val paths, labels), classes) of an ImageFolder-layout folder."""
    if not path:
        raise DataError("config.data.path must name a folder with train/<class>/ and val/<class>/ images")
    train_paths, train_labels, classes = _scan(os.path.join(path, "train"), None)
    val_paths, val_labels, _ = _scan(os.path.join(path, "val"), classes)
    return (train_paths, train_labels), (val_paths, val_labels), classes


def image_folder(path: str = "", image_size: int = 224, normalize: str = "imagenet",
                 skip_bad_images: bool = False) -> Dataset:
    """ImageFolder-layout data set: `train/` for training, `val/` for evaluation (see module docstring);
    `skip_bad_images` replaces an undecodable file by the next image (with a warning) instead of failing."""
    check_normalize(normalize, image_size)
    (train_paths, train_labels), (val_paths, val_labels), classes = scan_folder(path)
    train = _files(train_paths, train_labels, image_size, "train", skip_bad_images)
    train[0]  # a folder of undecodable files fails here, before a run starts
    return Dataset(train=train, test=_files(val_paths, val_labels, image_size, "val", skip_bad_images),
                   name="image_folder",
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
