"""grain input pipeline: seeded, reshuffled each epoch, sharded per process, checkpointable."""

from __future__ import annotations

import math
from typing import Iterator

import grain
import numpy as np

from dlfx.errors import DataError


class ArraySource:
    """Random-access grain source over a dict of equally long numpy arrays."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"arrays of a split differ in length: {lengths}")
        self._arrays = arrays
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self._arrays.items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, stacked into one batch."""
        return {k: v[indices] for k, v in self._arrays.items()}

    def __repr__(self) -> str:  # grain compares reprs when it restores a checkpointed iterator
        shapes = {k: v.shape for k, v in self._arrays.items()}
        return f"ArraySource({shapes})"


def augment_images(batch: dict[str, np.ndarray], rng: np.random.Generator, crop_padding: int,
                   random_flip: bool, part: slice | None = None, global_size: int | None = None) -> dict[str, np.ndarray]:
    """Random crop after zero padding, and random horizontal flip, of a batch of NHWC images.

    A process holding rows `part` of a global batch of `global_size` draws the random numbers of the
    whole global batch and uses its rows, so the augmentation does not depend on the process count.
    """
    x = batch["x"]
    if x.ndim != 4:
        raise DataError(f"image augmentation needs NHWC images, got batch shape {x.shape}")
    size, part = (global_size or len(x)), (part or slice(0, len(x)))
    if crop_padding:
        p = crop_padding
        padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = rng.integers(0, 2 * p + 1, size=(size, 2))[part]
        height, width = x.shape[1:3]
        x = np.stack([padded[i, dy:dy + height, dx:dx + width] for i, (dy, dx) in enumerate(offsets)])
    if random_flip:
        flip = (rng.random(size) < 0.5)[part]
        x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return {**batch, "x": x}


class _EpochBatches:
    """Batch number -> this process's rows of that global batch: a fresh seeded permutation every epoch.

    The global batch is the same for any process count (process i takes rows i*B/P..(i+1)*B/P of it),
    so P processes train exactly like one and a run can resume with another process count.
    """

    def __init__(self, num_examples: int, global_batch_size: int, seed: int, process_index: int,
                 process_count: int):
        self.num_examples, self.global_batch_size, self.seed = num_examples, global_batch_size, seed
        self.batches_per_epoch = num_examples // global_batch_size
        local = global_batch_size // process_count
        self.part = slice(process_index * local, (process_index + 1) * local)
        self._epoch, self._order = -1, np.arange(num_examples)

    def __call__(self, batch_number: int) -> np.ndarray:
        epoch, position = divmod(int(batch_number), self.batches_per_epoch)
        if epoch != self._epoch:  # the permutation depends only on (seed, epoch): resume-exact
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._epoch = epoch
        start = position * self.global_batch_size
        return self._order[start:start + self.global_batch_size][self.part]


def train_iterator(arrays: dict[str, np.ndarray], global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1, crop_padding: int = 0,
                   random_flip: bool = False, num_threads: int = 0) -> grain.DatasetIterator:
    """Endless iterator of this process's rows of each global batch, reshuffled every epoch.

    Elements of the grain dataset are whole batches (one gather per batch, not one read per example);
    its state is a global batch counter, the same on every process, so it restores under any process
    count. The iterator supports get_state/set_state. `num_threads=0` reads in the calling thread: the
    runner's device prefetcher is already a reader thread, and grain's pool adds ~35 us per batch.
    """
    if global_batch_size % process_count:
        raise DataError(f"config.data.batch_size={global_batch_size} is not divisible by the "
                        f"{process_count} processes")
    source = ArraySource(arrays)
    if len(source) < global_batch_size:
        raise DataError(f"train split has {len(source)} examples, fewer than one batch of "
                        f"config.data.batch_size={global_batch_size}")
    indices = _EpochBatches(len(source), global_batch_size, seed, process_index, process_count)
    dataset = grain.MapDataset.range(2**62).map(lambda b: source.gather(indices(b)))
    if crop_padding or random_flip:  # seeded per batch number, so a resumed stream is augmented identically
        dataset = dataset.random_map(
            lambda batch, rng: augment_images(batch, rng, crop_padding, random_flip, indices.part, global_batch_size),
            seed=seed + 1)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return iter(dataset.to_iter_dataset(options))


def num_examples(arrays: dict[str, np.ndarray]) -> int:
    """The length of a split (every array has it)."""
    return len(next(iter(arrays.values())))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full global batches in one pass over a split."""
    return max(num_examples // global_batch_size, 1)


def eval_batches(arrays: dict[str, np.ndarray], global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This process's part of every eval batch over the whole split, padded, with a 0/1 'mask'.

    Every example is seen exactly once; all processes yield the same number of batches.
    """
    num_examples = len(next(iter(arrays.values())))
    if num_examples == 0:
        raise DataError("eval split is empty")
    local_batch_size = global_batch_size // process_count
    num_batches = math.ceil(num_examples / global_batch_size)
    local = {k: v[process_index::process_count] for k, v in arrays.items()}
    num_local = len(local["y"]) if "y" in local else len(next(iter(local.values())))
    padded_len = num_batches * local_batch_size
    mask = np.zeros(padded_len, np.float32)
    mask[:num_local] = 1.0
    padded = {}
    for k, v in local.items():
        out = np.zeros((padded_len, *v.shape[1:]), v.dtype)
        out[:num_local] = v
        padded[k] = out
    for b in range(num_batches):
        window = slice(b * local_batch_size, (b + 1) * local_batch_size)
        batch = {k: v[window] for k, v in padded.items()}
        batch["mask"] = mask[window]
        yield batch
