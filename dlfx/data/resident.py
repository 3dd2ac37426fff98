"""Device-resident training data: a small in-memory train split held on every device, each batch gathered by
index inside the compiled step, so the host sends only the batch's row numbers (`config.data.on_device`).

The rows are those of the host pipeline (the same seeded per-epoch order, the same process split), so a run
trains on the same batches with the data on the host or on the devices, and resumes from the same position.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlfx.data import access
from dlfx.errors import ConfigError

CHOICES = ("auto", "on", "off")
UNKNOWN_MEMORY_LIMIT = 256 << 20  # bytes per device for `auto` where the device reports no memory size (CPU)
MEMORY_FRACTION = 8  # `auto` keeps the split on the device when it needs at most 1/8 of the device's memory
INDEX_KEY = "index"
SLOT_KEY = "slot"  # a chunk's step, for batches that carry the row indices of several steps (`slotted`)


def split_arrays(split: Any) -> Mapping[str, np.ndarray] | None:
    """The split's arrays when it is held in memory (a dict of arrays or an ArraySource), else None."""
    if isinstance(split, access.ArraySource):
        return split.arrays
    if hasattr(split, "rows"):  # part of memory-mapped arrays (data.test_fraction): its rows, read into memory
        return split.rows()
    return None if access.is_source(split) else split


def _memory_mapped(split: Any) -> bool:
    """True when the split reads from memory-mapped files."""
    arrays = getattr(split, "arrays", None) if access.is_source(split) else split
    return any(isinstance(v, np.memmap) for v in (arrays or {}).values())


def _why_not(config: Any, split: Any, devices: list) -> str | None:
    """Why the train split cannot (or, under `auto`, should not) live on the devices; None if it can."""
    if not (_memory_mapped(split) or isinstance(split, access.ArraySource) or not access.is_source(split)):
        return "the train split is a streamed source, read per batch (only arrays can be placed)"
    if config.data.crop_padding or config.data.random_flip:
        return "data.crop_padding / data.random_flip augment batches on the host"
    if config.data.workers:
        return "data.workers > 0 reads batches in worker processes"
    if config.data.on_device == "auto" and _memory_mapped(split):
        return "the train split is memory-mapped from a file"
    arrays = split_arrays(split)
    size = sum(np.asarray(v).nbytes for v in arrays.values())
    try:
        stats = devices[0].memory_stats()
    except (AttributeError, IndexError, jax.errors.JaxRuntimeError):  # none addressable (an AOT topology's)
        stats = None
    limit = (stats or {}).get("bytes_limit", 0) // MEMORY_FRACTION or UNKNOWN_MEMORY_LIMIT
    if config.data.on_device == "auto" and size > limit:
        return f"the train split ({size / 2**20:.0f} MiB) is over {limit / 2**20:.0f} MiB per device"
    return None


def decide(config: Any, split: Any, mesh: Mesh) -> bool:
    """Whether the runner keeps the train split on the devices: `config.data.on_device` = auto (when it is
    in memory, small, and augmented nowhere), on (refused with the reason when it cannot be), off."""
    choice = config.data.on_device
    if choice not in CHOICES:
        raise ConfigError(f"config.data.on_device={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "off":
        return False
    reason = _why_not(config, split, list(mesh.local_devices))
    if reason and choice == "on":
        raise ConfigError(f"config.data.on_device='on' cannot be used: {reason}")
    return reason is None


def place(split: Any, mesh: Mesh) -> dict[str, jax.Array]:
    """The train split's arrays, whole on every device of the mesh (every process holds the same split)."""
    sharding = NamedSharding(mesh, P())
    arrays = split_arrays(split)
    if jax.process_count() == 1:
        return jax.device_put({k: np.asarray(v) for k, v in arrays.items()}, sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: np.asarray(v[index]))
            for k, v in arrays.items()}


def gather(tables: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Inside a compiled step: the examples at `batch['index']`, from the device-resident split. With a
    `batch['slot']` (shape (1,)), `index` holds the rows of several steps (steps, batch) and the step takes
    row `slot` of it (`slotted`)."""
    index = call_rows(batch)[INDEX_KEY]
    return {k: jnp.take(v, index, axis=0) for k, v in tables.items()}


def call_rows(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Inside a compiled call: its row indices, entry `slot` of a chunk of several steps' (steps, batch) or
    several multi-step calls' (calls, steps, batch) where the batch has a slot; else the batch as it is."""
    if SLOT_KEY not in batch:
        return dict(batch)
    index = jax.lax.dynamic_index_in_dim(batch[INDEX_KEY], batch[SLOT_KEY].reshape(-1)[0], axis=0, keepdims=False)
    return {INDEX_KEY: index}


def slotted(mesh: Mesh, stacked: bool = False) -> Callable[[Mapping[str, jax.Array]], list[dict[str, jax.Array]]]:
    """`split(chunk)`: per-step batches of a placed chunk of row indices (steps, batch), each the whole chunk
    and its step's slot (device arrays made once): no device program per chunk, unlike splitting it.
    `stacked`: the chunk holds several multi-step calls (calls, steps, batch), split into per-call batches
    (their slot has shape (1, 1), laid out like a stack of batches)."""
    axes = tuple(mesh.axis_names)
    sharding = NamedSharding(mesh, P(None, axes) if stacked else P(axes))
    slots: list[jax.Array] = []

    def split(chunk: Mapping[str, jax.Array]) -> list[dict[str, jax.Array]]:
        count = len(chunk[INDEX_KEY])
        while len(slots) < count:
            slot = np.full((1, 1) if stacked else (1,), len(slots), np.int32)
            slots.append(jax.device_put(slot, sharding))
        return [{INDEX_KEY: chunk[INDEX_KEY], SLOT_KEY: slots[j]} for j in range(count)]

    return split
