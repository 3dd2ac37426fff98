"""The runner's device feed: host batches placed on the devices ahead of the step that needs them."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dlfx import data, parallel, steps


def call_sizes(exp) -> Any:
    """Batch position -> steps the call starting there runs (`train.steps_per_call`, or 1 up to a log,
    eval or checkpoint point); None without multi-step calls."""
    t = exp.config.train
    if t.steps_per_call == 1:
        return None
    every = (t.log_every, t.eval_every, t.checkpoint_every)
    return lambda position: steps.steps_in_call(position, t.steps_per_call, exp.total_steps, every)


MAX_TRANSFER_CHUNK = 16  # batches per transfer (one device, one step per call)
MAX_TRANSFER_BYTES = 4 << 20  # ... and at most this many bytes per transfer


def transfer_chunk(exp) -> int:
    """Batches per host-to-device transfer when each call runs one step: several on one device, where a
    transfer's fixed cost (~30 us per array on CPU) is worth amortizing; else 1. Several devices keep one
    transfer per step: splitting a chunk is a device program, kept out of the way of collective steps."""
    if (exp.config.train.steps_per_call > 1 or exp.mesh.devices.size > 1 or jax.process_count() > 1
            or exp.mode == "pmap"):
        return 1
    spec = {"index": ((), np.int32)} if exp.resident else data.access.element_spec(exp.dataset.train)
    batch_bytes = exp.config.data.batch_size * sum(int(np.prod(shape)) * np.dtype(dtype).itemsize
                                                   for shape, dtype in spec.values())
    return int(max(1, min(MAX_TRANSFER_CHUNK, MAX_TRANSFER_BYTES // max(batch_bytes, 1))))


def device_prefetcher(exp, host_iter, group: Any = None) -> data.DevicePrefetcher:
    """The runner's device feed: batches placed on the devices two calls ahead, off the training thread;
    `group(position)` batches stacked per multi-step call, or several per transfer on one device (see
    `transfer_chunk`)."""
    def place_stack(b):
        return parallel.shard_batch(b, exp.mesh, exp.mode, stacked=True)

    chunk = transfer_chunk(exp)
    return data.DevicePrefetcher(host_iter, lambda b: parallel.shard_batch(b, exp.mesh, exp.mode),
                                 group=group, place_stack=place_stack, chunk=chunk,
                                 unstack=parallel.unstack_batches)
