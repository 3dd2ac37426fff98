"""`tfds`: a TensorFlow Datasets data set already prepared in a local `data_dir` in the ArrayRecord file format,
read by random access (extra `[tfds]`; TensorFlow itself is not needed, and nothing is ever downloaded).

`data.path` is the `data_dir` and `data.dataset` the data set (`name`, `name:version` or
`name/config:version`), or `data.path` is the prepared version folder itself (the one holding
`dataset_info.json`). `data.keys` maps dlfx keys to features (`('x=pixels', 'y=label')`; by default x is the
first of x/image/img present and y of y/label/labels). An `Image` feature is read as its encoded bytes and
decoded with Pillow like `image_folder` (random resized crop and flip for training, resize and center crop
for eval); a `ClassLabel` gives `num_classes` and the class names.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dlfx.data import images
from dlfx.data.files import _parse_keys
from dlfx.data.hf import DEFAULT_COLUMNS
from dlfx.data.sources import Dataset
from dlfx.errors import DataError, one_line


def _tfds() -> Any:
    try:
        import tensorflow_datasets
    except ImportError:
        raise DataError("data set 'tfds' needs the `tensorflow-datasets` package: pip install 'dlfx[tfds]'") from None
    return tensorflow_datasets


class FeatureSource:
    """Random-access source over a TFDS ArrayRecord data source: {dlfx key: numpy array} per example."""

    def __init__(self, records: Any, columns: dict[str, str], name: str):
        self.records, self.columns, self.name = records, columns, name

    def __len__(self) -> int:
        return len(self.records)

    def _example(self, record: dict) -> dict[str, np.ndarray]:
        out = {key: np.asarray(record[column]) for key, column in self.columns.items()}
        if "y" in out and out["y"].ndim == 0 and np.issubdtype(out["y"].dtype, np.integer):
            out["y"] = out["y"].astype(np.int32)  # TFDS gives class labels as Python ints
        return out

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._example(self.records[int(index)])

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked (one batched read of the ArrayRecord shards)."""
        examples = [self._example(r) for r in self.records.__getitems__([int(i) for i in indices])]
        return {key: np.stack([e[key] for e in examples]) for key in self.columns}

    def __repr__(self) -> str:
        return f"FeatureSource({self.name}, {len(self)} examples, {self.columns})"


def _builder(path: str, dataset: str) -> Any:
    tfds = _tfds()
    if not path or not os.path.isdir(path):
        raise DataError(f"config.data.path must name a TFDS data_dir (or a prepared version folder), got {path!r}")
    try:
        if os.path.isfile(os.path.join(path, "dataset_info.json")):
            builder = tfds.builder_from_directory(path)
            if dataset and not _same_dataset(dataset, builder.info):
                raise DataError(f"config.data.path {path} is the prepared folder of {builder.info.full_name}, not "
                                f"config.data.dataset={dataset!r} (leave data.dataset empty, or give the data_dir)")
            return builder
        if not dataset:
            raise DataError(f"config.data.dataset must name the TFDS data set in {path} (e.g. 'mnist' or "
                            "'mnist:3.0.1'), or config.data.path the version folder holding dataset_info.json")
        return tfds.builder(dataset, data_dir=path, try_gcs=False)
    except DataError:
        raise
    except Exception as e:  # DatasetNotFoundError, DatasetInfoFileError, ...
        raise DataError(f"config.data.dataset={dataset!r}: no prepared TFDS data set in {path}: "
                        f"{one_line(e)}") from None


def _same_dataset(dataset: str, info: Any) -> bool:
    """Whether `name`, `name:version` or `name/config:version` names the data set `info` describes."""
    name, _, version = dataset.partition(":")
    name, _, config = name.partition("/")
    return (name == info.name and (not version or version == str(info.version))
            and (not config or config == (info.config_name or "")))



def _check_numeric(features: Any, mapping: dict[str, str], where: str) -> None:
    """Refuse a mapped feature dlfx cannot feed as a numeric array (text, nested dicts, ...)."""
    for key, column in mapping.items():
        dtype = getattr(features[column], "np_dtype", None)
        try:
            kind = np.dtype(dtype).kind if dtype is not None else "O"
        except TypeError:
            kind = "O"
        if kind not in "biuf":
            raise DataError(f"{where}: feature {column!r} (dlfx key {key!r}) is {type(features[column]).__name__} "
                            f"of {dtype}, not numbers; map a numeric or Image feature with config.data.keys")


def _split(builder: Any, split: str, decoders: dict, where: str) -> Any:
    names = sorted(builder.info.splits.keys())
    if not names:
        raise DataError(f"{where} is not prepared (it has no splits); prepare it with "
                        "download_and_prepare(file_format='array_record')")
    unknown = [part for part in split.split("+") if part.split("[")[0].strip() not in names]  # 'train[:90%]+test'
    if unknown:
        raise DataError(f"{where} has splits {names}, not {unknown[0]!r} (set config.data.train_split / "
                        "test_split)")
    try:
        records = builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:  # prepared as TFRecord: no random access
        raise DataError(f"{where} was prepared as {builder.info.file_format.value}, which cannot be read by random "
                        f"access; prepare it with file_format='array_record' ({one_line(e)})") from None
    except Exception as e:
        raise DataError(f"{where}: cannot read split {split!r}: {one_line(e)}") from None
    if len(records) == 0:
        raise DataError(f"{where}: split {split!r} is empty")
    return records


def tfds(path: str = "", dataset: str = "", keys: tuple = (), train_split: str = "train", test_split: str = "test",
         num_classes: int = 0, image_size: int = 224, normalize: str = "imagenet",
         skip_bad_images: bool = False) -> Dataset:
    """A prepared TFDS data set in a local data_dir (see the module docstring)."""
    builder = _builder(path, dataset)
    where = f"TFDS data set {builder.info.full_name} in {path}"
    features = builder.info.features
    _parse_keys(keys)  # each item is 'name=feature'
    given = dict(str(item).split("=", 1) for item in keys)
    mapping = {key: next((c for c in names if c in features), key) for key, names in DEFAULT_COLUMNS.items()} | given
    missing = [c for c in mapping.values() if c not in features]
    if missing:
        raise DataError(f"{where} has no feature {missing[0]!r} (features: {', '.join(features)}; map them with "
                        "config.data.keys, e.g. ('x=pixels', 'y=label'))")
    tfds_lib = _tfds()
    is_image = isinstance(features[mapping["x"]], tfds_lib.features.Image)
    decoders = {mapping["x"]: tfds_lib.decode.SkipDecoding()} if is_image else None
    _check_numeric(features, {k: c for k, c in mapping.items() if not (is_image and k == "x")}, where)
    splits = {s: _split(builder, s, decoders, where) for s in (train_split, test_split)}
    label = features[mapping["y"]]
    names = list(label.names) if isinstance(label, tfds_lib.features.ClassLabel) else None
    if names is not None and num_classes and num_classes < label.num_classes:
        raise DataError(f"config.data.num_classes={num_classes} is less than the {label.num_classes} classes of "
                        f"feature {mapping['y']!r} of {where} (leave it 0 to take them from the data set)")
    num_classes = num_classes or (label.num_classes if names is not None else 0)
    metadata = {"classes": names} if names else {}
    if is_image:
        images.check_normalize(normalize, image_size)
        metadata |= {"normalize": images.NORMALIZE[normalize], "kind": "images"}

        def source(split: str) -> images.ImageSource:
            records = splits[split]

            def fetch(i: int) -> tuple[bytes, int]:
                record = records[int(i)]
                return record[mapping["x"]], int(record[mapping["y"]])

            return images.ImageSource(fetch, len(records), image_size, split, skip_bad_images, where)

        train, test = source(train_split), source(test_split)
    else:
        train, test = (FeatureSource(splits[s], mapping, s) for s in (train_split, test_split))
    return Dataset(train=train, test=test, name=builder.info.name, num_classes=num_classes or None, metadata=metadata)
