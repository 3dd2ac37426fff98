"""`hf`: a Hugging Face `datasets` folder written by `save_to_disk` (a DatasetDict) or parquet files, read by
random access from its memory-mapped Arrow tables (extra `[hf]`; nothing is downloaded).

`data.path` is the `save_to_disk` folder, or a folder holding `<split>*.parquet` files. `data.keys` maps dlfx
keys to columns (`('x=pixels', 'y=label')`; by default x is the first of x/image/img present and y of
y/label/labels). An image column (the `datasets.Image` feature) is decoded with Pillow like `image_folder`:
random resized crop and flip for training, resize and center crop for eval, uint8 on the host and
normalised on the device.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from dlfx.data import images
from dlfx.data.files import _parse_keys
from dlfx.data.sources import Dataset
from dlfx.errors import DataError, one_line


DEFAULT_COLUMNS = {"x": ("x", "image", "img"), "y": ("y", "label", "labels")}  # without data.keys: the first present


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("data set 'hf' needs the Hugging Face `datasets` package: pip install 'dlfx[hf]'") from None
    return datasets


class TableSource:
    """Random-access source over a `datasets.Dataset`: {dlfx key: numpy array} per example; `gather` reads a
    whole batch with one Arrow take."""

    def __init__(self, table: Any, columns: dict[str, str], name: str):
        self.table = table.with_format("numpy", columns=list(columns.values()))
        self.columns, self.name = columns, name

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.table[int(index)]
        return {key: np.asarray(row[column]) for key, column in self.columns.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked."""
        rows = self.table[[int(i) for i in indices]]
        return {key: np.stack([np.asarray(v) for v in rows[column]]) if rows[column].dtype == object
                else np.asarray(rows[column]) for key, column in self.columns.items()}

    def __repr__(self) -> str:
        return f"TableSource({self.name}, {len(self)} rows, {self.columns})"


def _load(path: str, split: str) -> Any:
    datasets = _datasets()
    parquet = sorted(glob.glob(os.path.join(path, f"{split}*.parquet")) +
                     glob.glob(os.path.join(path, "data", f"{split}*.parquet")))
    try:
        if parquet:
            table = datasets.Dataset.from_parquet(parquet)
        elif os.path.exists(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits", [])
            if split not in splits:
                raise DataError(f"config.data.path: {path} has splits {sorted(splits)}, not {split!r} "
                                "(set config.data.train_split / test_split)")
            table = datasets.load_from_disk(os.path.join(path, split))  # this split only
        else:
            table = None
    except DataError:
        raise
    except Exception as e:  # e.g. an empty split: datasets raises IndexError / ValueError from its readers
        raise DataError(f"config.data.path: cannot read the {split!r} split of {path} (is it empty?): "
                        f"{one_line(e)}") from None
    if table is not None:
        if len(table) == 0:
            raise DataError(f"config.data.path: the {split!r} split of {path} is empty")
        return table
    raise DataError(f"config.data.path: {path} is neither a `save_to_disk` DatasetDict folder nor a folder "
                    f"of {split}*.parquet files")


def _source(table: Any, mapping: dict[str, str], image_size: int, name: str, skip_bad: bool,
            origin: str = "") -> Any:
    datasets = _datasets()
    missing = [c for c in mapping.values() if c not in table.column_names]
    if missing:
        raise DataError(f"the {name} split has no column {missing[0]!r} (columns: {', '.join(table.column_names)}; "
                        "map them with config.data.keys, e.g. ('x=pixels', 'y=label'))")
    label = table.features[mapping["y"]]
    if getattr(label, "dtype", "") in ("string", "large_string"):
        raise DataError(f"the {name} split's label column {mapping['y']!r} holds strings; make it a ClassLabel first "
                        f"(datasets' class_encode_column) so its classes get integer ids")
    x_feature = table.features[mapping["x"]]
    if not isinstance(x_feature, datasets.Image):
        return TableSource(table, mapping, name)
    encoded = table.cast_column(mapping["x"], datasets.Image(decode=False))
    labels = np.asarray(table.with_format("numpy", columns=[mapping["y"]])[mapping["y"]])

    def fetch(i: int):
        image = encoded[int(i)][mapping["x"]]
        return image["bytes"] if image.get("bytes") else image["path"], int(labels[i])

    return images.ImageSource(fetch, len(table), image_size, name, skip_bad, origin)


def hf(path: str = "", keys: tuple = (), train_split: str = "train", test_split: str = "test",
       num_classes: int = 0, image_size: int = 224, normalize: str = "imagenet",
       skip_bad_images: bool = False) -> Dataset:
    """A Hugging Face data set saved on disk (see the module docstring)."""
    if not path or not os.path.isdir(path):
        raise DataError(f"config.data.path must name a `save_to_disk` folder or a folder of parquet files, got {path!r}")
    train_table, test_table = _load(path, train_split), _load(path, test_split)
    _parse_keys(keys)  # each item is 'name=column'
    given = dict(str(item).split("=", 1) for item in keys)
    mapping = {key: next((c for c in names if c in train_table.column_names), key)
               for key, names in DEFAULT_COLUMNS.items()} | given
    train = _source(train_table, mapping, image_size, train_split, skip_bad_images, path)
    test = _source(test_table, mapping, image_size, test_split, skip_bad_images, path)
    feature = train_table.features[mapping["y"]]
    if hasattr(feature, "num_classes"):  # a datasets.ClassLabel
        num_classes = num_classes or feature.num_classes
    elif not num_classes and np.issubdtype(np.asarray(train_table[:1][mapping["y"]]).dtype, np.integer):
        labels = [list(t[mapping["y"]]) for t in (train_table, test_table)]
        missing = [(split, column.index(None)) for split, column in zip((train_split, test_split), labels)
                   if None in column]
        if missing:
            raise DataError(f"{path}: example {missing[0][1]} of split {missing[0][0]!r} has no label (column "
                            f"{mapping['y']!r} is null there)")
        num_classes = 1 + max(int(max(column)) for column in labels)
    metadata = {}
    if isinstance(train, images.ImageSource):
        images.check_normalize(normalize, image_size)
        metadata = {"normalize": images.NORMALIZE[normalize], "kind": "images"}
        if hasattr(feature, "names"):
            metadata["classes"] = list(feature.names)
    return Dataset(train=train, test=test, name=os.path.basename(path.rstrip("/")) or "hf",
                   num_classes=num_classes or None, metadata=metadata)
