"""`array_record`: shards of serialised examples that grain reads by random access (what a TPU pod streams).

A folder written by `dlfx data convert` (`convert`): `train-00000-of-00004.array_record`, ...,
`val-00000-of-00001.array_record` and `meta.json`. Each record is one example serialised with
safetensors (a documented, pickle-free format: a JSON header and raw little-endian buffers), one tensor
per key; image examples keep their encoded file bytes (`image`, uint8) and `label`, decoded and
augmented per record like `image_folder`. `meta.json`: `kind` (`images` or `arrays`), `num_classes`,
`classes`, and per split the shard names and example count.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

from dlfx.data import images
from dlfx.data.access import as_source, length, read
from dlfx.data.sources import Dataset
from dlfx.errors import DataError, one_line

SPLITS = (("train", "train"), ("val", "test"))  # file prefix, Dataset field


def serialize(example: dict[str, np.ndarray]) -> bytes:
    """One example as safetensors bytes (no pickle)."""
    from safetensors.numpy import save

    return save({k: np.require(np.asarray(v), requirements="C") for k, v in example.items()})  # keeps 0-d


def deserialize(record: bytes) -> dict[str, np.ndarray]:
    """The arrays of one record."""
    from safetensors.numpy import load

    return load(record)


class RecordSource:
    """Random access to the examples of one split's shards (grain's ArrayRecordDataSource underneath)."""

    def __init__(self, paths: list[str]):
        import grain

        self.paths = paths
        self.records = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return deserialize(self.records[int(index)])

    def __repr__(self) -> str:
        return f"RecordSource({len(self.paths)} shards)"


def _open(shards: list[str], meta_path: str) -> RecordSource:
    """A split's RecordSource, or one DataError naming the first shard that does not open as ArrayRecord."""
    try:
        return RecordSource(shards)
    except Exception as e:
        error = e
    for shard in shards:
        try:
            RecordSource([shard])
        except Exception as e:
            error, bad = e, shard
            break
    else:
        bad = shards[0]
    raise DataError(f"{bad} (listed in {meta_path}) is not a readable ArrayRecord shard: {one_line(error)}") from None


def _image_source(records: RecordSource, size: int, name: str, skip_bad: bool = False) -> images.ImageSource:
    def fetch(i: int) -> tuple[bytes, int]:
        try:
            example = records[i]
        except Exception as e:  # a damaged record (a checksum mismatch) inside a shard that opened
            raise DataError(f"example {i} of {os.path.dirname(records.paths[0])} ({name}) does not read back: "
                            f"{one_line(e)}") from None
        return example["image"].tobytes(), int(example["label"])

    return images.ImageSource(fetch, len(records), size, name, skip_bad, os.path.dirname(records.paths[0]))


def array_record(path: str = "", image_size: int = 224, normalize: str = "imagenet",
                 skip_bad_images: bool = False) -> Dataset:
    """A folder of ArrayRecord shards written by `dlfx data convert` (see the module docstring)."""
    if not path:
        raise DataError("config.data.path must name a folder written by `dlfx data convert`")
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        listed = {prefix: meta["splits"][prefix]["shards"] for prefix, _ in SPLITS}
        for prefix, shards in listed.items():
            if not (isinstance(shards, list) and shards and all(isinstance(s, str) and s for s in shards)):
                raise DataError(f"{meta_path} is not a dlfx ArrayRecord description: splits.{prefix}.shards must "
                                f"be a non-empty list of shard file names, got {json.dumps(shards)[:80]}")
        splits = {prefix: [os.path.join(path, shard) for shard in shards] for prefix, shards in listed.items()}
        kind = meta["kind"]
    except FileNotFoundError:
        raise DataError(f"config.data.path: {meta_path} does not exist (write the folder with `dlfx data convert`)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path} is not a dlfx ArrayRecord description: {one_line(e)}") from None
    missing = [p for shards in splits.values() for p in shards if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{missing[0]} (listed in {meta_path}) does not exist")
    listed_times = collections.Counter(os.path.normpath(p) for shards in splits.values() for p in shards)
    twice = sorted(p for p, times in listed_times.items() if times > 1)
    if twice:  # its examples would be read twice an epoch, or be both trained and evaluated on
        raise DataError(f"{meta_path} lists {os.path.basename(twice[0])} more than once")
    sources = {prefix: _open(shards, meta_path) for prefix, shards in splits.items()}
    for prefix, source in sources.items():
        expected = meta["splits"][prefix].get("num_examples")
        # a shard left out of (or added to) the list
        if isinstance(expected, int) and not isinstance(expected, bool) and expected != len(source):
            raise DataError(f"{meta_path}: splits.{prefix} says {expected} examples but its shards hold "
                            f"{len(source)}: is its shard list complete?")
    metadata: dict[str, Any] = {"kind": kind}
    if meta.get("classes"):
        metadata["classes"] = meta["classes"]
    if kind == "images":
        images.check_normalize(normalize, image_size)
        metadata["normalize"] = images.NORMALIZE[normalize]
        train, test = (_image_source(sources[p], image_size, p, skip_bad_images) for p, _ in SPLITS)
    else:
        train, test = sources["train"], sources["val"]
    return Dataset(train=train, test=test, name=os.path.basename(path.rstrip("/")) or "array_record",
                   num_classes=meta.get("num_classes"), metadata=metadata)


def _writing(out: str, write: Any) -> Any:
    """`write()`; the ArrayRecord writer's RuntimeError (a full disk) as one DataError line naming --out."""
    try:
        return write()
    except RuntimeError as e:
        raise DataError(f"cannot write --out {out}: {one_line(e)}") from None


def _verify_image(encoded: bytes, path: str) -> None:
    """A DataError naming `path` if its bytes are not a whole image (Pillow's structural check, no decode): the
    shards keep bytes, not file names, so a damaged file is caught here or not by name at all."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image.verify()
    except Exception as e:
        raise DataError(f"{path} is not a readable image ({one_line(e)}); fix or remove it before converting") from None


def _examples(kind: str, split: Any) -> Any:
    """(index, example dict) of a split in order: encoded bytes for images, arrays otherwise."""
    if kind == "images":
        paths, labels = split
        for path, label in zip(paths, labels):
            with open(path, "rb") as f:
                encoded = f.read()
            _verify_image(encoded, path)
            yield {"image": np.frombuffer(encoded, np.uint8), "label": np.int32(label)}
    else:
        for start in range(0, length(split), 1024):
            batch = read(split, np.arange(start, min(start + 1024, length(split))))
            for i in range(len(next(iter(batch.values())))):
                yield {k: v[i] for k, v in batch.items()}


def convert(kind: str, source: str, out: str, shards: int = 1, **options: Any) -> dict:
    """Write `dlfx data convert`'s folder from an `image_folder` (encoded files, no re-encoding) or an `arrays`
    source (`options`: its arguments, e.g. test_fraction); streamed into a hidden stage beside OUT, then renamed."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dlfx.data import files

    if shards < 1:
        raise DataError(f"--shards must be >= 1, got {shards}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"--out {out} exists and is not an empty folder")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise DataError(f"--out {out}: its folder does not exist")
    if kind == "image_folder":
        train, val, classes = images.scan_folder(source)
        splits, meta = {"train": train, "val": val}, {"kind": "images", "num_classes": len(classes), "classes": classes}
        counts = {"train": len(train[0]), "val": len(val[0])}
    elif kind == "arrays":
        dataset = files.arrays(source, **options)
        from dlfx.data import _check_dataset  # numbers only: safetensors stores no strings or objects

        _check_dataset(dataset, source)
        splits = {"train": as_source(dataset.train), "val": as_source(dataset.test)}
        meta = {"kind": "arrays", "num_classes": dataset.num_classes, "classes": []}
        counts = {prefix: length(split) for prefix, split in splits.items()}
    else:
        raise DataError(f"--from {kind!r} is not one of image_folder, arrays")
    with files.staged_output(out) as stage:
        meta["splits"] = {}
        for prefix, split in splits.items():
            count = min(shards, max(counts[prefix], 1)) if prefix == "train" else 1
            names = [f"{prefix}-{i:05d}-of-{count:05d}.array_record" for i in range(count)]
            per_shard = -(-counts[prefix] // count)  # contiguous blocks keep the split's order
            writers = _writing(out, lambda: [ArrayRecordWriter(os.path.join(stage, n), "group_size:1") for n in names])
            for index, example in enumerate(_examples(meta["kind"], split)):
                _writing(out, lambda: writers[index // per_shard].write(serialize(example)))
            for writer in writers:
                _writing(out, writer.close)
            meta["splits"][prefix] = {"shards": names, "num_examples": counts[prefix]}
        with open(os.path.join(stage, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return meta
