"""One way to read a split, whatever holds it: a dict of equal-length arrays or a random-access source.

A random-access source is what grain's `MapDataset.source` takes: `__len__` and `__getitem__(i) -> dict of
numpy arrays`. A source may also define `gather(indices) -> dict of stacked arrays` to read a whole batch in
one go (memory-mapped files do: one fancy index instead of a Python loop).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from dlfx.errors import DataError, one_line


class ArraySource:
    """Random-access source over a dict of equally long arrays (numpy, or memory-mapped numpy)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"arrays of a split differ in length: {lengths}")
        self.arrays = dict(arrays)
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked into one batch."""
        return {k: np.asarray(v[indices]) for k, v in self.arrays.items()}

    def __repr__(self) -> str:  # grain compares reprs when it restores a checkpointed iterator
        shapes = {k: v.shape for k, v in self.arrays.items()}
        return f"ArraySource({shapes})"


def is_source(split: Any) -> bool:
    """True for a random-access source (not a dict of arrays)."""
    return not isinstance(split, Mapping) and hasattr(split, "__len__") and hasattr(split, "__getitem__")


def as_source(split: Any) -> Any:
    """The split as a random-access source (a dict of arrays is wrapped)."""
    return split if is_source(split) else ArraySource(split)


def length(split: Any) -> int:
    """Examples in a split."""
    return len(split) if is_source(split) else len(next(iter(split.values())))


def read(split: Any, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The examples at `indices` as one batch (a dict of stacked arrays)."""
    indices = np.asarray(indices, np.int64)
    source = as_source(split)
    if isinstance(source, ArraySource):
        return source.gather(indices)
    if hasattr(source, "gather"):
        return _reading(source, indices, lambda: source.gather(indices))
    records = [(int(i), _reading(source, [i], lambda: source[int(i)])) for i in indices]
    if not records:
        first = source[0]
        return {k: np.zeros((0, *np.shape(v)), np.asarray(v).dtype) for k, v in first.items()}
    return _stack(records, type(source).__name__)


def _reading(source: Any, indices: Sequence[int], read_them: Any) -> Any:
    """`read_them()`; a user's source failing names the example(s) it was asked for, not a reader-thread frame."""
    try:
        return read_them()
    except DataError:
        raise
    except Exception as e:
        where = f"example {indices[0]}" if len(indices) == 1 else f"examples {min(indices)}..{max(indices)}"
        raise DataError(f"reading {where} of data source {type(source).__name__} failed: {one_line(e)}") from None


def _stack(records: list[tuple[int, Mapping]], source: str) -> dict[str, np.ndarray]:
    """Examples [(index, {key: array})] stacked into a batch; one that differs in keys or shapes is named."""
    first_index, first = records[0]
    try:
        return {k: np.stack([np.asarray(r[k]) for _, r in records]) for k in first}
    except (ValueError, KeyError, TypeError):
        pass  # find the example at fault
    for index, record in records:
        if not isinstance(record, Mapping) or set(record) != set(first):
            got = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise DataError(f"data source {source}: example {index} has keys {got}, example {first_index} "
                            f"{sorted(first)}")
        for key in first:
            if np.shape(record[key]) != np.shape(first[key]):
                raise DataError(f"data source {source}: example {index} has {key!r} of shape "
                                f"{np.shape(record[key])}, example {first_index} {np.shape(first[key])}")
    return {k: np.stack([np.asarray(r[k]) for _, r in records]) for k in first}


def element_spec(split: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape of one example, dtype)}, read from the first example."""
    if not is_source(split):
        return {k: (tuple(v.shape[1:]), v.dtype) for k, v in split.items()}
    first = split[0]
    if not isinstance(first, Mapping):
        raise DataError(f"a data source's examples must be dicts of arrays, got {type(first).__name__}")
    return {k: (tuple(np.shape(v)), np.asarray(v).dtype) for k, v in first.items()}


def batches(split: Any, batch_size: int) -> Any:
    """The whole split in order, `batch_size` examples at a time (the last batch may be shorter)."""
    total = length(split)
    for start in range(0, total, batch_size):
        yield read(split, np.arange(start, min(start + batch_size, total)))
